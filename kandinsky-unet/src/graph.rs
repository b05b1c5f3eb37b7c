//! The decoder UNet replayed from a CUDA graph: [`GraphedUNet`].
//!
//! candle issues every op of a step from the host; at 768 px a step replayed from a graph took
//! 19.0 ms against 21.2 ms eager on an H200 (benches/RESULTS.md, GPU run 9). The pipeline's
//! loop calls [`Denoiser::predict`] with a new sample and timestep each step and the same
//! conditioning, so the graph is captured once per (sample shape, dtype, conditioning) and
//! replayed with the sample and the timesteps' sinusoid copied into its input buffers.

use candle_core::{DType, Device, Tensor};
use kandinsky_core::traits::{Denoiser, DenoiserCondition};
use kandinsky_core::Result;

use crate::UNet2DConditionModel;

/// A [`Denoiser`] that replays `unet`'s forward from a CUDA graph on a CUDA device (with the
/// `cuda` feature) and calls it directly elsewhere. Outputs equal the eager ones (the same
/// kernels in the same order). Replays on the thread that captured (candle's capture cache
/// is thread-local).
pub struct GraphedUNet<'a> {
    unet: &'a UNet2DConditionModel,
    #[cfg(feature = "cuda")]
    captured: std::cell::RefCell<Option<Captured>>,
}

/// What a graph was captured for: the sample's shape and dtype and the conditioning tensors
/// (by identity: the pipeline passes the same ones at every step).
#[cfg(feature = "cuda")]
#[derive(Debug, Clone, PartialEq, Eq)]
struct Key {
    dims: Vec<usize>,
    dtype: DType,
    cond: [Option<candle_core::TensorId>; 4],
}

#[cfg(feature = "cuda")]
impl Key {
    fn new(sample: &Tensor, cond: &DenoiserCondition) -> Self {
        let id = |t: &Option<Tensor>| t.as_ref().map(Tensor::id);
        Self {
            dims: sample.dims().to_vec(),
            dtype: sample.dtype(),
            cond: [
                id(&cond.image_embeds),
                id(&cond.text_embeds),
                id(&cond.text_hidden_states),
                id(&cond.hint),
            ],
        }
    }
}

/// One captured forward. Field order is drop order: the output (memory of the graph) goes
/// before the graph.
#[cfg(feature = "cuda")]
struct Captured {
    key: Key,
    out: Tensor,
    graph: candle_core::cuda_backend::cudarc::driver::CudaGraph,
    sample: Tensor,
    time_sinusoid: Tensor,
    /// Keeps the captured conditioning's buffers alive.
    _cond: DenoiserCondition,
}

impl<'a> GraphedUNet<'a> {
    /// Wrap `unet`; nothing is captured before the first prediction.
    pub fn new(unet: &'a UNet2DConditionModel) -> Self {
        Self {
            unet,
            #[cfg(feature = "cuda")]
            captured: std::cell::RefCell::new(None),
        }
    }

    /// Whether a graph is held (after a prediction on a CUDA device).
    pub fn is_captured(&self) -> bool {
        #[cfg(feature = "cuda")]
        return self.captured.borrow().is_some();
        #[cfg(not(feature = "cuda"))]
        false
    }

    #[cfg(feature = "cuda")]
    fn capture(
        &self,
        key: Key,
        sample: &Tensor,
        timesteps: &[f64],
        cond: &DenoiserCondition,
    ) -> Result<Captured> {
        let Device::Cuda(cuda) = self.unet.device() else {
            return Err(kandinsky_core::Error::invalid(
                "CUDA graphs need a CUDA device",
            ));
        };
        // Input buffers of the graph's own, refilled before each replay.
        let sample_in = sample.to_device(self.unet.device())?.copy()?;
        let time_sinusoid = self.unet.time_sinusoid(timesteps)?.copy()?;
        let cond = cond.clone();
        let (graph, out) = kandinsky_core::cuda::capture_graph(cuda, || {
            self.unet
                .predict_with_sinusoid(&sample_in, &time_sinusoid, &cond)
                .map_err(candle_core::Error::wrap)
        })?;
        Ok(Captured {
            key,
            out,
            graph,
            sample: sample_in,
            time_sinusoid,
            _cond: cond,
        })
    }
}

impl Denoiser for GraphedUNet<'_> {
    fn predict(
        &self,
        sample: &Tensor,
        timesteps: &[f64],
        cond: &DenoiserCondition,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.unet.device().is_cuda() && sample.rank() == 4 && timesteps.len() == sample.dim(0)? {
            let key = Key::new(sample, cond);
            let mut slot = self.captured.borrow_mut();
            if slot.as_ref().is_none_or(|c| c.key != key) {
                // Free the previous graph's memory before capturing the next.
                *slot = None;
                *slot = Some(self.capture(key, sample, timesteps, cond)?);
            }
            let c = slot.as_ref().expect("captured above");
            c.sample
                .slice_set(&sample.to_device(self.unet.device())?.contiguous()?, 0, 0)?;
            c.time_sinusoid
                .slice_set(&self.unet.time_sinusoid(timesteps)?, 0, 0)?;
            c.graph
                .launch()
                .map_err(|e| kandinsky_core::Error::invalid(format!("CUDA graph launch: {e:?}")))?;
            // The next replay rewrites `out`: hand out a copy.
            return Ok(c.out.copy()?);
        }
        // Shapes the graph does not take are checked (and refused) by the UNet itself.
        self.unet.predict(sample, timesteps, cond)
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
