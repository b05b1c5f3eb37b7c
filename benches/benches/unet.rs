//! One decoder UNet step (`UNet2DConditionModel`, the real kandinsky-2-2-decoder and
//! ControlNet-depth configs, random weights), batch 2 (CFG's [negative, positive] halves), at
//! 32×32 and 64×64 latents (256 px and 512 px images); each with the conditioning's share
//! computed per step (as diffusers does) and prepared once (`Denoiser::prepare`, as the
//! pipeline does).
//!
//! The full network is 1.25B parameters (5 GB in f32); a CPU step takes seconds on the shared
//! 2-core machine, so the sample count is criterion's minimum (10). On CUDA (`--features
//! cuda`) it runs f16 and bf16. `KANDINSKY_BENCH_UNET_DTYPES` (e.g. `f32,bf16`) and
//! `KANDINSKY_BENCH_UNET_SIZES` (e.g. `32,64,96`) and `KANDINSKY_BENCH_UNET_VARIANTS` (e.g.
//! `kandinsky-2-2-decoder`) override the defaults.

use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use kandinsky_benches::random_var_builder;
use kandinsky_core::loading::read_json;
use kandinsky_core::traits::{Denoiser, DenoiserCondition};
use kandinsky_unet::{UNet2DConditionConfig, UNet2DConditionModel};

fn real_config(name: &str) -> UNet2DConditionConfig {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../fixtures/real-configs/{name}__unet.json"));
    read_json(&path).expect("real UNet config")
}

fn dtypes(device: &Device) -> Vec<DType> {
    kandinsky_benches::env_dtypes("KANDINSKY_BENCH_UNET_DTYPES", device)
}

fn sizes() -> Vec<usize> {
    kandinsky_benches::env_sizes("KANDINSKY_BENCH_UNET_SIZES", &[32, 64])
}

fn unet_step(c: &mut Criterion) {
    let device = Device::cuda_if_available(0).expect("device");
    let mut group = c.benchmark_group("unet_step_b2");
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(1));
    group.measurement_time(Duration::from_secs(if device.is_cuda() { 5 } else { 30 }));
    for variant in variants() {
        let cfg = real_config(&variant);
        for dtype in dtypes(&device) {
            let unet = UNet2DConditionModel::new(random_var_builder(dtype, &device), &cfg)
                .expect("build the real-config UNet");
            let embeds = Tensor::randn(0f32, 1.0, (2, 1280), &device).unwrap();
            for s in sizes() {
                let latents = Tensor::randn(0f32, 1.0, (2, 4, s, s), &device).unwrap();
                let cond = DenoiserCondition {
                    image_embeds: Some(embeds.clone()),
                    hint: unet
                        .takes_hint()
                        .then(|| Tensor::rand(0f32, 1.0, (2, 3, 8 * s, 8 * s), &device).unwrap()),
                    ..Default::default()
                };
                let prepared = unet.prepare(&cond).expect("prepare the conditioning");
                // Per step as diffusers runs it, and as the pipeline does: the
                // conditioning's share (image keys/values, encoded hint) prepared once.
                for (mode, prepared) in [("per-step", None), ("prepared", Some(&prepared))] {
                    let id =
                        BenchmarkId::new(format!("{variant}/{dtype:?}/{mode}"), format!("{s}x{s}"));
                    group.bench_function(id, |b| {
                        b.iter(|| {
                            let ts = [999.0, 999.0];
                            let out = match prepared {
                                Some(p) => unet.predict_prepared(&latents, &ts, p),
                                None => unet.predict(&latents, &ts, &cond),
                            }
                            .unwrap();
                            device.synchronize().unwrap();
                            out
                        })
                    });
                }
            }
        }
    }
    group.finish();
}

/// `KANDINSKY_BENCH_UNET_VARIANTS` (comma-separated real-config names), default the
/// decoder and the ControlNet (whose hint encoder runs at the image's full size).
fn variants() -> Vec<String> {
    std::env::var("KANDINSKY_BENCH_UNET_VARIANTS")
        .unwrap_or_else(|_| "kandinsky-2-2-decoder,kandinsky-2-2-controlnet-depth".into())
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect()
}

criterion_group!(benches, unet_step);
criterion_main!(benches);
