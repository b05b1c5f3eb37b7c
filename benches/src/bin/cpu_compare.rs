//! The kandinsky-rs side of `cargo xtask bench-compare`: runs ONE workload per process on the
//! CPU in f32 (so the process's peak RSS belongs to that workload), with random weights at the
//! real configs, and prints one JSON line:
//!
//! ```text
//! {"impl":"kandinsky-rs","workload":"unet_step_256","median_ms":…,"min_ms":…,"reps":3,
//!  "peak_rss_mib":…,"rss_after_load_mib":…,"build_s":…,"threads":2,"dtype":"f32"}
//! ```
//!
//! `cpu_compare <workload> [--reps N] [--warmup W]`; `cpu_compare --list` prints the workload
//! names. The thread count is candle's (`RAYON_NUM_THREADS`, else the core count); the xtask
//! sets it. The PyTorch side is `xtask/bench/diffusers_bench.py --cpu-workload`, with the same
//! names, shapes and inputs.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use kandinsky_benches::random_var_builder;
use kandinsky_core::attention::{attention, KvSegment};
use kandinsky_core::testing::fixtures_dir;

/// Every workload: name and a one-line description (the xtask prints these in the table).
const WORKLOADS: &[(&str, &str)] = &[
    (
        "unet_step_256",
        "decoder UNet step, batch 2, latent 32×32 (256 px)",
    ),
    (
        "unet_step_512",
        "decoder UNet step, batch 2, latent 64×64 (512 px)",
    ),
    ("movq_decode_256", "MoVQ decode, batch 1, 256 px"),
    ("movq_decode_512", "MoVQ decode, batch 1, 512 px"),
    ("prior_step", "prior step, batch 2 (20 blocks)"),
    (
        "prior_loop_25",
        "prior, the 25 steps of one generation, batch 2 (kandinsky-rs: prepared once, KV cache)",
    ),
    ("clip_text", "CLIP bigG text encoder, batch 2 × 77 tokens"),
    (
        "attention_32x32",
        "attention entry point, UNet 512 px level 1: b2 h12 q1024 k32+1024 d64",
    ),
    (
        "attention_48x48",
        "attention entry point, UNet 768 px level 1: b2 h12 q2304 k32+2304 d64",
    ),
];

fn cfg<T: serde::de::DeserializeOwned>(name: &str) -> Result<T> {
    let p = fixtures_dir().join("real-configs").join(name);
    let text = std::fs::read_to_string(&p).with_context(|| p.display().to_string())?;
    Ok(serde_json::from_str(&text)?)
}

/// A field of `/proc/self/status` in MiB (`VmHWM` = peak RSS, `VmRSS` = current).
fn proc_status_mib(field: &str) -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/status") else {
        return f64::NAN;
    };
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// A prepared workload: one call of `run` is one timed repetition.
type Job = Box<dyn FnMut() -> Result<()>>;

