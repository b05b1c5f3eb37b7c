//! diffusers' `autoencoders/vae.py`: the VQ-VAE `Encoder`, `Decoder` and `VectorQuantizer`.

use candle_core::{DType, Tensor, D};
use candle_nn::VarBuilder;

use kandinsky_core::nn::Activation;
use kandinsky_core::Result;

use crate::attention_processor::{Norm, NormKind};
use crate::conv::{Conv2d, Padding};
use crate::normalization::{ConvStats, GroupNorm};
use crate::unet_2d_blocks::{
    BlockParams, DownBlockType, DownEncoderBlock2D, UNetMidBlock2D, UpBlockType, UpDecoderBlock2D,
};

/// Epsilon of every norm of the VQ-VAE.
pub const NORM_EPS: f64 = 1e-6;

/// Structural parameters shared by the encoder and the decoder.
#[derive(Debug, Clone)]
pub struct CoderParams {
    /// `block_out_channels`.
    pub block_out_channels: Vec<usize>,
    /// `layers_per_block` (the decoder has one more resnet per block).
    pub layers_per_block: usize,
    /// `norm_num_groups` of the GroupNorms.
    pub norm_num_groups: usize,
    /// Resnet non-linearity (`act_fn`).
    pub act: Activation,
    /// `mid_block_add_attention`.
    pub mid_block_add_attention: bool,
}

/// `conv_in → down blocks → mid block → GroupNorm → SiLU → conv_out`.
#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: UNetMidBlock2D,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    /// Load an encoder `in_channels → out_channels` (no doubled output: VQ, not KL).
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        down_block_types: &[DownBlockType],
        p: &CoderParams,
        vb: VarBuilder,
    ) -> Result<Self> {
        let boc = &p.block_out_channels;
        let last = *boc.last().unwrap_or(&0);
        let norm = NormKind::Group {
            groups: p.norm_num_groups,
            eps: NORM_EPS,
        };
        let mut down_blocks = Vec::with_capacity(down_block_types.len());
        let mut out_ch = boc[0];
        for (i, kind) in down_block_types.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = boc[i];
            let params = BlockParams {
                in_channels: in_ch,
                out_channels: out_ch,
                num_layers: p.layers_per_block,
                act: p.act,
                norm,
                resample: i + 1 != boc.len(),
            };
            down_blocks.push(DownEncoderBlock2D::new(
                *kind,
                &params,
                vb.pp("down_blocks").pp(i),
            )?);
        }
        Ok(Self {
            conv_in: Conv2d::new(
                in_channels,
                boc[0],
                3,
                1,
                Padding::same(1),
                vb.pp("conv_in"),
            )?,
            down_blocks,
            mid_block: UNetMidBlock2D::new(
                last,
                p.act,
                norm,
                p.mid_block_add_attention,
                vb.pp("mid_block"),
            )?,
            conv_norm_out: GroupNorm::new(
                p.norm_num_groups,
                last,
                NORM_EPS,
                vb.pp("conv_norm_out"),
            )?,
            conv_out: Conv2d::new(
                last,
                out_channels,
                3,
                1,
                Padding::same(1),
                vb.pp("conv_out"),
            )?,
        })
    }

    /// `[B, in, H, W]` → `[B, out, H/f, W/f]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for block in &self.down_blocks {
            h = block.forward(&h)?;
        }
        let h = self.mid_block.forward(&h, None)?;
        // `conv_act` is always SiLU, whatever `act_fn` says.
        let h = self
            .conv_norm_out
            .forward(&h, None, Some(Activation::Silu))?;
        self.conv_out.forward(&h)
    }
}

/// `conv_in → mid block → up blocks → norm → SiLU → conv_out`, every norm conditioned on
/// the quantised latent when `norm` is spatial.
#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: Conv2d,
    mid_block: UNetMidBlock2D,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: Norm,
    conv_out: Conv2d,
}

