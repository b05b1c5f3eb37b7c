//! `SpatialNorm` and the single-head spatial self-attention of the VQ-VAE blocks
//! (diffusers' `Attention` built with `_from_deprecated_attn_block=True` and `AttnProcessor2_0`).

use candle_core::Tensor;
use candle_nn::{Module, VarBuilder};

use kandinsky_core::attention::{attention, KvSegment};
use kandinsky_core::nn::{linear, swap_last2, Activation, Linear};
use kandinsky_core::{Error, Result};

use crate::conv::{Conv2d, Padding};
use crate::normalization::{ConvStats, GroupNorm, Modulation};
use kandinsky_core::gpu_conv::MapStats;

/// `SpatialNorm(f_channels, zq_channels)`: `GroupNorm32(f)·conv_y(zq') + conv_b(zq')` with
/// `zq'` the latent resized (nearest) to the size of `f`. Keys `norm_layer`, `conv_y`, `conv_b`.
#[derive(Debug, Clone)]
pub struct SpatialNorm {
    norm_layer: GroupNorm,
    conv_y: Conv2d,
    conv_b: Conv2d,
}

/// diffusers hard-codes 32 groups in `SpatialNorm`, whatever `norm_num_groups` says.
pub const SPATIAL_NORM_GROUPS: usize = 32;

impl SpatialNorm {
    /// Load a SpatialNorm over `f_channels` conditioned on a `zq_channels` latent.
    pub fn new(f_channels: usize, zq_channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm_layer: GroupNorm::new(SPATIAL_NORM_GROUPS, f_channels, 1e-6, vb.pp("norm_layer"))?,
            conv_y: Conv2d::new(
                zq_channels,
                f_channels,
                1,
                1,
                Padding::same(0),
                vb.pp("conv_y"),
            )?,
            conv_b: Conv2d::new(
                zq_channels,
                f_channels,
                1,
                1,
                Padding::same(0),
                vb.pp("conv_b"),
            )?,
        })
    }

    /// Normalise `f` `[B, C, H, W]` conditioned on `zq` `[B, Z, h, w]`, then apply `act`.
    pub fn forward(&self, f: &Tensor, zq: &Tensor, act: Option<Activation>) -> Result<Tensor> {
        let (scale, shift) = self.maps(f, zq)?;
        self.norm_layer.forward(
            f,
            Some(Modulation {
                scale: &scale,
                shift: &shift,
            }),
            act,
        )
    }

    /// `conv(act(spatial_norm(f, zq))) [+ residual]`, normalised on read on CUDA
    /// ([`GroupNorm::forward_into_conv`]).
    pub fn forward_into_conv(
        &self,
        conv: &Conv2d,
        f: Tensor,
        zq: &Tensor,
        act: Option<Activation>,
        residual: Option<&Tensor>,
        stats: ConvStats<'_>,
    ) -> Result<(Tensor, Option<MapStats>)> {
        let (scale, shift) = self.maps(&f, zq)?;
        let modulation = Some(Modulation {
            scale: &scale,
            shift: &shift,
        });
        self.norm_layer
            .forward_into_conv(conv, f, modulation, act, residual, stats)
    }

    /// The modulation maps `(conv_y(zq'), conv_b(zq'))` for a map `f`.
    fn maps(&self, f: &Tensor, zq: &Tensor) -> Result<(Tensor, Tensor)> {
        let (_, _, h, w) = f.dims4()?;
        let (_, _, zh, zw) = zq.dims4()?;
        // A 1×1 convolution commutes with nearest upsampling: when the map is an integer
        // multiple of the latent, convolve at latent resolution and broadcast (same values).
        let zq = if zh > 0 && zw > 0 && h % zh == 0 && w % zw == 0 {
            zq.clone()
        } else {
            zq.upsample_nearest2d(h, w)?
        };
        Ok((self.conv_y.forward(&zq)?, self.conv_b.forward(&zq)?))
    }
}

/// The normalisation in front of a resnet convolution or an attention block: plain GroupNorm
/// (encoder, `norm_type: "group"` decoders) or SpatialNorm (MoVQ decoder).
#[derive(Debug, Clone)]
pub enum Norm {
    /// `nn.GroupNorm`.
    Group(GroupNorm),
    /// `SpatialNorm`, conditioned on the quantised latent.
    Spatial(SpatialNorm),
}

impl Norm {
    /// `act(norm(x))`; `zq` is required by the spatial variant.
    pub fn forward(
        &self,
        x: &Tensor,
        zq: Option<&Tensor>,
        act: Option<Activation>,
    ) -> Result<Tensor> {
        match self {
            Norm::Group(n) => n.forward(x, None, act),
            Norm::Spatial(n) => n.forward(x, Self::latent(zq)?, act),
        }
    }

