//! CLIP text and vision towers with projection (transformers `modeling_clip.py`):
//! `CLIPTextModelWithProjection` (Kandinsky 2.2's OpenCLIP ViT-bigG/14 text tower) and
//! `CLIPVisionModelWithProjection` (its vision tower, stored in f16).
//!
//! Module and field names follow transformers, so every `vb.pp(..)` segment is a checkpoint
//! key segment.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};
use kandinsky_core::attention::{attention, merge_heads, split_heads, KvSegment};
use kandinsky_core::loading::load_component;
use kandinsky_core::nn::{
    layer_norm, layer_norm_f32, linear, linear_no_bias, Activation, LayerNorm, Linear,
};
use kandinsky_core::traits::{ImageEncoder, TextEncoder, TextEncoding};
use kandinsky_core::ModelConfig;
use kandinsky_core::{Error, Result};

use crate::configuration_clip::{ClipTextConfig, ClipVisionConfig, EosPooling};

/// Multi-head self-attention (`CLIPAttention`): `q_proj`, `k_proj`, `v_proj`, `out_proj`.
#[derive(Debug, Clone)]
pub struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    scale: f64,
}

impl ClipAttention {
    /// Load from `…self_attn`.
    pub fn new(vb: VarBuilder, hidden: usize, heads: usize) -> Result<Self> {
        Ok(Self {
            q_proj: linear(hidden, hidden, vb.pp("q_proj"))?,
            k_proj: linear(hidden, hidden, vb.pp("k_proj"))?,
            v_proj: linear(hidden, hidden, vb.pp("v_proj"))?,
            out_proj: linear(hidden, hidden, vb.pp("out_proj"))?,
            heads,
            scale: ((hidden / heads) as f64).powf(-0.5),
        })
    }

    /// `x` `[B, L, C]`, optional additive `mask` broadcastable to `[B, H, L, L]`.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let q = split_heads(&self.q_proj.forward(x)?, self.heads)?;
        let k = split_heads(&self.k_proj.forward(x)?, self.heads)?;
        let v = split_heads(&self.v_proj.forward(x)?, self.heads)?;
        let o = attention(&q, &[KvSegment { k: &k, v: &v }], mask, self.scale)?;
        Ok(self.out_proj.forward(&merge_heads(&o)?)?)
    }
}

/// The feed-forward block (`CLIPMLP`): `fc1`, activation, `fc2`.
#[derive(Debug, Clone)]
pub struct ClipMlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl ClipMlp {
    /// Load from `…mlp`.
    pub fn new(
        vb: VarBuilder,
        hidden: usize,
        intermediate: usize,
        act: Activation,
    ) -> Result<Self> {
        Ok(Self {
            fc1: linear(hidden, intermediate, vb.pp("fc1"))?,
            fc2: linear(intermediate, hidden, vb.pp("fc2"))?,
            act,
        })
    }

    /// `[B, L, C]` → `[B, L, C]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.act.apply(&self.fc1.forward(x)?)?;
        Ok(self.fc2.forward(&h)?)
    }
}

/// One pre-LayerNorm transformer block (`CLIPEncoderLayer`).
#[derive(Debug, Clone)]
pub struct ClipEncoderLayer {
    self_attn: ClipAttention,
    layer_norm1: LayerNorm,
    mlp: ClipMlp,
    layer_norm2: LayerNorm,
}

impl ClipEncoderLayer {
    /// Load from `…layers.{i}`.
    pub fn new(vb: VarBuilder, dims: &TowerDims) -> Result<Self> {
        Ok(Self {
            self_attn: ClipAttention::new(vb.pp("self_attn"), dims.hidden, dims.heads)?,
            layer_norm1: layer_norm(dims.hidden, dims.eps, vb.pp("layer_norm1"))?,
            mlp: ClipMlp::new(vb.pp("mlp"), dims.hidden, dims.intermediate, dims.act)?,
            layer_norm2: layer_norm(dims.hidden, dims.eps, vb.pp("layer_norm2"))?,
        })
    }

