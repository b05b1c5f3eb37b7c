//! Rust side of `cargo xtask pipeline-full`: the full-size Kandinsky 2.2 prior and decoder
//! folders that diffusers wrote (random weights, the hub's layout, configs and stored dtypes)
//! loaded through the same loaders a user's hub download goes through, text2img replayed with
//! diffusers' recorded noise, and compared with diffusers' output.
//!
//! `cargo run --release -p kandinsky-pipeline --example compare_pipeline_full -- <dir>`
//! (`<dir>` holds `kandinsky-2-2-prior/`, `kandinsky-2-2-decoder/`, `reference.safetensors`
//! and `reference.json`, written by `xtask/fixtures/full_pipeline.py`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use kandinsky_core::noise::RecordedNoise;
use kandinsky_core::testing::diff;
use kandinsky_pipeline::decoder::DecoderOptions;
use kandinsky_pipeline::prior::PriorOptions;
use kandinsky_pipeline::{
    images, DecoderPipeline, Hooks, ImageEncoderUse, Placement, PriorPipeline, SchedulerChoice,
};

/// Same tolerance as the tiny end-to-end parity tests: ≤ 1e-3 max abs on images in [0, 1].
const TOL_IMAGE: f32 = 1e-3;
/// The embeddings are unbounded; compare them relative to their largest value.
const TOL_EMBEDS_REL: f32 = 1e-3;

fn main() -> Result<()> {
    kandinsky_core::device::keep_freed_memory();
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: compare_pipeline_full <dir written by full_pipeline.py>")?,
    );
    let f = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)?;
    let get = |k: &str| f.get(k).with_context(|| format!("reference lacks `{k}`"));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json"))?)?;
    let text = |k: &str| meta[k].as_str().map(str::to_string).context(k.to_string());
    let num = |k: &str| meta[k].as_u64().map(|v| v as usize).context(k.to_string());
    let guidance = meta["guidance_scale"].as_f64().context("guidance_scale")?;
    let cpu = Placement::cpu();
    let mut failures = Vec::new();

    // Prior: the image encoder only computes the zero-image embedding, then is dropped (what
    // the CLI does on its first run).
    let t = Instant::now();
    let mut prior = PriorPipeline::load(
        &dir.join("kandinsky-2-2-prior"),
        &cpu,
        &cpu,
        ImageEncoderUse::ZeroEmbeddingOnly { cache: None },
    )?;
    let prior_load = t.elapsed().as_secs_f64();
    let mut noise = RecordedNoise::with_prefix(&f, "prior_noise_");
    let t = Instant::now();
    let embeds = prior.generate(
        &[text("prompt")?],
        Some(&[text("negative_prompt")?]),
        &PriorOptions {
            steps: num("prior_steps")?,
            guidance_scale: guidance,
            ..Default::default()
        },
        &mut Hooks {
            noise: Some(&mut noise),
            ..Default::default()
        },
    )?;
    let prior_s = t.elapsed().as_secs_f64();
    if noise.remaining() != 0 {
        failures.push(format!(
            "the prior drew less noise than diffusers ({} left)",
            noise.remaining()
        ));
    }
    drop(prior);
    for (name, got) in [
        ("image_embeds", &embeds.image_embeds),
        ("negative_image_embeds", &embeds.negative_image_embeds),
    ] {
        let d = diff(got, get(name)?)?;
        println!(
            "prior {name}: max abs diff {:.3e}, rel {:.3e}",
            d.max_abs, d.rel
        );
        if d.rel > TOL_EMBEDS_REL {
            failures.push(format!("{name}: rel {:.3e} > {TOL_EMBEDS_REL}", d.rel));
        }
    }

    // Decoder with the folder's own scheduler (DDPM), diffusers' embeddings and latents so
    // the decoder comparison does not inherit the prior's difference.
    let t = Instant::now();
    let mut decoder = DecoderPipeline::load(
        &dir.join("kandinsky-2-2-decoder"),
        &cpu,
        &cpu,
        SchedulerChoice::Default,
    )?;
    let decoder_load = t.elapsed().as_secs_f64();
    let reference_embeds = kandinsky_pipeline::prior::ImageEmbeds {
        image_embeds: get("image_embeds")?.clone(),
        negative_image_embeds: get("negative_image_embeds")?.clone(),
    };
    let size = num("size")?;
    let opts = DecoderOptions {
        height: size,
        width: size,
        steps: num("decoder_steps")?,
        guidance_scale: guidance,
        noise: Some(get("latents")?.clone()),
        ..Default::default()
    };
    let mut noise = RecordedNoise::with_prefix(&f, "decoder_noise_");
    let t = Instant::now();
    let img = decoder.text2img(
        &reference_embeds,
        &opts,
        None,
        &mut Hooks {
            noise: Some(&mut noise),
            ..Default::default()
        },
    )?;
    let decoder_s = t.elapsed().as_secs_f64();
    if noise.remaining() != 0 {
        failures.push(format!(
            "the decoder drew less noise than diffusers ({} left)",
            noise.remaining()
        ));
    }
    let got = images::to_unit_range(&img)?;
    let d = diff(&got, get("output")?)?;
    println!(
        "text2img {size}×{size} image: max abs diff {:.3e} (images in [0, 1])",
        d.max_abs
    );
    if d.max_abs > TOL_IMAGE {
        failures.push(format!("image: max abs {:.3e} > {TOL_IMAGE}", d.max_abs));
    }
    let py: Vec<f32> = get("python_seconds")?.to_vec1()?;
    println!(
        "load: prior folder {prior_load:.1} s (incl. the image encoder's zero embedding), decoder folder {decoder_load:.1} s"
    );
    println!(
        "run (CPU f32): prior {prior_s:.1} s vs diffusers {:.1} s; decoder + MoVQ {decoder_s:.1} s vs diffusers {:.1} s",
        py[0], py[1]
    );
    if !failures.is_empty() {
        bail!(
            "full-size pipeline differs from diffusers:\n{}",
            failures.join("\n")
        );
    }
    println!("full-size pipeline matches diffusers");
    Ok(())
}
