//! `Downsample2D` of the VQ-VAE encoder.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use kandinsky_core::Result;

use crate::conv::{Conv2d, Padding};

/// A 3×3 stride-2 convolution after zero-padding only the right and bottom by one
/// (`downsample_padding = 0` in the encoder: `F.pad(x, (0, 1, 0, 1))`). Key `conv`.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
}

impl Downsample2D {
    /// Load the convolution of a `channels → channels` downsampler.
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        let padding = Padding {
            top: 0,
            bottom: 1,
            left: 0,
            right: 1,
        };
        Ok(Self {
            conv: Conv2d::new(channels, channels, 3, 2, padding, vb.pp("conv"))?,
        })
    }

    /// `[B, C, H, W]` → `[B, C, ⌊H/2⌋, ⌊W/2⌋]` (for even sides).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(x)
    }
}
