//! The conditioning of the Kandinsky UNets (diffusers `models/embeddings.py`).
//!
//! Kandinsky 2.2: `ImageProjection` (image embedding → cross-attention tokens),
//! `ImageTimeEmbedding` and `ImageHintTimeEmbedding` (image embedding → a term added to the
//! time embedding; the hint variant also encodes the ControlNet hint image).
//!
//! Kandinsky 2.1: `TextImageProjection` (image embedding → 10 tokens, followed by the
//! projected M-CLIP hidden states) and `TextImageTimeEmbedding` (pooled text embedding and
//! image embedding → the time-embedding term).

use candle_core::Tensor;
use candle_nn::{Module, VarBuilder};
use kandinsky_core::nn::{layer_norm, layer_norm_f32, Conv2dConfig, LayerNorm};
use kandinsky_core::Result;

use crate::layers::{conv2d, linear, Conv2d, Linear};

/// `nn.LayerNorm` default epsilon.
const LAYER_NORM_EPS: f64 = 1e-5;

/// `ImageProjection`: `[B, E]` → `[B, tokens, C]` (Linear, reshape, LayerNorm).
///
/// Keys: `image_embeds`, `norm`.
#[derive(Debug, Clone)]
pub struct ImageProjection {
    image_embeds: Linear,
    norm: LayerNorm,
    num_tokens: usize,
    cross_attention_dim: usize,
}

impl ImageProjection {
    /// diffusers' `num_image_text_embeds` default, used by every Kandinsky 2.2 UNet.
    pub const NUM_TOKENS: usize = 32;

    /// Load a projection of `image_embed_dim`-wide embeddings to 32 tokens of
    /// `cross_attention_dim`.
    pub fn new(vb: VarBuilder, image_embed_dim: usize, cross_attention_dim: usize) -> Result<Self> {
        let num_tokens = Self::NUM_TOKENS;
        Ok(Self {
            image_embeds: linear(
                image_embed_dim,
                num_tokens * cross_attention_dim,
                vb.pp("image_embeds"),
            )?,
            norm: layer_norm(cross_attention_dim, LAYER_NORM_EPS, vb.pp("norm"))?,
            num_tokens,
            cross_attention_dim,
        })
    }

    /// `[B, E]` → `[B, 32, C]`.
    pub fn forward(&self, image_embeds: &Tensor) -> Result<Tensor> {
        let b = image_embeds.dim(0)?;
        let tokens = self.image_embeds.forward(image_embeds)?.reshape((
            b,
            self.num_tokens,
            self.cross_attention_dim,
        ))?;
        Ok(layer_norm_f32(&self.norm, &tokens)?)
    }
}

/// `ImageTimeEmbedding`: `[B, E]` → `[B, T]` (Linear, LayerNorm), added to the time embedding.
///
/// Keys: `image_proj`, `image_norm`.
#[derive(Debug, Clone)]
pub struct ImageTimeEmbedding {
    image_proj: Linear,
    image_norm: LayerNorm,
}

impl ImageTimeEmbedding {
    /// Load a projection of `image_embed_dim` to `time_embed_dim`.
    pub fn new(vb: VarBuilder, image_embed_dim: usize, time_embed_dim: usize) -> Result<Self> {
        Ok(Self {
            image_proj: linear(image_embed_dim, time_embed_dim, vb.pp("image_proj"))?,
            image_norm: layer_norm(time_embed_dim, LAYER_NORM_EPS, vb.pp("image_norm"))?,
        })
    }

    /// `[B, E]` → `[B, T]`.
    pub fn forward(&self, image_embeds: &Tensor) -> Result<Tensor> {
        let h = self.image_proj.forward(image_embeds)?;
        Ok(layer_norm_f32(&self.image_norm, &h)?)
    }
}

/// `TextImageProjection` (Kandinsky 2.1): image embedding `[B, E]` → 10 tokens of `C`
/// (Linear, reshape; no norm), text hidden states `[B, L, D]` → `[B, L, C]` (Linear); the
/// context is `[image tokens ‖ text tokens]`, `[B, 10 + L, C]`.
///
/// Keys: `image_embeds`, `text_proj`.
#[derive(Debug, Clone)]
pub struct TextImageProjection {
    image_embeds: Linear,
    text_proj: Linear,
    num_tokens: usize,
    cross_attention_dim: usize,
}

impl TextImageProjection {
    /// diffusers' `num_image_text_embeds` default for `TextImageProjection` (Kandinsky 2.1).
    pub const NUM_IMAGE_TOKENS: usize = 10;

    /// Load the projections: `image_embed_dim` → 10 × `cross_attention_dim` and
    /// `text_embed_dim` → `cross_attention_dim`. (diffusers builds the 2.1 UNet with
    /// `text_embed_dim = encoder_hid_dim` and `image_embed_dim = cross_attention_dim`.)
    pub fn new(
        vb: VarBuilder,
        text_embed_dim: usize,
        image_embed_dim: usize,
        cross_attention_dim: usize,
    ) -> Result<Self> {
        let num_tokens = Self::NUM_IMAGE_TOKENS;
        Ok(Self {
            image_embeds: linear(
                image_embed_dim,
                num_tokens * cross_attention_dim,
                vb.pp("image_embeds"),
            )?,
            text_proj: linear(text_embed_dim, cross_attention_dim, vb.pp("text_proj"))?,
            num_tokens,
            cross_attention_dim,
        })
    }

