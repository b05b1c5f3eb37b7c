//! The decoder UNet replayed from a CUDA graph: [`GraphedUNet`].

use candle_core::{DType, Device, Tensor};
use kandinsky_core::graph::GraphReplay;
use kandinsky_core::traits::{Denoiser, DenoiserCondition, PreparedCondition};
use kandinsky_core::Result;

use crate::UNet2DConditionModel;

/// A [`Denoiser`] that replays `unet`'s forward from a CUDA graph on a CUDA device (with the
/// `cuda` feature; [`GraphReplay`]) and calls it directly elsewhere. The graph is captured
/// once per input shapes (sample, prepared conditioning) and replayed with the sample and the
/// timesteps' sinusoid ([`UNet2DConditionModel::predict_prepared_with_sinusoid`]) copied into
/// its input buffers; the prepared conditioning ([`Denoiser::prepare`]) is copied only when
/// another one comes. Outputs equal the eager ones (the same kernels in the same order).
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
    /// [`Self::prepare`] then [`Self::predict_prepared`]: the conditioning's share is
    /// recomputed (eagerly) at every call; a loop should prepare once.
    fn predict(
        &self,
        sample: &Tensor,
        timesteps: &[f64],
        cond: &DenoiserCondition,
    ) -> Result<Tensor> {
        self.predict_prepared(sample, timesteps, &self.prepare(cond)?)
    }

    fn prepare(&self, cond: &DenoiserCondition) -> Result<PreparedCondition> {
        self.unet.prepare(cond)
    }

    fn predict_prepared(
        &self,
        sample: &Tensor,
        timesteps: &[f64],
        prepared: &PreparedCondition,
    ) -> Result<Tensor> {
        // Off CUDA, and for inputs the UNet will refuse (its own errors), call it directly.
        if !self.unet.device().is_cuda()
            || sample.rank() != 4
            || timesteps.len() != sample.dim(0)?
        {
            return self.unet.predict_prepared(sample, timesteps, prepared);
        }
        let dev = self.unet.device();
        let inputs = [sample.to_device(dev)?, self.unet.time_sinusoid(timesteps)?];
        self.replay
            .run_prepared(&[&inputs[0], &inputs[1]], prepared, |x, prepared| {
                self.unet
                    .predict_prepared_with_sinusoid(&x[0], &x[1], prepared)
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
