//! A network's forward replayed from a CUDA graph: [`GraphReplay`].
//!
//! candle issues every op from the host: at 768 px a decoder UNet step replayed from a graph
//! took 19.0 ms against 21.2 ms eager on an H200 (benches/RESULTS.md, GPU run 9), and the
//! prior's small step is host-bound. A denoising loop calls its network with inputs of the
//! same shapes at every step, so the forward is captured once per key (a caller's tag and the
//! inputs' shapes and dtypes) and replayed with the inputs — sample, timestep sinusoid and
//! conditioning alike — copied into the graph's own input buffers. Off CUDA (or without the
//! `cuda` feature) the forward is called directly.

use candle_core::{DType, Tensor};

use crate::Result;

/// The forward of one network, captured per key and replayed (see the module docs).
/// Single-threaded: candle's capture cache, which the graph reads, is thread-local.
#[derive(Default)]
pub struct GraphReplay {
    #[cfg(feature = "cuda")]
    slot: std::cell::RefCell<Option<Slot>>,
}

/// What a graph is captured for: the caller's tag (which optional inputs are present) and
/// every input's shape and dtype.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Debug, Clone, PartialEq)]
struct Key {
    tag: u32,
    inputs: Vec<(Vec<usize>, DType)>,
}

/// What is held for the last key: its graph, or the capture's failure (that key then runs
/// eagerly, without trying again).
#[cfg(feature = "cuda")]
enum Slot {
    Captured(Captured),
    Failed(Key),
}

#[cfg(feature = "cuda")]
impl Slot {
    fn key(&self) -> &Key {
        match self {
            Slot::Captured(c) => &c.key,
            Slot::Failed(k) => k,
        }
    }
}

/// One captured forward. Field order is drop order: the output (memory of the graph) goes
/// before the graph.
#[cfg(feature = "cuda")]
struct Captured {
    key: Key,
    out: Tensor,
    graph: cudarc::driver::CudaGraph,
    inputs: Vec<Tensor>,
}

impl GraphReplay {
    /// Nothing captured yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a graph is held.
    pub fn is_captured(&self) -> bool {
        #[cfg(feature = "cuda")]
        return matches!(*self.slot.borrow(), Some(Slot::Captured(_)));
        #[cfg(not(feature = "cuda"))]
        false
    }

    /// `forward(inputs)`, where `inputs` are every tensor `forward` reads besides the
    /// network's weights, all on one device. On a CUDA device the graph captured for (`tag`,
    /// the inputs' shapes and dtypes) is replayed after `inputs` are copied into its input
    /// buffers; a new key first frees the previous graph and captures `forward` on copies of
    /// `inputs` (`cuda::capture_graph`: `forward` must upload the same host data at
    /// every call and never read back). Returns a copy of the output, which the next replay
    /// overwrites. A capture that fails is reported (`tracing` warning) and that key runs
    /// eagerly from then on.
    pub fn run(
        &self,
        tag: u32,
        inputs: &[&Tensor],
        forward: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(candle_core::Device::Cuda(cuda)) = inputs.first().map(|t| t.device()) {
            let key = Key {
                tag,
                inputs: inputs
                    .iter()
                    .map(|t| (t.dims().to_vec(), t.dtype()))
                    .collect(),
            };
            let mut slot = self.slot.borrow_mut();
            if slot.as_ref().is_none_or(|c| *c.key() != key) {
                // Free the previous graph's memory before capturing the next.
                *slot = None;
                let own: Vec<Tensor> = inputs
                    .iter()
                    .map(|t| t.copy())
                    .collect::<candle_core::Result<_>>()?;
                let captured = crate::cuda::capture_graph(cuda, || {
                    forward(&own).map_err(candle_core::Error::wrap)
                });
                *slot = Some(match captured {
                    Ok((graph, out)) => Slot::Captured(Captured {
                        key,
                        out,
                        graph,
                        inputs: own,
                    }),
                    Err(e) => {
                        tracing::warn!("CUDA graph capture failed, running eagerly: {e}");
                        Slot::Failed(key)
                    }
                });
            }
            let Some(Slot::Captured(c)) = slot.as_ref() else {
                drop(slot);
                return forward(&inputs.iter().map(|t| (*t).clone()).collect::<Vec<_>>());
            };
            for (dst, src) in c.inputs.iter().zip(inputs) {
                dst.slice_set(&src.contiguous()?, 0, 0)?;
            }
            c.graph
                .launch()
                .map_err(|e| crate::Error::invalid(format!("CUDA graph launch: {e:?}")))?;
            return Ok(c.out.copy()?);
        }
        let _ = tag;
        forward(&inputs.iter().map(|t| (*t).clone()).collect::<Vec<_>>())
    }
}
