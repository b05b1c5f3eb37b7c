//! A network's forward replayed from a CUDA graph: [`GraphReplay`].
//!
//! candle issues every op from the host: at 768 px a decoder UNet step replayed from a graph
//! took 19.0 ms against 21.2 ms eager on an H200 (benches/RESULTS.md, GPU run 9), and the
//! prior's small step is host-bound. A denoising loop calls its network with inputs of the
//! same shapes at every step, so the forward is captured once per key (a caller's tag, the
//! inputs' shapes and dtypes, the fixed inputs' strides) and replayed with the per-step
//! inputs (sample, timestep sinusoid) copied into the graph's own contiguous buffers, and
//! the fixed ones (a prepared conditioning) copied only when another preparation comes. Off
//! CUDA (or without the `cuda` feature) the forward is called directly.

use candle_core::{DType, Tensor};

use crate::traits::Prepared;
use crate::Result;

/// The forward of one network, captured per key and replayed (see the module docs).
/// Single-threaded: candle's capture cache, which the graph reads, is thread-local.
#[derive(Default)]
pub struct GraphReplay {
    #[cfg(feature = "cuda")]
    slot: std::cell::RefCell<Option<Slot>>,
}

/// What a graph is captured for: the caller's tag (which optional inputs are present) and
/// every input's shape and dtype, and the fixed inputs' strides (per-call inputs, then fixed
/// ones).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Debug, Clone, PartialEq)]
struct Key {
    tag: u32,
    inputs: Vec<(Vec<usize>, DType, Vec<usize>)>,
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
    fixed: Vec<Tensor>,
    /// The [`Fixed::id`] whose tensors `fixed` holds.
    fixed_id: std::cell::Cell<u64>,
}

/// Inputs that stay the same over many calls (a prepared conditioning): copied into the
/// graph's buffers only when `id` differs from the last call's.
#[derive(Debug, Clone, Copy)]
struct Fixed<'a> {
    /// Equal ids promise equal tensors ([`Prepared::id`]); read by the CUDA replay.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    id: u64,
    /// The tensors, on the device of the per-call inputs.
    tensors: &'a [Tensor],
}

