//! Decode random latents with the real-config MoVQ and random weights, to measure time and
//! peak memory: `/usr/bin/time -v cargo run -p kandinsky-movq --example decode_random -- 1024 f32`.
//! A third argument `cuda` runs on the GPU (build with `--features cuda`); a dtype other than
//! f32 is also compared against an f32 decode of the same latents and weights.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use kandinsky_core::testing::diff;
use kandinsky_movq::random::{random_weights, vq_model_from_weights};
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
    let device = match args.get(2).map(String::as_str) {
        Some("cuda") => kandinsky_core::device::cuda_device(0)?,
        _ => Device::Cpu,
    };
    let cfg = VQModelConfig::kandinsky_2_2();
    let weights = random_weights(&cfg, &device)?;
    let latents = Tensor::randn(0f32, 1.0, (1, 4, size / 8, size / 8), &device)?;
    let decode = |dtype: DType| -> anyhow::Result<Tensor> {
        let start = Instant::now();
        let model = vq_model_from_weights(&cfg, &weights, dtype, &device)?;
        let image = model.decode(&latents, true)?;
        image.device().synchronize()?;
        let secs = start.elapsed().as_secs_f64();
        let max = image
            .to_dtype(DType::F32)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        println!(
            "decoded {:?} ({dtype:?}, {device:?}) in {secs:.2} s, max |x| = {max:.3}",
            image.dims()
        );
        Ok(image)
    };
    let image = decode(dtype)?;
    if dtype != DType::F32 {
        drop(image);
        let again = decode(dtype)?; // warm
        let reference = decode(DType::F32)?;
        let d = diff(&again, &reference)?;
        println!(
            "{dtype:?} vs f32: max abs {:.3e}, rel {:.3e}",
            d.max_abs, d.rel
        );
    }
    Ok(())
}
