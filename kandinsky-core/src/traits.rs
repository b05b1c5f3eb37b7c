//! The shared tensor traits through which kandinsky-pipeline composes the networks.
//!
//! Model crates implement them; the pipeline depends only on them, so another
//! implementation (Kandinsky 2.1's UNet, a quantised UNet, a remote encoder) can be swapped in.
//! Shapes use diffusers' conventions (batch first, NCHW images).

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::noise::NoiseSource;

/// Output of a text encoder.
#[derive(Debug, Clone)]
pub struct TextEncoding {
    /// Per-token hidden states `[B, L, C]` (after the final norm).
    pub last_hidden_state: Tensor,
    /// Pooled (and projected, where the model has a projection) embedding `[B, E]`.
    pub text_embeds: Tensor,
}

/// Tokens → hidden states + pooled embedding (CLIP text tower, M-CLIP).
pub trait TextEncoder {
    /// Encode `input_ids` `[B, L]` (u32). `attention_mask` `[B, L]` is used by encoders that
    /// pool with it (M-CLIP); CLIP ignores it, as transformers does for the 2.2 prior.
    fn encode_text(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<TextEncoding>;
    /// The device the weights live on.
    fn device(&self) -> &Device;
}

/// Preprocessed pixels → image embedding (CLIP vision tower with projection).
pub trait ImageEncoder {
    /// `pixel_values` `[B, 3, S, S]` (normalised) → `image_embeds` `[B, E]`.
    fn encode_image(&self, pixel_values: &Tensor) -> Result<Tensor>;
    /// The square input size `S`.
    fn image_size(&self) -> usize;
    /// The device the weights live on.
    fn device(&self) -> &Device;
    /// The dtype of the weights.
    fn dtype(&self) -> DType;
}

/// Conditioning of one prior forward.
#[derive(Debug, Clone, Copy)]
pub struct PriorCondition<'a> {
    /// Pooled text embedding `[B, E]` (`text_embeds`).
    pub proj_embedding: &'a Tensor,
    /// Text hidden states `[B, 77, E]`.
    pub encoder_hidden_states: &'a Tensor,
    /// Tokenizer attention mask `[B, 77]` (1 = token, 0 = padding).
    pub attention_mask: &'a Tensor,
}

/// A [`PriorCondition`] owned, as a [`PreparedPriorCondition`] keeps it.
#[derive(Debug, Clone)]
pub struct OwnedPriorCondition {
    /// Pooled text embedding `[B, E]`.
    pub proj_embedding: Tensor,
    /// Text hidden states `[B, 77, E]`.
    pub encoder_hidden_states: Tensor,
    /// Tokenizer attention mask `[B, 77]`.
    pub attention_mask: Tensor,
}

impl OwnedPriorCondition {
    /// The borrowed form [`EmbeddingPrior::predict`] takes.
    pub fn view(&self) -> PriorCondition<'_> {
        PriorCondition {
            proj_embedding: &self.proj_embedding,
            encoder_hidden_states: &self.encoder_hidden_states,
            attention_mask: &self.attention_mask,
        }
    }
}

impl From<&PriorCondition<'_>> for OwnedPriorCondition {
    fn from(c: &PriorCondition<'_>) -> Self {
        Self {
            proj_embedding: c.proj_embedding.clone(),
            encoder_hidden_states: c.encoder_hidden_states.clone(),
            attention_mask: c.attention_mask.clone(),
        }
    }
}

/// A prior conditioning prepared once for a whole generation ([`EmbeddingPrior::prepare`]).
pub type PreparedPriorCondition = Prepared<OwnedPriorCondition>;

