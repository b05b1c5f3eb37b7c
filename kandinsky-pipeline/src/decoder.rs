//! The decoder flows: text2img, img2img, inpainting and ControlNet (diffusers'
//! `KandinskyV22{,Img2Img,Inpaint,Controlnet,ControlnetImg2Img}Pipeline`), and Kandinsky
//! 2.1's text2img, img2img and inpainting (`Kandinsky{,Img2Img,Inpaint}Pipeline`).

use candle_core::{DType, Tensor};
use kandinsky_core::noise::{NoiseSource, SeededNoise};
use kandinsky_core::traits::{Denoiser, DenoiserCondition, LatentCodec, Scheduler, TextEncoder};
use kandinsky_core::{Error, Result};
use kandinsky_schedulers::{add_noise_ddpm, torch_linspace_f32, NoiseTables};

use crate::callback::{report, Callback, Hooks, Stage, StepEvent};
use crate::guidance::{decoder_prediction, enabled, repeat_interleave};
use crate::prior::PromptTokenizer;

/// Kandinsky 2.1's text side of the decoder: its UNet also reads the prompt, encoded by the
/// multilingual M-CLIP text encoder.
#[derive(Clone, Copy)]
pub struct DecoderText<'a> {
    /// The XLM-Roberta tokenizer (77 tokens, padded, truncated).
    pub tokenizer: &'a dyn PromptTokenizer,
    /// The M-CLIP text encoder: hidden states `[B, 77, C]` + pooled projected `[B, E]`.
    pub text_encoder: &'a dyn TextEncoder,
}

/// The networks of the decoder stage.
pub struct DecoderModels<'a> {
    /// The decoder UNet (2.2, inpainting or ControlNet variant; or a 2.1 UNet).
    pub unet: &'a dyn Denoiser,
    /// The MoVQ codec.
    pub movq: &'a dyn LatentCodec,
    /// `Some` for a Kandinsky 2.1 decoder. The flows then follow diffusers' 2.1 pipelines:
    /// the UNet is conditioned on [`DecoderOptions::prompt`] too, img2img noises the image
    /// with 2.1's fixed schedule, and inpainting does not paste the known region back.
    pub text: Option<DecoderText<'a>>,
}

/// Options shared by every decoder flow (diffusers' defaults).
#[derive(Debug, Clone)]
pub struct DecoderOptions {
    /// Output height in pixels (512); rounded up to a multiple of 64 by text2img.
    pub height: usize,
    /// Output width in pixels (512).
    pub width: usize,
    /// Denoising steps (100).
    pub steps: usize,
    /// Guidance scale (4.0); CFG only when > 1.
    pub guidance_scale: f64,
    /// Images per embedding (1).
    pub num_images_per_prompt: usize,
    /// Seed of the host RNG (item `i` uses `seed + i`).
    pub seed: u64,
    /// Explicit initial Gaussian noise `[B, 4, h/8, w/8]`: text2img's starting latents, or
    /// the noise added to the encoded image (img2img, inpainting).
    pub noise: Option<Tensor>,
    /// Kandinsky 2.1 only (its UNet reads the text; 2.2 decoders ignore it): one prompt, or
    /// one per image embedding.
    pub prompt: Vec<String>,
    /// Kandinsky 2.1 only: the unconditional text under CFG (one, or one per prompt);
    /// `None` = the empty prompt, as diffusers does.
    pub negative_prompt: Option<Vec<String>>,
}

impl Default for DecoderOptions {
    fn default() -> Self {
        Self {
            height: 512,
            width: 512,
            steps: 100,
            guidance_scale: 4.0,
            num_images_per_prompt: 1,
            seed: 0,
            noise: None,
            prompt: Vec::new(),
            negative_prompt: None,
        }
    }
}

/// The size diffusers actually generates: each side rounded UP to a multiple of 64
/// (`downscale_height_and_width`). Returns pixel `(height, width)`.
pub fn rounded_size(height: usize, width: usize) -> (usize, usize) {
    (height.div_ceil(64) * 64, width.div_ceil(64) * 64)
}

fn latent_size(height: usize, width: usize, warn: bool) -> Result<(usize, usize)> {
    if height == 0 || width == 0 {
        return Err(Error::invalid(format!(
            "size {width}×{height} must be positive"
        )));
    }
    let (h, w) = rounded_size(height, width);
    if warn && (h, w) != (height, width) {
        tracing::warn!(
            "{width}×{height} is not a multiple of 64: generating {w}×{h} (as diffusers does)"
        );
    }
    Ok((h / 8, w / 8))
}

