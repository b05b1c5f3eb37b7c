//! Layers shared by several networks, each a thin wrapper so that a faster path (a fused
//! CPU loop, a CUDA kernel) changes one place.

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

pub use candle_nn::{
    conv2d, conv2d_no_bias, layer_norm, linear, linear_no_bias, Conv2d, Conv2dConfig, LayerNorm,
    Linear,
};

use crate::error::{Error, Result};

/// Activation functions found in the configs (`act_fn`, `hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu` / `swish`.
    Silu,
    /// `gelu`: the exact erf GELU.
    Gelu,
    /// `gelu_pytorch_tanh` / `gelu_new`: the tanh approximation.
    GeluTanh,
    /// `quick_gelu`: x·σ(1.702x) (OpenAI CLIP).
    QuickGelu,
}

impl Activation {
    /// Parse a config name.
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "silu" | "swish" => Self::Silu,
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Self::GeluTanh,
            "quick_gelu" => Self::QuickGelu,
            other => {
                return Err(Error::unsupported(
                    "act_fn",
                    other,
                    "silu, gelu, gelu_new, gelu_pytorch_tanh, quick_gelu",
                ))
            }
        })
    }

    /// Apply.
    pub fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Silu => x.silu(),
            Self::Gelu => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
            Self::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
        }
    }
}

/// False when `KANDINSKY_PLAIN_KERNELS` is set: every op then takes candle's plain path
/// (to compare against the fused kernels).
pub fn use_fused_kernels() -> bool {
    static FUSED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FUSED.get_or_init(|| std::env::var_os("KANDINSKY_PLAIN_KERNELS").is_none())
}

/// GroupNorm with statistics in f32 whatever the input dtype (half-precision sums overflow).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

/// Load a GroupNorm (`weight`, `bias`) of `channels` channels in `groups` groups.
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    if groups == 0 || channels % groups != 0 {
        return Err(Error::invalid(format!(
            "GroupNorm: {channels} channels cannot be split into {groups} groups"
        )));
    }
    Ok(GroupNorm {
        weight: vb.get(channels, "weight")?,
        bias: vb.get(channels, "bias")?,
        groups,
        eps,
    })
}

impl GroupNorm {
    /// A GroupNorm from its tensors (`weight`, `bias` of shape `[C]`).
    pub fn from_parts(weight: Tensor, bias: Tensor, groups: usize, eps: f64) -> Result<Self> {
        let c = weight.dims1()?;
        if groups == 0 || c % groups != 0 || bias.dims1()? != c {
            return Err(Error::invalid(format!(
                "GroupNorm: weight [{c}], bias {:?} and {groups} groups do not fit",
                bias.dims()
            )));
        }
        Ok(Self {
            weight,
            bias,
            groups,
            eps,
        })
    }

    /// Number of channels.
    pub fn channels(&self) -> usize {
        self.weight.dims1().unwrap_or(0)
    }

    /// Normalise `x` of shape `[B, C, ...]`: the fused CUDA kernel on a GPU, else the plain
    /// path (statistics in f32, one pass for the mean, one for the variance).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() && x.rank() >= 3 && use_fused_kernels() {
            return crate::cuda::group_norm(
                x,
                &self.weight,
                &self.bias,
                self.groups,
                self.eps,
                false,
            );
        }
        self.forward_plain(x)
    }

    /// `silu(GroupNorm(x))` in one pass where a fused kernel exists.
    pub fn forward_silu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() && x.rank() >= 3 && use_fused_kernels() {
            return crate::cuda::group_norm(
                x,
                &self.weight,
                &self.bias,
                self.groups,
                self.eps,
                true,
            );
        }
        self.forward_plain(x)?.silu()
    }

    /// The reference path: statistics in f32, affine in f32, cast back.
    pub fn forward_plain(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        if dims.len() < 3 {
            candle_core::bail!("GroupNorm expects [B, C, ...], got {dims:?}");
        }
        let (b, c) = (dims[0], dims[1]);
        let per_group = dims[2..].iter().product::<usize>() * c / self.groups;
        let dtype = x.dtype();
        let xf = x
            .to_dtype(DType::F32)?
            .reshape((b, self.groups, per_group))?;
        let mean = (xf.sum_keepdim(2)? / per_group as f64)?;
        let centered = xf.broadcast_sub(&mean)?;
        let var = (centered.sqr()?.sum_keepdim(2)? / per_group as f64)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let mut wshape = vec![1usize; dims.len()];
        wshape[1] = c;
        let w = self
            .weight
            .to_dtype(DType::F32)?
            .reshape(wshape.as_slice())?;
        let bias = self.bias.to_dtype(DType::F32)?.reshape(wshape.as_slice())?;
        normed
            .reshape(dims.as_slice())?
            .broadcast_mul(&w)?
            .broadcast_add(&bias)?
            .to_dtype(dtype)
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        GroupNorm::forward(self, x)
    }
}

/// LayerNorm computed in f32 for half-precision inputs.
pub fn layer_norm_f32(ln: &LayerNorm, x: &Tensor) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    if dtype == DType::F32 || dtype == DType::F64 {
        return ln.forward(x);
    }
    let w = ln.weight().to_dtype(DType::F32)?;
    let b = ln.bias().map(|b| b.to_dtype(DType::F32)).transpose()?;
    let ln32 = match b {
        Some(b) => LayerNorm::new(w, b, ln.eps()),
        None => LayerNorm::new_no_bias(w, ln.eps()),
    };
    ln32.forward(&x.to_dtype(DType::F32)?)?.to_dtype(dtype)
}
