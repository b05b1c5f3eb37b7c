//! Random weights for benches and memory measurements (no checkpoint needed).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use kandinsky_core::manifest::record_requests;
use kandinsky_core::Result;

use crate::vq_model::{VQModel, VQModelConfig};

/// Random f32 weights of sane scale for `cfg`, keyed like the checkpoint: norm weights 1,
/// biases 0, convolution and linear weights uniform in ±1/√fan_in (PyTorch's default init),
/// the codebook in ±1/K.
pub fn random_weights(cfg: &VQModelConfig, device: &Device) -> Result<HashMap<String, Tensor>> {
    let shapes = record_requests(|vb| VQModel::new(vb, cfg))?;
    let mut tensors = HashMap::with_capacity(shapes.len());
    for (name, shape) in shapes {
        let t = if shape.len() == 1 {
            let v = if name.ends_with("weight") { 1.0 } else { 0.0 };
            Tensor::full(v as f32, shape.as_slice(), device)?
        } else {
            let fan_in: usize = if name.ends_with("embedding.weight") {
                shape[0] * shape[0]
            } else {
                shape[1..].iter().product()
            };
            let bound = 1.0 / (fan_in as f64).sqrt();
            Tensor::rand(-bound as f32, bound as f32, shape.as_slice(), device)?
        };
        tensors.insert(name, t);
    }
    Ok(tensors)
}

/// A model built from `weights` (see [`random_weights`]) in `dtype`.
pub fn vq_model_from_weights(
    cfg: &VQModelConfig,
    weights: &HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
) -> Result<VQModel> {
    VQModel::new(
        VarBuilder::from_tensors(weights.clone(), dtype, device),
        cfg,
    )
}

/// A model with fresh [`random_weights`].
pub fn random_vq_model(cfg: &VQModelConfig, dtype: DType, device: &Device) -> Result<VQModel> {
    vq_model_from_weights(cfg, &random_weights(cfg, device)?, dtype, device)
}