    /// `conv(act(norm(x))) [+ residual]`, the norm applied on read by the CUDA convolution
    /// (`KANDINSKY_CONV_NORM=1`); `zq` is required by the spatial variant. Takes `x` so that
    /// elsewhere it can be freed before the convolution. `stats`: the GroupNorm statistics in
    /// and out ([`GroupNorm::forward_into_conv`]).
    pub fn forward_into_conv(
        &self,
        conv: &Conv2d,
        x: Tensor,
        zq: Option<&Tensor>,
        act: Option<Activation>,
        residual: Option<&Tensor>,
        stats: ConvStats<'_>,
    ) -> Result<(Tensor, Option<MapStats>)> {
        match self {
            Norm::Group(n) => n.forward_into_conv(conv, x, None, act, residual, stats),
            Norm::Spatial(n) => {
                n.forward_into_conv(conv, x, Self::latent(zq)?, act, residual, stats)
            }
        }
    }

    /// Number of groups of the GroupNorm.
    pub fn groups(&self) -> usize {
        match self {
            Norm::Group(n) => n.groups(),
            Norm::Spatial(n) => n.norm_layer.groups(),
        }
    }

    fn latent(zq: Option<&Tensor>) -> Result<&Tensor> {
        zq.ok_or_else(|| Error::invalid("a SpatialNorm needs the latent it is conditioned on"))
    }
}

/// Which normalisation a block uses, with its parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NormKind {
    /// `nn.GroupNorm(groups, channels, eps)`.
    Group {
        /// Number of groups (`norm_num_groups`).
        groups: usize,
        /// Epsilon (1e-6 in the VQ-VAE).
        eps: f64,
    },
    /// `SpatialNorm(channels, zq_channels)`.
    Spatial {
        /// Channels of the conditioning latent.
        zq_channels: usize,
    },
}

impl NormKind {
    /// Load a norm of this kind over `channels` channels.
    pub fn build(self, channels: usize, vb: VarBuilder) -> Result<Norm> {
        Ok(match self {
            NormKind::Group { groups, eps } => {
                Norm::Group(GroupNorm::new(groups, channels, eps, vb)?)
            }
            NormKind::Spatial { zq_channels } => {
                Norm::Spatial(SpatialNorm::new(channels, zq_channels, vb)?)
            }
        })
    }

    /// The checkpoint key of this norm inside an attention block.
    pub fn attention_key(self) -> &'static str {
        match self {
            NormKind::Group { .. } => "group_norm",
            NormKind::Spatial { .. } => "spatial_norm",
        }
    }
}

/// Single-head self-attention over the `H·W` positions of a map, with a residual connection.
/// Keys `group_norm` or `spatial_norm`, `to_q`, `to_k`, `to_v`, `to_out.0`.
#[derive(Debug, Clone)]
pub struct Attention {
    norm: Norm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    channels: usize,
}

impl Attention {
    /// Load an attention block over `channels` channels.
    pub fn new(channels: usize, norm: NormKind, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm: norm.build(channels, vb.pp(norm.attention_key()))?,
            to_q: linear(channels, channels, vb.pp("to_q"))?,
            to_k: linear(channels, channels, vb.pp("to_k"))?,
            to_v: linear(channels, channels, vb.pp("to_v"))?,
            to_out: linear(channels, channels, vb.pp("to_out").pp("0"))?,
            channels,
        })
    }

    /// `x + to_out(attention(norm(x)))` for `x` `[B, C, H, W]`.
    pub fn forward(&self, x: &Tensor, zq: Option<&Tensor>) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let normed = self.norm.forward(x, zq, None)?;
        // Contiguous: candle 0.11.1 multiplies a transposed [B, L, C] view by the batch-
        // broadcast Linear weight wrongly (stride-0 batch rhs with a column-major lhs).
        let tokens = swap_last2(&normed.reshape((b, c, h * w))?, None)?;
        // One head of width C: [B, 1, HW, C].
        let q = self.to_q.forward(&tokens)?.unsqueeze(1)?;
        let k = self.to_k.forward(&tokens)?.unsqueeze(1)?;
        let v = self.to_v.forward(&tokens)?.unsqueeze(1)?;
        drop(tokens);
        let scale = 1.0 / (self.channels as f64).sqrt();
        let out = attention(&q, &[KvSegment { k: &k, v: &v }], None, scale)?;
        let out = self.to_out.forward(&out.squeeze(1)?)?;
        if x.device().is_cuda() {
            // One (strided or tiled) transposing add instead of a transpose copy and an add.
            let sum = swap_last2(&out, Some(&x.reshape((b, c, h * w))?))?;
            return Ok(sum.reshape((b, c, h, w))?);
        }
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        Ok((out + x)?)
    }
}