    /// `x + attn(ln1(x))`, then `+ mlp(ln2(·))`.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let h = layer_norm_f32(&self.layer_norm1, x)?;
        let x = (x + self.self_attn.forward(&h, mask)?)?;
        let h = layer_norm_f32(&self.layer_norm2, &x)?;
        Ok((&x + self.mlp.forward(&h)?)?)
    }
}

/// The sizes shared by the text and vision encoders.
#[derive(Debug, Clone, Copy)]
pub struct TowerDims {
    /// Width.
    pub hidden: usize,
    /// MLP width.
    pub intermediate: usize,
    /// Attention heads.
    pub heads: usize,
    /// Layers.
    pub layers: usize,
    /// LayerNorm epsilon.
    pub eps: f64,
    /// MLP activation.
    pub act: Activation,
}

/// The stack of blocks (`CLIPEncoder`, key `…encoder.layers.{i}`).
#[derive(Debug, Clone)]
pub struct ClipEncoder {
    layers: Vec<ClipEncoderLayer>,
}

impl ClipEncoder {
    /// Load from `…encoder`.
    pub fn new(vb: VarBuilder, dims: &TowerDims) -> Result<Self> {
        let vb = vb.pp("layers");
        let layers = (0..dims.layers)
            .map(|i| ClipEncoderLayer::new(vb.pp(i), dims))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    /// Run every block.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let mut x = x.clone();
        for layer in &self.layers {
            x = layer.forward(&x, mask)?;
        }
        Ok(x)
    }
}

// ---------------------------------------------------------------------------------------------
// Text

/// Token + learned position embeddings (`CLIPTextEmbeddings`).
#[derive(Debug, Clone)]
pub struct ClipTextEmbeddings {
    token_embedding: Embedding,
    position_embedding: Tensor,
}

impl ClipTextEmbeddings {
    /// Load from `text_model.embeddings` (the `position_ids` buffer is not read: it is
    /// `arange`, non-persistent in current checkpoints).
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let token = vb
            .pp("token_embedding")
            .get((cfg.vocab_size, cfg.hidden_size), "weight")?;
        let position_embedding = vb
            .pp("position_embedding")
            .get((cfg.max_position_embeddings, cfg.hidden_size), "weight")?;
        Ok(Self {
            token_embedding: Embedding::new(token, cfg.hidden_size),
            position_embedding,
        })
    }

    /// `input_ids` `[B, L]` (u32) → `[B, L, C]`.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let l = input_ids.dim(1)?;
        let tokens = self.token_embedding.forward(input_ids)?;
        let pos = self.position_embedding.narrow(0, 0, l)?;
        Ok(tokens.broadcast_add(&pos)?)
    }
}

/// The text transformer (`CLIPTextTransformer`, key prefix `text_model`).
#[derive(Debug, Clone)]
pub struct ClipTextTransformer {
    embeddings: ClipTextEmbeddings,
    encoder: ClipEncoder,
    final_layer_norm: LayerNorm,
    pooling: EosPooling,
    vocab_size: usize,
    max_positions: usize,
}

/// Outputs of [`ClipTextTransformer::forward`].
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// `[B, L, C]` after `final_layer_norm`.
    pub last_hidden_state: Tensor,
    /// `[B, C]`: `last_hidden_state` at the end-of-text position.
    pub pooler_output: Tensor,
}