fn require_multiple_of_64(what: &str, height: usize, width: usize) -> Result<()> {
    if height % 64 != 0 || width % 64 != 0 || height == 0 || width == 0 {
        return Err(Error::invalid(format!(
            "{what} is {width}×{height}; this flow needs sides that are positive multiples of 64"
        )));
    }
    Ok(())
}

/// Image embeddings as the UNet sees them: `[negative; positive]` under CFG, each repeated
/// `n` times.
fn stacked_embeds(
    unet: &dyn Denoiser,
    image_embeds: &Tensor,
    negative: &Tensor,
    n: usize,
    cfg: bool,
) -> Result<Tensor> {
    if image_embeds.rank() != 2 {
        return Err(Error::invalid(format!(
            "image_embeds must be [B, E], got {:?}",
            image_embeds.dims()
        )));
    }
    let pos = repeat_interleave(image_embeds, n)?;
    let t = if cfg {
        if negative.dims() != image_embeds.dims() {
            return Err(Error::invalid(format!(
                "negative_image_embeds {:?} must match image_embeds {:?}",
                negative.dims(),
                image_embeds.dims()
            )));
        }
        Tensor::cat(&[repeat_interleave(negative, n)?, pos], 0)?
    } else {
        pos
    };
    Ok(t.to_device(unet.device())?.to_dtype(unet.dtype())?)
}

/// Kandinsky 2.1's text conditioning at the UNet's batch (`[negative; positive]` under CFG).
struct TextCond {
    text_embeds: Tensor,
    hidden: Tensor,
}

/// One prompt list spread over `batch` image embeddings (1 → repeated, `batch` → as is).
fn spread(prompts: &[String], batch: usize, what: &str) -> Result<Vec<String>> {
    match prompts.len() {
        1 => Ok(vec![prompts[0].clone(); batch]),
        n if n == batch => Ok(prompts.to_vec()),
        n => Err(Error::invalid(format!(
            "{n} {what} for {batch} image embeddings: give one, or one per image embedding"
        ))),
    }
}

fn encode_text(
    text: &DecoderText<'_>,
    unet: &dyn Denoiser,
    prompts: &[String],
    n: usize,
) -> Result<TextCond> {
    let tokens = text.tokenizer.tokenize(prompts)?;
    let dev = text.text_encoder.device();
    let out = text.text_encoder.encode_text(
        &tokens.ids.to_device(dev)?,
        Some(&tokens.mask.to_device(dev)?),
    )?;
    let place = |t: &Tensor| -> Result<Tensor> {
        repeat_interleave(&t.to_device(unet.device())?.to_dtype(unet.dtype())?, n)
    };
    Ok(TextCond {
        text_embeds: place(&out.text_embeds)?,
        hidden: place(&out.last_hidden_state)?,
    })
}

/// Kandinsky 2.1: encode the prompts (and, under CFG, the negative prompts first), as
/// diffusers' `KandinskyPipeline._encode_prompt` does. `None` for 2.2 decoders.
fn text_conditioning(
    models: &DecoderModels<'_>,
    opts: &DecoderOptions,
    batch: usize,
    n: usize,
    cfg: bool,
) -> Result<Option<TextCond>> {
    let Some(text) = &models.text else {
        return Ok(None);
    };
    if opts.prompt.is_empty() {
        return Err(Error::invalid(
            "a Kandinsky 2.1 decoder is conditioned on text too: give the prompt (DecoderOptions::prompt)",
        ));
    }
    let prompts = spread(&opts.prompt, batch, "prompts")?;
    let cond = encode_text(text, models.unet, &prompts, n)?;
    if !cfg {
        return Ok(Some(cond));
    }
    let negative = match &opts.negative_prompt {
        Some(neg) if !neg.is_empty() => spread(neg, batch, "negative prompts")?,
        _ => vec![String::new(); batch],
    };
    let un = encode_text(text, models.unet, &negative, n)?;
    Ok(Some(TextCond {
        text_embeds: Tensor::cat(&[&un.text_embeds, &cond.text_embeds], 0)?,
        hidden: Tensor::cat(&[&un.hidden, &cond.hidden], 0)?,
    }))
}

