//! `cargo xtask movq-full`: the full-size MoVQ (Kandinsky 2.2 `movq`), diffusers vs
//! kandinsky-rs, with the same random weights.
//!
//! Python builds `VQModel` at the real config (PyTorch's default init, seed 0), writes it with
//! `save_pretrained` (271 MB of f32 safetensors) plus random 32×32 latents and its 256×256
//! decode (`force_not_quantize=True`, as the pipelines) under `target/movq-full/`; then the
//! Rust example `kandinsky-movq/examples/movq_full.rs` (release build) loads those weights,
//! decodes the same latents and prints the max abs difference and both run times.

use std::process::Command;

use anyhow::{Context, Result};

use crate::python::{cargo, root, run, venv_python};

const PYTHON: &str = r#"
import sys, time
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[2])
from common import REAL_MOVQ, save_tensors, seed_all
from diffusers import VQModel

out = Path(sys.argv[1])
seed_all(0)
movq = VQModel(**REAL_MOVQ).eval()
movq.save_pretrained(out / "movq", safe_serialization=True)
g = torch.Generator().manual_seed(1)
latents = torch.randn((1, 4, 32, 32), generator=g)
times = []
with torch.no_grad():
    for _ in range(2):
        t = time.perf_counter()
        image = movq.decode(latents, force_not_quantize=True).sample
        times.append(time.perf_counter() - t)
save_tensors(out / "io.safetensors", {
    "latents": latents, "image": image,
    "python_seconds": torch.tensor(times, dtype=torch.float32),
})
print(f"diffusers decode 256x256: {times[0]:.2f} s, {times[1]:.2f} s "
      f"(torch threads {torch.get_num_threads()}), max |image| {image.abs().max():.3f}")
"#;

/// Run the comparison (`--regenerate` rewrites the Python side).
pub fn movq_full(args: &[String]) -> Result<()> {
    let root = root();
    let out = root.join("target/movq-full");
    let regenerate = args.iter().any(|a| a == "--regenerate");
    let weights = out.join("movq/diffusion_pytorch_model.safetensors");
    if regenerate || !weights.is_file() || !out.join("io.safetensors").is_file() {
        std::fs::create_dir_all(&out).context("creating target/movq-full")?;
        let script = out.join("make_full.py");
        std::fs::write(&script, PYTHON)?;
        eprintln!("diffusers: building the full MoVQ into {}", out.display());
        run(Command::new(venv_python()?)
            .arg(&script)
            .arg(&out)
            .arg(root.join("xtask/fixtures"))
            .env("HF_HUB_OFFLINE", "1"))?;
    } else {
        eprintln!("reusing {} (pass --regenerate to rewrite)", out.display());
    }
    run(cargo()
        .current_dir(&root)
        .args([
            "run",
            "--release",
            "-p",
            "kandinsky-movq",
            "--example",
            "movq_full",
            "--",
        ])
        .arg(&out))
}
