//! diffusers `prior_transformer.py`: `PriorTransformer`, the causal transformer that
//! denoises a CLIP image embedding conditioned on the CLIP text encoding.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use kandinsky_core::attention::{prepare_segment, KvSegment};
use kandinsky_core::embeddings::{timestep_embedding, TimestepEmbedding};
use kandinsky_core::loading::load_component;
use kandinsky_core::nn::{layer_norm, layer_norm_f32, linear, Activation, LayerNorm, Linear};
use kandinsky_core::traits::{EmbeddingPrior, PreparedPriorCondition, PriorCondition};
use kandinsky_core::ModelConfig;
use kandinsky_core::{Error, Result};
use serde::Deserialize;

use crate::attention::BasicTransformerBlock;

/// The additive value diffusers uses for masked positions (text padding and the causal mask).
const MASK_VALUE: f64 = -10000.0;
/// `nn.LayerNorm` default eps (`norm_in`, `embedding_proj_norm`, `norm_out`).
const LN_EPS: f64 = 1e-5;
/// Tokens after the text: `embedding_proj(text_embeds)`, time, `proj_in(x_t)`, `prd`.
const EXTRA_TOKENS: usize = 4;

fn d_heads() -> usize {
    32
}
fn d_head_dim() -> usize {
    64
}
fn d_layers() -> usize {
    20
}
fn d_embedding_dim() -> usize {
    768
}
fn d_num_embeddings() -> usize {
    77
}
fn d_additional() -> usize {
    4
}
fn d_silu() -> String {
    "silu".into()
}
fn d_linear() -> Option<String> {
    Some("linear".into())
}
fn d_prd() -> Option<String> {
    Some("prd".into())
}

/// `prior/config.json` of a `PriorTransformer`, with diffusers' defaults for absent fields.
///
/// `null` in the file means `None` (e.g. `"added_emb_type": null`), which differs from an
/// absent field (the default); both follow diffusers.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PriorTransformerConfig {
    /// Attention heads.
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    /// Width of one head.
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: usize,
    /// Transformer blocks.
    #[serde(default = "d_layers")]
    pub num_layers: usize,
    /// Width of the image embedding being denoised (and of the text hidden states).
    #[serde(default = "d_embedding_dim")]
    pub embedding_dim: usize,
    /// Text tokens (77).
    #[serde(default = "d_num_embeddings")]
    pub num_embeddings: usize,
    /// Tokens after the text (4: text embedding, time, noisy embedding, `prd`).
    #[serde(default = "d_additional")]
    pub additional_embeddings: usize,
    /// Training-time dropout (unused at inference).
    #[serde(default)]
    pub dropout: f64,
    /// Activation of `time_embedding` (`silu`, `swish` or `gelu`).
    #[serde(default = "d_silu")]
    pub time_embed_act_fn: String,
    /// `layer` for a LayerNorm before the blocks, `None` for none.
    #[serde(default)]
    pub norm_in_type: Option<String>,
    /// `layer` for a LayerNorm on the pooled text embedding, `None` for none.
    #[serde(default)]
    pub embedding_proj_norm_type: Option<String>,
    /// Projection of the text hidden states; only `linear` is supported.
    #[serde(default = "d_linear")]
    pub encoder_hid_proj_type: Option<String>,
    /// Extra learned token; only `prd` is supported.
    #[serde(default = "d_prd")]
    pub added_emb_type: Option<String>,
    /// Hidden width of `time_embedding` (default: the inner width).
    #[serde(default)]
    pub time_embed_dim: Option<usize>,
    /// Width of the pooled text embedding (default: `embedding_dim`).
    #[serde(default)]
    pub embedding_proj_dim: Option<usize>,
    /// Width of the output embedding (default: `embedding_dim`).
    #[serde(default)]
    pub clip_embed_dim: Option<usize>,
}

