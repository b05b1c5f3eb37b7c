//! One prior step (`PriorTransformer::forward`, batch 2 = CFG's [uncond, cond]) with the real
//! kandinsky-2-2-prior config and random weights; also the step with the conditioning
//! prepared (`EmbeddingPrior::predict_prepared`, as the pipeline runs it) and the
//! preparation itself (once per generation).
//!
//! The 20 transformer blocks hold 1.007B of the model's 1.02B parameters (4 GB in f32), which
//! is too much for a shared 2-core CI/dev machine; on the CPU the bench therefore builds the
//! real config with `KANDINSKY_BENCH_PRIOR_LAYERS` blocks (default 4; the step time scales
//! linearly with the block count, so ×5 estimates the full model). On CUDA the default is the
//! full 20. `KANDINSKY_BENCH_PRIOR_DTYPES` (e.g. `f32,bf16`) picks the weight dtypes
//! (default f32 on the CPU, f16/bf16 on CUDA).

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use kandinsky_core::traits::{EmbeddingPrior, PriorCondition};
use kandinsky_prior::{PriorTransformer, PriorTransformerConfig};

fn real_config(layers: usize) -> PriorTransformerConfig {
    PriorTransformerConfig {
        embedding_dim: 1280,
        num_layers: layers,
        ..Default::default()
    }
}

fn dtypes(device: &Device) -> Vec<DType> {
    kandinsky_benches::env_dtypes("KANDINSKY_BENCH_PRIOR_DTYPES", device)
}

fn prior_step(c: &mut Criterion) {
    let device = Device::cuda_if_available(0).expect("device");
    let default_layers = if device.is_cuda() { 20 } else { 4 };
    let layers = std::env::var("KANDINSKY_BENCH_PRIOR_LAYERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_layers);
    let cfg = real_config(layers);
    let b = 2;
    let mut group = c.benchmark_group(format!("prior_step_real_cfg_{layers}_layers"));
    group.sample_size(10);
    for dtype in dtypes(&device) {
        // Random weights with candle's init hints (LayerNorms at 1, linears Kaiming-uniform).
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, dtype, &device);
        let model = PriorTransformer::new(vb, &cfg).expect("build prior");
        let e = cfg.embedding_dim;
        let x = Tensor::randn(0f32, 1.0, (b, e), &device)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let p = Tensor::randn(0f32, 1.0, (b, e), &device)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let enc = Tensor::randn(0f32, 1.0, (b, 77, e), &device)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        // The unconditional row has 2 tokens ("" → BOS, EOS), the conditional one 12.
        let mut m = vec![0u8; b * 77];
        m[..2].fill(1);
        m[77..77 + 12].fill(1);
        let mask = Tensor::from_vec(m, (b, 77), &device).unwrap();
        group.bench_function(
            BenchmarkId::from_parameter(format!("{dtype:?}_b{b}")),
            |bench| {
                bench.iter(|| {
                    let out = model.forward(&x, &[500.0], &p, &enc, Some(&mask)).unwrap();
                    device.synchronize().unwrap();
                    out
                })
            },
        );
        // As the pipeline runs a step: the text tokens' keys and values prepared once per
        // generation (`EmbeddingPrior::prepare`), the step runs the last 3 of 81 tokens.
        let cond = PriorCondition {
            proj_embedding: &p,
            encoder_hidden_states: &enc,
            attention_mask: &mask,
        };
        let prepared = model.prepare(&cond).expect("prepare the conditioning");
        group.bench_function(
            BenchmarkId::from_parameter(format!("{dtype:?}_b{b}_prepared")),
            |bench| {
                bench.iter(|| {
                    let out = model.predict_prepared(&x, 500.0, &prepared).unwrap();
                    device.synchronize().unwrap();
                    out
                })
            },
        );
        group.bench_function(
            BenchmarkId::from_parameter(format!("{dtype:?}_b{b}_prepare")),
            |bench| {
                bench.iter(|| {
                    let prepared = model.prepare(&cond).unwrap();
                    device.synchronize().unwrap();
                    prepared
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, prior_step);
criterion_main!(benches);
