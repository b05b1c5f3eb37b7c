//! The UNet blocks of the Kandinsky 2.2 decoder (diffusers `models/unets/unet_2d_blocks.py`):
//! `ResnetDownsampleBlock2D`, `SimpleCrossAttnDownBlock2D`, `UNetMidBlock2DSimpleCrossAttn`,
//! `SimpleCrossAttnUpBlock2D`, `ResnetUpsampleBlock2D`. Resampling is a ResNet block with
//! `down`/`up` (keys `downsamplers.0` / `upsamplers.0`), not a conv.

use candle_core::Tensor;
use candle_nn::VarBuilder;
use kandinsky_core::gpu_conv::{cat_channels, MapStats};
use kandinsky_core::{Error, Result};

use crate::attention_processor::{Attention, ImageKv};
use crate::resnet::{Resample, ResnetBlock2D, ResnetSettings};

/// Attention settings of the SimpleCrossAttn blocks.
#[derive(Debug, Clone, Copy)]
pub struct AttentionSettings {
    /// Per-head dimension (`attention_head_dim`; heads = channels / this).
    pub head_dim: usize,
    /// Width of the image tokens (`cross_attention_dim`).
    pub cross_attention_dim: usize,
}

/// Channel plan of one block, as `UNet2DConditionModel.__init__` computes it.
#[derive(Debug, Clone, Copy)]
pub struct BlockChannels {
    /// Down blocks: input width. Up blocks: width of the deepest skip (the last layer's).
    pub in_channels: usize,
    /// Up blocks only: width of the incoming hidden state (`prev_output_channel`).
    pub prev_output_channel: usize,
    /// Output width.
    pub out_channels: usize,
    /// Number of ResNet layers.
    pub layers: usize,
    /// Whether the block ends with a resampling ResNet.
    pub resample: bool,
}

fn attentions(
    vb: &VarBuilder,
    n: usize,
    channels: usize,
    resnet: &ResnetSettings,
    attn: &AttentionSettings,
) -> Result<Vec<Attention>> {
    (0..n)
        .map(|i| {
            Attention::new(
                vb.pp("attentions").pp(i.to_string()),
                channels,
                attn.head_dim,
                attn.cross_attention_dim,
                resnet.groups,
            )
        })
        .collect()
}

fn down_resnets(
    vb: &VarBuilder,
    ch: &BlockChannels,
    resnet: &ResnetSettings,
) -> Result<Vec<ResnetBlock2D>> {
    (0..ch.layers)
        .map(|i| {
            let cin = if i == 0 {
                ch.in_channels
            } else {
                ch.out_channels
            };
            ResnetBlock2D::new(
                vb.pp("resnets").pp(i.to_string()),
                cin,
                ch.out_channels,
                Resample::None,
                resnet,
            )
        })
        .collect()
}

fn up_resnets(
    vb: &VarBuilder,
    ch: &BlockChannels,
    resnet: &ResnetSettings,
) -> Result<Vec<ResnetBlock2D>> {
    (0..ch.layers)
        .map(|i| {
            // The last layer takes the skip from the level below (the block's input width).
            let skip = if i + 1 == ch.layers {
                ch.in_channels
            } else {
                ch.out_channels
            };
            let cin = if i == 0 {
                ch.prev_output_channel
            } else {
                ch.out_channels
            };
            ResnetBlock2D::new(
                vb.pp("resnets").pp(i.to_string()),
                cin + skip,
                ch.out_channels,
                Resample::None,
                resnet,
            )
        })
        .collect()
}

fn resampler(
    vb: VarBuilder,
    ch: &BlockChannels,
    resample: Resample,
    resnet: &ResnetSettings,
) -> Result<Option<ResnetBlock2D>> {
    if !ch.resample {
        return Ok(None);
    }
    let c = ch.out_channels;
    Ok(Some(ResnetBlock2D::new(
        vb.pp("0"),
        c,
        c,
        resample,
        resnet,
    )?))
}

