//! Shared helpers for the criterion benches and the GPU check: random-weight models at the
//! real configs (no checkpoint is needed to measure speed).

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

/// A `VarBuilder` backend that creates every requested tensor with random values of a
/// sensible scale: N(0, 1/fan_in) for matrices and kernels, ≈1 for norm weights, small biases.
/// Values are drawn on the target device, so a 1.2B-parameter model is built in seconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct RandomBackend;

impl SimpleBackend for RandomBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let dims = s.dims();
        let t = if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            Tensor::randn(0f32, (1.0 / fan_in as f64).sqrt() as f32, s, dev)?
        } else if name.ends_with("weight") {
            (Tensor::randn(0f32, 0.05, s, dev)? + 1.0)?
        } else {
            Tensor::randn(0f32, 0.02, s, dev)?
        };
        t.to_dtype(dtype)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape for `{name}`")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// A `VarBuilder` handing out random weights on `device` in `dtype`.
pub fn random_var_builder(dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(RandomBackend), dtype, device.clone())
}

/// Block until the device has finished its queued work (so a timer measures the work).
pub fn sync(device: &Device) -> candle_core::Result<()> {
    device.synchronize()
}

/// Dtypes to bench from a comma-separated env var (`f32,f16,bf16`); default f16+bf16 on CUDA,
/// f32 on the CPU.
pub fn env_dtypes(var: &str, device: &Device) -> Vec<DType> {
    match std::env::var(var) {
        Ok(s) => s
            .split(',')
            .map(|d| {
                kandinsky_core::device::parse_dtype(d.trim())
                    .unwrap_or_else(|e| panic!("{var}: {e}"))
            })
            .collect(),
        Err(_) if device.is_cuda() => vec![DType::F16, DType::BF16],
        Err(_) => vec![DType::F32],
    }
}

/// Sizes to bench from a comma-separated env var, else `default`.
pub fn env_sizes(var: &str, default: &[usize]) -> Vec<usize> {
    match std::env::var(var) {
        Ok(s) => s
            .split(',')
            .map(|x| {
                x.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{var}: `{x}` is not a size"))
            })
            .collect(),
        Err(_) => default.to_vec(),
    }
}
