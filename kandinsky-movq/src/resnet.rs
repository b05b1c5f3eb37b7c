//! `ResnetBlock2D` (encoder: GroupNorm, no time embedding) and `ResnetBlockCondNorm2D`
//! (MoVQ decoder: SpatialNorm conditioned on the latent), which differ only in their norms.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use kandinsky_core::nn::Activation;
use kandinsky_core::Result;

use crate::attention_processor::{Norm, NormKind};
use crate::conv::{Conv2d, Padding};
use crate::normalization::ConvStats;
use kandinsky_core::gpu_conv::MapStats;

/// `norm1 → act → conv1 → norm2 → act → conv2`, plus the (1×1 `conv_shortcut` when the
/// channel count changes) input. Keys `norm1`, `conv1`, `norm2`, `conv2`, `[conv_shortcut]`.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: Norm,
    conv1: Conv2d,
    norm2: Norm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    act: Activation,
}

impl ResnetBlock2D {
    /// Load a block `in_channels → out_channels` whose norms are of kind `norm`.
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        act: Activation,
        norm: NormKind,
        vb: VarBuilder,
    ) -> Result<Self> {
        let conv_shortcut = if in_channels != out_channels {
            Some(Conv2d::new(
                in_channels,
                out_channels,
                1,
                1,
                Padding::same(0),
                vb.pp("conv_shortcut"),
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: norm.build(in_channels, vb.pp("norm1"))?,
            conv1: Conv2d::new(
                in_channels,
                out_channels,
                3,
                1,
                Padding::same(1),
                vb.pp("conv1"),
            )?,
            norm2: norm.build(out_channels, vb.pp("norm2"))?,
            conv2: Conv2d::new(
                out_channels,
                out_channels,
                3,
                1,
                Padding::same(1),
                vb.pp("conv2"),
            )?,
            conv_shortcut,
            act,
        })
    }

    /// Forward `x` `[B, C, H, W]`; `zq` is the latent for spatial norms.
    pub fn forward(&self, x: &Tensor, zq: Option<&Tensor>) -> Result<Tensor> {
        Ok(self.forward_stats(x, zq, None, None)?.0)
    }

    /// The groups of the norm that reads the block's input (norm1).
    pub fn norm_groups(&self) -> usize {
        self.norm1.groups()
    }

    /// [`Self::forward`] with the GroupNorm statistics of `x` where the kernel that wrote it
    /// left them (norm1 skips its pass), and with `out_groups` also those of the output in
    /// that many groups for the norm that reads it next, where the CUDA path leaves them
    /// (`KANDINSKY_CONV_STATS=1`).
    pub fn forward_stats(
        &self,
        x: &Tensor,
        zq: Option<&Tensor>,
        x_stats: Option<&MapStats>,
        out_groups: Option<usize>,
    ) -> Result<(Tensor, Option<MapStats>)> {
        // Each norm goes into its convolution (on CUDA optionally applied on read).
        // output_scale_factor is 1 in every VQ-VAE block; the residual add rides in conv2
        // (one kernel on CUDA).
        // Reassigned, not shadowed: each full-size intermediate is freed as soon as the next
        // exists.
        // On CUDA conv1 may also leave norm2's statistics of its output
        // (KANDINSKY_CONV_STATS=1), sparing norm2 its pass over it.
        let (mut h, h_stats) = self.norm1.forward_into_conv(
            &self.conv1,
            x.clone(),
            zq,
            Some(self.act),
            None,
            ConvStats {
                input: x_stats,
                output_groups: Some(self.norm2.groups()),
            },
        )?;
        if self.conv2.shifted().is_none() {
            // Elsewhere the shortcut is computed after norm2 has freed the conv1 output:
            // computed before, it was one more full-size map at the peak (+32 MiB for a
            // 256 px decode, measured).
            h = self.norm2.forward(&h, zq, Some(self.act))?;
            let out = match &self.conv_shortcut {
                Some(c) => self.conv2.forward_add(h, &c.forward(x)?)?,
                None => self.conv2.forward_add(h, x)?,
            };
            return Ok((out, None));
        }
        let shortcut = match &self.conv_shortcut {
            Some(c) => Some(c.forward(x)?),
            None => None,
        };
        self.norm2.forward_into_conv(
            &self.conv2,
            h,
            zq,
            Some(self.act),
            Some(shortcut.as_ref().unwrap_or(x)),
            ConvStats {
                input: h_stats.as_ref(),
                output_groups: out_groups,
            },
        )
    }
}