impl Default for PriorTransformerConfig {
    /// diffusers' constructor defaults (the 2.1/2.2 checkpoints override `embedding_dim`).
    fn default() -> Self {
        Self {
            num_attention_heads: d_heads(),
            attention_head_dim: d_head_dim(),
            num_layers: d_layers(),
            embedding_dim: d_embedding_dim(),
            num_embeddings: d_num_embeddings(),
            additional_embeddings: d_additional(),
            dropout: 0.0,
            time_embed_act_fn: d_silu(),
            norm_in_type: None,
            embedding_proj_norm_type: None,
            encoder_hid_proj_type: d_linear(),
            added_emb_type: d_prd(),
            time_embed_dim: None,
            embedding_proj_dim: None,
            clip_embed_dim: None,
        }
    }
}

/// `None` / `Some("layer")` → whether the LayerNorm exists.
fn optional_layer_norm(field: &str, value: &Option<String>) -> Result<bool> {
    match value.as_deref() {
        None => Ok(false),
        Some("layer") => Ok(true),
        Some(other) => Err(Error::unsupported(field, other, "null, \"layer\"")),
    }
}

impl PriorTransformerConfig {
    /// `num_attention_heads · attention_head_dim`.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Width of the pooled text embedding input.
    pub fn proj_embedding_dim(&self) -> usize {
        self.embedding_proj_dim.unwrap_or(self.embedding_dim)
    }

    /// Width of the predicted embedding.
    pub fn output_dim(&self) -> usize {
        self.clip_embed_dim.unwrap_or(self.embedding_dim)
    }

    /// Sequence length: text tokens + additional tokens.
    pub fn seq_len(&self) -> usize {
        self.num_embeddings + self.additional_embeddings
    }

    fn time_embed_act(&self) -> Result<Activation> {
        // diffusers' `get_activation` accepts swish/silu/mish/gelu/relu; the last two have no
        // shared implementation here.
        match self.time_embed_act_fn.as_str() {
            "silu" | "swish" => Ok(Activation::Silu),
            "gelu" => Ok(Activation::Gelu),
            other => Err(Error::unsupported(
                "time_embed_act_fn",
                other,
                "\"silu\", \"swish\", \"gelu\"",
            )),
        }
    }
}

impl ModelConfig for PriorTransformerConfig {
    /// Reject values this implementation does not support (with the field and the
    /// supported values named).
    fn validate(&self) -> Result<()> {
        for (field, v) in [
            ("num_attention_heads", self.num_attention_heads),
            ("attention_head_dim", self.attention_head_dim),
            ("embedding_dim", self.embedding_dim),
            ("num_embeddings", self.num_embeddings),
        ] {
            if v == 0 {
                return Err(Error::unsupported(field, v, "a positive integer"));
            }
        }
        for (field, v) in [
            ("time_embed_dim", self.time_embed_dim),
            ("embedding_proj_dim", self.embedding_proj_dim),
            ("clip_embed_dim", self.clip_embed_dim),
        ] {
            if v == Some(0) {
                return Err(Error::unsupported(field, 0, "null or a positive integer"));
            }
        }
        self.time_embed_act()?;
        optional_layer_norm("norm_in_type", &self.norm_in_type)?;
        optional_layer_norm("embedding_proj_norm_type", &self.embedding_proj_norm_type)?;
        if self.encoder_hid_proj_type.as_deref() != Some("linear") {
            return Err(Error::unsupported(
                "encoder_hid_proj_type",
                &self.encoder_hid_proj_type,
                "\"linear\"",
            ));
        }
        if self.added_emb_type.as_deref() != Some("prd") {
            return Err(Error::unsupported(
                "added_emb_type",
                &self.added_emb_type,
                "\"prd\"",
            ));
        }
        // With text tokens and the prd token the sequence is always text + 4 tokens; diffusers
        // fails at the first forward for any other count.
        if self.additional_embeddings != EXTRA_TOKENS {
            return Err(Error::unsupported(
                "additional_embeddings",
                self.additional_embeddings,
                "4 (with added_emb_type \"prd\")",
            ));
        }
        Ok(())
    }
}