/// Each attention with its image keys and values: one per attention, in order.
fn paired<'a>(
    attentions: &'a [Attention],
    image_kv: &'a [ImageKv],
) -> Result<impl Iterator<Item = (&'a Attention, &'a ImageKv)>> {
    check_kv_count(attentions.len(), image_kv)?;
    Ok(attentions.iter().zip(image_kv))
}

fn check_kv_count(attentions: usize, image_kv: &[ImageKv]) -> Result<()> {
    if image_kv.len() != attentions {
        return Err(Error::invalid(format!(
            "a block with {attentions} attention layers was given image keys and values for {}",
            image_kv.len()
        )));
    }
    Ok(())
}

fn pop_cat(
    h: &Tensor,
    skips: &mut Vec<Tensor>,
    resnet: &ResnetBlock2D,
) -> Result<(Tensor, Option<MapStats>)> {
    let skip = skips
        .pop()
        .ok_or_else(|| Error::invalid("UNet up path ran out of skip connections"))?;
    // On CUDA the concatenation may leave the statistics of the ResNet's norm1, which reads
    // it next (KANDINSKY_CONV_STATS=1).
    cat_channels(h, &skip, Some(resnet.norm_groups()))
}

/// `ResnetDownsampleBlock2D`: ResNets, then a downsampling ResNet. Every ResNet output and
/// the downsampler output are skips.
///
/// Keys: `resnets.{i}`, `downsamplers.0`.
#[derive(Debug, Clone)]
pub struct ResnetDownsampleBlock2D {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<ResnetBlock2D>,
}

impl ResnetDownsampleBlock2D {
    /// Load the block.
    pub fn new(vb: VarBuilder, ch: &BlockChannels, resnet: &ResnetSettings) -> Result<Self> {
        Ok(Self {
            resnets: down_resnets(&vb, ch, resnet)?,
            downsampler: resampler(vb.pp("downsamplers"), ch, Resample::Down, resnet)?,
        })
    }

    /// Run the block, pushing its skips.
    pub fn forward(&self, x: &Tensor, temb: &Tensor, skips: &mut Vec<Tensor>) -> Result<Tensor> {
        // Each ResNet leaves the next one's norm1 statistics where the CUDA path can; the
        // block's output goes to a block of its own (no statistics across blocks).
        let (mut h, mut stats) = (x.clone(), None);
        let n = self.resnets.len();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let read_by_a_norm = i + 1 < n || self.downsampler.is_some();
            (h, stats) = resnet.forward_stats(&h, stats.as_ref(), temb, read_by_a_norm)?;
            skips.push(h.clone());
        }
        if let Some(down) = &self.downsampler {
            h = down.forward_stats(&h, stats.as_ref(), temb, false)?.0;
            skips.push(h.clone());
        }
        Ok(h)
    }
}

/// `SimpleCrossAttnDownBlock2D`: (ResNet, added-KV attention) per layer, then a
/// downsampling ResNet.
///
/// Keys: `resnets.{i}`, `attentions.{i}`, `downsamplers.0`.
#[derive(Debug, Clone)]
pub struct SimpleCrossAttnDownBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Attention>,
    downsampler: Option<ResnetBlock2D>,
}

impl SimpleCrossAttnDownBlock2D {
    /// Load the block.
    pub fn new(
        vb: VarBuilder,
        ch: &BlockChannels,
        resnet: &ResnetSettings,
        attn: &AttentionSettings,
    ) -> Result<Self> {
        Ok(Self {
            resnets: down_resnets(&vb, ch, resnet)?,
            attentions: attentions(&vb, ch.layers, ch.out_channels, resnet, attn)?,
            downsampler: resampler(vb.pp("downsamplers"), ch, Resample::Down, resnet)?,
        })
    }

