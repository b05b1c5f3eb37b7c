//! Seeded Gaussian noise drawn on the host.
//!
//! One seed gives the same numbers on every device: noise is generated on the CPU with a
//! ChaCha20 stream (stable across platforms and `rand` versions) and a Box–Muller transform,
//! then uploaded. Item `i` of a batch uses `seed + i`, so image 3 of a batch of 4 equals
//! image 0 of a run seeded `seed + 3`.

use candle_core::{DType, Device, Shape, Tensor};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::error::{Error, Result};

/// Something that hands out standard-normal tensors (initial latents, stochastic steps).
pub trait NoiseSource {
    /// A tensor of `N(0, 1)` samples of `shape`.
    fn randn(&mut self, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor>;
}

/// One ChaCha20 stream per batch item, seeded `seed + i`.
#[derive(Debug, Clone)]
pub struct SeededNoise {
    rngs: Vec<ChaCha20Rng>,
}

impl SeededNoise {
    /// Streams for a batch of `batch` items.
    pub fn new(seed: u64, batch: usize) -> Self {
        Self {
            rngs: (0..batch as u64)
                .map(|i| ChaCha20Rng::seed_from_u64(seed.wrapping_add(i)))
                .collect(),
        }
    }

    /// Batch size these streams serve.
    pub fn batch(&self) -> usize {
        self.rngs.len()
    }
}

fn normal_pair(rng: &mut ChaCha20Rng) -> (f64, f64) {
    // 53-bit uniforms in (0, 1]; u1 > 0 keeps ln finite.
    let u1 = ((rng.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64;
    let u2 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let r = (-2.0 * u1.ln()).sqrt();
    let theta = 2.0 * std::f64::consts::PI * u2;
    (r * theta.cos(), r * theta.sin())
}

fn fill_normal(rng: &mut ChaCha20Rng, n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let (a, b) = normal_pair(rng);
        out.push(a as f32);
        out.push(b as f32);
    }
    out.truncate(n);
    out
}

impl NoiseSource for SeededNoise {
    fn randn(&mut self, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor> {
        let dims = shape.dims();
        if dims.first() != Some(&self.rngs.len()) {
            return Err(Error::invalid(format!(
                "noise of shape {dims:?} requested from {} seeded streams: the first dimension must be the batch",
                self.rngs.len()
            )));
        }
        let per_item: usize = dims[1..].iter().product();
        let mut data = Vec::with_capacity(shape.elem_count());
        for rng in &mut self.rngs {
            data.extend(fill_normal(rng, per_item));
        }
        Ok(Tensor::from_vec(data, shape.clone(), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?)
    }
}

/// Noise recorded elsewhere (e.g. by diffusers), handed out in order: parity tests of
/// stochastic schedulers replay it.
#[derive(Debug, Clone, Default)]
pub struct RecordedNoise {
    queue: std::collections::VecDeque<Tensor>,
}

impl RecordedNoise {
    /// Replay these tensors in order.
    pub fn new(tensors: impl IntoIterator<Item = Tensor>) -> Self {
        Self {
            queue: tensors.into_iter().collect(),
        }
    }

    /// Replay the tensors of `named` whose names start with `prefix`, in name order (the
    /// fixtures store diffusers' draws as `noise_000`, `noise_001`, …).
    pub fn with_prefix(named: &std::collections::HashMap<String, Tensor>, prefix: &str) -> Self {
        let mut keys: Vec<&String> = named.keys().filter(|k| k.starts_with(prefix)).collect();
        keys.sort();
        Self::new(keys.into_iter().map(|k| named[k].clone()))
    }

    /// Tensors not yet consumed.
    pub fn remaining(&self) -> usize {
        self.queue.len()
    }
}

impl NoiseSource for RecordedNoise {
    fn randn(&mut self, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor> {
        let t = self
            .queue
            .pop_front()
            .ok_or_else(|| Error::invalid("recorded noise exhausted"))?;
        if t.shape() != shape {
            return Err(Error::invalid(format!(
                "recorded noise has shape {:?}, the step asked for {:?}",
                t.dims(),
                shape.dims()
            )));
        }
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }
}

/// Draw `N(0,1)` noise of `shape` (batch first) from `seed`, item `i` from `seed + i`.
pub fn randn_seeded(
    seed: u64,
    shape: impl Into<Shape>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let shape = shape.into();
    let batch = *shape
        .dims()
        .first()
        .ok_or_else(|| Error::invalid("noise shape must have a batch dimension"))?;
    SeededNoise::new(seed, batch).randn(&shape, dtype, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_are_per_item_and_reproducible() -> anyhow::Result<()> {
        let a = randn_seeded(7, (3, 4, 2, 2), DType::F32, &Device::Cpu)?;
        let b = randn_seeded(7, (3, 4, 2, 2), DType::F32, &Device::Cpu)?;
        let c = randn_seeded(9, (1, 4, 2, 2), DType::F32, &Device::Cpu)?;
        assert_eq!(
            a.flatten_all()?.to_vec1::<f32>()?,
            b.flatten_all()?.to_vec1::<f32>()?
        );
        // item 2 of seed 7 == item 0 of seed 9
        assert_eq!(
            a.get(2)?.flatten_all()?.to_vec1::<f32>()?,
            c.get(0)?.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }

    #[test]
    fn moments_are_standard_normal() -> anyhow::Result<()> {
        let x = randn_seeded(1, (1, 200_000), DType::F32, &Device::Cpu)?;
        let mean = x.mean_all()?.to_scalar::<f32>()?;
        let var = x.sqr()?.mean_all()?.to_scalar::<f32>()? - mean * mean;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
        Ok(())
    }

    #[test]
    fn wrong_batch_is_an_error() {
        let mut n = SeededNoise::new(0, 2);
        assert!(n
            .randn(&Shape::from((3, 4)), DType::F32, &Device::Cpu)
            .is_err());
    }
}