/// diffusers' `PriorTransformer`.
#[derive(Debug, Clone)]
pub struct PriorTransformer {
    time_embedding: TimestepEmbedding,
    proj_in: Linear,
    embedding_proj_norm: Option<LayerNorm>,
    embedding_proj: Linear,
    encoder_hidden_states_proj: Linear,
    positional_embedding: Tensor,
    prd_embedding: Tensor,
    transformer_blocks: Vec<BasicTransformerBlock>,
    norm_in: Option<LayerNorm>,
    norm_out: LayerNorm,
    proj_to_clip_embeddings: Linear,
    clip_mean: Tensor,
    clip_std: Tensor,
    cfg: PriorTransformerConfig,
    device: Device,
    dtype: DType,
}

impl PriorTransformer {
    /// Build from a `VarBuilder` whose names are the checkpoint keys.
    pub fn new(vb: VarBuilder, cfg: &PriorTransformerConfig) -> Result<Self> {
        cfg.validate()?;
        let inner = cfg.inner_dim();
        let e = cfg.embedding_dim;
        let time_embed_dim = cfg.time_embed_dim.unwrap_or(inner);
        let proj_dim = cfg.proj_embedding_dim();
        let embedding_proj_norm =
            if optional_layer_norm("embedding_proj_norm_type", &cfg.embedding_proj_norm_type)? {
                Some(layer_norm(proj_dim, LN_EPS, vb.pp("embedding_proj_norm"))?)
            } else {
                None
            };
        let norm_in = if optional_layer_norm("norm_in_type", &cfg.norm_in_type)? {
            Some(layer_norm(inner, LN_EPS, vb.pp("norm_in"))?)
        } else {
            None
        };
        let blocks = (0..cfg.num_layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    vb.pp("transformer_blocks").pp(i.to_string()),
                    inner,
                    cfg.num_attention_heads,
                    cfg.attention_head_dim,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            time_embedding: TimestepEmbedding::new(
                vb.pp("time_embedding"),
                inner,
                time_embed_dim,
                inner,
                cfg.time_embed_act()?,
            )?,
            proj_in: linear(e, inner, vb.pp("proj_in"))?,
            embedding_proj_norm,
            embedding_proj: linear(proj_dim, inner, vb.pp("embedding_proj"))?,
            encoder_hidden_states_proj: linear(e, inner, vb.pp("encoder_hidden_states_proj"))?,
            positional_embedding: vb.get((1, cfg.seq_len(), inner), "positional_embedding")?,
            prd_embedding: vb.get((1, 1, inner), "prd_embedding")?,
            transformer_blocks: blocks,
            norm_in,
            norm_out: layer_norm(inner, LN_EPS, vb.pp("norm_out"))?,
            proj_to_clip_embeddings: linear(
                inner,
                cfg.output_dim(),
                vb.pp("proj_to_clip_embeddings"),
            )?,
            clip_mean: vb.get((1, cfg.output_dim()), "clip_mean")?,
            clip_std: vb.get((1, cfg.output_dim()), "clip_std")?,
            cfg: cfg.clone(),
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// Load a prior component folder (`config.json` + safetensors weights).
    pub fn load(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        load_component(dir, dtype, device, Self::new)
    }

    /// The configuration.
    pub fn config(&self) -> &PriorTransformerConfig {
        &self.cfg
    }

    /// The additive attention mask `[B, 1, L, L]` (f32) of diffusers: `(1 − text_mask)·−10000`
    /// on the text keys, 0 on the extra keys, plus −10000 strictly above the diagonal.
    fn attention_bias(&self, text_mask: &Tensor) -> Result<Tensor> {
        let b = text_mask.dim(0)?;
        let l = self.cfg.seq_len();
        let text = ((text_mask.to_dtype(DType::F32)?.affine(-1.0, 1.0)?) * MASK_VALUE)?;
        let pad = Tensor::zeros(
            (b, self.cfg.additional_embeddings),
            DType::F32,
            &self.device,
        )?;
        let keys = Tensor::cat(&[&text.to_device(&self.device)?, &pad], 1)?;
        let causal: Vec<f32> = (0..l * l)
            .map(|i| {
                if i % l > i / l {
                    MASK_VALUE as f32
                } else {
                    0.0
                }
            })
            .collect();
        let causal = Tensor::from_vec(causal, (1, l, l), &self.device)?;
        // The heads share one mask: broadcast over H instead of repeating it.
        Ok(keys.unsqueeze(1)?.broadcast_add(&causal)?.unsqueeze(1)?)
    }

    fn check_inputs(
        &self,
        hidden_states: &Tensor,
        proj_embedding: &Tensor,
        encoder_hidden_states: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<usize> {
        let b = self.check_latents(hidden_states)?;
        self.check_cond(b, proj_embedding, encoder_hidden_states, attention_mask)?;
        Ok(b)
    }

    /// `hidden_states` `[B, embedding_dim]`, B > 0 → B.
    fn check_latents(&self, hidden_states: &Tensor) -> Result<usize> {
        let cfg = &self.cfg;
        let (b, e) = hidden_states.dims2().map_err(|_| {
            Error::invalid(format!(
                "prior hidden_states must be [B, {}], got {:?}",
                cfg.embedding_dim,
                hidden_states.dims()
            ))
        })?;
        if e != cfg.embedding_dim {
            return Err(Error::invalid(format!(
                "prior hidden_states width is {e}, the model's embedding_dim is {}",
                cfg.embedding_dim
            )));
        }
        if b == 0 {
            return Err(Error::invalid("prior input batch is empty"));
        }
        Ok(b)
    }

    /// The conditioning of a batch of `b`.
    fn check_cond(
        &self,
        b: usize,
        proj_embedding: &Tensor,
        encoder_hidden_states: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<()> {
        let cfg = &self.cfg;
        if proj_embedding.dims() != [b, cfg.proj_embedding_dim()] {
            return Err(Error::invalid(format!(
                "prior proj_embedding must be [{b}, {}] (batch of hidden_states, embedding_proj_dim), got {:?}",
                cfg.proj_embedding_dim(),
                proj_embedding.dims()
            )));
        }
        if encoder_hidden_states.dims() != [b, cfg.num_embeddings, cfg.embedding_dim] {
            return Err(Error::invalid(format!(
                "prior encoder_hidden_states must be [{b}, {}, {}] (batch, num_embeddings, embedding_dim), got {:?}",
                cfg.num_embeddings,
                cfg.embedding_dim,
                encoder_hidden_states.dims()
            )));
        }
        if let Some(m) = attention_mask {
            if m.dims() != [b, cfg.num_embeddings] {
                return Err(Error::invalid(format!(
                    "prior attention_mask must be [{b}, {}] like encoder_hidden_states, got {:?}",
                    cfg.num_embeddings,
                    m.dims()
                )));
            }
        }
        Ok(())
    }

    fn check_timesteps(timesteps: &[f64], b: usize) -> Result<()> {
        if timesteps.len() != 1 && timesteps.len() != b {
            return Err(Error::invalid(format!(
                "prior needs 1 or {b} timesteps, got {}",
                timesteps.len()
            )));
        }
        if let Some(t) = timesteps.iter().find(|t| !t.is_finite()) {
            return Err(Error::invalid(format!("prior timestep {t} is not finite")));
        }
        Ok(())
    }

    /// One forward, as diffusers' `PriorTransformer.forward`.
    ///
    /// * `hidden_states` `[B, embedding_dim]`: the noisy (normalised) image embedding;
    /// * `timesteps`: one value for the whole batch or one per element;
    /// * `proj_embedding` `[B, embedding_proj_dim]`: the pooled text embedding;
    /// * `encoder_hidden_states` `[B, num_embeddings, embedding_dim]`: text hidden states;
    /// * `attention_mask` `[B, num_embeddings]` (1 = token, 0 = padding, any dtype). `None`
    ///   applies no mask at all, not even the causal one, exactly as diffusers does.
    ///
    /// Returns the predicted embedding `[B, clip_embed_dim]` in the model dtype.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        timesteps: &[f64],
        proj_embedding: &Tensor,
        encoder_hidden_states: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let b = self.check_inputs(
            hidden_states,
            proj_embedding,
            encoder_hidden_states,
            attention_mask,
        )?;
        Self::check_timesteps(timesteps, b)?;
        self.forward_with_sinusoid(
            hidden_states,
            &self.time_sinusoid(timesteps, b)?,
            proj_embedding,
            encoder_hidden_states,
            attention_mask,
        )
    }

    /// The sinusoidal embedding of `timesteps` (one for the whole batch of `batch`, or one per
    /// element) as [`Self::forward_with_sinusoid`] takes it: `[batch, inner_dim]` f32 on the
    /// model's device, computed on the host as diffusers does.
    pub fn time_sinusoid(&self, timesteps: &[f64], batch: usize) -> Result<Tensor> {
        let ts: Vec<f64> = if timesteps.len() == 1 {
            vec![timesteps[0]; batch]
        } else {
            timesteps.to_vec()
        };
        timestep_embedding(&ts, self.cfg.inner_dim(), true, 0.0, &self.device)
    }

    /// [`Self::forward`] with the timesteps given as their sinusoid
    /// ([`Self::time_sinusoid`]): the forward then uploads nothing that varies between
    /// denoising steps, the form a CUDA graph replays (`graph::GraphedPrior`).
    pub fn forward_with_sinusoid(
        &self,
        hidden_states: &Tensor,
        time_sinusoid: &Tensor,
        proj_embedding: &Tensor,
        encoder_hidden_states: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let b = self.check_inputs(
            hidden_states,
            proj_embedding,
            encoder_hidden_states,
            attention_mask,
        )?;
        if time_sinusoid.dims() != [b, self.cfg.inner_dim()] {
            return Err(Error::invalid(format!(
                "prior time sinusoid must be [{b}, {}], got {:?}",
                self.cfg.inner_dim(),
                time_sinusoid.dims()
            )));
        }
        let prefix = self.prefix_tokens(proj_embedding, encoder_hidden_states)?;
        let later = self.later_tokens(hidden_states, time_sinusoid, b)?;
        let mut h = Tensor::cat(&[&prefix, &later], 1)?;

        let mask = attention_mask.map(|m| self.attention_bias(m)).transpose()?;
        if let Some(ln) = &self.norm_in {
            h = layer_norm_f32(ln, &h)?;
        }
        for block in &self.transformer_blocks {
            h = block.forward(&h, mask.as_ref())?;
        }
        self.output(&h)
    }

    /// The prediction from the last layer's tokens `h` `[B, L', inner]`, the prd token last.
    fn output(&self, h: &Tensor) -> Result<Tensor> {
        // Only the last (prd) token is read: normalising it alone equals normalising all.
        let last = h.narrow(1, h.dim(1)? - 1, 1)?.squeeze(1)?;
        let last = layer_norm_f32(&self.norm_out, &last)?;
        Ok(self.proj_to_clip_embeddings.forward(&last)?)
    }

    /// The text tokens and the pooled text token (`embedding_proj`), with their positional
    /// embeddings: `[B, num_embeddings + 1, inner]`, the sequence's causal prefix.
    fn prefix_tokens(
        &self,
        proj_embedding: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        let dt = self.dtype;
        let proj_embedding = proj_embedding.to_device(&self.device)?.to_dtype(dt)?;
        let proj_embedding = match &self.embedding_proj_norm {
            Some(ln) => layer_norm_f32(ln, &proj_embedding)?,
            None => proj_embedding,
        };
        let proj_emb = self.embedding_proj.forward(&proj_embedding)?;
        let text = self.encoder_hidden_states_proj.forward(
            &encoder_hidden_states
                .to_device(&self.device)?
                .to_dtype(dt)?,
        )?;
        let tokens = Tensor::cat(&[&text, &proj_emb.unsqueeze(1)?], 1)?;
        let p = tokens.dim(1)?;
        Ok(tokens.broadcast_add(&self.positional_embedding.narrow(1, 0, p)?)?)
    }

    /// The time token, the latent token (`proj_in`) and the `prd` token, with their
    /// positional embeddings: `[B, 3, inner]`, what follows the prefix.
    fn later_tokens(
        &self,
        hidden_states: &Tensor,
        time_sinusoid: &Tensor,
        b: usize,
    ) -> Result<Tensor> {
        let dt = self.dtype;
        let inner = self.cfg.inner_dim();
        // The sinusoid is computed in f32 and cast, as diffusers does.
        let t_proj = time_sinusoid.to_device(&self.device)?.to_dtype(dt)?;
        let time_emb = self.time_embedding.forward(&t_proj)?;
        let x = self
            .proj_in
            .forward(&hidden_states.to_device(&self.device)?.to_dtype(dt)?)?;
        let prd = self.prd_embedding.broadcast_as((b, 1, inner))?;
        let tokens = Tensor::cat(
            &[
                &time_emb.unsqueeze(1)?,
                &x.unsqueeze(1)?,
                &prd.contiguous()?,
            ],
            1,
        )?;
        let (l, later) = (self.cfg.seq_len(), tokens.dim(1)?);
        Ok(tokens.broadcast_add(&self.positional_embedding.narrow(1, l - later, later)?)?)
    }

    /// [`EmbeddingPrior::prepare`]: under the causal mask the text tokens and the pooled text
    /// token (the first `num_embeddings + 1`) attend only among themselves, so their keys
    /// and values at every layer are the same at every step. They are computed here once;
    /// a prepared step then runs the three later tokens (time, latent, prd) alone
    /// (KV caching, as in autoregressive decoding).
    ///
    /// The prepared tensors, in order: the mask rows of the three later tokens
    /// `[B, 1, 3, L]` (f32), then each layer's prefix keys and values `[B, H, P, D]`.
    pub fn prepare_condition(&self, cond: &PriorCondition<'_>) -> Result<PreparedPriorCondition> {
        let b = match cond.proj_embedding.dims() {
            &[b, _] => b,
            dims => {
                return Err(Error::invalid(format!(
                    "prior proj_embedding must be [B, {}] (batch, embedding_proj_dim), \
                     got {dims:?}",
                    self.cfg.proj_embedding_dim()
                )))
            }
        };
        self.check_cond(
            b,
            cond.proj_embedding,
            cond.encoder_hidden_states,
            Some(cond.attention_mask),
        )?;
        let mut h = self.prefix_tokens(cond.proj_embedding, cond.encoder_hidden_states)?;
        if let Some(ln) = &self.norm_in {
            h = layer_norm_f32(ln, &h)?;
        }
        let p = h.dim(1)?;
        let mask = self.attention_bias(cond.attention_mask)?;
        let prefix_mask = mask.narrow(2, 0, p)?.narrow(3, 0, p)?;
        let later_mask = mask.narrow(2, p, self.cfg.seq_len() - p)?.contiguous()?;
        let mut tensors = vec![later_mask];
        let n = self.transformer_blocks.len();
        for (i, block) in self.transformer_blocks.iter().enumerate() {
            // The last layer's prefix output is read by no one.
            let (k, v, out) = block.prefix(&h, &prefix_mask, i + 1 < n)?;
            let (k, v) = prepare_segment(&k, &v)?;
            tensors.extend([k, v]);
            if let Some(out) = out {
                h = out;
            }
        }
        Ok(PreparedPriorCondition::new(cond, tensors))
    }

    /// [`EmbeddingPrior::predict_prepared`] with the timesteps given as their sinusoid
    /// ([`Self::time_sinusoid`]): the form a CUDA graph replays (`graph::GraphedPrior`).
    /// Equals [`Self::forward_with_sinusoid`] with the prepared conditioning's mask up to
    /// rounding (the same operations on fewer rows).
    pub fn forward_prepared_with_sinusoid(
        &self,
        hidden_states: &Tensor,
        time_sinusoid: &Tensor,
        prepared: &PreparedPriorCondition,
    ) -> Result<Tensor> {
        let b = self.check_latents(hidden_states)?;
        let inner = self.cfg.inner_dim();
        if time_sinusoid.dims() != [b, inner] {
            return Err(Error::invalid(format!(
                "prior time sinusoid must be [{b}, {inner}], got {:?}",
                time_sinusoid.dims()
            )));
        }
        let l = self.cfg.seq_len();
        let later = EXTRA_TOKENS - 1;
        let layers = self.transformer_blocks.len();
        let stale = |what: String| {
            Error::invalid(format!(
                "the prepared prior conditioning does not fit this prior and batch ({what}); \
                 prepare it with this prior for latents of this batch"
            ))
        };
        let [mask, kv @ ..] = prepared.tensors() else {
            return Err(stale("no tensors".into()));
        };
        if kv.len() != 2 * layers {
            return Err(stale(format!(
                "{} tensors, expected {}",
                prepared.tensors().len(),
                1 + 2 * layers
            )));
        }
        if mask.dims() != [b, 1, later, l] {
            return Err(stale(format!(
                "mask rows {:?}, expected [{b}, 1, {later}, {l}]",
                mask.dims()
            )));
        }
        let mut h = self.later_tokens(hidden_states, time_sinusoid, b)?;
        if let Some(ln) = &self.norm_in {
            h = layer_norm_f32(ln, &h)?;
        }
        for (block, kv) in self.transformer_blocks.iter().zip(kv.chunks(2)) {
            h = block.forward_after(
                &h,
                KvSegment {
                    k: &kv[0],
                    v: &kv[1],
                },
                mask,
            )?;
        }
        self.output(&h)
    }

    /// `z · clip_std + clip_mean`: from the prior's normalised space to CLIP space.
    pub fn post_process_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let d = self.cfg.output_dim();
        match latents.dims() {
            [_, w] if *w == d => {}
            other => {
                return Err(Error::invalid(format!(
                    "post_process_latents expects [B, {d}], got {other:?}"
                )))
            }
        }
        let z = latents.to_dtype(self.dtype)?;
        Ok(z.broadcast_mul(&self.clip_std)?
            .broadcast_add(&self.clip_mean)?)
    }
}

impl EmbeddingPrior for PriorTransformer {
    fn predict(
        &self,
        latents: &Tensor,
        timestep: f64,
        cond: &PriorCondition<'_>,
    ) -> Result<Tensor> {
        self.forward(
            latents,
            &[timestep],
            cond.proj_embedding,
            cond.encoder_hidden_states,
            Some(cond.attention_mask),
        )
    }

    /// The text tokens' keys and values at every layer and the later tokens' mask rows
    /// ([`PriorTransformer::prepare_condition`]).
    fn prepare(&self, cond: &PriorCondition<'_>) -> Result<PreparedPriorCondition> {
        self.prepare_condition(cond)
    }

    fn predict_prepared(
        &self,
        latents: &Tensor,
        timestep: f64,
        prepared: &PreparedPriorCondition,
    ) -> Result<Tensor> {
        let b = self.check_latents(latents)?;
        Self::check_timesteps(&[timestep], b)?;
        self.forward_prepared_with_sinusoid(latents, &self.time_sinusoid(&[timestep], b)?, prepared)
    }

    fn post_process_latents(&self, latents: &Tensor) -> Result<Tensor> {
        PriorTransformer::post_process_latents(self, latents)
    }

    /// The width of the latents the prior denoises (`embedding_dim`; equal to the output
    /// width `clip_embed_dim` in every released checkpoint).
    fn embedding_dim(&self) -> usize {
        self.cfg.embedding_dim
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}