/// Per-flow extras of the denoising loop.
struct LoopInputs<'a> {
    /// Inpainting: `(masked image latents, keep-mask)` at batch `B` (doubled for CFG inside).
    inpaint: Option<InpaintState<'a>>,
    /// ControlNet hint at batch `B`.
    hint: Option<Tensor>,
    /// Kandinsky 2.1's text conditioning.
    text: Option<TextCond>,
}

struct InpaintState<'a> {
    image_latents: &'a Tensor,
    mask: &'a Tensor,
    masked: &'a Tensor,
    noise: &'a Tensor,
    /// 2.2 re-noises the known region and pastes it back after every step; 2.1 does not.
    paste: bool,
}

fn dup(x: &Tensor, cfg: bool) -> Result<Tensor> {
    Ok(if cfg {
        Tensor::cat(&[x, x], 0)?
    } else {
        x.clone()
    })
}

#[allow(clippy::too_many_arguments)]
fn denoise(
    models: &DecoderModels<'_>,
    scheduler: &mut dyn Scheduler,
    embeds: &Tensor,
    mut latents: Tensor,
    start: usize,
    guidance: f64,
    inputs: &LoopInputs<'_>,
    noise: &mut dyn NoiseSource,
    callback: &mut Callback<'_>,
) -> Result<Tensor> {
    let cfg = enabled(guidance);
    let channels = latents.dim(1)?;
    let timesteps = scheduler.timesteps().to_vec();
    let total = timesteps.len() - start;
    let cond = DenoiserCondition {
        image_embeds: Some(embeds.clone()),
        hint: inputs.hint.as_ref().map(|h| dup(h, cfg)).transpose()?,
        text_embeds: inputs.text.as_ref().map(|t| t.text_embeds.clone()),
        text_hidden_states: inputs.text.as_ref().map(|t| t.hidden.clone()),
    };
    // What every step shares (the image tokens' keys and values, the encoded hint, ...).
    let cond = models.unet.prepare(&cond)?;
    let extra = match &inputs.inpaint {
        Some(st) => Some((dup(st.masked, cfg)?, dup(st.mask, cfg)?)),
        None => None,
    };
    let keep_variance = scheduler.uses_learned_variance();
    for (i, &t) in timesteps.iter().enumerate().skip(start) {
        let model_in = dup(&latents, cfg)?;
        let model_in = scheduler.scale_model_input(&model_in, i)?;
        let model_in = match &extra {
            Some((masked, mask)) => Tensor::cat(&[&model_in, masked, mask], 1)?,
            None => model_in,
        };
        let ts = vec![t; model_in.dim(0)?];
        let pred = models.unet.predict_prepared(&model_in, &ts, &cond)?;
        let pred = decoder_prediction(&pred, channels, cfg.then_some(guidance), keep_variance)?;
        latents = scheduler.step(&pred.to_dtype(latents.dtype())?, i, &latents, noise)?;
        if let Some(st) = inputs.inpaint.as_ref().filter(|st| st.paste) {
            // Re-noise the known region to the next level and paste it back (diffusers does
            // this with element 0 only; here every batch element keeps its own image).
            let proper = if i + 1 < timesteps.len() {
                scheduler.add_noise(st.image_latents, st.noise, i + 1)?
            } else {
                st.image_latents.clone()
            };
            latents = blend(st.mask, &proper, &latents)?;
        }
        report(
            callback,
            StepEvent {
                stage: Stage::Decoder,
                step: i - start,
                total,
                timestep: t,
                latents: &latents,
            },
        )?;
    }
    if let Some(st) = inputs.inpaint.as_ref().filter(|st| st.paste) {
        latents = blend(st.mask, st.image_latents, &latents)?;
    }
    Ok(latents)
}

/// `mask·known + (1 − mask)·generated`.
fn blend(mask: &Tensor, known: &Tensor, generated: &Tensor) -> Result<Tensor> {
    let inv = (1.0 - mask)?;
    Ok((mask.broadcast_mul(known)? + inv.broadcast_mul(generated)?)?)
}

fn initial_noise(
    opts: &DecoderOptions,
    shape: &[usize],
    unet: &dyn Denoiser,
    noise: &mut dyn NoiseSource,
) -> Result<Tensor> {
    match &opts.noise {
        Some(n) => {
            if n.dims() != shape {
                return Err(Error::invalid(format!(
                    "initial noise has shape {:?}, this run needs {shape:?}",
                    n.dims()
                )));
            }
            Ok(n.to_device(unet.device())?.to_dtype(unet.dtype())?)
        }
        None => noise.randn(&shape.into(), unet.dtype(), unet.device()),
    }
}

