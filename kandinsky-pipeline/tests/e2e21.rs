//! End-to-end parity with diffusers' Kandinsky 2.1 pipelines (`KandinskyPriorPipeline`,
//! `KandinskyPipeline`, `KandinskyImg2ImgPipeline`, `KandinskyInpaintPipeline`) on the tiny
//! 2.1 fixture folders.
//!
//! `xtask/fixtures/gen_pipeline21.py` ran each flow with fixed inputs and recorded every
//! Gaussian tensor diffusers drew (`noise_000`, ... in call order); the Rust flows replay them
//! and must consume exactly as many. Tolerance: ≤ 1e-3 max abs on the final f32 outputs
//! (images in [0, 1], embeddings). Measured: prior 3.8e-6, text2img DDIM 2.6e-4 (mean
//! 2.3e-6: a few pixels where the random tiny MoVQ amplifies, as in the 2.2 inpaint case),
//! shipped DDPM 2.4e-6, img2img 1.0e-5, inpaint 1.4e-4.

mod common;

use common::{check_images, recorded, tiny, TOL};
use kandinsky_core::noise::RecordedNoise;

use std::collections::HashMap;

use candle_core::Tensor;
use kandinsky_core::testing::{assert_close, get, load_fixture};
use kandinsky_pipeline::decoder::DecoderOptions;
use kandinsky_pipeline::prior::{ImageEmbeds, PriorOptions};
use kandinsky_pipeline::{
    DecoderPipeline, Hooks, ImageEncoderUse, Placement, PriorPipeline, SchedulerChoice,
};

fn hooks(noise: &mut RecordedNoise) -> Hooks<'_> {
    Hooks {
        noise: Some(noise),
        ..Default::default()
    }
}

/// The first `n` image embeddings of the fixture (diffusers' cases use 1 or 2).
fn embeds(f: &HashMap<String, Tensor>, n: usize) -> anyhow::Result<ImageEmbeds> {
    Ok(ImageEmbeds {
        image_embeds: get(f, "image_embeds")?.narrow(0, 0, n)?,
        negative_image_embeds: get(f, "negative_image_embeds")?.narrow(0, 0, n)?,
    })
}

fn decoder(repo: &str, choice: SchedulerChoice) -> anyhow::Result<DecoderPipeline> {
    let cpu = Placement::cpu();
    let d = DecoderPipeline::load(&tiny(repo), &cpu, &cpu, choice)?;
    assert!(d.is_kandinsky_2_1(), "{repo} must load as a 2.1 decoder");
    Ok(d)
}

fn opts(
    f: &HashMap<String, Tensor>,
    size_from: &str,
    steps: usize,
    guidance: f64,
    prompt: &[&str],
) -> anyhow::Result<DecoderOptions> {
    let (_, _, h, w) = get(f, size_from)?.dims4()?;
    Ok(DecoderOptions {
        height: h,
        width: w,
        steps,
        guidance_scale: guidance,
        prompt: prompt.iter().map(|p| p.to_string()).collect(),
        ..Default::default()
    })
}

#[test]
fn v21_prior_matches_diffusers() -> anyhow::Result<()> {
    let f = load_fixture("pipeline/v21_prior.safetensors")?;
    let cpu = Placement::cpu();
    let mut p = PriorPipeline::load(
        &tiny("kandinsky-2-1-prior"),
        &cpu,
        &cpu,
        ImageEncoderUse::Load,
    )?;
    let mut noise = recorded(&f);
    let opts = PriorOptions {
        steps: 5,
        guidance_scale: 4.0,
        ..Default::default()
    };
    let out = p.generate(
        &["рыжий кот на диване".to_string()],
        None,
        &opts,
        &mut hooks(&mut noise),
    )?;
    assert_eq!(noise.remaining(), 0, "diffusers drew more noise");
    assert_close(
        "2.1 prior image_embeds",
        &out.image_embeds,
        get(&f, "image_embeds")?,
        TOL,
    )?;
    assert_close(
        "2.1 prior negative_image_embeds",
        &out.negative_image_embeds,
        get(&f, "negative_image_embeds")?,
        TOL,
    )?;
    Ok(())
}

