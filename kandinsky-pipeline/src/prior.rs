//! The prior stage: prompt → CLIP image embedding (diffusers' `KandinskyV22PriorPipeline`,
//! its `interpolate`, and `KandinskyV22PriorEmb2EmbPipeline`).

use candle_core::{DType, Tensor};
use kandinsky_core::noise::{NoiseSource, SeededNoise};
use kandinsky_core::traits::{
    EmbeddingPrior, ImageEncoder, PriorCondition, Scheduler, TextEncoder,
};
use kandinsky_core::{Error, Result};

use crate::callback::{report, Callback, Hooks, Stage, StepEvent};
use crate::guidance::{combine, enabled, repeat_interleave};

/// Token ids and attention mask of a batch of prompts.
#[derive(Debug, Clone)]
pub struct Tokens {
    /// `[B, L]` u32.
    pub ids: Tensor,
    /// `[B, L]` (1 = token, 0 = padding).
    pub mask: Tensor,
}

/// Turns prompts into fixed-length token batches (CLIP: 77, padded, truncated).
pub trait PromptTokenizer {
    /// Tokenize `prompts`.
    fn tokenize(&self, prompts: &[String]) -> Result<Tokens>;
}

/// The networks of the prior stage.
pub struct PriorModels<'a> {
    /// The prompt tokenizer.
    pub tokenizer: &'a dyn PromptTokenizer,
    /// CLIP text tower with projection.
    pub text_encoder: &'a dyn TextEncoder,
    /// The diffusion prior.
    pub prior: &'a dyn EmbeddingPrior,
}

/// Options of one prior run (diffusers' defaults).
#[derive(Debug, Clone)]
pub struct PriorOptions {
    /// Denoising steps (25).
    pub steps: usize,
    /// Guidance scale (4.0); CFG only when > 1.
    pub guidance_scale: f64,
    /// Images per prompt (1).
    pub num_images_per_prompt: usize,
    /// Seed of the host RNG (item `i` uses `seed + i`).
    pub seed: u64,
    /// Explicit initial latents `[B·n, E]` instead of seeded noise.
    pub latents: Option<Tensor>,
}

impl Default for PriorOptions {
    fn default() -> Self {
        Self {
            steps: 25,
            guidance_scale: 4.0,
            num_images_per_prompt: 1,
            seed: 0,
            latents: None,
        }
    }
}

/// The prior's outputs.
#[derive(Debug, Clone)]
pub struct ImageEmbeds {
    /// `[B, E]`.
    pub image_embeds: Tensor,
    /// `[B, E]`.
    pub negative_image_embeds: Tensor,
}

struct Encoded {
    text_embeds: Tensor,
    hidden: Tensor,
    mask: Tensor,
}

fn encode(models: &PriorModels<'_>, prompts: &[String], n: usize) -> Result<Encoded> {
    let tokens = models.tokenizer.tokenize(prompts)?;
    let dev = models.text_encoder.device();
    let out = models
        .text_encoder
        .encode_text(&tokens.ids.to_device(dev)?, None)?;
    let dtype = models.prior.dtype();
    let pdev = models.prior.device();
    Ok(Encoded {
        text_embeds: repeat_interleave(&out.text_embeds.to_device(pdev)?.to_dtype(dtype)?, n)?,
        hidden: repeat_interleave(&out.last_hidden_state.to_device(pdev)?.to_dtype(dtype)?, n)?,
        mask: repeat_interleave(&tokens.mask.to_device(pdev)?, n)?,
    })
}

fn cat0(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(Tensor::cat(&[a, b], 0)?)
}