/// The diffusion prior: noisy image embedding + text → predicted (normalised) image embedding.
pub trait EmbeddingPrior {
    /// One denoiser evaluation at `timestep` for every batch element.
    fn predict(&self, latents: &Tensor, timestep: f64, cond: &PriorCondition<'_>)
        -> Result<Tensor>;
    /// Compute once what every step of a generation conditioned on `cond` shares (the
    /// default prepares nothing). Checks `cond` as [`Self::predict`] would.
    fn prepare(&self, cond: &PriorCondition<'_>) -> Result<PreparedPriorCondition> {
        Ok(PreparedPriorCondition::new(cond, Vec::new()))
    }
    /// [`Self::predict`] with a conditioning from [`Self::prepare`] (of this model): the same
    /// result up to rounding, without recomputing the prepared part.
    fn predict_prepared(
        &self,
        latents: &Tensor,
        timestep: f64,
        prepared: &PreparedPriorCondition,
    ) -> Result<Tensor> {
        self.predict(latents, timestep, &prepared.condition().view())
    }
    /// Map the final latents from the normalised space to CLIP space (`z·std + mean`).
    fn post_process_latents(&self, latents: &Tensor) -> Result<Tensor>;
    /// Width of the image embedding.
    fn embedding_dim(&self) -> usize;
    /// The device the weights live on.
    fn device(&self) -> &Device;
    /// The dtype of the weights.
    fn dtype(&self) -> DType;
}

/// Conditioning of one decoder UNet forward.
#[derive(Debug, Clone, Default)]
pub struct DenoiserCondition {
    /// CLIP image embeddings `[B, E]`.
    pub image_embeds: Option<Tensor>,
    /// ControlNet hint `[B, 3, H·8, W·8]` in [0, 1].
    pub hint: Option<Tensor>,
    /// Kandinsky 2.1: pooled text embedding `[B, 768]`.
    pub text_embeds: Option<Tensor>,
    /// Kandinsky 2.1: text hidden states `[B, 77, 1024]`.
    pub text_hidden_states: Option<Tensor>,
}

/// A conditioning `C` prepared once for a whole generation ([`Denoiser::prepare`],
/// [`EmbeddingPrior::prepare`]): besides the conditioning itself, the tensors of a forward
/// that depend on it alone (not on the noisy latents or the timestep), computed once instead
/// of at every step. Which tensors, in which order, is the preparing model's business.
///
/// Each preparation has its own [`id`](Self::id) (clones share it), so a CUDA graph that
/// holds copies of the tensors refreshes them only when another preparation comes.
#[derive(Debug, Clone)]
pub struct Prepared<C> {
    id: u64,
    condition: C,
    tensors: Vec<Tensor>,
}

/// A decoder conditioning prepared once for a whole generation ([`Denoiser::prepare`]).
pub type PreparedCondition = Prepared<DenoiserCondition>;

/// A process-wide fresh id for a preparation (never 0, which `graph::Fixed::NONE` uses).
fn fresh_preparation_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl<C: Clone> Prepared<C> {
    /// `condition` with the `tensors` a model computed from it; a fresh [`id`](Self::id).
    pub fn new(condition: impl Into<C>, tensors: Vec<Tensor>) -> Self {
        Self {
            id: fresh_preparation_id(),
            condition: condition.into(),
            tensors,
        }
    }

    /// The same preparation (same id) reading `tensors` instead, e.g. a CUDA graph's
    /// copies of them; the count and shapes must be those of [`Self::tensors`].
    pub fn with_tensors(&self, tensors: Vec<Tensor>) -> Self {
        Self {
            id: self.id,
            condition: self.condition.clone(),
            tensors,
        }
    }

    /// Identifies this preparation (and its clones) within the process.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The conditioning it was prepared from.
    pub fn condition(&self) -> &C {
        &self.condition
    }

    /// The model's prepared tensors (empty for a model that prepares nothing).
    pub fn tensors(&self) -> &[Tensor] {
        &self.tensors
    }
}

/// The decoder UNet: noisy latents + timestep + conditioning → prediction.
pub trait Denoiser {
    /// `sample` `[B, in_channels, h, w]`, `timesteps` one per batch element → `[B, out_channels, h, w]`.
    fn predict(
        &self,
        sample: &Tensor,
        timesteps: &[f64],
        cond: &DenoiserCondition,
    ) -> Result<Tensor>;
    /// Compute once what every step of a generation conditioned on `cond` shares (the
    /// default prepares nothing). Checks `cond` as [`Self::predict`] would.
    fn prepare(&self, cond: &DenoiserCondition) -> Result<PreparedCondition> {
        Ok(PreparedCondition::new(cond.clone(), Vec::new()))
    }
    /// [`Self::predict`] with a conditioning from [`Self::prepare`] (of this model): the same
    /// result, without recomputing the prepared part.
    fn predict_prepared(
        &self,
        sample: &Tensor,
        timesteps: &[f64],
        prepared: &PreparedCondition,
    ) -> Result<Tensor> {
        self.predict(sample, timesteps, prepared.condition())
    }
    /// Channels of `sample` (4, 9 for inpainting; the ControlNet variant takes 4 + a hint).
    fn sample_channels(&self) -> usize;
    /// Output channels (8: ε and the learned variance).
    fn out_channels(&self) -> usize;
    /// The device the weights live on.
    fn device(&self) -> &Device;
    /// The dtype of the weights.
    fn dtype(&self) -> DType;
}

/// Image ↔ latents (MoVQ).
pub trait LatentCodec {
    /// `[B, 3, H, W]` in [-1, 1] → latents `[B, C, H/f, W/f]`.
    fn encode(&self, image: &Tensor) -> Result<Tensor>;
    /// Latents → image in [-1, 1] (not clamped); `force_not_quantize` skips the codebook.
    fn decode(&self, latents: &Tensor, force_not_quantize: bool) -> Result<Tensor>;
    /// Spatial down-scaling factor `f` (8).
    fn scale_factor(&self) -> usize;
    /// Latent channels `C` (4).
    fn latent_channels(&self) -> usize;
    /// The device the weights live on.
    fn device(&self) -> &Device;
    /// The dtype of the weights.
    fn dtype(&self) -> DType;
}

/// A diffusion scheduler, driven by step index.
///
/// `set_timesteps` fixes the schedule; the pipeline feeds `timesteps()[i]` to the model and
/// calls `step(i, …)`. Stochastic schedulers draw their noise from the given source, so a
/// run is reproducible.
pub trait Scheduler {
    /// Prepare `num_inference_steps` steps.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()>;
    /// The timesteps fed to the model, in order.
    fn timesteps(&self) -> &[f64];
    /// Length of the training schedule (`config.num_train_timesteps`, 1000 for Kandinsky).
    fn num_train_timesteps(&self) -> usize;
    /// Standard deviation of the initial noise (1 for the DDPM family; sigma-based
    /// schedulers such as Euler override it).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// Scale the model input at step `step_index` (identity for the DDPM family).
    fn scale_model_input(&self, sample: &Tensor, _step_index: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }
    /// One denoising step from `sample` at `timesteps()[step_index]` to the next.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor>;
    /// Noise `original` to the level of `timesteps()[step_index]`.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor>;
    /// True if the model's extra output channels carry a learned variance the step uses.
    fn uses_learned_variance(&self) -> bool;
    /// Index of the first step for img2img at `strength` (diffusers' `get_timesteps`:
    /// `init = min(int(steps·strength), steps)`, start = `steps − init`).
    fn img2img_start(&self, strength: f64) -> Result<usize> {
        if !(0.0..=1.0).contains(&strength) || strength.is_nan() {
            return Err(crate::Error::invalid(format!(
                "strength must be in [0, 1], got {strength}"
            )));
        }
        let steps = self.timesteps().len();
        let init = ((steps as f64 * strength) as usize).min(steps);
        Ok(steps - init)
    }
}
