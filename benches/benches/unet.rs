//! One decoder UNet step (`UNet2DConditionModel`, the real kandinsky-2-2-decoder config,
//! random weights), batch 2 (CFG's [negative, positive] halves), at 32×32 and 64×64 latents
//! (256 px and 512 px images).
//!
//! The full network is 1.25B parameters (5 GB in f32); a CPU step takes seconds on the shared
//! 2-core machine, so the sample count is criterion's minimum (10). On CUDA (`--features
//! cuda`) it runs f16 and bf16. `KANDINSKY_BENCH_UNET_DTYPES` (e.g. `f32,bf16`) and
//! `KANDINSKY_BENCH_UNET_SIZES` (e.g. `32,64,96`) override the defaults.

use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use kandinsky_benches::random_var_builder;
use kandinsky_core::loading::read_json;
use kandinsky_unet::{UNet2DConditionConfig, UNet2DConditionModel};

fn real_config() -> UNet2DConditionConfig {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/real-configs/kandinsky-2-2-decoder__unet.json");
    read_json(&path).expect("real decoder UNet config")
}

fn dtypes(device: &Device) -> Vec<DType> {
    kandinsky_benches::env_dtypes("KANDINSKY_BENCH_UNET_DTYPES", device)
}

fn sizes() -> Vec<usize> {
    kandinsky_benches::env_sizes("KANDINSKY_BENCH_UNET_SIZES", &[32, 64])
}

fn unet_step(c: &mut Criterion) {
    let device = Device::cuda_if_available(0).expect("device");
    let cfg = real_config();
    let mut group = c.benchmark_group("unet_step_b2");
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(1));
    group.measurement_time(Duration::from_secs(if device.is_cuda() { 5 } else { 30 }));
    for dtype in dtypes(&device) {
        let unet = UNet2DConditionModel::new(random_var_builder(dtype, &device), &cfg)
            .expect("build the real-config UNet");
        let embeds = Tensor::randn(0f32, 1.0, (2, 1280), &device).unwrap();
        for s in sizes() {
            let latents = Tensor::randn(0f32, 1.0, (2, 4, s, s), &device).unwrap();
            group.bench_function(
                BenchmarkId::new(format!("{dtype:?}"), format!("{s}x{s}")),
                |b| {
                    b.iter(|| {
                        let out = unet
                            .forward(&latents, &[999.0, 999.0], &embeds, None)
                            .unwrap();
                        device.synchronize().unwrap();
                        out
                    })
                },
            );
        }
    }
    group.finish();
}

criterion_group!(benches, unet_step);
criterion_main!(benches);