/// Run the prior denoising loop from `latents` over `timesteps()[start..]`.
#[allow(clippy::too_many_arguments)]
fn denoise(
    models: &PriorModels<'_>,
    scheduler: &mut dyn Scheduler,
    cond: &Encoded,
    mut latents: Tensor,
    start: usize,
    guidance: Option<f64>,
    noise: &mut dyn NoiseSource,
    callback: &mut Callback<'_>,
) -> Result<Tensor> {
    let timesteps = scheduler.timesteps().to_vec();
    let total = timesteps.len() - start;
    // What every step shares (the text tokens' keys and values at every layer).
    let prepared = models.prior.prepare(&PriorCondition {
        proj_embedding: &cond.text_embeds,
        encoder_hidden_states: &cond.hidden,
        attention_mask: &cond.mask,
    })?;
    for (i, &t) in timesteps.iter().enumerate().skip(start) {
        let input = match guidance {
            Some(_) => cat0(&latents, &latents)?,
            None => latents.clone(),
        };
        let input = scheduler.scale_model_input(&input, i)?;
        let pred = models.prior.predict_prepared(&input, t, &prepared)?;
        let pred = match guidance {
            Some(g) => combine(&pred, g)?,
            None => pred,
        };
        latents = scheduler.step(&pred, i, &latents, noise)?;
        report(
            callback,
            StepEvent {
                stage: Stage::Prior,
                step: i - start,
                total,
                timestep: t,
                latents: &latents,
            },
        )?;
    }
    models.prior.post_process_latents(&latents)
}

/// Encode the conditional prompts and, under CFG, prepend the unconditional ones.
fn conditioning(
    models: &PriorModels<'_>,
    prompts: &[String],
    uncond: &[String],
    n: usize,
    cfg: bool,
) -> Result<Encoded> {
    let cond = encode(models, prompts, n)?;
    if !cfg {
        return Ok(cond);
    }
    let un = encode(models, uncond, n)?;
    Ok(Encoded {
        text_embeds: cat0(&un.text_embeds, &cond.text_embeds)?,
        hidden: cat0(&un.hidden, &cond.hidden)?,
        mask: cat0(&un.mask, &cond.mask)?,
    })
}

/// diffusers' prompt bookkeeping: with negative prompts the batch is `prompts ‖ negatives`
/// (the prior also produces the negative embedding), and the unconditional texts are the
/// negatives twice; without, the unconditional text is "".
fn prompt_lists(
    prompts: &[String],
    negative_prompts: Option<&[String]>,
) -> Result<(Vec<String>, Vec<String>)> {
    let Some(neg) = negative_prompts else {
        return Ok((prompts.to_vec(), vec![String::new(); prompts.len()]));
    };
    let neg: Vec<String> = match neg.len() {
        1 => vec![neg[0].clone(); prompts.len()],
        n if n == prompts.len() => neg.to_vec(),
        n => {
            return Err(Error::invalid(format!(
                "{n} negative prompts for {} prompts: give one, or one per prompt",
                prompts.len()
            )))
        }
    };
    let mut all = prompts.to_vec();
    all.extend(neg.iter().cloned());
    let mut uncond = neg.clone();
    uncond.extend(neg);
    Ok((all, uncond))
}

/// Split the prior's result: with negative prompts its second half is the negative
/// embedding, else the zero-image embedding is repeated to the batch.
fn split_result(
    embeds: Tensor,
    has_negative: bool,
    zero_image_embed: &Tensor,
) -> Result<ImageEmbeds> {
    let (batch, e) = embeds.dims2()?;
    if has_negative {
        let half = batch / 2;
        return Ok(ImageEmbeds {
            image_embeds: embeds.narrow(0, 0, half)?,
            negative_image_embeds: embeds.narrow(0, half, half)?,
        });
    }
    let zero = zero_image_embed
        .to_device(embeds.device())?
        .to_dtype(embeds.dtype())?
        .broadcast_as((batch, e))
        .map_err(|_| {
            Error::invalid(format!(
                "zero-image embedding has shape {:?}, expected [1, {e}]",
                zero_image_embed.dims()
            ))
        })?
        .contiguous()?;
    Ok(ImageEmbeds {
        image_embeds: embeds,
        negative_image_embeds: zero,
    })
}

