//! The Rust half of `cargo xtask movq-full`: decode the latents written by diffusers with the
//! same full-size random weights and compare.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device};
use kandinsky_core::testing::diff;
use kandinsky_movq::VQModel;

fn main() -> anyhow::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).context("usage: movq_full <dir>")?);
    let io = candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu)?;
    let py: Vec<f32> = io["python_seconds"].to_vec1()?;
    let model = VQModel::load(dir.join("movq"), DType::F32, &Device::Cpu)?;
    let mut times = Vec::new();
    let mut image = None;
    for _ in 0..2 {
        let t = Instant::now();
        image = Some(model.decode(&io["latents"], true)?);
        times.push(t.elapsed().as_secs_f64());
    }
    let image = image.context("no decode ran")?;
    let d = diff(&image, &io["image"])?;
    println!(
        "movq-full 256x256 decode (f32, CPU): max abs diff {:.3e} (rel {:.3e}); \
         kandinsky-rs {:.2} s / {:.2} s, diffusers {:.2} s / {:.2} s (first / second run)",
        d.max_abs, d.rel, times[0], times[1], py[0], py[1]
    );
    Ok(())
}
