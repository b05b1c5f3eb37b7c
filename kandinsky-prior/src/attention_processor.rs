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
        let (k, v) = self.key_values(x)?;
        self.attend(x, &[KvSegment { k: &k, v: &v }], mask)
    }

    /// The keys and values of the tokens `x` `[B, L, C]`, split into heads `[B, H, L, D]`.
    pub fn key_values(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let k = split_heads(&self.to_k.forward(x)?, self.heads)?;
        let v = split_heads(&self.to_v.forward(x)?, self.heads)?;
        Ok((k, v))
    }

    /// The queries of `x` `[B, Lq, C]` attending to the key/value segments `kv` (in
    /// sequence order, [`Self::key_values`]); `mask` broadcastable to `[B, H, Lq, Lk]`.
    pub fn attend(
        &self,
        x: &Tensor,
        kv: &[KvSegment<'_>],
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let q = split_heads(&self.to_q.forward(x)?, self.heads)?;
        let out = attention(&q, kv, mask, self.scale)?;
        Ok(self.to_out.forward(&merge_heads(&out)?)?)
    }
}
