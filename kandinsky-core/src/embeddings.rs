//! Timestep embeddings (diffusers `embeddings.py`).

use candle_core::{DType, Device, Tensor};
use candle_nn::{Module, VarBuilder};

use crate::error::Result;
use crate::nn::{linear, Activation, Linear};

/// Sinusoidal timestep embedding (`get_timestep_embedding`), computed in f32 on the host
/// exactly as diffusers does: `freq_i = exp(-ln(max_period)·i / (half − shift))`,
/// `[sin, cos]`, swapped to `[cos, sin]` with `flip_sin_to_cos`.
pub fn timestep_embedding(
    timesteps: &[f64],
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
    device: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let max_period = 10000f32;
    let denom = half as f32 - downscale_freq_shift as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-max_period.ln() * i as f32 / denom).exp())
        .collect();
    let mut data = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let t = t as f32;
        let args: Vec<f32> = freqs.iter().map(|f| t * f).collect();
        let sin = args.iter().map(|a| a.sin());
        let cos = args.iter().map(|a| a.cos());
        if flip_sin_to_cos {
            data.extend(cos.chain(sin));
        } else {
            data.extend(sin.chain(cos));
        }
        if dim % 2 == 1 {
            data.push(0.0);
        }
    }
    Ok(Tensor::from_vec(data, (timesteps.len(), dim), device)?)
}

/// Read a `[B]` timestep tensor to the host as f64.
pub fn timesteps_to_host(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

/// `TimestepEmbedding`: `linear_1` → activation → `linear_2`.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
    act: Activation,
}

impl TimestepEmbedding {
    /// Load `linear_1` (`in_channels → time_embed_dim`) and `linear_2` (`→ out_dim`).
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        time_embed_dim: usize,
        out_dim: usize,
        act: Activation,
    ) -> Result<Self> {
        Ok(Self {
            linear_1: linear(in_channels, time_embed_dim, vb.pp("linear_1"))?,
            linear_2: linear(time_embed_dim, out_dim, vb.pp("linear_2"))?,
            act,
        })
    }

    /// Apply to a `[B, in_channels]` embedding.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.act.apply(&self.linear_1.forward(x)?)?;
        Ok(self.linear_2.forward(&h)?)
    }
}
