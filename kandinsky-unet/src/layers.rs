//! `Linear` / `Conv2d` that also run in bf16 on the CPU.
//!
//! candle 0.11's CPU matmul (used by linear layers and by the im2col convolution) has no bf16
//! kernel. For bf16 on the CPU these layers compute in f32 and round the result back to
//! bf16, as PyTorch's CPU bf16 matmul accumulates in f32. Every other dtype/device goes
//! straight to candle.

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;
use kandinsky_core::nn::Conv2dConfig;

/// True when `x` needs the f32 detour (bf16 on the CPU).
pub fn needs_f32(x: &Tensor) -> bool {
    x.dtype() == DType::BF16 && x.device().is_cpu()
}

/// A linear layer (`weight [out, in]`, `bias [out]`).
#[derive(Debug, Clone)]
pub struct Linear(candle_nn::Linear);

/// Load `weight`/`bias` of a linear layer.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    Ok(Linear(candle_nn::linear(in_dim, out_dim, vb)?))
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if !needs_f32(x) {
            return self.0.forward(x);
        }
        let w = self.0.weight().to_dtype(DType::F32)?;
        let b = self.0.bias().map(|b| b.to_dtype(DType::F32)).transpose()?;
        candle_nn::Linear::new(w, b)
            .forward(&x.to_dtype(DType::F32)?)?
            .to_dtype(DType::BF16)
    }
}

/// A 2-D convolution with bias.
#[derive(Debug, Clone)]
pub struct Conv2d(candle_nn::Conv2d);

/// Load `weight [out, in, k, k]`/`bias [out]` of a convolution.
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> candle_core::Result<Conv2d> {
    Ok(Conv2d(candle_nn::conv2d(
        in_channels,
        out_channels,
        kernel,
        cfg,
        vb,
    )?))
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if !needs_f32(x) {
            return self.0.forward(x);
        }
        let w = self.0.weight().to_dtype(DType::F32)?;
        let b = self.0.bias().map(|b| b.to_dtype(DType::F32)).transpose()?;
        candle_nn::Conv2d::new(w, b, *self.0.config())
            .forward(&x.to_dtype(DType::F32)?)?
            .to_dtype(DType::BF16)
    }
}
