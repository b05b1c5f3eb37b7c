//! MoVQ decode (`VQModel`, the real kandinsky-2-2-decoder `movq` config, random weights),
//! batch 1, at 32×32 and 64×64 latents (256² and 512² images), `force_not_quantize` as the
//! pipelines decode.
//!
//! A CPU decode takes seconds on the shared machine, so the sample count is criterion's
//! minimum (10). On CUDA (`--features cuda`) it runs f16 and bf16.
//! `KANDINSKY_BENCH_MOVQ_DTYPES` (e.g. `f32,f16`) and `KANDINSKY_BENCH_MOVQ_SIZES` (latent
//! sides, e.g. `32,64,128`) override the defaults.

use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use kandinsky_movq::random::random_vq_model;
use kandinsky_movq::VQModelConfig;

fn dtypes(device: &Device) -> Vec<DType> {
    kandinsky_benches::env_dtypes("KANDINSKY_BENCH_MOVQ_DTYPES", device)
}

fn sizes() -> Vec<usize> {
    kandinsky_benches::env_sizes("KANDINSKY_BENCH_MOVQ_SIZES", &[32, 64])
}

fn movq_decode(c: &mut Criterion) {
    let device = Device::cuda_if_available(0).expect("device");
    let cfg = VQModelConfig::kandinsky_2_2();
    let mut group = c.benchmark_group("movq_decode");
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(1));
    group.measurement_time(Duration::from_secs(if device.is_cuda() { 5 } else { 30 }));
    for dtype in dtypes(&device) {
        let model = random_vq_model(&cfg, dtype, &device).expect("random MoVQ");
        for side in sizes() {
            let latents = Tensor::randn(0f32, 1.0, (1, 4, side, side), &device)
                .expect("latents")
                .to_dtype(dtype)
                .expect("dtype");
            let id = BenchmarkId::new(format!("{dtype:?}"), format!("{}px", side * 8));
            group.bench_with_input(id, &latents, |b, z| {
                b.iter(|| {
                    let image = model.decode(z, true).expect("decode");
                    // Wait for the device so the time covers the whole decode.
                    image.device().synchronize().expect("sync");
                    image
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, movq_decode);
criterion_main!(benches);
