//! The added-KV attention of the SimpleCrossAttn blocks (diffusers `Attention` with
//! `added_kv_proj_dim`, run by `AttnAddedKVProcessor2_0`).
//!
//! The spatial tokens attend to the image tokens (through `add_k_proj`/`add_v_proj`) *and*
//! to themselves (through `to_k`/`to_v`), in one softmax, image tokens first.

use candle_core::{DType, Tensor};
use candle_nn::{Module, VarBuilder};
use kandinsky_core::attention::{attention, merge_heads, prepare_segment, split_heads, KvSegment};
use kandinsky_core::gpu_conv::MapStats;
use kandinsky_core::nn::{group_norm, swap_last2, GroupNorm};
use kandinsky_core::{Error, Result};

use crate::layers::{linear, needs_f32, Linear};

/// diffusers' `Attention` default GroupNorm epsilon (not the UNet's `norm_eps`).
const ATTENTION_NORM_EPS: f64 = 1e-5;

/// The image tokens' keys and values of one [`Attention`], `[B, heads, L, head_dim]` each
/// ([`Attention::image_kv`]), in the layout the attention reads them.
#[derive(Debug, Clone)]
pub struct ImageKv {
    /// Keys.
    pub k: Tensor,
    /// Values.
    pub v: Tensor,
}

/// `Attention(query_dim=C, cross_attention_dim=C, added_kv_proj_dim=E, heads=C/d, dim_head=d,
/// norm_num_groups=G, bias=True)`.
///
/// Keys: `group_norm, to_q, to_k, to_v, add_k_proj, add_v_proj, to_out.0`.
#[derive(Debug, Clone)]
pub struct Attention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    add_k_proj: Linear,
    add_v_proj: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
}

impl Attention {
    /// Load an attention over `channels` spatial channels in heads of `head_dim`, with image
    /// tokens of width `added_kv_proj_dim`.
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        head_dim: usize,
        added_kv_proj_dim: usize,
        groups: usize,
    ) -> Result<Self> {
        if head_dim == 0 || channels % head_dim != 0 {
            // diffusers would build to_q with heads·head_dim ≠ C outputs and then fail to
            // reshape; reject up front.
            return Err(Error::unsupported(
                "attention_head_dim",
                head_dim,
                format!("a divisor of every attention block's channel count ({channels})"),
            ));
        }
        let heads = channels / head_dim;
        Ok(Self {
            group_norm: group_norm(groups, channels, ATTENTION_NORM_EPS, vb.pp("group_norm"))?,
            to_q: linear(channels, channels, vb.pp("to_q"))?,
            to_k: linear(channels, channels, vb.pp("to_k"))?,
            to_v: linear(channels, channels, vb.pp("to_v"))?,
            add_k_proj: linear(added_kv_proj_dim, channels, vb.pp("add_k_proj"))?,
            add_v_proj: linear(added_kv_proj_dim, channels, vb.pp("add_v_proj"))?,
            to_out: linear(channels, channels, vb.pp("to_out").pp("0"))?,
            heads,
            scale: 1.0 / (head_dim as f64).sqrt(),
        })
    }

    /// `x` `[B, C, H, W]`, `encoder_hidden_states` `[B, L, E]` → `[B, C, H, W]` (residual
    /// included).
    pub fn forward(&self, x: &Tensor, encoder_hidden_states: &Tensor) -> Result<Tensor> {
        self.forward_kv(x, None, &self.image_kv(encoder_hidden_states)?)
    }

    /// The image tokens' keys and values (`add_k_proj`, `add_v_proj`, split into heads):
    /// the part of [`Self::forward`] that depends on the conditioning alone, computed once
    /// per generation by `UNet2DConditionModel::prepare`.
    pub fn image_kv(&self, encoder_hidden_states: &Tensor) -> Result<ImageKv> {
        let k = split_heads(&self.add_k_proj.forward(encoder_hidden_states)?, self.heads)?;
        let v = split_heads(&self.add_v_proj.forward(encoder_hidden_states)?, self.heads)?;
        // candle has no bf16 matmul on the CPU: the attention runs in f32 there.
        let (k, v) = if needs_f32(&k) {
            (k.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?)
        } else {
            (k, v)
        };
        let (k, v) = prepare_segment(&k, &v)?;
        Ok(ImageKv { k, v })
    }

    /// [`Self::forward`] with the image tokens' keys and values from [`Self::image_kv`] and
    /// the GroupNorm statistics of `x` where the kernel that wrote it left them (its norm
    /// then skips its statistics pass).
    pub fn forward_kv(
        &self,
        x: &Tensor,
        x_stats: Option<&MapStats>,
        image_kv: &ImageKv,
    ) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        match image_kv.k.dims() {
            &[kb, kh, _, _] if kb == b && kh == self.heads => {}
            dims => {
                return Err(Error::invalid(format!(
                    "attention over {c} channels in {} heads, batch {b}: image keys must be \
                     [{b}, {}, L, {}], got {dims:?}",
                    self.heads,
                    self.heads,
                    c / self.heads,
                )))
            }
        }
        // GroupNorm over channels on the [B, C, HW] view, then tokens [B, HW, C].
        let normed =
            self.group_norm
                .forward_with_stats(&x.reshape((b, c, h * w))?, None, false, x_stats)?;
        let tokens = swap_last2(&normed, None)?;
        let q = split_heads(&self.to_q.forward(&tokens)?, self.heads)?;
        let k_self = split_heads(&self.to_k.forward(&tokens)?, self.heads)?;
        let v_self = split_heads(&self.to_v.forward(&tokens)?, self.heads)?;
        // candle has no bf16 matmul on the CPU: run the attention in f32 there.
        let (q, k_self, v_self) = if needs_f32(&q) {
            let f = |t: &Tensor| t.to_dtype(DType::F32);
            (f(&q)?, f(&k_self)?, f(&v_self)?)
        } else {
            (q, k_self, v_self)
        };
        let (k_img, v_img) = (&image_kv.k, &image_kv.v);
        let out = attention(
            &q,
            &[
                KvSegment { k: k_img, v: v_img },
                KvSegment {
                    k: &k_self,
                    v: &v_self,
                },
            ],
            None,
            self.scale,
        )?;
        let out = merge_heads(&out.to_dtype(x.dtype())?)?.contiguous()?;
        let out = self.to_out.forward(&out)?;
        if x.device().is_cuda() {
            // One (strided or tiled) transposing add instead of a transpose copy and an add.
            let sum = swap_last2(&out, Some(&x.reshape((b, c, h * w))?))?;
            return Ok(sum.reshape((b, c, h, w))?);
        }
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        Ok((out + x)?)
    }
}
