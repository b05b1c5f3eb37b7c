//! `Upsample2D` of the VQ-VAE decoder.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use kandinsky_core::Result;

use crate::conv::{Conv2d, Padding};

/// Nearest-neighbour 2× upsampling followed by a 3×3 convolution (fused, see
/// [`Conv2d::forward_upsample2x`]). Key `conv`.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    /// Load the convolution of a `channels → channels` upsampler.
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(channels, channels, 3, 1, Padding::same(1), vb.pp("conv"))?,
        })
    }

    /// `[B, C, H, W]` → `[B, C, 2H, 2W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward_upsample2x(x)
    }
}
