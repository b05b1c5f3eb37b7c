//! `cargo xtask pipeline-full`: full-size Kandinsky 2.2 prior and decoder folders (random
//! weights that diffusers builds from the real configs, in the hub's layout and stored dtypes),
//! diffusers' text2img on them against kandinsky-rs', then the `kandinsky` CLI on the same
//! folders.
//!
//! 1. `xtask/fixtures/full_pipeline.py build` writes `target/pipeline-full/kandinsky-2-2-prior`
//!    and `…/kandinsky-2-2-decoder` (≈ 16 GB: the repositories' sizes).
//! 2. `full_pipeline.py reference` runs diffusers (prior 2 steps, decoder 2 DDPM steps at
//!    256×256, every Gaussian draw recorded).
//! 3. `kandinsky-pipeline/examples/compare_full.rs` loads the folders with the library's
//!    loaders, replays the noise and compares (≤ 1e-3 on the image).
//! 4. The CLI runs `text2img` on the folders twice with one seed (the second run reads the
//!    cached zero-image embedding instead of loading the image encoder): both PNGs must be
//!    identical; wall time and peak RSS (`/usr/bin/time`) are printed.
//!
//! Needs ≈ 17 GB of free RAM (the prior folder in f32) and ≈ 17 GB of disk. `--regenerate`
//! rebuilds the weights; they are kept for the next run: delete `target/pipeline-full` to
//! free the disk.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::python::{mem_available_gb, root, run, venv_python};

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Run the CLI once; returns the PNG bytes and prints `/usr/bin/time`'s summary when present.
fn cli_text2img(root: &Path, out: &Path, name: &str) -> Result<Vec<u8>> {
    let bin = root.join("target/release/kandinsky");
    let png = out.join(format!("{name}.png"));
    let timer = Path::new("/usr/bin/time");
    let mut cmd = if timer.is_file() {
        let mut c = Command::new(timer);
        c.args(["-f", "  wall %e s, peak RSS %M kB"]).arg(&bin);
        c
    } else {
        Command::new(&bin)
    };
    cmd.arg("text2img")
        .args([
            "--prompt",
            "a portrait of a red fox in a snowy forest, oil painting",
        ])
        .args(["--negative-prompt", "blurry, low quality"])
        .arg("--prior")
        .arg(out.join("kandinsky-2-2-prior"))
        .arg("--decoder")
        .arg(out.join("kandinsky-2-2-decoder"))
        .args(["--width", "256", "--height", "256", "--steps", "2"])
        .args(["--prior-steps", "2", "--seed", "7", "--out"])
        .arg(&png)
        // The zero-image embedding cache of this run only, not the user's.
        .env("XDG_CACHE_HOME", out.join("cache"))
        .env("HF_HUB_OFFLINE", "1");
    eprintln!("CLI {name}:");
    run(&mut cmd)?;
    std::fs::read(&png).with_context(|| format!("reading {}", png.display()))
}

/// Run the whole check.
pub fn pipeline_full(args: &[String]) -> Result<()> {
    let root = root();
    let out = root.join("target/pipeline-full");
    let regenerate = args.iter().any(|a| a == "--regenerate");
    if let Some(gb) = mem_available_gb() {
        eprintln!("available memory: {gb:.1} GB");
        if gb < 17.0 {
            bail!("the full prior folder needs ≈ 17 GB of free RAM in f32; {gb:.1} GB available");
        }
    }
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
        "compare_full",
    ]))?;
    run(Command::new(root.join("target/release/examples/compare_full")).arg(&out))?;

    let cache = out.join("cache");
    if cache.exists() {
        std::fs::remove_dir_all(&cache).context("clearing the run's cache")?;
    }
    let first = cli_text2img(&root, &out, "cli-first")?;
    let second = cli_text2img(&root, &out, "cli-cached")?;
    if first != second {
        bail!("the CLI wrote different PNGs for one seed (first run vs cached zero embedding)");
    }
    eprintln!("CLI: both runs wrote the same {} bytes", first.len());
    Ok(())
}