/// Prompt (+ optional negative prompt) → `image_embeds`, `negative_image_embeds`
/// (diffusers' `KandinskyV22PriorPipeline.__call__`).
///
/// Without a negative prompt the negative embedding is `zero_image_embed` (the image
/// encoder applied to an all-zeros image, `[1, E]`), repeated to the batch. With one, the
/// prior also runs on the negative prompts (as diffusers does, in the same batch) and the
/// second half of the result is the negative embedding.
pub fn prior(
    models: &PriorModels<'_>,
    scheduler: &mut dyn Scheduler,
    prompts: &[String],
    negative_prompts: Option<&[String]>,
    zero_image_embed: &Tensor,
    opts: &PriorOptions,
    hooks: &mut Hooks<'_>,
) -> Result<ImageEmbeds> {
    if prompts.is_empty() {
        return Err(Error::invalid("the prior needs at least one prompt"));
    }
    let n = opts.num_images_per_prompt.max(1);
    let (all, uncond) = prompt_lists(prompts, negative_prompts)?;
    let cfg = enabled(opts.guidance_scale);
    let cond = conditioning(models, &all, &uncond, n, cfg)?;
    scheduler.set_timesteps(opts.steps)?;
    let batch = all.len() * n;
    let e = models.prior.embedding_dim();
    let mut seeded = SeededNoise::new(opts.seed, batch);
    let noise: &mut dyn NoiseSource = match hooks.noise.as_deref_mut() {
        Some(n) => n,
        None => &mut seeded,
    };
    let latents = initial_latents(
        models.prior,
        opts.latents.as_ref(),
        &[batch, e],
        scheduler,
        noise,
    )?;
    let guidance = cfg.then_some(opts.guidance_scale);
    let embeds = denoise(
        models,
        scheduler,
        &cond,
        latents,
        0,
        guidance,
        noise,
        &mut hooks.callback,
    )?;
    split_result(embeds, negative_prompts.is_some(), zero_image_embed)
}

fn initial_latents(
    prior: &dyn EmbeddingPrior,
    given: Option<&Tensor>,
    shape: &[usize],
    scheduler: &dyn Scheduler,
    noise: &mut dyn NoiseSource,
) -> Result<Tensor> {
    let latents = match given {
        Some(l) => {
            if l.dims() != shape {
                return Err(Error::invalid(format!(
                    "prior latents have shape {:?}, expected {shape:?}",
                    l.dims()
                )));
            }
            l.to_device(prior.device())?.to_dtype(prior.dtype())?
        }
        None => noise.randn(&shape.into(), prior.dtype(), prior.device())?,
    };
    Ok((latents * scheduler.init_noise_sigma())?)
}

/// One condition of a fusion (`interpolate`).
#[derive(Debug, Clone)]
pub enum FusionInput {
    /// A text prompt, run through the prior.
    Text(String),
    /// Preprocessed pixels `[1, 3, S, S]` for the image encoder.
    Pixels(Tensor),
    /// A CLIP image embedding `[1, E]`, used as is.
    Embedding(Tensor),
}

/// Options of a fusion run.
#[derive(Debug, Clone, Default)]
pub struct FusionOptions {
    /// The prior run options.
    pub prior: PriorOptions,
    /// Negative prompt of each text's prior run (`negative_prior_prompt`).
    pub negative_prior_prompt: Option<String>,
    /// Negative prompt of the fused result (`negative_prompt`, default "").
    pub negative_prompt: String,
}

/// Mix texts and images with weights (diffusers' `interpolate`): Σ wᵢ·embedᵢ (weights are not
/// normalised); the negative embedding comes from a prior run on `negative_prompt`.
pub fn interpolate(
    models: &PriorModels<'_>,
    image_encoder: Option<&dyn ImageEncoder>,
    scheduler: &mut dyn Scheduler,
    inputs: &[(FusionInput, f64)],
    zero_image_embed: &Tensor,
    opts: &FusionOptions,
    hooks: &mut Hooks<'_>,
) -> Result<ImageEmbeds> {
    if inputs.is_empty() {
        return Err(Error::invalid(
            "interpolate needs at least one text or image",
        ));
    }
    let n = opts.prior.num_images_per_prompt.max(1);
    let dtype = models.prior.dtype();
    let dev = models.prior.device().clone();
    let neg_prior = opts.negative_prior_prompt.as_ref().map(|s| vec![s.clone()]);
    let mut sum: Option<Tensor> = None;
    for (input, weight) in inputs {
        let emb = match input {
            FusionInput::Text(text) => {
                prior(
                    models,
                    scheduler,
                    std::slice::from_ref(text),
                    neg_prior.as_deref(),
                    zero_image_embed,
                    &opts.prior,
                    hooks,
                )?
                .image_embeds
            }
            FusionInput::Pixels(px) => {
                let enc = image_encoder.ok_or_else(|| {
                    Error::invalid(
                        "an image input needs the image encoder (prior `image_encoder/`)",
                    )
                })?;
                let px = px.to_device(enc.device())?.to_dtype(enc.dtype())?;
                repeat_interleave(&enc.encode_image(&px)?, n)?
            }
            FusionInput::Embedding(e) => repeat_interleave(e, n)?,
        };
        let emb = (emb.to_device(&dev)?.to_dtype(DType::F32)? * *weight)?;
        sum = Some(match sum {
            Some(s) => (s + emb)?,
            None => emb,
        });
    }
    let image_embeds = sum.expect("inputs is not empty").to_dtype(dtype)?;
    let out = prior(
        models,
        scheduler,
        std::slice::from_ref(&opts.negative_prompt),
        neg_prior.as_deref(),
        zero_image_embed,
        &opts.prior,
        hooks,
    )?;
    let negative_image_embeds = if opts.negative_prompt.is_empty() {
        out.negative_image_embeds
    } else {
        out.image_embeds
    };
    Ok(ImageEmbeds {
        image_embeds,
        negative_image_embeds,
    })
}

