//! Kandinsky 2.1's multilingual text encoder: diffusers' `MultilingualCLIP`
//! (`pipelines/kandinsky/text_encoder.py`) around transformers' `XLMRobertaModel`
//! (`modeling_xlm_roberta.py`).
//!
//! XLM-RoBERTa is a post-LayerNorm BERT encoder: word + position + token-type embeddings and a
//! LayerNorm, then blocks of `LN(x + attn(x))`, `LN(h + ffn(h))`. The tokenizer's attention
//! mask is applied as an additive mask in every self-attention, and `MultilingualCLIP` pools
//! the last hidden states with a masked mean before `LinearTransformation`.
//!
//! Module and field names follow transformers, so every `vb.pp(..)` segment is a checkpoint
//! key segment (`transformer.encoder.layer.{i}.attention.self.query`, ...).

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};
use kandinsky_core::attention::{attention, merge_heads, split_heads, KvSegment};
use kandinsky_core::loading::load_component;
use kandinsky_core::nn::{layer_norm, layer_norm_f32, linear, Activation, LayerNorm, Linear};
use kandinsky_core::traits::{TextEncoder, TextEncoding};
use kandinsky_core::ModelConfig;
use kandinsky_core::{Error, Result};

use crate::configuration_xlm_roberta::MClipConfig;

/// Checkpoint tensors that exist in the real `text_encoder/model.safetensors` but that
/// `MultilingualCLIP` never uses: `XLMRobertaModel`'s pooler (tanh(dense(first token))), whose
/// output diffusers discards. They are not requested, so loading leaves them unused.
pub const UNUSED_CHECKPOINT_KEYS: [&str; 2] = [
    "transformer.pooler.dense.bias",
    "transformer.pooler.dense.weight",
];

/// The value transformers' eager attention adds at masked keys (`torch.finfo(float32).min`):
/// finite, so a fully masked row degrades to uniform weights instead of NaN.
const MASKED: f32 = f32::MIN;

/// Word, position and token-type embeddings followed by a LayerNorm (`XLMRobertaEmbeddings`).
#[derive(Debug, Clone)]
pub struct XlmRobertaEmbeddings {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    /// Row 0 of `token_type_embeddings`: every token has type 0.
    token_type: Tensor,
    layer_norm: LayerNorm,
}

impl XlmRobertaEmbeddings {
    /// Load from `transformer.embeddings`.
    pub fn new(vb: VarBuilder, cfg: &MClipConfig) -> Result<Self> {
        let c = cfg.hidden_size;
        let words = vb
            .pp("word_embeddings")
            .get((cfg.vocab_size, c), "weight")?;
        let positions = vb
            .pp("position_embeddings")
            .get((cfg.max_position_embeddings, c), "weight")?;
        let types = vb
            .pp("token_type_embeddings")
            .get((cfg.type_vocab_size, c), "weight")?;
        Ok(Self {
            word_embeddings: Embedding::new(words, c),
            position_embeddings: Embedding::new(positions, c),
            token_type: types.narrow(0, 0, 1)?,
            layer_norm: layer_norm(c, cfg.layer_norm_eps, vb.pp("LayerNorm"))?,
        })
    }

    /// `input_ids` and `position_ids` `[B, L]` (u32) → `[B, L, C]`.
    pub fn forward(&self, input_ids: &Tensor, position_ids: &Tensor) -> Result<Tensor> {
        let x = self.word_embeddings.forward(input_ids)?;
        let x = x.broadcast_add(&self.token_type)?;
        let x = (x + self.position_embeddings.forward(position_ids)?)?;
        Ok(layer_norm_f32(&self.layer_norm, &x)?)
    }
}

