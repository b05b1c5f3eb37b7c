//! Decode random latents with the real-config MoVQ and random weights, to measure time and
//! peak memory: `/usr/bin/time -v cargo run -p kandinsky-movq --example decode_random -- 1024 f32`.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use kandinsky_movq::random::random_vq_model;
use kandinsky_movq::VQModelConfig;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let size: usize = args.first().map(|s| s.parse()).transpose()?.unwrap_or(1024);
    let dtype = match args.get(1).map(String::as_str).unwrap_or("f32") {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => anyhow::bail!("dtype must be f32, f16 or bf16, got {other}"),
    };
    let device = Device::Cpu;
    let model = random_vq_model(&VQModelConfig::kandinsky_2_2(), dtype, &device)?;
    let latents = Tensor::randn(0f32, 1.0, (1, 4, size / 8, size / 8), &device)?;
    let start = Instant::now();
    let image = model.decode(&latents, true)?;
    let secs = start.elapsed().as_secs_f64();
    let max = image
        .to_dtype(DType::F32)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    println!(
        "decoded {:?} ({dtype:?}) in {secs:.2} s, max |x| = {max:.3}",
        image.dims()
    );
    Ok(())
}