/// Image-guided prior (diffusers' `KandinskyV22PriorEmb2EmbPipeline`): the image's CLIP
/// embedding is noised to the level given by `strength` and denoised towards the prompt.
#[allow(clippy::too_many_arguments)]
pub fn emb2emb(
    models: &PriorModels<'_>,
    scheduler: &mut dyn Scheduler,
    prompts: &[String],
    image_embeds: &Tensor,
    strength: f64,
    negative_prompts: Option<&[String]>,
    zero_image_embed: &Tensor,
    opts: &PriorOptions,
    hooks: &mut Hooks<'_>,
) -> Result<ImageEmbeds> {
    if prompts.is_empty() {
        return Err(Error::invalid("emb2emb needs at least one prompt"));
    }
    let n = opts.num_images_per_prompt.max(1);
    let cfg = enabled(opts.guidance_scale);
    let (all, uncond) = prompt_lists(prompts, negative_prompts)?;
    let cond = conditioning(models, &all, &uncond, n, cfg)?;
    scheduler.set_timesteps(opts.steps)?;
    let start = scheduler.img2img_start(strength)?;
    if start >= scheduler.timesteps().len() {
        return Err(Error::invalid(format!(
            "strength {strength} with {} steps leaves no step to run",
            opts.steps
        )));
    }
    let batch = all.len() * n;
    let e = models.prior.embedding_dim();
    let img = image_embeds
        .to_device(models.prior.device())?
        .to_dtype(models.prior.dtype())?;
    if img.dims().len() != 2 || img.dim(1)? != e {
        return Err(Error::invalid(format!(
            "image embeddings have shape {:?}, expected [N, {e}]",
            img.dims()
        )));
    }
    // diffusers repeats the image embedding for the whole (prompt + negative) batch.
    let img = repeat_interleave(&img, n)?;
    let img = if img.dim(0)? == batch {
        img
    } else if batch % img.dim(0)? == 0 {
        img.repeat((batch / img.dim(0)?, 1))?
    } else {
        return Err(Error::invalid(format!(
            "{} image embeddings cannot be spread over a batch of {batch}",
            img.dim(0)?
        )));
    };
    let mut seeded = SeededNoise::new(opts.seed, batch);
    let noise: &mut dyn NoiseSource = match hooks.noise.as_deref_mut() {
        Some(n) => n,
        None => &mut seeded,
    };
    let eps = match &opts.latents {
        Some(l) => l.to_device(img.device())?.to_dtype(img.dtype())?,
        None => noise.randn(img.shape(), img.dtype(), img.device())?,
    };
    let latents = scheduler.add_noise(&img, &eps, start)?;
    let guidance = cfg.then_some(opts.guidance_scale);
    let embeds = denoise(
        models,
        scheduler,
        &cond,
        latents,
        start,
        guidance,
        noise,
        &mut hooks.callback,
    )?;
    split_result(embeds, negative_prompts.is_some(), zero_image_embed)
}
