//! `cargo xtask unet-full`: the full-size Kandinsky 2.2 decoder UNet, diffusers vs
//! kandinsky-rs, with the same random weights.
//!
//! Python builds `UNet2DConditionModel` at the real config (PyTorch's default init, seed 0),
//! writes it once with `save_pretrained` (5 GB of f32 safetensors) plus the inputs and its
//! output at a 32×32 latent, batch 2, under `target/unet-full/`; then the Rust example
//! `kandinsky-unet/examples/compare_full.rs` loads those weights, runs the same forward and
//! prints the difference and both run times. Needs ≈ 6 GB of disk and ≈ 12 GB of free RAM.
//! `--regenerate` rewrites the weights.

use anyhow::Result;

use crate::python::{full_compare, require_memory_gb, FullCompare};

const PYTHON: &str = r#"
import sys, time
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[2])
from common import REAL_UNET_22, save_tensors, seed_all
from diffusers import UNet2DConditionModel

out = Path(sys.argv[1])
seed_all(0)
unet = UNet2DConditionModel(**REAL_UNET_22).eval()
unet.save_pretrained(out / "unet", safe_serialization=True, max_shard_size="100GB")
g = torch.Generator().manual_seed(1)
sample = torch.randn((2, 4, 32, 32), generator=g)
image_embeds = torch.randn((2, 1280), generator=g)
timesteps = torch.tensor([999, 421], dtype=torch.int64)
times = []
with torch.no_grad():
    for _ in range(2):
        t = time.perf_counter()
        output = unet(sample, timesteps, encoder_hidden_states=None,
                      added_cond_kwargs={"image_embeds": image_embeds}).sample
        times.append(time.perf_counter() - t)
save_tensors(out / "io.safetensors", {
    "sample": sample, "timesteps": timesteps.float(), "image_embeds": image_embeds,
    "output": output, "python_seconds": torch.tensor(times, dtype=torch.float32),
})
print(f"diffusers forward: {times[0]:.2f} s, {times[1]:.2f} s (torch threads {torch.get_num_threads()})")
"#;

/// Run the comparison.
pub fn unet_full(args: &[String]) -> Result<()> {
    require_memory_gb(12.0, "the full UNet (5 GB weights + copies)")?;
    full_compare(
        args,
        FullCompare {
            dir: "unet-full",
            outputs: &["unet/diffusion_pytorch_model.safetensors", "io.safetensors"],
            script: PYTHON,
            what: "the full decoder UNet",
            package: "kandinsky-unet",
            example: "compare_full",
        },
    )
}