impl ClipTextTransformer {
    /// Load from `text_model`.
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        cfg.validate()?;
        let dims = TowerDims {
            hidden: cfg.hidden_size,
            intermediate: cfg.intermediate_size,
            heads: cfg.num_attention_heads,
            layers: cfg.num_hidden_layers,
            eps: cfg.layer_norm_eps,
            act: cfg.activation()?,
        };
        Ok(Self {
            embeddings: ClipTextEmbeddings::new(vb.pp("embeddings"), cfg)?,
            encoder: ClipEncoder::new(vb.pp("encoder"), &dims)?,
            final_layer_norm: layer_norm(
                cfg.hidden_size,
                cfg.layer_norm_eps,
                vb.pp("final_layer_norm"),
            )?,
            pooling: cfg.pooling()?,
            vocab_size: cfg.vocab_size,
            max_positions: cfg.max_position_embeddings,
        })
    }

    /// Validate `input_ids` `[B, L]` and return them as host rows.
    fn host_ids(&self, input_ids: &Tensor) -> Result<Vec<Vec<u32>>> {
        let (b, l) = input_ids.dims2().map_err(|_| {
            Error::invalid(format!(
                "input_ids must be [batch, seq], got {:?}",
                input_ids.dims()
            ))
        })?;
        if b == 0 || l == 0 || l > self.max_positions {
            return Err(Error::invalid(format!(
                "input_ids {:?}: need batch >= 1 and 1..={} tokens",
                input_ids.dims(),
                self.max_positions
            )));
        }
        let rows: Vec<Vec<u32>> = match input_ids.dtype() {
            DType::U32 => input_ids.to_vec2::<u32>()?,
            DType::I64 => input_ids
                .to_vec2::<i64>()?
                .into_iter()
                .map(|r| {
                    r.into_iter()
                        .map(|v| u32::try_from(v).unwrap_or(u32::MAX))
                        .collect()
                })
                .collect(),
            other => {
                return Err(Error::invalid(format!(
                    "input_ids must be u32 or i64, got {other:?}"
                )))
            }
        };
        if let Some(bad) = rows
            .iter()
            .flatten()
            .find(|&&v| v as usize >= self.vocab_size)
        {
            return Err(Error::invalid(format!(
                "token id {bad} is outside the vocabulary of {} ids",
                self.vocab_size
            )));
        }
        Ok(rows)
    }

    /// Where each row is pooled (see [`EosPooling`]).
    fn pool_positions(&self, rows: &[Vec<u32>]) -> Vec<usize> {
        rows.iter()
            .map(|row| match self.pooling {
                // torch's argmax returns the first maximal index.
                EosPooling::ArgmaxId => {
                    let max = row.iter().copied().max().unwrap_or(0);
                    row.iter().position(|&v| v == max).unwrap_or(0)
                }
                // transformers takes argmax of (ids == eos): 0 when the row has none.
                EosPooling::FirstEos(eos) => row.iter().position(|&v| v == eos).unwrap_or(0),
            })
            .collect()
    }

    /// `input_ids` `[B, L]` (u32 or i64) → hidden states and pooled feature. Only the causal
    /// mask is applied, as in transformers when no attention mask is passed.
    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipTextOutput> {
        let rows = self.host_ids(input_ids)?;
        let (b, l) = (rows.len(), rows[0].len());
        let dev = input_ids.device();
        let flat_ids: Vec<u32> = rows.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(flat_ids, (b, l), dev)?;
        let x = self.embeddings.forward(&ids)?;
        let mask = causal_mask(l, dev)?;
        let x = self.encoder.forward(&x, Some(&mask))?;
        let last_hidden_state = layer_norm_f32(&self.final_layer_norm, &x)?;
        let flat: Vec<u32> = self
            .pool_positions(&rows)
            .into_iter()
            .enumerate()
            .map(|(i, p)| (i * l + p) as u32)
            .collect();
        let c = last_hidden_state.dim(2)?;
        let pooler_output = last_hidden_state
            .reshape((b * l, c))?
            .index_select(&Tensor::new(flat, dev)?, 0)?;
        Ok(ClipTextOutput {
            last_hidden_state,
            pooler_output,
        })
    }
}

/// `[1, 1, L, L]` additive causal mask (0 on and below the diagonal, −∞ above), f32.
fn causal_mask(l: usize, dev: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..l)
        .flat_map(|i| (0..l).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(data, (1, 1, l, l), dev)?)
}

