//! diffusers' `autoencoders/vq_model.py`: `VQModel` (MoVQ), its config and the
//! [`LatentCodec`] implementation.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use kandinsky_core::loading::load_component;
use kandinsky_core::nn::Activation;
use kandinsky_core::traits::LatentCodec;
use kandinsky_core::ModelConfig;
use kandinsky_core::{Error, Result};

use crate::attention_processor::{NormKind, SPATIAL_NORM_GROUPS};
use crate::conv::{Conv2d, Padding};
use crate::unet_2d_blocks::{DownBlockType, UpBlockType};
use crate::vae::{CoderParams, Decoder, Encoder, VectorQuantizer, NORM_EPS};

fn default_in_out() -> usize {
    3
}
fn default_down() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn default_up() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}
fn default_boc() -> Vec<usize> {
    vec![64]
}
fn default_one() -> usize {
    1
}
fn default_act() -> String {
    "silu".into()
}
fn default_latent() -> usize {
    3
}
fn default_sample_size() -> usize {
    32
}
fn default_vq() -> usize {
    256
}
fn default_groups() -> usize {
    32
}
fn default_scaling() -> f64 {
    0.18215
}
fn default_norm_type() -> String {
    "group".into()
}
fn default_true() -> bool {
    true
}

/// `config.json` of a `VQModel` (diffusers' defaults for absent fields; unknown fields ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct VQModelConfig {
    /// Image channels.
    #[serde(default = "default_in_out")]
    pub in_channels: usize,
    /// Decoded image channels.
    #[serde(default = "default_in_out")]
    pub out_channels: usize,
    /// `DownEncoderBlock2D` / `AttnDownEncoderBlock2D` per level.
    #[serde(default = "default_down")]
    pub down_block_types: Vec<String>,
    /// `UpDecoderBlock2D` / `AttnUpDecoderBlock2D` per level.
    #[serde(default = "default_up")]
    pub up_block_types: Vec<String>,
    /// Channels per level.
    #[serde(default = "default_boc")]
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder block (decoder blocks have one more).
    #[serde(default = "default_one")]
    pub layers_per_block: usize,
    /// Resnet non-linearity.
    #[serde(default = "default_act")]
    pub act_fn: String,
    /// Latent channels.
    #[serde(default = "default_latent")]
    pub latent_channels: usize,
    /// Training sample size (unused at inference).
    #[serde(default = "default_sample_size")]
    pub sample_size: usize,
    /// Codebook entries.
    #[serde(default = "default_vq")]
    pub num_vq_embeddings: usize,
    /// Groups of the GroupNorms (SpatialNorm always uses 32).
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    /// Codebook width (defaults to `latent_channels`).
    #[serde(default)]
    pub vq_embed_dim: Option<usize>,
    /// Never applied by the Kandinsky pipelines (kept for completeness).
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    /// `group` or `spatial` (decoder norms).
    #[serde(default = "default_norm_type")]
    pub norm_type: String,
    /// Attention in the mid blocks.
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    /// Decode codebook indices instead of latents (not supported).
    #[serde(default)]
    pub lookup_from_codebook: bool,
    /// A flag only; `VQModel` never reads it.
    #[serde(default)]
    pub force_upcast: bool,
}

