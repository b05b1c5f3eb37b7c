//! Custom CUDA kernels (nvcc-built PTX, launched through cudarc inside candle custom ops).
//!
//! Only compiled with the `cuda` feature. Each kernel has a plain candle fallback in the
//! module that dispatches to it; kernels are compared with that fallback on the GPU by
//! `kandinsky-benches`' `gpu_check` binary.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Layout, Shape, Tensor};
use cudarc::driver::{LaunchConfig, PushKernelArg};

const GROUP_NORM_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/group_norm.ptx"));

/// Fused GroupNorm(+SiLU) of a contiguous `[B, C, ...]` tensor.
struct GroupNormOp {
    groups: usize,
    eps: f32,
    silu: bool,
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "kandinsky-group-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!(
            "kandinsky-group-norm is a CUDA kernel; the CPU uses nn::GroupNorm's plain path"
        )
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (xo, _) = xl.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("group-norm kernel needs a contiguous input".into())
        })?;
        let (wo, _) = wl.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("group-norm weight must be contiguous".into())
        })?;
        let (bo, _) = bl
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("group-norm bias must be contiguous".into()))?;
        let dims = xl.shape().dims();
        let (b, c) = (dims[0], dims[1]);
        let hw: usize = dims[2..].iter().product();
        let g = self.groups;
        let cpg = c / g;
        let group_elems = cpg * hw;
        // Enough blocks to fill the GPU (~4 waves on 132 SMs), at least 4096 elements each.
        let splits = (528usize.div_ceil(b * g)).clamp(1, group_elems.div_ceil(4096).max(1));
        let chunk = group_elems.div_ceil(splits);
        let nblocks = b * g * splits;
        let dev = xs.device().clone();
        let partial = dev.alloc_zeros::<f32>(3 * nblocks)?;
        let cfg = LaunchConfig {
            grid_dim: (nblocks as u32, 1, 1),
            block_dim: (512, 1, 1),
            shared_mem_bytes: 0,
        };
        let (ge, ch, sp, gr, cp, hw64, silu) = (
            group_elems as i64,
            chunk as i64,
            splits as i32,
            g as i32,
            cpg as i32,
            hw as i64,
            self.silu as i32,
        );
        macro_rules! launch {
            ($t:ty, $suf:literal) => {{
                let x = xs.as_cuda_slice::<$t>()?.slice(xo..);
                let w = ws.as_cuda_slice::<$t>()?.slice(wo..);
                let bias = bs.as_cuda_slice::<$t>()?.slice(bo..);
                let stats = dev.get_or_load_custom_func(
                    concat!("group_norm_stats_", $suf),
                    "kandinsky_group_norm",
                    GROUP_NORM_PTX,
                )?;
                let mut s = stats.builder();
                s.arg(&x);
                s.arg(&partial);
                s.arg(&ge);
                s.arg(&ch);
                s.arg(&sp);
                unsafe { s.launch(cfg) }.w()?;
                let out = unsafe { dev.alloc::<$t>(b * c * hw)? };
                let apply = dev.get_or_load_custom_func(
                    concat!("group_norm_apply_", $suf),
                    "kandinsky_group_norm",
                    GROUP_NORM_PTX,
                )?;
                let mut a = apply.builder();
                a.arg(&x);
                a.arg(&w);
                a.arg(&bias);
                a.arg(&partial);
                a.arg(&out);
                a.arg(&ge);
                a.arg(&ch);
                a.arg(&sp);
                a.arg(&gr);
                a.arg(&cp);
                a.arg(&hw64);
                a.arg(&self.eps);
                a.arg(&silu);
                unsafe { a.launch(cfg) }.w()?;
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match xs.dtype() {
            DType::F32 => launch!(f32, "f32"),
            DType::F16 => launch!(half::f16, "f16"),
            DType::BF16 => launch!(half::bf16, "bf16"),
            dt => candle_core::bail!("group-norm kernel: unsupported dtype {dt:?}"),
        };
        Ok((out, xl.shape().clone()))
    }
}

/// Fused GroupNorm (+ SiLU when `silu`) on a CUDA tensor `[B, C, ...]`; `weight`/`bias` `[C]`
/// in the dtype of `x`. Statistics in f32.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    let w = weight.to_dtype(x.dtype())?.contiguous()?;
    let b = bias.to_dtype(x.dtype())?.contiguous()?;
    x.apply_op3_no_bwd(
        &w,
        &b,
        &GroupNormOp {
            groups,
            eps: eps as f32,
            silu,
        },
    )
}

/// `(free, total)` bytes of the current CUDA device's memory.
pub fn mem_info() -> candle_core::Result<(usize, usize)> {
    cudarc::driver::result::mem_get_info()
        .map_err(|e| candle_core::Error::Msg(format!("cuMemGetInfo: {e:?}")))
}