impl Decoder {
    /// Load a decoder `in_channels → out_channels`.
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        up_block_types: &[UpBlockType],
        norm: NormKind,
        p: &CoderParams,
        vb: VarBuilder,
    ) -> Result<Self> {
        let rev: Vec<usize> = p.block_out_channels.iter().rev().copied().collect();
        let first = *p.block_out_channels.first().unwrap_or(&0);
        let mut up_blocks = Vec::with_capacity(up_block_types.len());
        let mut out_ch = rev[0];
        for (i, kind) in up_block_types.iter().enumerate() {
            let prev = out_ch;
            out_ch = rev[i];
            let params = BlockParams {
                in_channels: prev,
                out_channels: out_ch,
                num_layers: p.layers_per_block + 1,
                act: p.act,
                norm,
                resample: i + 1 != rev.len(),
            };
            up_blocks.push(UpDecoderBlock2D::new(
                *kind,
                &params,
                vb.pp("up_blocks").pp(i),
            )?);
        }
        Ok(Self {
            conv_in: Conv2d::new(
                in_channels,
                rev[0],
                3,
                1,
                Padding::same(1),
                vb.pp("conv_in"),
            )?,
            mid_block: UNetMidBlock2D::new(
                rev[0],
                p.act,
                norm,
                p.mid_block_add_attention,
                vb.pp("mid_block"),
            )?,
            up_blocks,
            conv_norm_out: norm.build(first, vb.pp("conv_norm_out"))?,
            conv_out: Conv2d::new(
                first,
                out_channels,
                3,
                1,
                Padding::same(1),
                vb.pp("conv_out"),
            )?,
        })
    }

    /// `z` `[B, C, h, w]` (after `post_quant_conv`) → `[B, out, h·f, w·f]`; `zq` is the
    /// latent the spatial norms are conditioned on.
    pub fn forward(&self, z: &Tensor, zq: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv_in.forward(z)?;
        h = self.mid_block.forward(&h, zq)?;
        for block in &self.up_blocks {
            h = block.forward(&h, zq)?;
        }
        // `conv_act` is always SiLU. `h` is handed over, so it is freed as soon as its norm
        // exists (or, on CUDA, the norm is applied on read by the convolution).
        Ok(self
            .conv_norm_out
            .forward_into_conv(
                &self.conv_out,
                h,
                zq,
                Some(Activation::Silu),
                None,
                ConvStats::default(),
            )?
            .0)
    }
}

/// Nearest-codebook-entry quantiser (`VectorQuantizer`, key `embedding.weight` `[K, D]`).
#[derive(Debug, Clone)]
pub struct VectorQuantizer {
    embedding: Tensor,
}

/// Largest distance matrix slice (bytes of f32) computed at once.
const DISTANCE_CHUNK_BYTES: usize = 64 << 20;

impl VectorQuantizer {
    /// Load a codebook of `n_e` entries of width `dim`.
    pub fn new(n_e: usize, dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            embedding: vb.pp("embedding").get((n_e, dim), "weight")?,
        })
    }

    /// The codebook `[K, D]`.
    pub fn codebook(&self) -> &Tensor {
        &self.embedding
    }

    /// Snap every `D`-vector of `z` `[B, D, H, W]` to its nearest codebook row (L2, ties to
    /// the lowest index, as `argmin(cdist)`). Returns the quantised map (dtype of `z`) and the
    /// indices `[B, H, W]` (u32; diffusers' flat index order is their row-major flattening).
    pub fn forward(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, d, h, w) = z.dims4()?;
        let n = b * h * w;
        let flat = z
            .permute((0, 2, 3, 1))?
            .reshape((n, d))?
            .to_dtype(DType::F32)?;
        let e = self.embedding.to_dtype(DType::F32)?;
        let k = e.dim(0)?;
        let e_t = e.t()?.contiguous()?;
        let e_sq = e.sqr()?.sum(1)?.unsqueeze(0)?;
        let rows = (DISTANCE_CHUNK_BYTES / (k * 4).max(1)).max(1);
        let mut parts = Vec::with_capacity(n.div_ceil(rows));
        let mut start = 0;
        while start < n {
            let len = rows.min(n - start);
            let zc = flat.narrow(0, start, len)?;
            // |z − e|² = |z|² + |e|² − 2 z·e, as cdist's matrix-product path.
            let dist = zc
                .sqr()?
                .sum_keepdim(1)?
                .broadcast_add(&e_sq)?
                .sub(&(zc.matmul(&e_t)? * 2.0)?)?;
            parts.push(dist.argmin(D::Minus1)?);
            start += len;
        }
        let indices = Tensor::cat(&parts, 0)?;
        let quantized = self
            .embedding
            .index_select(&indices, 0)?
            .reshape((b, h, w, d))?
            .permute((0, 3, 1, 2))?
            .contiguous()?
            .to_dtype(z.dtype())?;
        Ok((quantized, indices.reshape((b, h, w))?))
    }
}