/// RoBERTa's position ids (fairseq `make_positions`): non-padding tokens are numbered
/// `pad + 1, pad + 2, ...` in order, padding tokens get `pad`. Decided by the ids, not by the
/// attention mask, exactly as transformers does.
pub fn roberta_position_ids(rows: &[Vec<u32>], pad: u32) -> Vec<Vec<u32>> {
    rows.iter()
        .map(|row| {
            let mut n = 0;
            row.iter()
                .map(|&id| {
                    if id == pad {
                        pad
                    } else {
                        n += 1;
                        pad + n
                    }
                })
                .collect()
        })
        .collect()
}

/// Self-attention with its output projection and post-LayerNorm (`XLMRobertaAttention`:
/// `self.{query,key,value}`, `output.{dense,LayerNorm}`).
#[derive(Debug, Clone)]
pub struct XlmRobertaAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    dense: Linear,
    layer_norm: LayerNorm,
    heads: usize,
    scale: f64,
}

impl XlmRobertaAttention {
    /// Load from `…layer.{i}.attention`.
    pub fn new(vb: VarBuilder, cfg: &MClipConfig) -> Result<Self> {
        let c = cfg.hidden_size;
        let s = vb.pp("self");
        let o = vb.pp("output");
        Ok(Self {
            query: linear(c, c, s.pp("query"))?,
            key: linear(c, c, s.pp("key"))?,
            value: linear(c, c, s.pp("value"))?,
            dense: linear(c, c, o.pp("dense"))?,
            layer_norm: layer_norm(c, cfg.layer_norm_eps, o.pp("LayerNorm"))?,
            heads: cfg.num_attention_heads,
            scale: (cfg.head_dim() as f64).powf(-0.5),
        })
    }

    /// `LN(x + dense(attn(x)))`; `mask` is additive, broadcastable to `[B, H, L, L]`.
    pub fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let q = split_heads(&self.query.forward(x)?, self.heads)?;
        let k = split_heads(&self.key.forward(x)?, self.heads)?;
        let v = split_heads(&self.value.forward(x)?, self.heads)?;
        let o = attention(&q, &[KvSegment { k: &k, v: &v }], Some(mask), self.scale)?;
        let h = self.dense.forward(&merge_heads(&o)?)?;
        Ok(layer_norm_f32(&self.layer_norm, &(h + x)?)?)
    }
}

/// One post-LayerNorm encoder block (`XLMRobertaLayer`).
#[derive(Debug, Clone)]
pub struct XlmRobertaLayer {
    attention: XlmRobertaAttention,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
    act: Activation,
}

impl XlmRobertaLayer {
    /// Load from `…encoder.layer.{i}`.
    pub fn new(vb: VarBuilder, cfg: &MClipConfig) -> Result<Self> {
        let (c, f) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            attention: XlmRobertaAttention::new(vb.pp("attention"), cfg)?,
            intermediate: linear(c, f, vb.pp("intermediate").pp("dense"))?,
            output: linear(f, c, vb.pp("output").pp("dense"))?,
            output_norm: layer_norm(c, cfg.layer_norm_eps, vb.pp("output").pp("LayerNorm"))?,
            act: cfg.activation()?,
        })
    }

    /// `h = LN(x + attn(x))`, then `LN(h + dense(act(dense(h))))`.
    pub fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = self.attention.forward(x, mask)?;
        let f = self.act.apply(&self.intermediate.forward(&h)?)?;
        let f = self.output.forward(&f)?;
        Ok(layer_norm_f32(&self.output_norm, &(f + h)?)?)
    }
}

/// `[B][L]` host values (ids or mask).
type Rows = Vec<Vec<u32>>;

/// `XLMRobertaModel` without its pooler (see [`UNUSED_CHECKPOINT_KEYS`]).
#[derive(Debug, Clone)]
pub struct XlmRobertaModel {
    embeddings: XlmRobertaEmbeddings,
    layers: Vec<XlmRobertaLayer>,
    pad_token_id: u32,
    vocab_size: usize,
    max_positions: usize,
    device: Device,
}