impl VQModelConfig {
    /// The configuration of the Kandinsky 2.1/2.2 MoVQ (`kandinsky-2-2-decoder/movq`).
    pub fn kandinsky_2_2() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: [
                "DownEncoderBlock2D",
                "DownEncoderBlock2D",
                "DownEncoderBlock2D",
                "AttnDownEncoderBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            up_block_types: [
                "AttnUpDecoderBlock2D",
                "UpDecoderBlock2D",
                "UpDecoderBlock2D",
                "UpDecoderBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            block_out_channels: vec![128, 256, 256, 512],
            layers_per_block: 2,
            act_fn: "silu".into(),
            latent_channels: 4,
            sample_size: 32,
            num_vq_embeddings: 16384,
            norm_num_groups: 32,
            vq_embed_dim: Some(4),
            scaling_factor: 0.18215,
            norm_type: "spatial".into(),
            mid_block_add_attention: true,
            lookup_from_codebook: false,
            force_upcast: false,
        }
    }

    /// Codebook width.
    pub fn vq_embed_dim(&self) -> usize {
        self.vq_embed_dim.unwrap_or(self.latent_channels)
    }

    /// Spatial down-scaling factor `2^(levels − 1)`.
    pub fn scale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    /// The down block types, rejecting unknown ones.
    pub fn down_blocks(&self) -> Result<Vec<DownBlockType>> {
        self.down_block_types
            .iter()
            .map(|t| match t.as_str() {
                "DownEncoderBlock2D" => Ok(DownBlockType::DownEncoderBlock2D),
                "AttnDownEncoderBlock2D" => Ok(DownBlockType::AttnDownEncoderBlock2D),
                other => Err(Error::unsupported(
                    "down_block_types",
                    other,
                    "DownEncoderBlock2D, AttnDownEncoderBlock2D",
                )),
            })
            .collect()
    }

    /// The up block types, rejecting unknown ones.
    pub fn up_blocks(&self) -> Result<Vec<UpBlockType>> {
        self.up_block_types
            .iter()
            .map(|t| match t.as_str() {
                "UpDecoderBlock2D" => Ok(UpBlockType::UpDecoderBlock2D),
                "AttnUpDecoderBlock2D" => Ok(UpBlockType::AttnUpDecoderBlock2D),
                other => Err(Error::unsupported(
                    "up_block_types",
                    other,
                    "UpDecoderBlock2D, AttnUpDecoderBlock2D",
                )),
            })
            .collect()
    }

    /// The decoder's norm, rejecting unknown `norm_type`s.
    pub fn decoder_norm(&self) -> Result<NormKind> {
        match self.norm_type.as_str() {
            "spatial" => Ok(NormKind::Spatial {
                zq_channels: self.latent_channels,
            }),
            "group" => Ok(NormKind::Group {
                groups: self.norm_num_groups,
                eps: NORM_EPS,
            }),
            other => Err(Error::unsupported("norm_type", other, "group, spatial")),
        }
    }
}

impl ModelConfig for VQModelConfig {
    /// Check every value this implementation depends on.
    fn validate(&self) -> Result<()> {
        let levels = self.block_out_channels.len();
        if levels == 0 {
            return Err(Error::unsupported(
                "block_out_channels",
                &self.block_out_channels,
                "at least one level",
            ));
        }
        if self.down_blocks()?.len() != levels {
            return Err(Error::unsupported(
                "down_block_types",
                &self.down_block_types,
                format!("one block per block_out_channels entry ({levels})"),
            ));
        }
        if self.up_blocks()?.len() != levels {
            return Err(Error::unsupported(
                "up_block_types",
                &self.up_block_types,
                format!("one block per block_out_channels entry ({levels})"),
            ));
        }
        let norm = self.decoder_norm()?;
        Activation::from_name(&self.act_fn)?;
        for &c in &self.block_out_channels {
            if self.norm_num_groups == 0 || c == 0 || c % self.norm_num_groups != 0 {
                return Err(Error::unsupported(
                    "block_out_channels",
                    &self.block_out_channels,
                    format!(
                        "positive multiples of norm_num_groups ({})",
                        self.norm_num_groups
                    ),
                ));
            }
            if matches!(norm, NormKind::Spatial { .. }) && c % SPATIAL_NORM_GROUPS != 0 {
                return Err(Error::unsupported(
                    "block_out_channels",
                    &self.block_out_channels,
                    "multiples of 32 with norm_type \"spatial\" (SpatialNorm has 32 groups)",
                ));
            }
        }
        if self.lookup_from_codebook {
            return Err(Error::unsupported(
                "lookup_from_codebook",
                true,
                "false (decode takes latents, not codebook indices)",
            ));
        }
        if self.latent_channels == 0 || self.num_vq_embeddings == 0 || self.vq_embed_dim() == 0 {
            return Err(Error::unsupported(
                "latent_channels / num_vq_embeddings / vq_embed_dim",
                (
                    self.latent_channels,
                    self.num_vq_embeddings,
                    self.vq_embed_dim(),
                ),
                "positive values",
            ));
        }
        if matches!(norm, NormKind::Spatial { .. }) && self.vq_embed_dim() != self.latent_channels {
            return Err(Error::unsupported(
                "vq_embed_dim",
                self.vq_embed_dim(),
                format!(
                    "equal to latent_channels ({}) with norm_type \"spatial\" (the decoder's \
                     norms are conditioned on the quantised latent)",
                    self.latent_channels
                ),
            ));
        }
        Ok(())
    }
}

/// The MoVQ image codec: `encoder`, `quant_conv`, `quantize`, `post_quant_conv`, `decoder`.
#[derive(Debug, Clone)]
pub struct VQModel {
    encoder: Encoder,
    quant_conv: Conv2d,
    quantize: VectorQuantizer,
    post_quant_conv: Conv2d,
    decoder: Decoder,
    spatial: bool,
    in_channels: usize,
    latent_channels: usize,
    scale_factor: usize,
    dtype: DType,
    device: Device,
}

