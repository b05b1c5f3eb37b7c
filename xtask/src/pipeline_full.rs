//! `cargo xtask pipeline-full`: full-size Kandinsky 2.2 prior and decoder folders (random
//! weights that diffusers builds from the real configs, in the hub's layout and stored dtypes),
//! diffusers' text2img on them against kandinsky-rs', then the `kandinsky` CLI on the same
//! folders.
//!
//! 1. `xtask/fixtures/full_pipeline.py build` writes `target/pipeline-full/kandinsky-2-2-prior`
//!    and `…/kandinsky-2-2-decoder` (≈ 16 GB: the repositories' sizes).
//! 2. `full_pipeline.py reference` runs diffusers (prior 2 steps, decoder 2 DDPM steps at
//!    256×256, every Gaussian draw recorded).
//! 3. `kandinsky-pipeline/examples/compare_pipeline_full.rs` loads the folders with the library's
//!    loaders, replays the noise and compares (≤ 1e-3 on the image).
//! 4. The CLI runs `text2img` on the folders twice with one seed (the second run reads the
//!    cached zero-image embedding instead of loading the image encoder): both PNGs must be
//!    identical; then `img2img`, `mix` and `prior`. Wall time and peak RSS
//!    (`/usr/bin/time`) are printed for each.
//!
//! Needs ≈ 17 GB of free RAM (the prior folder in f32) and ≈ 17 GB of disk. `--regenerate`
//! rebuilds the weights; they are kept for the next run: delete `target/pipeline-full` to
//! free the disk.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::python::{cargo, require_memory_gb, root, run, target_dir, venv_python};

/// Run one CLI subcommand on the full-size folders (`flow_args` after the subcommand; the
/// output goes to `<out>/<name>.png` or `.safetensors`); returns the output's bytes and
/// prints `/usr/bin/time`'s wall time and peak RSS when present.
fn cli(out: &Path, name: &str, flow_args: &[&str]) -> Result<Vec<u8>> {
    let bin = target_dir().join("release/kandinsky");
    let ext = if flow_args.first() == Some(&"prior") {
        "safetensors"
    } else {
        "png"
    };
    let file = out.join(format!("{name}.{ext}"));
    let timer = Path::new("/usr/bin/time");
    let mut cmd = if timer.is_file() {
        let mut c = Command::new(timer);
        c.args(["-f", "  wall %e s, peak RSS %M kB"]).arg(&bin);
        c
    } else {
        Command::new(&bin)
    };
    cmd.args(flow_args)
        .arg("--prior")
        .arg(out.join("kandinsky-2-2-prior"))
        .args(["--prior-steps", "2", "--seed", "7", "--out"])
        .arg(&file)
        // The zero-image embedding cache of this run only, not the user's.
        .env("XDG_CACHE_HOME", out.join("cache"))
        .env("HF_HUB_OFFLINE", "1");
    if ext == "png" {
        cmd.arg("--decoder")
            .arg(out.join("kandinsky-2-2-decoder"))
            .args(["--width", "256", "--height", "256", "--steps", "2"]);
    }
    eprintln!("CLI {name}:");
    run(&mut cmd)?;
    std::fs::read(&file).with_context(|| format!("reading {}", file.display()))
}

/// Run the whole check.
pub fn pipeline_full(args: &[String]) -> Result<()> {
    let root = root();
    let out = root.join("target/pipeline-full");
    let regenerate = args.iter().any(|a| a == "--regenerate");
    require_memory_gb(17.0, "the full prior folder in f32")?;
    let python = venv_python()?;
    let script = root.join("xtask/fixtures/full_pipeline.py");
    let built = out.join("kandinsky-2-2-decoder/movq/diffusion_pytorch_model.safetensors");
    if regenerate || !built.is_file() {
        eprintln!(
            "diffusers: building full-size random-weight folders in {}",
            out.display()
        );
        std::fs::create_dir_all(&out).context("creating target/pipeline-full")?;
        run(Command::new(&python).arg(&script).arg(&out).arg("build"))?;
    } else {
        eprintln!(
            "reusing the folders in {} (--regenerate rewrites them)",
            out.display()
        );
    }
    if regenerate || !out.join("reference.safetensors").is_file() {
        eprintln!("diffusers: text2img reference");
        run(Command::new(&python)
            .arg(&script)
            .arg(&out)
            .arg("reference")
            .env("HF_HUB_OFFLINE", "1"))?;
    }
    // Two builds: `--example` alone would skip the CLI's binary.
    run(cargo()
        .current_dir(&root)
        .args(["build", "--release", "-p", "kandinsky-cli"]))?;
    run(cargo().current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "kandinsky-pipeline",
        "--example",
        "compare_pipeline_full",
    ]))?;
    run(Command::new(target_dir().join("release/examples/compare_pipeline_full")).arg(&out))?;

    let cache = out.join("cache");
    if cache.exists() {
        std::fs::remove_dir_all(&cache).context("clearing the run's cache")?;
    }
    const PROMPT: &str = "a portrait of a red fox in a snowy forest, oil painting";
    let text2img = [
        "text2img",
        "--prompt",
        PROMPT,
        "--negative-prompt",
        "blurry, low quality",
    ];
    let first = cli(&out, "cli-text2img", &text2img)?;
    let second = cli(&out, "cli-text2img-cached", &text2img)?;
    if first != second {
        bail!("the CLI wrote different PNGs for one seed (first run vs cached zero embedding)");
    }
    eprintln!(
        "CLI: both text2img runs wrote the same {} bytes",
        first.len()
    );
    // The other flows these folders serve: img2img through the full MoVQ encoder, fusion
    // through the full image encoder, and the prior alone.
    let init = out.join("cli-text2img.png");
    let init = init.to_str().context("non-UTF-8 path")?;
    cli(
        &out,
        "cli-img2img",
        &[
            "img2img",
            "--prompt",
            "a watercolor painting",
            "--image",
            init,
            "--strength",
            "0.5",
        ],
    )?;
    cli(
        &out,
        "cli-mix",
        &[
            "mix",
            "--prompt",
            "a cat",
            "--text-weight",
            "0.3",
            "--mix-image",
            init,
            "--image-weight",
            "0.7",
        ],
    )?;
    cli(&out, "cli-prior", &["prior", "--prompt", PROMPT])?;
    Ok(())
}