/// Decode latents to images in [-1, 1].
pub fn decode(movq: &dyn LatentCodec, latents: &Tensor) -> Result<Tensor> {
    let l = latents.to_device(movq.device())?.to_dtype(movq.dtype())?;
    movq.decode(&l, true)
}

fn embeds_batch(image_embeds: &Tensor) -> Result<usize> {
    Ok(image_embeds.dim(0)?)
}

/// text2img: image embeddings → latents (decode them with [`decode`]).
pub fn text2img(
    models: &DecoderModels<'_>,
    scheduler: &mut dyn Scheduler,
    image_embeds: &Tensor,
    negative_image_embeds: &Tensor,
    opts: &DecoderOptions,
    hint: Option<&Tensor>,
    hooks: &mut Hooks<'_>,
) -> Result<Tensor> {
    let n = opts.num_images_per_prompt.max(1);
    let cfg = enabled(opts.guidance_scale);
    let embeds = stacked_embeds(models.unet, image_embeds, negative_image_embeds, n, cfg)?;
    let batch = embeds_batch(image_embeds)? * n;
    let (lh, lw) = latent_size(opts.height, opts.width, true)?;
    let hint = prepare_hint(models.unet, hint, n, batch, lh, lw)?;
    scheduler.set_timesteps(opts.steps)?;
    let c = models.movq.latent_channels();
    let mut seeded = SeededNoise::new(opts.seed, batch);
    let noise: &mut dyn NoiseSource = match hooks.noise.as_deref_mut() {
        Some(n) => n,
        None => &mut seeded,
    };
    let latents = initial_noise(opts, &[batch, c, lh, lw], models.unet, noise)?;
    let latents = (latents * scheduler.init_noise_sigma())?;
    let inputs = LoopInputs {
        inpaint: None,
        hint,
        text: text_conditioning(models, opts, batch / n, n, cfg)?,
    };
    denoise(
        models,
        scheduler,
        &embeds,
        latents,
        0,
        opts.guidance_scale,
        &inputs,
        noise,
        &mut hooks.callback,
    )
}

fn prepare_hint(
    unet: &dyn Denoiser,
    hint: Option<&Tensor>,
    n: usize,
    batch: usize,
    lh: usize,
    lw: usize,
) -> Result<Option<Tensor>> {
    let Some(h) = hint else { return Ok(None) };
    let (hb, hc, hh, hw) = h
        .dims4()
        .map_err(|_| Error::invalid(format!("hint must be [B, 3, H, W], got {:?}", h.dims())))?;
    if hc != 3 || hh != lh * 8 || hw != lw * 8 {
        return Err(Error::invalid(format!(
            "hint is {hw}×{hh} with {hc} channels; it must be RGB at the output size {}×{}",
            lw * 8,
            lh * 8
        )));
    }
    let h = repeat_interleave(h, n)?;
    let h = if hb * n == batch {
        h
    } else if hb == 1 {
        h.repeat((batch, 1, 1, 1))?
    } else {
        return Err(Error::invalid(format!(
            "{hb} hints for a batch of {}",
            batch / n
        )));
    };
    Ok(Some(h.to_device(unet.device())?.to_dtype(unet.dtype())?))
}

/// Encode `[N, 3, H, W]` images in [-1, 1] and spread them over `batch` (N = 1 or batch/n).
fn encode_images(
    models: &DecoderModels<'_>,
    image: &Tensor,
    n: usize,
    batch: usize,
) -> Result<Tensor> {
    let img = image
        .to_device(models.movq.device())?
        .to_dtype(models.movq.dtype())?;
    let lat = models.movq.encode(&img)?;
    let lat = repeat_interleave(&lat, n)?;
    let lat = if lat.dim(0)? == batch {
        lat
    } else if lat.dim(0)? == n {
        lat.repeat((batch / n, 1, 1, 1))?
    } else {
        return Err(Error::invalid(format!(
            "{} images for {} image embeddings",
            image.dim(0)?,
            batch / n
        )));
    };
    Ok(lat
        .to_device(models.unet.device())?
        .to_dtype(models.unet.dtype())?)
}

