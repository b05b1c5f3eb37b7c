//! The VQ-VAE blocks of diffusers' `unet_2d_blocks.py`: `DownEncoderBlock2D`,
//! `AttnDownEncoderBlock2D`, `UpDecoderBlock2D`, `AttnUpDecoderBlock2D`, `UNetMidBlock2D`.

use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use kandinsky_core::nn::Activation;
use kandinsky_core::Result;

use crate::attention_processor::{Attention, NormKind};
use crate::downsampling::Downsample2D;
use crate::resnet::ResnetBlock2D;
use crate::upsampling::Upsample2D;

/// Encoder block types (`down_block_types`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DownBlockType {
    /// Resnets, then a downsampler.
    DownEncoderBlock2D,
    /// (Resnet, attention) pairs, then a downsampler.
    AttnDownEncoderBlock2D,
}

/// Decoder block types (`up_block_types`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpBlockType {
    /// Resnets, then an upsampler.
    UpDecoderBlock2D,
    /// (Resnet, attention) pairs, then an upsampler.
    AttnUpDecoderBlock2D,
}

/// Shared construction parameters of a block.
#[derive(Debug, Clone, Copy)]
pub struct BlockParams {
    /// Input channels of the first resnet.
    pub in_channels: usize,
    /// Output channels of every resnet.
    pub out_channels: usize,
    /// Number of resnets.
    pub num_layers: usize,
    /// Resnet non-linearity.
    pub act: Activation,
    /// Norm of the resnets and attentions.
    pub norm: NormKind,
    /// Whether the block ends with a down/upsampler (every block but the last).
    pub resample: bool,
}

/// Resnets, each optionally followed by an attention block (the `Attn…` variants).
#[derive(Debug, Clone)]
struct ResnetStack {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Attention>,
}

impl ResnetStack {
    fn new(p: &BlockParams, with_attention: bool, vb: &VarBuilder) -> Result<Self> {
        let mut resnets = Vec::with_capacity(p.num_layers);
        let mut attentions = Vec::new();
        for i in 0..p.num_layers {
            let in_ch = if i == 0 {
                p.in_channels
            } else {
                p.out_channels
            };
            resnets.push(ResnetBlock2D::new(
                in_ch,
                p.out_channels,
                p.act,
                p.norm,
                vb.pp("resnets").pp(i),
            )?);
            if with_attention {
                attentions.push(Attention::new(
                    p.out_channels,
                    p.norm,
                    vb.pp("attentions").pp(i),
                )?);
            }
        }
        Ok(Self {
            resnets,
            attentions,
        })
    }

    fn forward(&self, x: &Tensor, zq: Option<&Tensor>) -> Result<Tensor> {
        // Without attentions each ResNet leaves the next one's norm1 statistics where the
        // CUDA path can.
        let (mut h, mut stats) = (x.clone(), None);
        for (i, resnet) in self.resnets.iter().enumerate() {
            let next = self
                .resnets
                .get(i + 1)
                .filter(|_| self.attentions.is_empty());
            let out_groups = next.map(ResnetBlock2D::norm_groups);
            (h, stats) = resnet.forward_stats(&h, zq, stats.as_ref(), out_groups)?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, zq)?;
            }
        }
        Ok(h)
    }
}

/// `DownEncoderBlock2D` / `AttnDownEncoderBlock2D`. Keys `resnets.i`, `attentions.i`,
/// `downsamplers.0`.
#[derive(Debug, Clone)]
pub struct DownEncoderBlock2D {
    stack: ResnetStack,
    downsampler: Option<Downsample2D>,
}

impl DownEncoderBlock2D {
    /// Load a block of the given type.
    pub fn new(kind: DownBlockType, p: &BlockParams, vb: VarBuilder) -> Result<Self> {
        let with_attention = kind == DownBlockType::AttnDownEncoderBlock2D;
        let downsampler = if p.resample {
            Some(Downsample2D::new(
                p.out_channels,
                vb.pp("downsamplers").pp(0),
            )?)
        } else {
            None
        };
        Ok(Self {
            stack: ResnetStack::new(p, with_attention, &vb)?,
            downsampler,
        })
    }

    /// Forward.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.stack.forward(x, None)?;
        match &self.downsampler {
            Some(d) => d.forward(&h),
            None => Ok(h),
        }
    }
}

/// `UpDecoderBlock2D` / `AttnUpDecoderBlock2D`. Keys `resnets.i`, `attentions.i`,
/// `upsamplers.0`.
#[derive(Debug, Clone)]
pub struct UpDecoderBlock2D {
    stack: ResnetStack,
    upsampler: Option<Upsample2D>,
}

impl UpDecoderBlock2D {
    /// Load a block of the given type.
    pub fn new(kind: UpBlockType, p: &BlockParams, vb: VarBuilder) -> Result<Self> {
        let with_attention = kind == UpBlockType::AttnUpDecoderBlock2D;
        let upsampler = if p.resample {
            Some(Upsample2D::new(p.out_channels, vb.pp("upsamplers").pp(0))?)
        } else {
            None
        };
        Ok(Self {
            stack: ResnetStack::new(p, with_attention, &vb)?,
            upsampler,
        })
    }

    /// Forward; `zq` conditions spatial norms.
    pub fn forward(&self, x: &Tensor, zq: Option<&Tensor>) -> Result<Tensor> {
        let h = self.stack.forward(x, zq)?;
        match &self.upsampler {
            Some(u) => u.forward(&h),
            None => Ok(h),
        }
    }
}

/// `UNetMidBlock2D` with one layer: resnet, attention, resnet. Keys `resnets.{0,1}`,
/// `attentions.0`.
#[derive(Debug, Clone)]
pub struct UNetMidBlock2D {
    resnets: [ResnetBlock2D; 2],
    attention: Option<Attention>,
}

impl UNetMidBlock2D {
    /// Load a mid block over `channels` channels.
    pub fn new(
        channels: usize,
        act: Activation,
        norm: NormKind,
        add_attention: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let resnet =
            |i: usize| ResnetBlock2D::new(channels, channels, act, norm, vb.pp("resnets").pp(i));
        let attention = if add_attention {
            Some(Attention::new(channels, norm, vb.pp("attentions").pp(0))?)
        } else {
            None
        };
        Ok(Self {
            resnets: [resnet(0)?, resnet(1)?],
            attention,
        })
    }

    /// Forward; `zq` conditions spatial norms.
    pub fn forward(&self, x: &Tensor, zq: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(x, zq)?;
        if let Some(a) = &self.attention {
            h = a.forward(&h, zq)?;
        }
        self.resnets[1].forward(&h, zq)
    }
}
