//! diffusers `attention_processor.py`: the `Attention` module as the prior uses it
//! (self-attention, biased projections, additive mask, `AttnProcessor2_0`).

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use kandinsky_core::attention::{attention, merge_heads, split_heads, KvSegment};
use kandinsky_core::nn::{linear, Linear};
use kandinsky_core::Result;

/// Multi-head self-attention with `to_q`, `to_k`, `to_v`, `to_out.0` (all with bias).
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
}

impl Attention {
    /// `query_dim` = `heads · dim_head` here (the prior's inner width).
    pub fn new(vb: VarBuilder, query_dim: usize, heads: usize, dim_head: usize) -> Result<Self> {
        let inner = heads * dim_head;
        Ok(Self {
            to_q: linear(query_dim, inner, vb.pp("to_q"))?,
            to_k: linear(query_dim, inner, vb.pp("to_k"))?,
            to_v: linear(query_dim, inner, vb.pp("to_v"))?,
            to_out: linear(inner, query_dim, vb.pp("to_out").pp("0"))?,
            heads,
            scale: (dim_head as f64).powf(-0.5),
        })
    }

    /// `x` `[B, L, C]`; `mask` an additive mask broadcastable to `[B, H, L, L]`.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let q = split_heads(&self.to_q.forward(x)?, self.heads)?;
        let k = split_heads(&self.to_k.forward(x)?, self.heads)?;
        let v = split_heads(&self.to_v.forward(x)?, self.heads)?;
        let out = attention(&q, &[KvSegment { k: &k, v: &v }], mask, self.scale)?;
        Ok(self.to_out.forward(&merge_heads(&out)?)?)
    }
}