/// img2img: noise the encoded image to `strength` and denoise (with an optional ControlNet hint).
#[allow(clippy::too_many_arguments)]
pub fn img2img(
    models: &DecoderModels<'_>,
    scheduler: &mut dyn Scheduler,
    image_embeds: &Tensor,
    negative_image_embeds: &Tensor,
    image: &Tensor,
    strength: f64,
    opts: &DecoderOptions,
    hint: Option<&Tensor>,
    hooks: &mut Hooks<'_>,
) -> Result<Tensor> {
    let (_, _, ih, iw) = image.dims4()?;
    require_multiple_of_64("the input image", ih, iw)?;
    let n = opts.num_images_per_prompt.max(1);
    let cfg = enabled(opts.guidance_scale);
    let embeds = stacked_embeds(models.unet, image_embeds, negative_image_embeds, n, cfg)?;
    let batch = embeds_batch(image_embeds)? * n;
    let hint = prepare_hint(models.unet, hint, n, batch, ih / 8, iw / 8)?;
    let init = encode_images(models, image, n, batch)?;
    scheduler.set_timesteps(opts.steps)?;
    let start = scheduler.img2img_start(strength)?;
    if start >= scheduler.timesteps().len() {
        return Err(Error::invalid(format!(
            "strength {strength} with {} steps leaves no step to run; raise the strength or the steps",
            opts.steps
        )));
    }
    let mut seeded = SeededNoise::new(opts.seed, batch);
    let noise: &mut dyn NoiseSource = match hooks.noise.as_deref_mut() {
        Some(n) => n,
        None => &mut seeded,
    };
    let eps = initial_noise(opts, init.dims(), models.unet, noise)?;
    let latents = if models.text.is_some() {
        kandinsky21_img2img_noise(scheduler, &init, &eps, strength)?
    } else {
        scheduler.add_noise(&init, &eps, start)?
    };
    let inputs = LoopInputs {
        inpaint: None,
        hint,
        text: text_conditioning(models, opts, batch / n, n, cfg)?,
    };
    denoise(
        models,
        scheduler,
        &embeds,
        latents,
        start,
        opts.guidance_scale,
        &inputs,
        noise,
        &mut hooks.callback,
    )
}

/// Kandinsky 2.1's img2img noising (`KandinskyImg2ImgPipeline.add_noise`, from the original
/// repository): whatever the scheduler, the encoded image is noised with the fixed schedule
/// β = linspace(0.0001, 0.02, 1000) at `t = int(T·strength) − 2`. diffusers indexes its table
/// with a negative `t` for strength < 0.002 (wrapping to almost pure noise); here `t` stops at 0.
fn kandinsky21_img2img_noise(
    scheduler: &dyn Scheduler,
    init: &Tensor,
    eps: &Tensor,
    strength: f64,
) -> Result<Tensor> {
    let t = ((scheduler.num_train_timesteps() as f64 * strength) as i64 - 2).max(0);
    let tables = NoiseTables::from_betas(torch_linspace_f32(0.0001, 0.02, 1000));
    let init = (init * scheduler.init_noise_sigma())?;
    add_noise_ddpm(&tables, &init, eps, t)
}

/// The inpainting keep-mask in latent space, from a user mask `[N, 1, H, W]` in [0, 1]
/// where WHITE (1) = repaint (diffusers ≥ 0.19): binarise at 0.5, invert (1 = keep), nearest
/// downsample to the latent size, then shrink the keep region by diffusers' 6-neighbour rule.
pub fn latent_keep_mask(mask: &Tensor, lh: usize, lw: usize) -> Result<Tensor> {
    let (b, c, h, w) = mask.dims4()?;
    if c != 1 {
        return Err(Error::invalid(format!("mask must have 1 channel, got {c}")));
    }
    let m = mask
        .to_dtype(DType::F32)?
        .to_device(&candle_core::Device::Cpu)?;
    let data = m.flatten_all()?.to_vec1::<f32>()?;
    let mut out = Vec::with_capacity(b * lh * lw);
    for n in 0..b {
        let img = &data[n * h * w..(n + 1) * h * w];
        // PyTorch "nearest": source index floor(dst · in / out).
        let mut keep = vec![0f32; lh * lw];
        for i in 0..lh {
            for j in 0..lw {
                let si = (i * h) / lh;
                let sj = (j * w) / lw;
                let v = img[si * w + sj];
                keep[i * lw + j] = if v >= 0.5 { 0.0 } else { 1.0 };
            }
        }
        let old = keep.clone();
        for i in 0..lh {
            for j in 0..lw {
                if old[i * lw + j] == 1.0 {
                    continue;
                }
                let mut clear = |ii: usize, jj: usize| keep[ii * lw + jj] = 0.0;
                if i > 0 {
                    clear(i - 1, j);
                }
                if j > 0 {
                    clear(i, j - 1);
                }
                if i > 0 && j > 0 {
                    clear(i - 1, j - 1);
                }
                if i + 1 < lh {
                    clear(i + 1, j);
                }
                if j + 1 < lw {
                    clear(i, j + 1);
                }
                if i + 1 < lh && j + 1 < lw {
                    clear(i + 1, j + 1);
                }
            }
        }
        out.extend(keep);
    }
    Ok(Tensor::from_vec(
        out,
        (b, 1, lh, lw),
        &candle_core::Device::Cpu,
    )?)
}

