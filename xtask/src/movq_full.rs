//! `cargo xtask movq-full`: the full-size MoVQ (Kandinsky 2.2 `movq`), diffusers vs
//! kandinsky-rs, with the same random weights.
//!
//! Python builds `VQModel` at the real config (PyTorch's default init, seed 0), writes it with
//! `save_pretrained` (271 MB of f32 safetensors) plus random 32×32 latents and its 256×256
//! decode (`force_not_quantize=True`, as the pipelines) under `target/movq-full/`; then the
//! Rust example `kandinsky-movq/examples/movq_full.rs` (release build) loads those weights,
//! decodes the same latents and prints the max abs difference and both run times.

use anyhow::Result;

use crate::python::{full_compare, FullCompare};

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
    full_compare(
        args,
        FullCompare {
            dir: "movq-full",
            outputs: &["movq/diffusion_pytorch_model.safetensors", "io.safetensors"],
            script: PYTHON,
            what: "the full MoVQ",
            package: "kandinsky-movq",
            example: "movq_full",
        },
    )
}