/// `CLIPTextModelWithProjection`: the text transformer and `text_projection` (no bias).
#[derive(Debug, Clone)]
pub struct ClipTextModelWithProjection {
    text_model: ClipTextTransformer,
    text_projection: Linear,
    device: Device,
    dtype: DType,
}

impl ClipTextModelWithProjection {
    /// Build from a var builder at the checkpoint root.
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        Ok(Self {
            text_model: ClipTextTransformer::new(vb.pp("text_model"), cfg)?,
            text_projection: linear_no_bias(
                cfg.hidden_size,
                cfg.projection_dim,
                vb.pp("text_projection"),
            )?,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// Load a `text_encoder/` folder (config + safetensors) in `dtype` on `device`.
    pub fn load(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        load_component(dir, dtype, device, Self::new)
    }

    /// `input_ids` `[B, L]` → `last_hidden_state` `[B, L, C]` and `text_embeds` `[B, E]`
    /// (projected pooled feature, not normalised).
    pub fn forward(&self, input_ids: &Tensor) -> Result<TextEncoding> {
        let out = self.text_model.forward(input_ids)?;
        let text_embeds = self.text_projection.forward(&out.pooler_output)?;
        Ok(TextEncoding {
            last_hidden_state: out.last_hidden_state,
            text_embeds,
        })
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

impl TextEncoder for ClipTextModelWithProjection {
    fn encode_text(
        &self,
        input_ids: &Tensor,
        _attention_mask: Option<&Tensor>,
    ) -> Result<TextEncoding> {
        // The Kandinsky prior pipelines never pass the padding mask to CLIP.
        self.forward(&input_ids.to_device(&self.device)?)
    }

    fn device(&self) -> &Device {
        &self.device
    }
}

// ---------------------------------------------------------------------------------------------
// Vision

/// Class token, patch embedding (a conv without bias) and position embeddings
/// (`CLIPVisionEmbeddings`).
#[derive(Debug, Clone)]
pub struct ClipVisionEmbeddings {
    class_embedding: Tensor,
    /// The conv weight `[C, 3, p, p]`, applied as a matmul over non-overlapping patches.
    patch_embedding: Tensor,
    position_embedding: Tensor,
    image_size: usize,
    patch_size: usize,
}

impl ClipVisionEmbeddings {
    /// Load from `vision_model.embeddings`.
    pub fn new(vb: VarBuilder, cfg: &ClipVisionConfig) -> Result<Self> {
        let p = cfg.patch_size;
        Ok(Self {
            class_embedding: vb.get(cfg.hidden_size, "class_embedding")?,
            patch_embedding: vb
                .pp("patch_embedding")
                .get((cfg.hidden_size, cfg.num_channels, p, p), "weight")?,
            position_embedding: vb
                .pp("position_embedding")
                .get((cfg.num_positions(), cfg.hidden_size), "weight")?,
            image_size: cfg.image_size,
            patch_size: p,
        })
    }

    /// `pixel_values` `[B, 3, S, S]` → `[B, 1 + patches, C]`.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixel_values.dims4().map_err(|_| {
            Error::invalid(format!(
                "pixel_values must be [batch, 3, {s}, {s}], got {:?}",
                pixel_values.dims(),
                s = self.image_size
            ))
        })?;
        if c != 3 || h != self.image_size || w != self.image_size || b == 0 {
            return Err(Error::invalid(format!(
                "pixel_values must be [batch, 3, {s}, {s}], got {:?} (use the image processor)",
                pixel_values.dims(),
                s = self.image_size
            )));
        }
        let dtype = self.class_embedding.dtype();
        let hidden = self.class_embedding.dim(0)?;
        // A stride-p, kernel-p conv is a matmul over the flattened (channel, row, column)
        // patches; candle's CPU conv has no bf16 path and im2col would copy as much anyway.
        let (p, g) = (self.patch_size, self.image_size / self.patch_size);
        let patches = pixel_values
            .to_dtype(dtype)?
            .reshape((b, 3, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b, g * g, 3 * p * p))?;
        let w = self.patch_embedding.reshape((hidden, 3 * p * p))?;
        let patches = patches.broadcast_matmul(&w.t()?)?;
        let cls = self
            .class_embedding
            .reshape((1, 1, hidden))?
            .broadcast_as((b, 1, hidden))?;
        let x = Tensor::cat(&[&cls.contiguous()?, &patches.contiguous()?], 1)?;
        Ok(x.broadcast_add(&self.position_embedding)?)
    }
}

/// The vision transformer (`CLIPVisionTransformer`, key prefix `vision_model`).
#[derive(Debug, Clone)]
pub struct ClipVisionTransformer {
    embeddings: ClipVisionEmbeddings,
    pre_layrnorm: LayerNorm,
    encoder: ClipEncoder,
    post_layernorm: LayerNorm,
}

impl ClipVisionTransformer {
    /// Load from `vision_model`.
    pub fn new(vb: VarBuilder, cfg: &ClipVisionConfig) -> Result<Self> {
        cfg.validate()?;
        let dims = TowerDims {
            hidden: cfg.hidden_size,
            intermediate: cfg.intermediate_size,
            heads: cfg.num_attention_heads,
            layers: cfg.num_hidden_layers,
            eps: cfg.layer_norm_eps,
            act: cfg.activation()?,
        };
        let eps = cfg.layer_norm_eps;
        Ok(Self {
            embeddings: ClipVisionEmbeddings::new(vb.pp("embeddings"), cfg)?,
            // (sic) transformers' spelling of the checkpoint key.
            pre_layrnorm: layer_norm(cfg.hidden_size, eps, vb.pp("pre_layrnorm"))?,
            encoder: ClipEncoder::new(vb.pp("encoder"), &dims)?,
            post_layernorm: layer_norm(cfg.hidden_size, eps, vb.pp("post_layernorm"))?,
        })
    }