impl Fixed<'_> {
    /// No fixed inputs.
    const NONE: Fixed<'static> = Fixed {
        id: 0,
        tensors: &[],
    };
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
    /// the inputs' shapes and dtypes) is replayed after `inputs` are copied into its
    /// (contiguous) input buffers; a new key first frees the previous graph and captures
    /// `forward` on copies of `inputs` (`cuda::capture_graph`: `forward` must upload the
    /// same host data at every call and never read back). Returns a copy of the output, which the next replay
    /// overwrites. A capture that fails is reported (`tracing` warning) and that key runs
    /// eagerly from then on.
    pub fn run(
        &self,
        tag: u32,
        inputs: &[&Tensor],
        forward: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        self.run_with_fixed(tag, inputs, Fixed::NONE, |inputs, _| forward(inputs))
    }

    /// [`Self::run`] with a prepared conditioning besides the per-call `inputs`:
    /// `forward(inputs, prepared)`, `prepared` reading the graph's copies of its tensors.
    /// They belong to the key like the inputs, but a replay copies them into the graph's
    /// buffers only when `prepared` is another preparation than the one they hold (its
    /// [`id`](Prepared::id)). Its tensors may be strided views of a dense buffer (a
    /// transposed copy): the graph's buffers keep their layout.
    pub fn run_prepared<C: Clone>(
        &self,
        inputs: &[&Tensor],
        prepared: &Prepared<C>,
        forward: impl Fn(&[Tensor], &Prepared<C>) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let fixed = Fixed {
            id: prepared.id(),
            tensors: prepared.tensors(),
        };
        self.run_with_fixed(0, inputs, fixed, |inputs, fixed| {
            forward(inputs, &prepared.with_tensors(fixed.to_vec()))
        })
    }

    /// [`Self::run`] with `fixed` inputs besides the per-call ones: `forward(inputs, fixed)`
    /// (see [`Self::run_prepared`]).
    fn run_with_fixed(
        &self,
        tag: u32,
        inputs: &[&Tensor],
        fixed: Fixed<'_>,
        forward: impl Fn(&[Tensor], &[Tensor]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(candle_core::Device::Cuda(cuda)) = inputs.first().map(|t| t.device()) {
            // Per-call inputs are captured from contiguous buffers whatever their layout
            // (no recapture when one arrives as a view); fixed ones keep theirs.
            let per_call = inputs
                .iter()
                .map(|t| (t.dims().to_vec(), t.dtype(), Vec::new()));
            let kept = fixed
                .tensors
                .iter()
                .map(|t| (t.dims().to_vec(), t.dtype(), t.stride().to_vec()));
            let key = Key {
                tag,
                inputs: per_call.chain(kept).collect(),
            };
            let mut slot = self.slot.borrow_mut();
            if slot.as_ref().is_none_or(|c| *c.key() != key) {
                // Free the previous graph's memory before capturing the next.
                *slot = None;
                let own = inputs
                    .iter()
                    .map(|t| {
                        if t.is_contiguous() {
                            t.copy()
                        } else {
                            t.contiguous()
                        }
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let own_fixed = fixed
                    .tensors
                    .iter()
                    .map(|t| t.copy())
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let captured = crate::cuda::capture_graph(cuda, || {
                    forward(&own, &own_fixed).map_err(candle_core::Error::wrap)
                });
                *slot = Some(match captured {
                    Ok((graph, out)) => Slot::Captured(Captured {
                        key,
                        out,
                        graph,
                        inputs: own,
                        fixed: own_fixed,
                        fixed_id: std::cell::Cell::new(fixed.id),
                    }),
                    Err(e) => {
                        tracing::warn!("CUDA graph capture failed, running eagerly: {e}");
                        Slot::Failed(key)
                    }
                });
            }
            let Some(Slot::Captured(c)) = slot.as_ref() else {
                drop(slot);
                let inputs: Vec<Tensor> = inputs.iter().map(|t| (*t).clone()).collect();
                return forward(&inputs, fixed.tensors);
            };
            for (dst, src) in c.inputs.iter().zip(inputs) {
                copy_into(dst, src)?;
            }
            if c.fixed_id.get() != fixed.id {
                for (dst, src) in c.fixed.iter().zip(fixed.tensors) {
                    copy_into(dst, src)?;
                }
                c.fixed_id.set(fixed.id);
            }
            c.graph
                .launch()
                .map_err(|e| crate::Error::invalid(format!("CUDA graph launch: {e:?}")))?;
            return Ok(c.out.copy()?);
        }
        let _ = tag;
        let inputs: Vec<Tensor> = inputs.iter().map(|t| (*t).clone()).collect();
        forward(&inputs, fixed.tensors)
    }
}

/// Copy `src` into `dst` (same shape and dtype), `dst` possibly a permuted view of a dense
/// buffer: both are viewed in `dst`'s storage order, where `dst` is contiguous.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn copy_into(dst: &Tensor, src: &Tensor) -> Result<()> {
    let order = storage_order(dst.stride());
    let dst = dst.permute(order.clone())?;
    let src = src.permute(order)?.contiguous()?;
    Ok(dst.slice_set(&src, 0, 0)?)
}

/// The dimensions ordered from the largest stride to the smallest (ties keep their order):
/// the permutation under which a permuted view of a dense buffer is contiguous.
fn storage_order(stride: &[usize]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..stride.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(stride[i]));
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn copy_into_a_transposed_buffer() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        // A [B, H, L, D] view of a contiguous [B, L, H, D] buffer, as prepared for the
        // token-major attention.
        let buf = Tensor::zeros((2, 3, 4, 5), DType::F32, &dev)?;
        let dst = buf.transpose(1, 2)?;
        assert_eq!(storage_order(dst.stride()), vec![0, 2, 1, 3]);
        let src = Tensor::arange(0f32, 120.0, &dev)?.reshape((2, 4, 3, 5))?;
        copy_into(&dst, &src)?;
        assert_eq!(
            dst.flatten_all()?.to_vec1::<f32>()?,
            src.flatten_all()?.to_vec1::<f32>()?
        );
        // The buffer, in its own (storage) order, holds src's heads swapped back.
        assert_eq!(
            buf.flatten_all()?.to_vec1::<f32>()?,
            src.transpose(1, 2)?.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }

    #[test]
    fn off_cuda_runs_forward_with_both_input_sets() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[1f32, 2.0], &dev)?;
        let prepared = Prepared::<()>::new((), vec![Tensor::new(&[10f32, 20.0], &dev)?]);
        let replay = GraphReplay::new();
        let out = replay.run_prepared(&[&x], &prepared, |i, p| {
            assert_eq!(p.id(), prepared.id(), "the same preparation");
            Ok((&i[0] + &p.tensors()[0])?)
        })?;
        assert_eq!(out.to_vec1::<f32>()?, vec![11.0, 22.0]);
        assert!(!replay.is_captured());
        Ok(())
    }
}
