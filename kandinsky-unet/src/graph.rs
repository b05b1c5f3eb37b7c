//! The decoder UNet replayed from a CUDA graph: [`GraphedUNet`].

use candle_core::{DType, Device, Tensor};
use kandinsky_core::graph::GraphReplay;
use kandinsky_core::traits::{Denoiser, DenoiserCondition};
use kandinsky_core::Result;

use crate::UNet2DConditionModel;

/// A [`Denoiser`] that replays `unet`'s forward from a CUDA graph on a CUDA device (with the
/// `cuda` feature; [`GraphReplay`]) and calls it directly elsewhere. The graph is captured
/// once per input shapes (sample, conditioning) and replayed with the sample, the timesteps'
/// sinusoid ([`UNet2DConditionModel::predict_with_sinusoid`]) and the conditioning copied
/// into its input buffers. Outputs equal the eager ones (the same kernels in the same order).
pub struct GraphedUNet<'a> {
    unet: &'a UNet2DConditionModel,
    replay: GraphReplay,
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
        let dev = self.unet.device();
        let optional = [
            &cond.image_embeds,
            &cond.text_embeds,
            &cond.text_hidden_states,
            &cond.hint,
        ];
        // The tag says which conditioning tensors follow the sample and the sinusoid.
        let tag = optional
            .iter()
            .enumerate()
            .fold(0u32, |t, (i, c)| t | (u32::from(c.is_some()) << i));
        let mut inputs = vec![sample.to_device(dev)?, self.unet.time_sinusoid(timesteps)?];
        for c in optional.iter().copied().flatten() {
            inputs.push(c.to_device(dev)?);
        }
        let refs: Vec<&Tensor> = inputs.iter().collect();
        self.replay.run(tag, &refs, |inputs| {
            let mut rest = inputs[2..].iter();
            let mut next = |present: bool| if present { rest.next().cloned() } else { None };
            let cond = DenoiserCondition {
                image_embeds: next(tag & 1 != 0),
                text_embeds: next(tag & 2 != 0),
                text_hidden_states: next(tag & 4 != 0),
                hint: next(tag & 8 != 0),
            };
            self.unet
                .predict_with_sinusoid(&inputs[0], &inputs[1], &cond)
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