    /// `pixel_values` → (`last_hidden_state` `[B, P, C]`, pooled `post_layernorm(CLS)` `[B, C]`).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<(Tensor, Tensor)> {
        let x = self.embeddings.forward(pixel_values)?;
        let x = layer_norm_f32(&self.pre_layrnorm, &x)?;
        let last = self.encoder.forward(&x, None)?;
        let cls = last.narrow(1, 0, 1)?.squeeze(1)?;
        let pooled = layer_norm_f32(&self.post_layernorm, &cls)?;
        Ok((last, pooled))
    }
}

/// `CLIPVisionModelWithProjection`: the vision transformer and `visual_projection` (no bias).
#[derive(Debug, Clone)]
pub struct ClipVisionModelWithProjection {
    vision_model: ClipVisionTransformer,
    visual_projection: Linear,
    image_size: usize,
    device: Device,
    dtype: DType,
}

impl ClipVisionModelWithProjection {
    /// Build from a var builder at the checkpoint root.
    pub fn new(vb: VarBuilder, cfg: &ClipVisionConfig) -> Result<Self> {
        Ok(Self {
            vision_model: ClipVisionTransformer::new(vb.pp("vision_model"), cfg)?,
            visual_projection: linear_no_bias(
                cfg.hidden_size,
                cfg.projection_dim,
                vb.pp("visual_projection"),
            )?,
            image_size: cfg.image_size,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// Load an `image_encoder/` folder in `dtype` on `device` (the real checkpoint is stored
    /// in f16 and is converted tensor by tensor while loading).
    pub fn load(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        load_component(dir, dtype, device, Self::new)
    }

    /// `pixel_values` `[B, 3, S, S]` → `image_embeds` `[B, E]` (not normalised).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (_, pooled) = self
            .vision_model
            .forward(&pixel_values.to_device(&self.device)?)?;
        Ok(self.visual_projection.forward(&pooled)?)
    }
}

impl ImageEncoder for ClipVisionModelWithProjection {
    fn encode_image(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.forward(pixel_values)
    }

    fn image_size(&self) -> usize {
        self.image_size
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}
