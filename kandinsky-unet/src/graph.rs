//! The decoder UNet replayed from a CUDA graph: [`GraphedUNet`].

use candle_core::{DType, Device, Tensor, TensorId};
use kandinsky_core::graph::GraphReplay;
use kandinsky_core::traits::{Denoiser, DenoiserCondition};
use kandinsky_core::Result;

use crate::UNet2DConditionModel;

/// A [`Denoiser`] that replays `unet`'s forward from a CUDA graph on a CUDA device (with the
/// `cuda` feature; [`GraphReplay`]) and calls it directly elsewhere. The graph is captured
/// once per (sample shape, dtype, conditioning tensors): the pipeline's loop passes a new
/// sample and timestep at each step and the same conditioning, and the timesteps enter as
/// their sinusoid ([`UNet2DConditionModel::predict_with_sinusoid`]), refilled before each
/// replay. Outputs equal the eager ones (the same kernels in the same order).
pub struct GraphedUNet<'a> {
    unet: &'a UNet2DConditionModel,
    replay: GraphReplay<Key>,
}

/// What a graph was captured for: the sample's shape and dtype and the conditioning tensors
/// (by identity).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Key {
    dims: Vec<usize>,
    dtype: DType,
    cond: [Option<TensorId>; 4],
}

impl<'a> GraphedUNet<'a> {
    /// Wrap `unet`; nothing is captured before the first prediction.
    pub fn new(unet: &'a UNet2DConditionModel) -> Self {
        Self {
            unet,
            replay: GraphReplay::new(),
        }
    }

    /// Whether a graph is held (after a prediction on a CUDA device).
    pub fn is_captured(&self) -> bool {
        self.replay.is_captured()
    }
}

impl Denoiser for GraphedUNet<'_> {
    fn predict(
        &self,
        sample: &Tensor,
        timesteps: &[f64],
        cond: &DenoiserCondition,
    ) -> Result<Tensor> {
        // Off CUDA, and for inputs the UNet will refuse (its own errors), call it directly.
        if !self.unet.device().is_cuda()
            || sample.rank() != 4
            || timesteps.len() != sample.dim(0)?
        {
            return self.unet.predict(sample, timesteps, cond);
        }
        let tensors = [
            &cond.image_embeds,
            &cond.text_embeds,
            &cond.text_hidden_states,
            &cond.hint,
        ];
        let key = Key {
            dims: sample.dims().to_vec(),
            dtype: sample.dtype(),
            cond: tensors.map(|t| t.as_ref().map(Tensor::id)),
        };
        let keep: Vec<&Tensor> = tensors.iter().filter_map(|t| t.as_ref()).collect();
        let sample = sample.to_device(self.unet.device())?;
        let t_sin = self.unet.time_sinusoid(timesteps)?;
        self.replay.run(key, &[&sample, &t_sin], &keep, |inputs| {
            self.unet
                .predict_with_sinusoid(&inputs[0], &inputs[1], cond)
        })
    }

    fn sample_channels(&self) -> usize {
        self.unet.sample_channels()
    }

    fn out_channels(&self) -> usize {
        Denoiser::out_channels(self.unet)
    }

    fn device(&self) -> &Device {
        Denoiser::device(self.unet)
    }

    fn dtype(&self) -> DType {
        Denoiser::dtype(self.unet)
    }
}