    /// Run the block, pushing its skips; `image_kv`: one per attention layer
    /// ([`Attention::image_kv`]).
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        image_kv: &[ImageKv],
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (resnet, (attn, kv)) in self.resnets.iter().zip(paired(&self.attentions, image_kv)?) {
            // The ResNet leaves its attention's norm statistics where the CUDA path can.
            let (r, stats) = resnet.forward_stats(&h, None, temb, true)?;
            h = attn.forward_kv(&r, stats.as_ref(), kv)?;
            skips.push(h.clone());
        }
        if let Some(down) = &self.downsampler {
            h = down.forward(&h, temb)?;
            skips.push(h.clone());
        }
        Ok(h)
    }
}

/// A down block (`down_block_types`).
#[derive(Debug, Clone)]
pub enum DownBlock {
    /// `ResnetDownsampleBlock2D`.
    ResnetDownsample(ResnetDownsampleBlock2D),
    /// `SimpleCrossAttnDownBlock2D`.
    SimpleCrossAttn(SimpleCrossAttnDownBlock2D),
}

impl DownBlock {
    /// The block's attention layers in forward order (none for a ResNet-only block).
    pub fn attentions(&self) -> &[Attention] {
        match self {
            Self::ResnetDownsample(_) => &[],
            Self::SimpleCrossAttn(b) => &b.attentions,
        }
    }

    /// Run the block, pushing its skips; `image_kv`: one per attention layer
    /// ([`Attention::image_kv`]).
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        image_kv: &[ImageKv],
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        match self {
            Self::ResnetDownsample(b) => {
                check_kv_count(0, image_kv)?;
                b.forward(x, temb, skips)
            }
            Self::SimpleCrossAttn(b) => b.forward(x, temb, image_kv, skips),
        }
    }
}

/// `UNetMidBlock2DSimpleCrossAttn`: ResNet, then (attention, ResNet) (one layer, diffusers'
/// default).
///
/// Keys: `resnets.{0,1}`, `attentions.0`.
#[derive(Debug, Clone)]
pub struct UNetMidBlock2DSimpleCrossAttn {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Attention>,
}

impl UNetMidBlock2DSimpleCrossAttn {
    /// Load a mid block of `channels`.
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        resnet: &ResnetSettings,
        attn: &AttentionSettings,
    ) -> Result<Self> {
        let resnets = (0..2)
            .map(|i| {
                ResnetBlock2D::new(
                    vb.pp("resnets").pp(i.to_string()),
                    channels,
                    channels,
                    Resample::None,
                    resnet,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            resnets,
            attentions: attentions(&vb, 1, channels, resnet, attn)?,
        })
    }

    /// The block's attention layers in forward order.
    pub fn attentions(&self) -> &[Attention] {
        &self.attentions
    }

    /// Run the block; `image_kv`: one per attention layer ([`Attention::image_kv`]).
    pub fn forward(&self, x: &Tensor, temb: &Tensor, image_kv: &[ImageKv]) -> Result<Tensor> {
        // Each ResNet followed by an attention leaves its norm statistics where the CUDA
        // path can.
        let (mut h, mut stats) = self.resnets[0].forward_stats(x, None, temb, true)?;
        let layers = self.attentions.len();
        let attentions = paired(&self.attentions, image_kv)?;
        for (i, ((attn, kv), resnet)) in attentions.zip(&self.resnets[1..]).enumerate() {
            h = attn.forward_kv(&h, stats.as_ref(), kv)?;
            (h, stats) = resnet.forward_stats(&h, None, temb, i + 1 < layers)?;
        }
        Ok(h)
    }
}

/// `ResnetUpsampleBlock2D`: per layer, concatenate `[h, last skip]` and run a ResNet; then
/// an upsampling ResNet.
///
/// Keys: `resnets.{i}`, `upsamplers.0`.
#[derive(Debug, Clone)]
pub struct ResnetUpsampleBlock2D {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<ResnetBlock2D>,
}

