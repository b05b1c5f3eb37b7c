//! The CLIP text encoder (`CLIPTextModelWithProjection`, 77 tokens, batch 2 = CFG's
//! [negative, positive] prompts) with the real kandinsky-2-2-prior bigG config and random
//! weights, plus the tokenizer on the committed real CLIP vocabulary.
//!
//! The full bigG text tower is 695M parameters (2.78 GB in f32); its 32 blocks are 98% of the
//! compute. On the shared 2-core CPU machine the bench builds the real config with
//! `KANDINSKY_BENCH_CLIP_LAYERS` blocks (default 8; the time scales linearly with the block
//! count, so ×4 estimates the full tower). On CUDA the default is the full 32.
//! `KANDINSKY_BENCH_CLIP_DTYPES` (e.g. `f32,bf16`) picks the weight dtypes (default f32 on the
//! CPU, f16/bf16 on CUDA).

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use kandinsky_clip::{ClipTextConfig, ClipTextModelWithProjection, ClipTokenizer};
use kandinsky_core::ModelConfig;

fn real_config(layers: usize) -> ClipTextConfig {
    let cfg = ClipTextConfig {
        num_hidden_layers: layers,
        ..ClipTextConfig::kandinsky_2_2_prior()
    };
    cfg.validate().expect("valid config");
    cfg
}

fn dtypes(device: &Device) -> Vec<DType> {
    kandinsky_benches::env_dtypes("KANDINSKY_BENCH_CLIP_DTYPES", device)
}

fn tokenizer() -> ClipTokenizer {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/tiny/kandinsky-2-2-prior/tokenizer");
    ClipTokenizer::from_dir(dir).expect("tokenizer fixture")
}

fn text_encoder(c: &mut Criterion) {
    let device = Device::cuda_if_available(0).expect("device");
    let default_layers = if device.is_cuda() { 32 } else { 8 };
    let layers = std::env::var("KANDINSKY_BENCH_CLIP_LAYERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_layers);
    let cfg = real_config(layers);
    let tok = tokenizer();
    let batch = tok
        .encode_batch(&[
            "",
            "a portrait of a red cat, oil on canvas, highly detailed",
        ])
        .expect("tokenize");
    let ids = batch.input_ids(&device).expect("ids");
    let mut group = c.benchmark_group(format!("clip_text_bigG_{layers}_layers"));
    group.sample_size(10);
    for dtype in dtypes(&device) {
        // Random weights with candle's init hints (LayerNorms at 1, linears Kaiming-uniform).
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, dtype, &device);
        let model = ClipTextModelWithProjection::new(vb, &cfg).expect("build text encoder");
        group.bench_function(
            BenchmarkId::from_parameter(format!("{dtype:?}_b2_l77")),
            |b| {
                b.iter(|| {
                    let out = model.forward(&ids).unwrap();
                    device.synchronize().unwrap();
                    out
                })
            },
        );
    }
    group.finish();
}

fn tokenize(c: &mut Criterion) {
    let tok = tokenizer();
    let prompts = [
        "",
        "a portrait of a red cat, oil on canvas, highly detailed, trending on artstation",
    ];
    c.bench_function("clip_tokenizer_b2", |b| {
        b.iter(|| tok.encode_batch(&prompts).unwrap())
    });
}

criterion_group!(benches, tokenize, text_encoder);
criterion_main!(benches);
