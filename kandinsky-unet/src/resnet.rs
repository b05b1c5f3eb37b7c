//! `ResnetBlock2D` (diffusers `models/resnet.py`) as the Kandinsky UNet uses it: pre-norm,
//! `scale_shift` time conditioning, and the up/down resampling *inside* the block.

use candle_core::Tensor;
use candle_nn::{Module, VarBuilder};
use kandinsky_core::gpu_conv::{InputNorm, MapStats};
use kandinsky_core::nn::{group_norm, Activation, Conv2dConfig, GroupNorm, NormModulation};
use kandinsky_core::Result;

use crate::layers::{conv2d, linear, Conv2d, Linear};

/// Resampling applied inside a ResNet block, to both the residual and the main branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    /// No resampling.
    None,
    /// Nearest-neighbour 2× (`Upsample2D(use_conv=False)`).
    Up,
    /// 2×2 average pooling (`Downsample2D(use_conv=False)`).
    Down,
}

impl Resample {
    fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::None => Ok(x.clone()),
            Self::Up => {
                let (_, _, h, w) = x.dims4()?;
                x.upsample_nearest2d(2 * h, 2 * w)
            }
            Self::Down => x.avg_pool2d(2),
        }
    }
}

/// Hyper-parameters shared by every ResNet block of one UNet.
#[derive(Debug, Clone, Copy)]
pub struct ResnetSettings {
    /// Width of the time embedding (`temb_channels`).
    pub temb_channels: usize,
    /// GroupNorm groups (`resnet_groups`).
    pub groups: usize,
    /// GroupNorm epsilon (`resnet_eps`).
    pub eps: f64,
    /// Non-linearity (`resnet_act_fn`).
    pub act: Activation,
    /// `skip_time_act`: feed the time embedding to `time_emb_proj` without the activation.
    pub skip_time_act: bool,
    /// The output is divided by this (`output_scale_factor`).
    pub output_scale_factor: f64,
}

/// `ResnetBlock2D` with `time_embedding_norm = "scale_shift"`.
///
/// Keys: `norm1, conv1, time_emb_proj, norm2, conv2[, conv_shortcut]`.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    resample: Resample,
    out_channels: usize,
    settings: ResnetSettings,
}

impl ResnetBlock2D {
    /// Load a block mapping `in_channels` to `out_channels`.
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        resample: Resample,
        settings: &ResnetSettings,
    ) -> Result<Self> {
        let s = *settings;
        let pad1 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(Self {
            norm1: group_norm(s.groups, in_channels, s.eps, vb.pp("norm1"))?,
            conv1: conv2d(in_channels, out_channels, 3, pad1, vb.pp("conv1"))?,
            // scale_shift: one half scales, the other shifts.
            time_emb_proj: linear(s.temb_channels, 2 * out_channels, vb.pp("time_emb_proj"))?,
            norm2: group_norm(s.groups, out_channels, s.eps, vb.pp("norm2"))?,
            conv2: conv2d(out_channels, out_channels, 3, pad1, vb.pp("conv2"))?,
            conv_shortcut: if in_channels != out_channels {
                Some(conv2d(
                    in_channels,
                    out_channels,
                    1,
                    Conv2dConfig::default(),
                    vb.pp("conv_shortcut"),
                )?)
            } else {
                None
            },
            resample,
            out_channels,
            settings: s,
        })
    }

    /// The groups of the norm that reads the block's input (norm1).
    pub fn norm_groups(&self) -> usize {
        self.norm1.groups()
    }

    /// `x` `[B, C_in, H, W]`, `temb` `[B, temb_channels]` → `[B, C_out, H', W']`.
    pub fn forward(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        Ok(self.forward_stats(x, None, temb, false)?.0)
    }

    /// [`Self::forward`] with the GroupNorm statistics of `x` where the kernel that wrote it
    /// left them (norm1 then skips its statistics pass), and with `out_stats` also those of
    /// the output in the UNet's groups, for the norm that reads it next, where the CUDA path
    /// leaves them (`KANDINSKY_CONV_STATS=1`). Inside, conv1 leaves norm2's the same way.
    pub fn forward_stats(
        &self,
        x: &Tensor,
        x_stats: Option<&MapStats>,
        temb: &Tensor,
        out_stats: bool,
    ) -> Result<(Tensor, Option<MapStats>)> {
        let act = self.settings.act;
        let residual = self.resample.apply(x)?;
        // GroupNorm + SiLU in one pass (on CUDA, optionally inside the convolution's copy
        // kernel); the 2× upsampling of the main branch rides in the convolution (folded on
        // CUDA). On CUDA conv1 may also leave norm2's statistics of its output
        // (KANDINSKY_CONV_STATS=1), sparing norm2 its pass over it.
        let (h, h_stats) = match (act, self.resample) {
            (Activation::Silu, Resample::Up | Resample::None) => self.conv1.forward_normed_stats(
                x,
                InputNorm {
                    norm: &self.norm1,
                    modulation: None,
                    silu: true,
                    stats: x_stats,
                },
                self.resample == Resample::Up,
                None,
                Some(self.norm2.groups()),
            )?,
            (Activation::Silu, _) => (
                self.conv1.forward(
                    &self
                        .resample
                        .apply(&self.norm1.forward_with_stats(x, None, true, x_stats)?)?,
                )?,
                None,
            ),
            _ => (
                self.conv1
                    .forward(&self.resample.apply(&act.apply(&self.norm1.forward(x)?)?)?)?,
                None,
            ),
        };

        let temb = if self.settings.skip_time_act {
            temb.clone()
        } else {
            act.apply(temb)?
        };
        let temb = self
            .time_emb_proj
            .forward(&temb)?
            .unsqueeze(2)?
            .unsqueeze(3)?;
        let scale = temb.narrow(1, 0, self.out_channels)?;
        let shift = temb.narrow(1, self.out_channels, self.out_channels)?;
        // GroupNorm, ·(1 + scale) + shift and SiLU in one pass (fused kernels; on CUDA
        // optionally inside conv2's copy kernel).
        let modulation = Some(NormModulation::ScaleShift {
            scale: &scale,
            shift: &shift,
        });
        let residual = match &self.conv_shortcut {
            Some(conv) => conv.forward(&residual)?,
            None => residual,
        };
        // The residual add rides in conv2 (one kernel on CUDA), and with it the output's
        // statistics where asked for (not when the output is scaled afterwards).
        let scaled = self.settings.output_scale_factor != 1.0;
        let (out, out_stats) = match act {
            Activation::Silu => self.conv2.forward_normed_stats(
                &h,
                InputNorm {
                    norm: &self.norm2,
                    modulation,
                    silu: true,
                    stats: h_stats.as_ref(),
                },
                false,
                Some(&residual),
                (out_stats && !scaled).then_some(self.settings.groups),
            )?,
            _ => {
                let h = act.apply(&self.norm2.forward_with_stats(
                    &h,
                    modulation,
                    false,
                    h_stats.as_ref(),
                )?)?;
                (self.conv2.forward_fused(&h, false, Some(&residual))?, None)
            }
        };
        Ok(if scaled {
            ((out / self.settings.output_scale_factor)?, None)
        } else {
            (out, out_stats)
        })
    }
}