impl ResnetUpsampleBlock2D {
    /// Load the block.
    pub fn new(vb: VarBuilder, ch: &BlockChannels, resnet: &ResnetSettings) -> Result<Self> {
        Ok(Self {
            resnets: up_resnets(&vb, ch, resnet)?,
            upsampler: resampler(vb.pp("upsamplers"), ch, Resample::Up, resnet)?,
        })
    }

    /// Run the block, popping its skips.
    pub fn forward(&self, x: &Tensor, skips: &mut Vec<Tensor>, temb: &Tensor) -> Result<Tensor> {
        // Each ResNet reads a concatenation; only the last one's output goes straight into a
        // norm (the upsampler's), so only it leaves the statistics.
        let (mut h, mut stats) = (x.clone(), None);
        let n = self.resnets.len();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let read_by_a_norm = i + 1 == n && self.upsampler.is_some();
            let (cat, cat_stats) = pop_cat(&h, skips, resnet)?;
            (h, stats) = resnet.forward_stats(&cat, cat_stats.as_ref(), temb, read_by_a_norm)?;
        }
        if let Some(up) = &self.upsampler {
            h = up.forward_stats(&h, stats.as_ref(), temb, false)?.0;
        }
        Ok(h)
    }
}

/// `SimpleCrossAttnUpBlock2D`: per layer, concatenate `[h, last skip]`, ResNet, attention;
/// then an upsampling ResNet.
///
/// Keys: `resnets.{i}`, `attentions.{i}`, `upsamplers.0`.
#[derive(Debug, Clone)]
pub struct SimpleCrossAttnUpBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Attention>,
    upsampler: Option<ResnetBlock2D>,
}

impl SimpleCrossAttnUpBlock2D {
    /// Load the block.
    pub fn new(
        vb: VarBuilder,
        ch: &BlockChannels,
        resnet: &ResnetSettings,
        attn: &AttentionSettings,
    ) -> Result<Self> {
        Ok(Self {
            resnets: up_resnets(&vb, ch, resnet)?,
            attentions: attentions(&vb, ch.layers, ch.out_channels, resnet, attn)?,
            upsampler: resampler(vb.pp("upsamplers"), ch, Resample::Up, resnet)?,
        })
    }

    /// Run the block, popping its skips; `image_kv`: one per attention layer
    /// ([`Attention::image_kv`]).
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        image_kv: &[ImageKv],
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (resnet, (attn, kv)) in self.resnets.iter().zip(paired(&self.attentions, image_kv)?) {
            // The ResNet leaves its attention's norm statistics where the CUDA path can.
            let (cat, cat_stats) = pop_cat(&h, skips, resnet)?;
            let (r, stats) = resnet.forward_stats(&cat, cat_stats.as_ref(), temb, true)?;
            h = attn.forward_kv(&r, stats.as_ref(), kv)?;
        }
        if let Some(up) = &self.upsampler {
            h = up.forward(&h, temb)?;
        }
        Ok(h)
    }
}

/// An up block (`up_block_types`).
#[derive(Debug, Clone)]
pub enum UpBlock {
    /// `SimpleCrossAttnUpBlock2D`.
    SimpleCrossAttn(SimpleCrossAttnUpBlock2D),
    /// `ResnetUpsampleBlock2D`.
    ResnetUpsample(ResnetUpsampleBlock2D),
}

impl UpBlock {
    /// The block's attention layers in forward order (none for a ResNet-only block).
    pub fn attentions(&self) -> &[Attention] {
        match self {
            Self::SimpleCrossAttn(b) => &b.attentions,
            Self::ResnetUpsample(_) => &[],
        }
    }

    /// Run the block, popping one skip per ResNet from the end of `skips`; `image_kv`: one
    /// per attention layer ([`Self::attentions`]).
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        image_kv: &[ImageKv],
    ) -> Result<Tensor> {
        match self {
            Self::SimpleCrossAttn(b) => b.forward(x, skips, temb, image_kv),
            Self::ResnetUpsample(b) => {
                check_kv_count(0, image_kv)?;
                b.forward(x, skips, temb)
            }
        }
    }
}
