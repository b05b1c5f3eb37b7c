//! A network's forward replayed from a CUDA graph: [`GraphReplay`].
//!
//! candle issues every op from the host: at 768 px a decoder UNet step replayed from a graph
//! took 19.0 ms against 21.2 ms eager on an H200 (benches/RESULTS.md, GPU run 9), and the
//! prior's small step is host-bound. A denoising loop calls its network with new inputs and
//! the same conditioning at every step, so the forward is captured once per key (input
//! shapes, conditioning) and replayed with the new inputs copied into the graph's own input
//! buffers. Off CUDA (or without the `cuda` feature) the forward is called directly.

use candle_core::Tensor;

use crate::Result;

/// The forward of one network, captured per key `K` and replayed (see the module docs).
/// Single-threaded: candle's capture cache, which the graph reads, is thread-local.
pub struct GraphReplay<K> {
    #[cfg(feature = "cuda")]
    slot: std::cell::RefCell<Option<Captured<K>>>,
    #[cfg(not(feature = "cuda"))]
    _key: std::marker::PhantomData<K>,
}

/// One captured forward. Field order is drop order: the output (memory of the graph) goes
/// before the graph.
#[cfg(feature = "cuda")]
struct Captured<K> {
    key: K,
    out: Tensor,
    graph: cudarc::driver::CudaGraph,
    inputs: Vec<Tensor>,
    /// The other tensors the forward reads: their buffers are baked into the graph.
    _kept: Vec<Tensor>,
}

impl<K: PartialEq> Default for GraphReplay<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: PartialEq> GraphReplay<K> {
    /// Nothing captured yet.
    pub fn new() -> Self {
        Self {
            #[cfg(feature = "cuda")]
            slot: std::cell::RefCell::new(None),
            #[cfg(not(feature = "cuda"))]
            _key: std::marker::PhantomData,
        }
    }

    /// Whether a graph is held.
    pub fn is_captured(&self) -> bool {
        #[cfg(feature = "cuda")]
        return self.slot.borrow().is_some();
        #[cfg(not(feature = "cuda"))]
        false
    }

    /// `forward(inputs)`. On a CUDA device the graph captured for `key` is replayed after
    /// `inputs` (contiguous, on the device) are copied into its input buffers; a new key
    /// first frees the previous graph and captures `forward` on copies of `inputs`
    /// ([`crate::cuda::capture_graph`]: `forward` must upload the same host data at every
    /// call and never read back). `keep`: every other tensor `forward` reads (the
    /// conditioning), held as long as the graph. Returns a copy of the output, which the
    /// next replay overwrites.
    pub fn run(
        &self,
        key: K,
        inputs: &[&Tensor],
        keep: &[&Tensor],
        forward: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(candle_core::Device::Cuda(cuda)) = inputs.first().map(|t| t.device()) {
            let mut slot = self.slot.borrow_mut();
            if slot.as_ref().is_none_or(|c| c.key != key) {
                // Free the previous graph's memory before capturing the next.
                *slot = None;
                let own: Vec<Tensor> = inputs
                    .iter()
                    .map(|t| t.copy())
                    .collect::<candle_core::Result<_>>()?;
                let (graph, out) = crate::cuda::capture_graph(cuda, || {
                    forward(&own).map_err(candle_core::Error::wrap)
                })?;
                *slot = Some(Captured {
                    key,
                    out,
                    graph,
                    inputs: own,
                    _kept: keep.iter().map(|t| (*t).clone()).collect(),
                });
            }
            let Some(c) = slot.as_ref() else {
                return Err(crate::Error::invalid("CUDA graph: nothing captured"));
            };
            for (dst, src) in c.inputs.iter().zip(inputs) {
                dst.slice_set(&src.contiguous()?, 0, 0)?;
            }
            c.graph
                .launch()
                .map_err(|e| crate::Error::invalid(format!("CUDA graph launch: {e:?}")))?;
            return Ok(c.out.copy()?);
        }
        let _ = (key, keep);
        forward(&inputs.iter().map(|t| (*t).clone()).collect::<Vec<_>>())
    }
}