#[test]
fn v21_text2img_two_languages_matches_diffusers() -> anyhow::Result<()> {
    let f = load_fixture("pipeline/v21_text2img.safetensors")?;
    let mut d = decoder("kandinsky-2-1", SchedulerChoice::Default)?;
    let mut o = opts(
        &f,
        "image",
        4,
        4.0,
        &["рыжий кот на диване", "一只红猫坐在沙发上"],
    )?;
    o.noise = Some(get(&f, "latents")?.clone());
    let img = d.text2img(&embeds(&f, 2)?, &o, None, &mut Hooks::default())?;
    check_images("2.1 text2img (DDIM)", &img, &f)
}

#[test]
fn v21_text2img_shipped_ddpm_with_negative_prompt_matches_diffusers() -> anyhow::Result<()> {
    let f = load_fixture("pipeline/v21_text2img_ddpm.safetensors")?;
    let mut d = decoder("kandinsky-2-1", SchedulerChoice::Folder("ddpm_scheduler"))?;
    assert!(
        kandinsky_core::traits::Scheduler::uses_learned_variance(&d.scheduler),
        "the shipped ddpm_scheduler learns the variance"
    );
    let mut o = opts(&f, "image", 3, 3.0, &["a red cat on a sofa"])?;
    o.negative_prompt = Some(vec!["blurry, low quality".into()]);
    o.noise = Some(get(&f, "latents")?.narrow(0, 0, 1)?);
    let mut noise = recorded(&f);
    let img = d.text2img(&embeds(&f, 1)?, &o, None, &mut hooks(&mut noise))?;
    assert_eq!(
        noise.remaining(),
        0,
        "the DDPM steps must draw as diffusers"
    );
    check_images("2.1 text2img (shipped DDPM)", &img, &f)
}

#[test]
fn v21_img2img_matches_diffusers() -> anyhow::Result<()> {
    let f = load_fixture("pipeline/v21_img2img.safetensors")?;
    let mut d = decoder("kandinsky-2-1", SchedulerChoice::Default)?;
    let o = opts(&f, "image", 4, 4.0, &["a red cat on a sofa"])?;
    let mut noise = recorded(&f);
    let img = d.img2img(
        &embeds(&f, 1)?,
        get(&f, "image")?,
        0.5,
        &o,
        None,
        &mut hooks(&mut noise),
    )?;
    assert_eq!(noise.remaining(), 0);
    check_images("2.1 img2img", &img, &f)
}

#[test]
fn v21_inpaint_matches_diffusers() -> anyhow::Result<()> {
    let f = load_fixture("pipeline/v21_inpaint.safetensors")?;
    let mut d = decoder("kandinsky-2-1-inpaint", SchedulerChoice::Default)?;
    let mut o = opts(&f, "image", 4, 4.0, &["a red cat on a sofa"])?;
    o.noise = Some(get(&f, "latents")?.narrow(0, 0, 1)?);
    let img = d.inpaint(
        &embeds(&f, 1)?,
        get(&f, "image")?,
        get(&f, "mask")?,
        &o,
        &mut Hooks::default(),
    )?;
    check_images("2.1 inpaint", &img, &f)
}

#[test]
fn v21_decoder_without_prompt_is_a_clear_error() -> anyhow::Result<()> {
    let f = load_fixture("pipeline/v21_text2img.safetensors")?;
    let mut d = decoder("kandinsky-2-1", SchedulerChoice::Default)?;
    let mut o = opts(&f, "image", 1, 4.0, &[])?;
    o.noise = Some(get(&f, "latents")?.clone());
    let err = d
        .text2img(&embeds(&f, 2)?, &o, None, &mut Hooks::default())
        .expect_err("a 2.1 decoder needs the prompt");
    assert!(err.to_string().contains("prompt"), "{err}");
    // Three prompts for two image embeddings.
    let mut o = opts(&f, "image", 1, 4.0, &["a", "b", "c"])?;
    o.noise = Some(get(&f, "latents")?.clone());
    let err = d
        .text2img(&embeds(&f, 2)?, &o, None, &mut Hooks::default())
        .expect_err("prompt count must fit");
    assert!(err.to_string().contains("3 prompts for 2"), "{err}");
    Ok(())
}