impl XlmRobertaModel {
    /// Load from `transformer`.
    pub fn new(vb: VarBuilder, cfg: &MClipConfig) -> Result<Self> {
        cfg.validate()?;
        let lvb = vb.pp("encoder").pp("layer");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| XlmRobertaLayer::new(lvb.pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeddings: XlmRobertaEmbeddings::new(vb.pp("embeddings"), cfg)?,
            layers,
            pad_token_id: cfg.pad_token_id,
            vocab_size: cfg.vocab_size,
            max_positions: cfg.max_positions(),
            device: vb.device().clone(),
        })
    }

    /// Host rows of `input_ids` and `attention_mask`, validated.
    fn prepare(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<(Rows, Rows)> {
        let ids = host_rows(input_ids, "input_ids")?;
        let mask = host_rows(attention_mask, "attention_mask")?;
        let (b, l) = (ids.len(), ids.first().map_or(0, |r| r.len()));
        if b == 0 || l == 0 || l > self.max_positions {
            return Err(Error::invalid(format!(
                "input_ids {:?}: need batch >= 1 and 1..={} tokens",
                input_ids.dims(),
                self.max_positions
            )));
        }
        if attention_mask.dims() != input_ids.dims() {
            return Err(Error::invalid(format!(
                "attention_mask {:?} must have the shape of input_ids {:?}",
                attention_mask.dims(),
                input_ids.dims()
            )));
        }
        if let Some(bad) = ids
            .iter()
            .flatten()
            .find(|&&v| v as usize >= self.vocab_size)
        {
            return Err(Error::invalid(format!(
                "token id {bad} is outside the vocabulary of {} ids",
                self.vocab_size
            )));
        }
        if let Some(bad) = mask.iter().flatten().find(|&&v| v > 1) {
            return Err(Error::invalid(format!(
                "attention_mask must hold 0 and 1, found {bad}"
            )));
        }
        if let Some(i) = mask.iter().position(|r| r.iter().all(|&v| v == 0)) {
            // The masked mean would divide by zero (NaN in diffusers).
            return Err(Error::invalid(format!(
                "attention_mask row {i} has no token (a tokenizer always keeps <s> and </s>)"
            )));
        }
        Ok((ids, mask))
    }

    /// `input_ids`, `attention_mask` `[B, L]` → the last hidden states `[B, L, C]`.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let (ids, mask) = self.prepare(input_ids, attention_mask)?;
        self.forward_rows(&ids, &mask)
    }

    fn forward_rows(&self, ids: &[Vec<u32>], mask: &[Vec<u32>]) -> Result<Tensor> {
        let (b, l) = (ids.len(), ids[0].len());
        let dev = &self.device;
        let positions = roberta_position_ids(ids, self.pad_token_id);
        let ids_t = Tensor::from_vec(ids.concat(), (b, l), dev)?;
        let pos_t = Tensor::from_vec(positions.concat(), (b, l), dev)?;
        let additive: Vec<f32> = mask
            .iter()
            .flatten()
            .map(|&m| if m == 1 { 0.0 } else { MASKED })
            .collect();
        let additive = Tensor::from_vec(additive, (b, 1, 1, l), dev)?;
        let mut x = self.embeddings.forward(&ids_t, &pos_t)?;
        for layer in &self.layers {
            x = layer.forward(&x, &additive)?;
        }
        Ok(x)
    }
}