/// Inpainting: repaint where the mask is white, keep the rest of `image`.
///
/// `image` `[N, 3, H, W]` in [-1, 1], `mask` `[N, 1, H, W]` in [0, 1] (1 = repaint), N = 1 or
/// one per image embedding. With a 2.2 UNet the known region is re-noised and pasted back
/// after every step and at the end; unlike diffusers, every batch element is blended with its
/// own image and mask. A 2.1 decoder relies on the 9-channel input alone, as diffusers'
/// `KandinskyInpaintPipeline` does.
#[allow(clippy::too_many_arguments)]
pub fn inpaint(
    models: &DecoderModels<'_>,
    scheduler: &mut dyn Scheduler,
    image_embeds: &Tensor,
    negative_image_embeds: &Tensor,
    image: &Tensor,
    mask: &Tensor,
    opts: &DecoderOptions,
    hooks: &mut Hooks<'_>,
) -> Result<Tensor> {
    let (_, _, ih, iw) = image.dims4()?;
    require_multiple_of_64("the input image", ih, iw)?;
    let (_, _, mh, mw) = mask.dims4()?;
    if (mh, mw) != (ih, iw) {
        return Err(Error::invalid(format!(
            "the mask is {mw}×{mh} but the image is {iw}×{ih}; they must be the same size"
        )));
    }
    if models.unet.sample_channels() != 9 {
        return Err(Error::invalid(format!(
            "inpainting needs a 9-channel inpainting UNet (kandinsky-2-2-decoder-inpaint, kandinsky-2-1-inpaint); this UNet takes {} channels",
            models.unet.sample_channels()
        )));
    }
    let n = opts.num_images_per_prompt.max(1);
    let cfg = enabled(opts.guidance_scale);
    let embeds = stacked_embeds(models.unet, image_embeds, negative_image_embeds, n, cfg)?;
    let batch = embeds_batch(image_embeds)? * n;
    let image_latents = encode_images(models, image, n, batch)?;
    let (lh, lw) = (image_latents.dim(2)?, image_latents.dim(3)?);
    let keep = latent_keep_mask(mask, lh, lw)?;
    let keep = repeat_interleave(&keep, n)?;
    let keep = if keep.dim(0)? == batch {
        keep
    } else {
        keep.repeat((batch / n, 1, 1, 1))?
    };
    let keep = keep
        .to_device(models.unet.device())?
        .to_dtype(models.unet.dtype())?;
    let masked = image_latents.broadcast_mul(&keep)?;
    scheduler.set_timesteps(opts.steps)?;
    let c = models.movq.latent_channels();
    let mut seeded = SeededNoise::new(opts.seed, batch);
    let noise: &mut dyn NoiseSource = match hooks.noise.as_deref_mut() {
        Some(n) => n,
        None => &mut seeded,
    };
    let latents = initial_noise(opts, &[batch, c, lh, lw], models.unet, noise)?;
    let latents = (latents * scheduler.init_noise_sigma())?;
    let eps = latents.clone();
    let inputs = LoopInputs {
        inpaint: Some(InpaintState {
            image_latents: &image_latents,
            mask: &keep,
            masked: &masked,
            noise: &eps,
            paste: models.text.is_none(),
        }),
        hint: None,
        text: text_conditioning(models, opts, batch / n, n, cfg)?,
    };
    denoise(
        models,
        scheduler,
        &embeds,
        latents,
        0,
        opts.guidance_scale,
        &inputs,
        noise,
        &mut hooks.callback,
    )
}