    /// `text_hidden_states` `[B, L, D]`, `image_embeds` `[B, E]` → `[B, 10 + L, C]`.
    pub fn forward(&self, text_hidden_states: &Tensor, image_embeds: &Tensor) -> Result<Tensor> {
        let b = image_embeds.dim(0)?;
        let image_tokens = self.image_embeds.forward(image_embeds)?.reshape((
            b,
            self.num_tokens,
            self.cross_attention_dim,
        ))?;
        let text_tokens = self.text_proj.forward(text_hidden_states)?;
        // Image tokens first, as diffusers concatenates them.
        Ok(Tensor::cat(&[&image_tokens, &text_tokens], 1)?)
    }
}

/// `TextImageTimeEmbedding` (Kandinsky 2.1): `LayerNorm(text_proj(text_embeds)) +
/// image_proj(image_embeds)`, `[B, T]`, added to the time embedding. The image term has no
/// norm.
///
/// Keys: `text_proj`, `text_norm`, `image_proj`.
#[derive(Debug, Clone)]
pub struct TextImageTimeEmbedding {
    text_proj: Linear,
    text_norm: LayerNorm,
    image_proj: Linear,
}

impl TextImageTimeEmbedding {
    /// Load the projections of `text_embed_dim` and `image_embed_dim` to `time_embed_dim`
    /// (both inputs are `cross_attention_dim` wide in diffusers' 2.1 UNet).
    pub fn new(
        vb: VarBuilder,
        text_embed_dim: usize,
        image_embed_dim: usize,
        time_embed_dim: usize,
    ) -> Result<Self> {
        Ok(Self {
            text_proj: linear(text_embed_dim, time_embed_dim, vb.pp("text_proj"))?,
            text_norm: layer_norm(time_embed_dim, LAYER_NORM_EPS, vb.pp("text_norm"))?,
            image_proj: linear(image_embed_dim, time_embed_dim, vb.pp("image_proj"))?,
        })
    }

    /// `text_embeds` `[B, Et]`, `image_embeds` `[B, Ei]` → `[B, T]`.
    pub fn forward(&self, text_embeds: &Tensor, image_embeds: &Tensor) -> Result<Tensor> {
        let text = self.text_proj.forward(text_embeds)?;
        let text = layer_norm_f32(&self.text_norm, &text)?;
        let image = self.image_proj.forward(image_embeds)?;
        Ok((image + text)?)
    }
}

/// `ImageHintTimeEmbedding`: [`ImageTimeEmbedding`] plus `input_hint_block`, eight 3×3 convs
/// (SiLU between them, three with stride 2) taking a `[B, 3, H, W]` hint to `[B, 4, H/8, W/8]`.
///
/// Keys: `image_proj`, `image_norm`, `input_hint_block.{0,2,4,...,14}`.
#[derive(Debug, Clone)]
pub struct ImageHintTimeEmbedding {
    image: ImageTimeEmbedding,
    input_hint_block: Vec<Conv2d>,
}

impl ImageHintTimeEmbedding {
    /// `(in, out, stride)` of the hint convs; the widths are hard-coded in diffusers too.
    const HINT_CONVS: [(usize, usize, usize); 8] = [
        (3, 16, 1),
        (16, 16, 1),
        (16, 32, 2),
        (32, 32, 1),
        (32, 96, 2),
        (96, 96, 1),
        (96, 256, 2),
        (256, 4, 1),
    ];
    /// Channels of the hint image.
    pub const HINT_CHANNELS: usize = 3;
    /// Channels of the encoded hint (concatenated to the latents).
    pub const HINT_OUT_CHANNELS: usize = 4;
    /// Spatial down-scaling of the hint encoder.
    pub const HINT_DOWNSCALE: usize = 8;

    /// Load the image term and the hint encoder.
    pub fn new(vb: VarBuilder, image_embed_dim: usize, time_embed_dim: usize) -> Result<Self> {
        let image = ImageTimeEmbedding::new(vb.clone(), image_embed_dim, time_embed_dim)?;
        let hint_vb = vb.pp("input_hint_block");
        let input_hint_block = Self::HINT_CONVS
            .iter()
            .enumerate()
            .map(|(i, &(cin, cout, stride))| {
                let cfg = Conv2dConfig {
                    padding: 1,
                    stride,
                    ..Default::default()
                };
                // nn.Sequential indices: convs at even positions, SiLU at odd ones.
                conv2d(cin, cout, 3, cfg, hint_vb.pp((2 * i).to_string()))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            image,
            input_hint_block,
        })
    }

    /// `image_embeds` `[B, E]`, `hint` `[B, 3, H, W]` → (`[B, T]`, `[B, 4, H/8, W/8]`).
    pub fn forward(&self, image_embeds: &Tensor, hint: &Tensor) -> Result<(Tensor, Tensor)> {
        let aug = self.image.forward(image_embeds)?;
        let last = self.input_hint_block.len() - 1;
        let mut h = hint.clone();
        for (i, conv) in self.input_hint_block.iter().enumerate() {
            h = conv.forward(&h)?;
            if i != last {
                h = h.silu()?;
            }
        }
        Ok((aug, h))
    }
}
