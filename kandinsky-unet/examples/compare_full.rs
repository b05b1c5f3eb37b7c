//! Rust side of `cargo xtask unet-full`: load the full-size decoder UNet that diffusers wrote
//! (random weights, `<dir>/unet/`), run the forward of `<dir>/io.safetensors` and compare it
//! with diffusers' output.
//!
//! `cargo run --release -p kandinsky-unet --example compare_full -- <dir>`

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use kandinsky_core::testing::diff;
use kandinsky_unet::UNet2DConditionModel;

fn main() -> Result<()> {
    let dir = std::env::args()
        .nth(1)
        .context("usage: compare_full <dir with unet/ and io.safetensors>")?;
    let dir = std::path::PathBuf::from(dir);
    let device = Device::Cpu;
    let io = candle_core::safetensors::load(dir.join("io.safetensors"), &device)?;
    let get = |k: &str| {
        io.get(k)
            .with_context(|| format!("io.safetensors lacks `{k}`"))
    };

    let t0 = Instant::now();
    let unet = UNet2DConditionModel::from_dir(dir.join("unet"), DType::F32, &device)?;
    let load_s = t0.elapsed().as_secs_f64();

    let sample = get("sample")?;
    let timesteps: Vec<f64> = get("timesteps")?.to_dtype(DType::F64)?.to_vec1()?;
    let embeds = get("image_embeds")?;
    let mut times = Vec::new();
    let mut out = None;
    // The first run pays for page faults and allocator growth; report both.
    for _ in 0..2 {
        let t = Instant::now();
        out = Some(unet.forward(sample, &timesteps, embeds, None)?);
        times.push(t.elapsed().as_secs_f64());
    }
    let out = out.expect("ran");
    let reference = get("output")?;
    let d = diff(&out, reference)?;
    let py: Vec<f32> = get("python_seconds")?.to_vec1()?;
    let ref_max = reference.abs()?.max_all()?.to_scalar::<f32>()?;
    println!(
        "full decoder UNet, latents {:?}, timesteps {timesteps:?}",
        sample.dims()
    );
    println!("  max |diffusers output| {ref_max:.4}");
    println!("  max abs diff {:.3e}, rel {:.3e}", d.max_abs, d.rel);
    println!(
        "  diffusers (torch CPU f32) forward: first {:.2} s, second {:.2} s",
        py[0], py[1]
    );
    println!(
        "  kandinsky-rs (candle CPU f32) forward: first {:.2} s, second {:.2} s (load {load_s:.1} s)",
        times[0], times[1]
    );
    // Same tolerance as the tiny parity tests.
    anyhow::ensure!(d.max_abs <= 1e-4 * ref_max.max(1.0), "difference too large");
    Ok(())
}
