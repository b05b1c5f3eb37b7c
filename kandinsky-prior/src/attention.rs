//! diffusers `attention.py`: `BasicTransformerBlock` (pre-LN, self-attention only) and
//! `FeedForward` with the exact-GELU projection, as the prior builds them.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use kandinsky_core::attention::KvSegment;
use kandinsky_core::nn::{layer_norm, layer_norm_f32, linear, LayerNorm, Linear};
use kandinsky_core::Result;

use crate::attention_processor::Attention;

/// diffusers' `GELU` module: `proj` then exact (erf) GELU.
#[derive(Debug, Clone)]
pub struct Gelu {
    proj: Linear,
}

impl Gelu {
    /// Load `proj` (`dim_in → dim_out`).
    pub fn new(vb: VarBuilder, dim_in: usize, dim_out: usize) -> Result<Self> {
        Ok(Self {
            proj: linear(dim_in, dim_out, vb.pp("proj"))?,
        })
    }

    /// Apply.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.proj.forward(x)?.gelu_erf()?)
    }
}

/// `FeedForward` with `activation_fn="gelu"`: `net.0` (GELU projection to `4·dim`),
/// `net.1` dropout (identity at inference), `net.2` (back to `dim`).
#[derive(Debug, Clone)]
pub struct FeedForward {
    act: Gelu,
    out: Linear,
}

impl FeedForward {
    /// Load `net.0.proj` and `net.2` with the default `mult = 4`.
    pub fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = 4 * dim;
        let net = vb.pp("net");
        Ok(Self {
            act: Gelu::new(net.pp("0"), dim, inner)?,
            out: linear(inner, dim, net.pp("2"))?,
        })
    }

    /// Apply to `[B, L, dim]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.out.forward(&self.act.forward(x)?)?)
    }
}

/// `BasicTransformerBlock` with `norm_type="layer_norm"` and no cross-attention:
/// `x += attn1(norm1(x)); x += ff(norm3(x))`.
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

/// diffusers' `norm_eps` default for `BasicTransformerBlock`.
const NORM_EPS: f64 = 1e-5;

impl BasicTransformerBlock {
    /// Load `norm1`, `attn1`, `norm3`, `ff`.
    pub fn new(vb: VarBuilder, dim: usize, heads: usize, dim_head: usize) -> Result<Self> {
        Ok(Self {
            norm1: layer_norm(dim, NORM_EPS, vb.pp("norm1"))?,
            attn1: Attention::new(vb.pp("attn1"), dim, heads, dim_head)?,
            norm3: layer_norm(dim, NORM_EPS, vb.pp("norm3"))?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
        })
    }

    /// `x` `[B, L, dim]`, `mask` additive, broadcastable to `[B, H, L, L]`.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let h = self.attn1.forward(&layer_norm_f32(&self.norm1, x)?, mask)?;
        self.finish(x, h)
    }

    /// The causal prefix `x` `[B, P, dim]` (tokens that attend only among themselves,
    /// `mask` broadcastable to `[B, H, P, P]`): this layer's keys and values of it (the
    /// later tokens attend to them, [`Self::forward_after`]) and, if `advance`, its output.
    pub fn prefix(
        &self,
        x: &Tensor,
        mask: &Tensor,
        advance: bool,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let n = layer_norm_f32(&self.norm1, x)?;
        let (k, v) = self.attn1.key_values(&n)?;
        let out = if advance {
            let h = self
                .attn1
                .attend(&n, &[KvSegment { k: &k, v: &v }], Some(mask))?;
            Some(self.finish(x, h)?)
        } else {
            None
        };
        Ok((k, v, out))
    }

    /// [`Self::forward`] of the tokens `x` `[B, S, dim]` that follow a prefix whose keys and
    /// values at this layer are `prefix` ([`Self::prefix`]); `mask` covers every key,
    /// `[B, H, S, P + S]` after broadcasting.
    pub fn forward_after(
        &self,
        x: &Tensor,
        prefix: KvSegment<'_>,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let n = layer_norm_f32(&self.norm1, x)?;
        let (k, v) = self.attn1.key_values(&n)?;
        let h = self
            .attn1
            .attend(&n, &[prefix, KvSegment { k: &k, v: &v }], Some(mask))?;
        self.finish(x, h)
    }

    /// The residual add of the attention output `h`, then the feed-forward half.
    fn finish(&self, x: &Tensor, h: Tensor) -> Result<Tensor> {
        let x = (h + x)?;
        let h = self.ff.forward(&layer_norm_f32(&self.norm3, &x)?)?;
        Ok((h + x)?)
    }
}