/// `[B, L]` ids or mask (u32, i64, or 0/1 floats) as host rows.
fn host_rows(t: &Tensor, what: &str) -> Result<Vec<Vec<u32>>> {
    if t.rank() != 2 {
        return Err(Error::invalid(format!(
            "{what} must be [batch, seq], got {:?}",
            t.dims()
        )));
    }
    let to_u32 = |v: i64| u32::try_from(v).unwrap_or(u32::MAX);
    Ok(match t.dtype() {
        DType::U32 => t.to_vec2::<u32>()?,
        DType::U8 => t
            .to_vec2::<u8>()?
            .into_iter()
            .map(|r| r.into_iter().map(u32::from).collect())
            .collect(),
        DType::I64 => t
            .to_vec2::<i64>()?
            .into_iter()
            .map(|r| r.into_iter().map(to_u32).collect())
            .collect(),
        DType::F32 | DType::F16 | DType::BF16 | DType::F64 => t
            .to_dtype(DType::F64)?
            .to_vec2::<f64>()?
            .into_iter()
            .map(|r| {
                r.into_iter()
                    .map(|v| {
                        if v.fract() == 0.0 && (0.0..=u32::MAX as f64).contains(&v) {
                            v as u32
                        } else {
                            u32::MAX
                        }
                    })
                    .collect()
            })
            .collect(),
        other => {
            return Err(Error::invalid(format!(
                "{what} must be an integer tensor (u32 or i64), got {other:?}"
            )))
        }
    })
}

/// diffusers' `MultilingualCLIP`: XLM-RoBERTa (`transformer`) and `LinearTransformation`
/// (`transformerDimensions` → `numDims`, with bias) applied to the masked mean of the last
/// hidden states.
#[derive(Debug, Clone)]
pub struct MultilingualClip {
    transformer: XlmRobertaModel,
    linear_transformation: Linear,
    device: Device,
    dtype: DType,
}

impl MultilingualClip {
    /// Build from a var builder at the checkpoint root.
    pub fn new(vb: VarBuilder, cfg: &MClipConfig) -> Result<Self> {
        Ok(Self {
            transformer: XlmRobertaModel::new(vb.pp("transformer"), cfg)?,
            linear_transformation: linear(
                cfg.transformer_dimensions,
                cfg.num_dims,
                vb.pp("LinearTransformation"),
            )?,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// Load kandinsky-2-1's `text_encoder/` folder (config + safetensors) in `dtype` on
    /// `device`. The checkpoint's unused pooler ([`UNUSED_CHECKPOINT_KEYS`]) is left unread.
    pub fn load(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        load_component(dir, dtype, device, Self::new)
    }

    /// `input_ids` and `attention_mask` `[B, L]` (from [`crate::XlmRobertaTokenizer`]) →
    /// `last_hidden_state` `[B, L, C]` (the 2.1 UNet's text context) and `text_embeds`
    /// `[B, numDims]` = `LinearTransformation(Σ H·mask / Σ mask)`.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<TextEncoding> {
        let (ids, mask) = self.transformer.prepare(input_ids, attention_mask)?;
        let hidden = self.transformer.forward_rows(&ids, &mask)?;
        let (b, l) = (ids.len(), ids[0].len());
        // The masked mean in f32 (diffusers computes it in the model dtype; f32 is at least as
        // accurate and the result is cast back).
        let m: Vec<f32> = mask.concat().into_iter().map(|v| v as f32).collect();
        let m = Tensor::from_vec(m, (b, l, 1), &self.device)?;
        let sum = hidden.to_dtype(DType::F32)?.broadcast_mul(&m)?.sum(1)?;
        let count = m.sum(1)?;
        let pooled = sum.broadcast_div(&count)?.to_dtype(self.dtype)?;
        let text_embeds = self.linear_transformation.forward(&pooled)?;
        Ok(TextEncoding {
            last_hidden_state: hidden,
            text_embeds,
        })
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

impl TextEncoder for MultilingualClip {
    /// M-CLIP pools with the padding mask, so `attention_mask` is required: `None` is an
    /// [`Error::InvalidInput`].
    fn encode_text(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<TextEncoding> {
        let mask = attention_mask.ok_or_else(|| {
            Error::invalid(
                "MultilingualCLIP needs the tokenizer's attention_mask (it is applied in \
                 attention and to the masked-mean pooling)",
            )
        })?;
        self.forward(input_ids, mask)
    }

    fn device(&self) -> &Device {
        &self.device
    }
}