/// Inputs are fixed (seeded on the Python side the same way is not needed: only shapes and
/// value scale matter for the time), weights random at the real configs.
fn build(name: &str, dev: &Device) -> Result<Job> {
    let dt = DType::F32;
    Ok(match name {
        "unet_step_256" | "unet_step_512" => {
            let s = if name == "unet_step_256" { 32 } else { 64 };
            let c: kandinsky_unet::UNet2DConditionConfig = cfg("kandinsky-2-2-decoder__unet.json")?;
            let unet = kandinsky_unet::UNet2DConditionModel::new(random_var_builder(dt, dev), &c)?;
            let x = Tensor::randn(0f32, 1.0, (2, 4, s, s), dev)?;
            let emb = Tensor::randn(0f32, 1.0, (2, 1280), dev)?;
            Box::new(move || {
                unet.forward(&x, &[500.0, 500.0], &emb, None)?;
                Ok(())
            })
        }
        "movq_decode_256" | "movq_decode_512" => {
            let px = if name == "movq_decode_256" { 256 } else { 512 };
            let c: kandinsky_movq::VQModelConfig = cfg("kandinsky-2-2-decoder__movq.json")?;
            let movq = kandinsky_movq::VQModel::new(random_var_builder(dt, dev), &c)?;
            let z = Tensor::randn(0f32, 1.0, (1, 4, px / 8, px / 8), dev)?;
            Box::new(move || {
                movq.decode(&z, true)?;
                Ok(())
            })
        }
        "prior_step" | "prior_loop_25" => {
            let c: kandinsky_prior::PriorTransformerConfig =
                cfg("kandinsky-2-2-prior__prior.json")?;
            let prior = kandinsky_prior::PriorTransformer::new(random_var_builder(dt, dev), &c)?;
            let x = Tensor::randn(0f32, 1.0, (2, 1280), dev)?;
            let pe = Tensor::randn(0f32, 1.0, (2, 1280), dev)?;
            let hs = Tensor::randn(0f32, 1.0, (2, 77, 1280), dev)?;
            let mask = Tensor::ones((2, 77), DType::U8, dev)?;
            if name == "prior_step" {
                return Ok(Box::new(move || {
                    prior.forward(&x, &[500.0], &pe, &hs, Some(&mask))?;
                    Ok(())
                }));
            }
            // The prior's share of one generation as the pipeline runs it: the conditioning
            // prepared once, then 25 steps at the Python side's timesteps.
            Box::new(move || {
                use kandinsky_core::traits::{EmbeddingPrior, PriorCondition};
                let prepared = prior.prepare(&PriorCondition {
                    proj_embedding: &pe,
                    encoder_hidden_states: &hs,
                    attention_mask: &mask,
                })?;
                for i in 0..25u32 {
                    prior.predict_prepared(&x, f64::from(999 - i * 999 / 24), &prepared)?;
                }
                Ok(())
            })
        }
        "clip_text" => {
            let c: kandinsky_clip::ClipTextConfig = cfg("kandinsky-2-2-prior__text_encoder.json")?;
            let te =
                kandinsky_clip::ClipTextModelWithProjection::new(random_var_builder(dt, dev), &c)?;
            // Same ids as the Python side: (i·331) mod 49000.
            let ids = Tensor::from_vec(
                (0..154u32).map(|i| (i * 331) % 49000).collect::<Vec<_>>(),
                (2, 77),
                dev,
            )?;
            Box::new(move || {
                te.forward(&ids)?;
                Ok(())
            })
        }
        "attention_32x32" | "attention_48x48" => {
            let level = if name == "attention_32x32" { 32 } else { 48 };
            let (b, h, n, d) = (2, 12, level * level, 64);
            let q = Tensor::randn(0f32, 1.0, (b, h, n, d), dev)?;
            let ki = Tensor::randn(0f32, 1.0, (b, h, 32, d), dev)?;
            let vi = Tensor::randn(0f32, 1.0, (b, h, 32, d), dev)?;
            let ks = Tensor::randn(0f32, 1.0, (b, h, n, d), dev)?;
            let vs = Tensor::randn(0f32, 1.0, (b, h, n, d), dev)?;
            Box::new(move || {
                let segs = [KvSegment { k: &ki, v: &vi }, KvSegment { k: &ks, v: &vs }];
                attention(&q, &segs, None, 0.125)?;
                Ok(())
            })
        }
        other => bail!(
            "unknown workload `{other}`; available: {}",
            WORKLOADS
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    })
}

fn arg_value(args: &[String], flag: &str) -> Result<Option<usize>> {
    match args.iter().position(|a| a == flag) {
        None => Ok(None),
        Some(i) => {
            let v = args
                .get(i + 1)
                .with_context(|| format!("{flag} needs a value"))?;
            Ok(Some(v.parse().with_context(|| {
                format!("{flag}: `{v}` is not a number")
            })?))
        }
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        for (n, d) in WORKLOADS {
            println!("{n}\t{d}");
        }
        return Ok(());
    }
    let Some(name) = args.first().filter(|a| !a.starts_with("--")) else {
        bail!("usage: cpu_compare <workload> [--reps N] [--warmup W] | --list");
    };
    let reps = arg_value(&args, "--reps")?.unwrap_or(3).max(1);
    let warmup = arg_value(&args, "--warmup")?.unwrap_or(1);
    // As the `kandinsky` CLI does (see kandinsky_core::device::keep_freed_memory); the
    // PyTorch side keeps glibc's defaults unless bench-compare runs with --keep-freed-memory.
    if std::env::var_os("KANDINSKY_DEFAULT_MALLOC").is_none() {
        kandinsky_core::device::keep_freed_memory();
    }
    let dev = Device::Cpu;
    let rss_start = proc_status_mib("VmRSS:");
    let t0 = Instant::now();
    let mut job = build(name, &dev)?;
    let build_s = t0.elapsed().as_secs_f64();
    let rss_after_load = proc_status_mib("VmRSS:");
    for _ in 0..warmup {
        job()?;
    }
    let mut ms = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        job()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    let line = serde_json::json!({
        "impl": "kandinsky-rs",
        "workload": name,
        "median_ms": ms[ms.len() / 2],
        "min_ms": ms[0],
        "all_ms": ms,
        "reps": reps,
        "warmup": warmup,
        "peak_rss_mib": proc_status_mib("VmHWM:"),
        "rss_start_mib": rss_start,
        "rss_after_load_mib": rss_after_load,
        "build_s": build_s,
        "threads": candle_core::utils::get_num_threads(),
        "dtype": "f32",
    });
    println!("{line}");
    Ok(())
}