impl VQModel {
    /// Build from a `VarBuilder` whose paths are the checkpoint's keys.
    pub fn new(vb: VarBuilder, cfg: &VQModelConfig) -> Result<Self> {
        cfg.validate()?;
        let params = CoderParams {
            block_out_channels: cfg.block_out_channels.clone(),
            layers_per_block: cfg.layers_per_block,
            norm_num_groups: cfg.norm_num_groups,
            act: Activation::from_name(&cfg.act_fn)?,
            mid_block_add_attention: cfg.mid_block_add_attention,
        };
        let norm = cfg.decoder_norm()?;
        let (lat, vq) = (cfg.latent_channels, cfg.vq_embed_dim());
        let one = Padding::same(0);
        Ok(Self {
            encoder: Encoder::new(
                cfg.in_channels,
                lat,
                &cfg.down_blocks()?,
                &params,
                vb.pp("encoder"),
            )?,
            quant_conv: Conv2d::new(lat, vq, 1, 1, one, vb.pp("quant_conv"))?,
            quantize: VectorQuantizer::new(cfg.num_vq_embeddings, vq, vb.pp("quantize"))?,
            post_quant_conv: Conv2d::new(vq, lat, 1, 1, one, vb.pp("post_quant_conv"))?,
            decoder: Decoder::new(
                lat,
                cfg.out_channels,
                &cfg.up_blocks()?,
                norm,
                &params,
                vb.pp("decoder"),
            )?,
            spatial: matches!(norm, NormKind::Spatial { .. }),
            in_channels: cfg.in_channels,
            latent_channels: vq,
            scale_factor: cfg.scale_factor(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// Load a diffusers `movq/` folder (`config.json` + safetensors weights).
    pub fn load(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        load_component(dir, dtype, device, Self::new)
    }

    fn check_input(&self, x: &Tensor, what: &str, channels: usize) -> Result<Tensor> {
        let dims = x.dims();
        if dims.len() != 4 || dims[0] == 0 || dims[1] != channels || dims[2] == 0 || dims[3] == 0 {
            return Err(Error::invalid(format!(
                "{what} must be [batch, {channels}, height, width], got shape {dims:?}"
            )));
        }
        Ok(x.to_device(&self.device)?.to_dtype(self.dtype)?)
    }

    /// `quant_conv(encoder(image))`: image `[B, 3, H, W]` in [-1, 1], `H` and `W` multiples of
    /// the scale factor (8) → latents `[B, 4, H/8, W/8]` (not quantised, not scaled).
    pub fn encode(&self, image: &Tensor) -> Result<Tensor> {
        let x = self.check_input(image, "the image", self.in_channels)?;
        let (_, _, h, w) = x.dims4()?;
        let f = self.scale_factor;
        if h % f != 0 || w % f != 0 {
            return Err(Error::invalid(format!(
                "image sides must be multiples of {f}, got shape {:?} ({h}×{w})",
                image.dims()
            )));
        }
        let h = self.encoder.forward(&x)?;
        self.quant_conv.forward(&h)
    }

    /// Snap latents `[B, 4, h, w]` to the codebook: (quantised latents, indices `[B, h, w]`).
    pub fn quantize(&self, latents: &Tensor) -> Result<(Tensor, Tensor)> {
        let z = self.check_input(latents, "latents", self.latent_channels)?;
        self.quantize.forward(&z)
    }

    /// Latents `[B, 4, h, w]` → image `[B, 3, 8h, 8w]` in about [-1, 1] (not clamped). The
    /// pipelines pass `force_not_quantize = true`; `false` snaps to the codebook first.
    pub fn decode(&self, latents: &Tensor, force_not_quantize: bool) -> Result<Tensor> {
        let h = self.check_input(latents, "latents", self.latent_channels)?;
        let quant = if force_not_quantize {
            h
        } else {
            self.quantize.forward(&h)?.0
        };
        let z = self.post_quant_conv.forward(&quant)?;
        let zq = self.spatial.then_some(&quant);
        self.decoder.forward(&z, zq)
    }
}

impl LatentCodec for VQModel {
    fn encode(&self, image: &Tensor) -> Result<Tensor> {
        VQModel::encode(self, image)
    }
    fn decode(&self, latents: &Tensor, force_not_quantize: bool) -> Result<Tensor> {
        VQModel::decode(self, latents, force_not_quantize)
    }
    fn scale_factor(&self) -> usize {
        self.scale_factor
    }
    fn latent_channels(&self) -> usize {
        self.latent_channels
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
}
