//! Custom CUDA kernels (nvcc-built PTX, launched through cudarc inside candle custom ops).
//!
//! Only compiled with the `cuda` feature. Each kernel has a plain candle fallback in the
//! module that dispatches to it; kernels are compared with that fallback on the GPU by
//! `kandinsky-benches`' `gpu_check` binary.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Layout, Shape, Tensor};
use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::nn::NormModulation;

/// An op's `name` and a `cpu_fwd` that refuses (`n`: its number of inputs): every custom op
/// here is a CUDA kernel, and its caller takes candle's ops off CUDA.
macro_rules! cuda_only {
    ($name:literal, $n:tt) => {
        cuda_only!($name, $n, concat!($name, " is a CUDA kernel"));
    };
    ($name:literal, 1, $msg:expr) => {
        cuda_only!(@fns $name, $msg, CpuStorage, Layout);
    };
    ($name:literal, 2, $msg:expr) => {
        cuda_only!(@fns $name, $msg, CpuStorage, Layout, CpuStorage, Layout);
    };
    ($name:literal, 3, $msg:expr) => {
        cuda_only!(@fns $name, $msg, CpuStorage, Layout, CpuStorage, Layout, CpuStorage, Layout);
    };
    (@fns $name:literal, $msg:expr, $($ty:ty),+) => {
        fn name(&self) -> &'static str {
            $name
        }

        fn cpu_fwd(&self, $(_: &$ty),+) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!($msg)
        }
    };
}

const GROUP_NORM_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/group_norm.ptx"));
const FLASH_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_attention.ptx"));
const FLASH_MMA_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_attention_mma.ptx"));
const FLASH_WIDE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_attention_wide.ptx"));
const FLASH_WGMMA_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_attention_wgmma.ptx"));

/// Which fused attention kernel [`flash_attention_with`] launches (same arguments; the grid
/// is one block per [`FlashKernel::block`] queries of each head).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlashKernel {
    /// `flash_attention.cu`: WMMA tiles, scores and output through shared memory (12 TFLOP/s
    /// at the 48×48 level on an H200; kept for comparison, `KANDINSKY_FLASH=wmma`).
    Wmma,
    /// `flash_attention_mma.cu`: FlashAttention-2 style, mma.sync fragments in registers,
    /// cp.async double buffering (125 TFLOP/s f16, 104 bf16 at the 48×48 level on an H200,
    /// GPU run 10; relative error 2.8e-4 / 2.1e-3 against f32; `KANDINSKY_FLASH=mma`).
    Mma,
    /// `flash_attention_wide.cu`: the FlashAttention-2 division of work, 32 query rows per
    /// warp and ldmatrix fragment loads (a third of the mma kernel's shared-memory traffic
    /// per tensor-core product), 4 warps per block: 168 TFLOP/s f16, 136 bf16 at the 48×48
    /// level (GPU run 10). The entry point's bf16 kernel, and its f16 one where the wgmma
    /// kernels are not built (`KANDINSKY_FLASH=wide`).
    Wide4,
    /// [`FlashKernel::Wide4`] with 2 warps (64 queries) per block: twice the blocks, for
    /// shapes where 128-query blocks leave SMs idle (`KANDINSKY_FLASH=wide2`; slower than
    /// `wide` at every UNet level in GPU run 10).
    Wide2,
    /// `flash_attention_wgmma.cu`: Hopper's warpgroup tensor cores (wgmma, sm_90a), two
    /// warpgroups of 64 query rows per block, K/V tiles in the 128-byte swizzled layout, with
    /// FlashAttention-3's intra-warpgroup overlap: a tile's S and the previous tile's P·V in
    /// flight together, the softmax running meanwhile (40 KB of shared memory: V in three
    /// buffers). Built only when `CUDA_COMPUTE_CAP` is 90 (it runs on sm_90 cards alone):
    /// 195 TFLOP/s f16, 117 bf16 at the 48×48 level (GPU run 10), the entry point's f16
    /// kernel there (`KANDINSKY_FLASH=wgmma-pipe`). Its one-tile-at-a-time sibling gave wrong
    /// outputs on the card (relative error 0.97) where the host emulation passed it, and was
    /// removed.
    WgmmaPipe,
    /// [`FlashKernel::WgmmaPipe`] in the unswizzled core-matrix layout (179 TFLOP/s f16;
    /// `KANDINSKY_FLASH=wgmma-pipe-ns`).
    WgmmaPipeNoSwizzle,
}

impl FlashKernel {
    /// Every kernel under its name: the value of `KANDINSKY_FLASH` that selects it in the
    /// attention entry point, and `gpu_check`'s name for it.
    pub const NAMED: [(&'static str, FlashKernel); 6] = [
        ("wmma", Self::Wmma),
        ("mma", Self::Mma),
        ("wide", Self::Wide4),
        ("wide2", Self::Wide2),
        ("wgmma-pipe", Self::WgmmaPipe),
        ("wgmma-pipe-ns", Self::WgmmaPipeNoSwizzle),
    ];

    /// The kernel named `name` in [`Self::NAMED`].
    pub fn from_name(name: &str) -> Option<Self> {
        Self::NAMED
            .iter()
            .find(|(n, _)| *n == name)
            .map(|&(_, k)| k)
    }

    /// Whether this build has the kernel: every one but the wgmma kernels, which exist only
    /// when the kernels were built for compute capability 9.0 (`CUDA_COMPUTE_CAP=90`).
    pub fn is_built(self) -> bool {
        !self.is_wgmma() || cfg!(kandinsky_wgmma)
    }

    /// The `flash_attention_wgmma.cu` kernels (sm_90a only).
    fn is_wgmma(self) -> bool {
        matches!(self, Self::WgmmaPipe | Self::WgmmaPipeNoSwizzle)
    }

    /// `(queries per block, threads per block)`.
    fn block(self) -> (usize, u32) {
        match self {
            _ if self.is_wgmma() => (128, 256),
            Self::Wide4 => (128, 128),
            Self::Wide2 => (64, 64),
            _ => (64, 128),
        }
    }

    /// Whether the kernel has `[B, L, H, 64]` (token-major) entry points.
    pub fn reads_token_major(self) -> bool {
        self != Self::Wmma
    }

    /// `(entry point, module, PTX)` for the storage type and layout: entry points are named
    /// `{prefix}_{tm_}{f16|bf16}`.
    fn entry(
        self,
        dtype: DType,
        token_major: bool,
    ) -> candle_core::Result<(String, &'static str, &'static str)> {
        let ty = match dtype {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            dt => candle_core::bail!("flash attention: unsupported dtype {dt:?}"),
        };
        if self == Self::Wmma && token_major {
            candle_core::bail!("flash attention: the WMMA kernel reads [B, H, L, 64] only");
        }
        if !self.is_built() {
            candle_core::bail!(
                "flash attention: the wgmma kernels need the kernels built for compute \
                 capability 9.0 (CUDA_COMPUTE_CAP=90)"
            );
        }
        const WIDE: (&str, &str) = ("kandinsky_flash_attention_wide", FLASH_WIDE_PTX);
        const WGMMA: (&str, &str) = ("kandinsky_flash_attention_wgmma", FLASH_WGMMA_PTX);
        let (prefix, (module, ptx)) = match self {
            Self::Wmma => ("flash_attention", ("kandinsky_flash_attention", FLASH_PTX)),
            Self::Mma => (
                "flash_mma",
                ("kandinsky_flash_attention_mma", FLASH_MMA_PTX),
            ),
            Self::Wide4 => ("flash_wide4", WIDE),
            Self::Wide2 => ("flash_wide2", WIDE),
            Self::WgmmaPipe => ("flash_wgmma_pipe", WGMMA),
            Self::WgmmaPipeNoSwizzle => ("flash_wgmma_pipe_ns", WGMMA),
        };
        let tm = if token_major { "tm_" } else { "" };
        Ok((format!("{prefix}_{tm}{ty}"), module, ptx))
    }
}

/// Fused GroupNorm(+modulation)(+SiLU) of a contiguous `[B, C, ...]` tensor.
struct GroupNormOp {
    groups: usize,
    eps: f32,
    silu: bool,
    modulation: Option<KernelModulation>,
    /// The input's statistics, left by the kernel that wrote it (the statistics pass is
    /// skipped).
    stats: Option<GroupNormStats>,
}

/// A [`NormModulation`] as the kernel takes it: its kind (1 scale-shift, 2 spatial, as in
/// `group_norm.cu`) and the two tensors in the input's dtype (spatial maps contiguous).
struct KernelModulation {
    kind: i32,
    scale: Tensor,
    shift: Tensor,
}

impl KernelModulation {
    /// Per-channel values are read through their strides (the halves of the time projection
    /// in place); only a dtype change copies. Spatial maps are made contiguous.
    fn new(m: NormModulation<'_>, dtype: DType) -> candle_core::Result<Self> {
        Ok(match m {
            NormModulation::ScaleShift { scale, shift } => Self {
                kind: 1,
                scale: scale.to_dtype(dtype)?,
                shift: shift.to_dtype(dtype)?,
            },
            NormModulation::Spatial { scale, shift } => Self {
                kind: 2,
                scale: scale.to_dtype(dtype)?.contiguous()?,
                shift: shift.to_dtype(dtype)?.contiguous()?,
            },
        })
    }

    fn hold(&self) -> HeldModulation<'_, impl std::ops::Deref<Target = candle_core::Storage> + '_> {
        Some((
            self.kind,
            self.scale.storage_and_layout(),
            self.shift.storage_and_layout(),
        ))
    }
}

/// Batch and channel strides of a per-channel `[B, C, 1, …]` modulation tensor.
fn bc_strides(l: &Layout) -> (i64, i64) {
    let st = l.stride();
    (st[0] as i64, st.get(1).copied().unwrap_or(0) as i64)
}

/// The scalar kernel arguments of a [`KernelModulation`] (the kinds of `group_norm.cu`):
/// the batch/channel strides of scale and shift (kind 1), the spatial maps' size (kind 2).
#[derive(Debug, Clone, Copy)]
struct ModulationArgs {
    kind: i32,
    ssb: i64,
    ssc: i64,
    tsb: i64,
    tsc: i64,
    mh: i32,
    mw: i32,
}

impl ModulationArgs {
    const NONE: Self = Self {
        kind: 0,
        ssb: 0,
        ssc: 0,
        tsb: 0,
        tsc: 0,
        mh: 1,
        mw: 1,
    };

    fn new(kind: i32, scale: &Layout, shift: &Layout) -> Self {
        let (ssb, ssc) = bc_strides(scale);
        let (tsb, tsc) = bc_strides(shift);
        let (mh, mw) = if kind == 2 {
            let d = scale.shape().dims();
            (d[2] as i32, d[3] as i32)
        } else {
            (1, 1)
        };
        Self {
            kind,
            ssb,
            ssc,
            tsb,
            tsc,
            mh,
            mw,
        }
    }
}

/// A modulation's kind, storages (`G`: their read guards) and layouts while a kernel reads
/// them.
type HeldModulation<'a, G> = Option<(i32, (G, &'a Layout), (G, &'a Layout))>;

/// The modulation's scale and shift as kernel arguments, from their start offsets (kind 1
/// reads them through their strides); without a modulation `stand_in`, which the kernels
/// never read then.
fn modulation_views<'a, T, G>(
    m: &'a HeldModulation<'_, G>,
    stand_in: &cudarc::driver::CudaView<'a, T>,
    what: &str,
) -> candle_core::Result<(
    cudarc::driver::CudaView<'a, T>,
    cudarc::driver::CudaView<'a, T>,
)>
where
    T: candle_core::cuda_backend::CudaDType,
    G: std::ops::Deref<Target = candle_core::Storage>,
{
    let Some((_, (ss, sl), (ts, tl))) = m else {
        return Ok((stand_in.slice(..), stand_in.slice(..)));
    };
    let (candle_core::Storage::Cuda(sc), candle_core::Storage::Cuda(tc)) = (&**ss, &**ts) else {
        candle_core::bail!("{what} is not on the GPU");
    };
    Ok((
        sc.as_cuda_slice::<T>()?.slice(sl.start_offset()..),
        tc.as_cuda_slice::<T>()?.slice(tl.start_offset()..),
    ))
}

/// How `group_norm_stats_*` splits the groups of a `[B, C, hw]` map into blocks: enough
/// blocks to fill the GPU (~4 waves on 132 SMs), at least 4096 elements each; maps of a
/// multiple of 8 pixels take the kernels' 8-wide path, with chunks in multiples of 8 too (a
/// last split may then be empty, which the merge skips).
#[derive(Debug, Clone, Copy)]
struct StatsPlan {
    cpg: usize,
    group_elems: usize,
    splits: usize,
    chunk: usize,
    vec8: i32,
    blocks: usize,
}

impl StatsPlan {
    fn new(
        b: usize,
        c: usize,
        hw: usize,
        groups: usize,
        kernel: &str,
    ) -> candle_core::Result<Self> {
        if groups == 0 || c % groups != 0 {
            candle_core::bail!("{kernel}: {c} channels do not split into {groups} groups");
        }
        let cpg = c / groups;
        let group_elems = cpg * hw;
        if group_elems > i32::MAX as usize {
            candle_core::bail!("{kernel}: {group_elems} elements per group, at most 2^31 - 1");
        }
        let splits = (528usize.div_ceil(b * groups)).clamp(1, group_elems.div_ceil(4096).max(1));
        let vec8 = i32::from(hw % 8 == 0);
        let chunk = if vec8 == 1 {
            group_elems.div_ceil(splits).div_ceil(8) * 8
        } else {
            group_elems.div_ceil(splits)
        };
        Ok(Self {
            cpg,
            group_elems,
            splits,
            chunk,
            vec8,
            blocks: b * groups * splits,
        })
    }

    /// The grid of both group-norm kernels.
    fn launch_config(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.blocks as u32, 1, 1),
            block_dim: (512, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Run `group_norm_stats_{suffix}` over `x`: (count, mean, M2) per block.
    fn launch<T: candle_core::cuda_backend::CudaDType>(
        &self,
        dev: &candle_core::CudaDevice,
        x: &cudarc::driver::CudaView<'_, T>,
        suffix: &str,
    ) -> candle_core::Result<cudarc::driver::CudaSlice<f32>> {
        let partial = dev.alloc_zeros::<f32>(3 * self.blocks)?;
        let f = dev.get_or_load_custom_func(
            &format!("group_norm_stats_{suffix}"),
            "kandinsky_group_norm",
            GROUP_NORM_PTX,
        )?;
        let (ge, ch, sp) = (
            self.group_elems as i64,
            self.chunk as i64,
            self.splits as i32,
        );
        let mut s = f.builder();
        s.arg(x);
        s.arg(&partial);
        s.arg(&ge);
        s.arg(&ch);
        s.arg(&sp);
        s.arg(&self.vec8);
        unsafe { s.launch(self.launch_config()) }.w()?;
        Ok(partial)
    }
}

impl CustomOp3 for GroupNormOp {
    cuda_only!(
        "kandinsky-group-norm",
        3,
        "kandinsky-group-norm is a CUDA kernel; the CPU uses nn::GroupNorm's plain path"
    );

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let xo = contiguous_start(xl, "group-norm kernel: the input")?;
        let wo = contiguous_start(wl, "group-norm kernel: the weight")?;
        let bo = contiguous_start(bl, "group-norm kernel: the bias")?;
        let dims = xl.shape().dims();
        let (b, c) = (dims[0], dims[1]);
        let hw: usize = dims[2..].iter().product();
        let plan = StatsPlan::new(b, c, hw, self.groups, "group-norm kernel")?;
        if let Some(st) = &self.stats {
            st.check(b, c, hw, self.groups)?;
        }
        let given = self
            .stats
            .as_ref()
            .map(|st| st.partial.storage_and_layout());
        let psplits = self.stats.as_ref().map_or(plan.splits, |st| st.splits) as i32;
        let dev = xs.device().clone();
        let cfg = plan.launch_config();
        let modulation = self.modulation.as_ref().and_then(KernelModulation::hold);
        let margs = match &modulation {
            None => ModulationArgs::NONE,
            Some((kind, (_, sl), (_, tl))) => ModulationArgs::new(*kind, sl, tl),
        };
        let width = if margs.kind == 2 { dims[3] as i32 } else { 1 };
        let (ge, ch, sp, gr, cp, hw64, silu) = (
            plan.group_elems as i64,
            plan.chunk as i64,
            plan.splits as i32,
            self.groups as i32,
            plan.cpg as i32,
            hw as i64,
            self.silu as i32,
        );
        macro_rules! launch {
            ($t:ty, $suf:literal) => {{
                let x = xs.as_cuda_slice::<$t>()?.slice(xo..);
                let w = ws.as_cuda_slice::<$t>()?.slice(wo..);
                let bias = bs.as_cuda_slice::<$t>()?.slice(bo..);
                let (mscale, mshift) =
                    modulation_views::<$t, _>(&modulation, &x, "group-norm modulation")?;
                let partial = NormPartial::new(
                    &given,
                    &plan,
                    &dev,
                    &x,
                    $suf,
                    "group-norm kernel: the statistics",
                )?;
                let partial = partial.view();
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
                a.arg(&psplits);
                a.arg(&out);
                a.arg(&ge);
                a.arg(&ch);
                a.arg(&sp);
                a.arg(&gr);
                a.arg(&cp);
                a.arg(&hw64);
                a.arg(&self.eps);
                a.arg(&silu);
                a.arg(&mscale);
                a.arg(&mshift);
                a.arg(&margs.kind);
                a.arg(&margs.ssb);
                a.arg(&margs.ssc);
                a.arg(&margs.tsb);
                a.arg(&margs.tsc);
                a.arg(&margs.mh);
                a.arg(&margs.mw);
                a.arg(&width);
                a.arg(&plan.vec8);
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

/// Fused GroupNorm, then the optional `modulation`, then SiLU when `silu`, on a CUDA tensor
/// `[B, C, ...]` in one pass over the output. Statistics and the modulation arithmetic in f32,
/// one rounding to the input's dtype at the end; `stats`: the statistics of `x` where the
/// kernel that wrote it left them. The caller has checked the modulation's shapes
/// ([`NormModulation`]'s `check`).
pub fn group_norm(
    x: &Tensor,
    norm: &crate::nn::GroupNorm,
    modulation: Option<NormModulation<'_>>,
    silu: bool,
    stats: Option<&GroupNormStats>,
) -> candle_core::Result<Tensor> {
    let (weight, bias, groups, eps) = norm.parts();
    let x = x.contiguous()?;
    let w = weight.to_dtype(x.dtype())?.contiguous()?;
    let b = bias.to_dtype(x.dtype())?.contiguous()?;
    let modulation = modulation
        .map(|m| KernelModulation::new(m, x.dtype()))
        .transpose()?;
    x.apply_op3_no_bwd(
        &w,
        &b,
        &GroupNormOp {
            groups,
            eps: eps as f32,
            silu,
            modulation,
            stats: stats.cloned(),
        },
    )
}

/// `(free, total)` bytes of the current CUDA device's memory.
pub fn mem_info() -> candle_core::Result<(usize, usize)> {
    cudarc::driver::result::mem_get_info()
        .map_err(|e| candle_core::Error::Msg(format!("cuMemGetInfo: {e:?}")))
}

fn driver_err(what: &str, e: cudarc::driver::DriverError) -> candle_core::Error {
    candle_core::Error::Msg(format!("{what}: {e:?}"))
}

/// The number of streaming multiprocessors of `dev`'s GPU.
pub fn multiprocessors(dev: &candle_core::Device) -> candle_core::Result<usize> {
    let candle_core::Device::Cuda(d) = dev else {
        candle_core::bail!("multiprocessors: {dev:?} is not a CUDA device");
    };
    let n = d
        .cuda_stream()
        .context()
        .attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )
        .map_err(|e| driver_err("multiprocessor count", e))?;
    Ok(n.max(1) as usize)
}

/// The default (stream-ordered) memory pool of `dev`'s GPU, with its context bound.
fn default_pool(
    dev: &candle_core::CudaDevice,
) -> candle_core::Result<cudarc::driver::sys::CUmemoryPool> {
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    ctx.bind_to_thread()
        .map_err(|e| driver_err("cuCtxSetCurrent", e))?;
    // SAFETY: the device handle comes from a live context.
    unsafe { cudarc::driver::result::device::get_default_mem_pool(ctx.cu_device()) }
        .map_err(|e| driver_err("cuDeviceGetDefaultMemPool", e))
}

fn set_pool_u64(
    dev: &candle_core::CudaDevice,
    attr: cudarc::driver::sys::CUmemPool_attribute,
    mut value: u64,
) -> candle_core::Result<()> {
    let pool = default_pool(dev)?;
    // SAFETY: both attributes used here (release threshold, used-memory high watermark)
    // take a cuuint64_t, which `value` is.
    unsafe {
        cudarc::driver::result::mem_pool::set_attribute(pool, attr, (&mut value as *mut u64).cast())
    }
    .map_err(|e| driver_err("cuMemPoolSetAttribute", e))
}

/// See [`crate::device::tune_cuda`]: keep freed memory in the pool, no per-buffer events.
pub(crate) fn tune(dev: &candle_core::CudaDevice) -> candle_core::Result<()> {
    use cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
    // Event tracking only orders work across streams: candle runs a device's work on one
    // stream, and cudarc never waits on these events outside multi-stream mode, so they are
    // pure overhead (two event creations and destructions per buffer).
    // SAFETY: kandinsky-rs never creates a second stream on this context.
    unsafe { dev.disable_event_tracking() };
    set_pool_u64(dev, CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, u64::MAX)
}

/// See [`crate::device::cuda_pool_trim`].
pub(crate) fn pool_trim(dev: &candle_core::CudaDevice) -> candle_core::Result<()> {
    use candle_core::backend::BackendDevice;
    dev.synchronize()?;
    let pool = default_pool(dev)?;
    // SAFETY: a valid pool; trimming only releases memory no allocation holds.
    unsafe { cudarc::driver::result::mem_pool::trim_to(pool, 0) }
        .map_err(|e| driver_err("cuMemPoolTrimTo", e))
}

/// Peak bytes allocated from `dev`'s memory pool since the last [`pool_reset_peak`] (or
/// since the process started): the true peak of what candle's tensors held, the number
/// comparable to PyTorch's `torch.cuda.max_memory_allocated`.
pub fn pool_peak_bytes(dev: &candle_core::CudaDevice) -> candle_core::Result<u64> {
    use cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
    let pool = default_pool(dev)?;
    let mut value = 0u64;
    // SAFETY: CU_MEMPOOL_ATTR_USED_MEM_HIGH is a cuuint64_t.
    unsafe {
        cudarc::driver::result::mem_pool::get_attribute(
            pool,
            CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            (&mut value as *mut u64).cast(),
        )
    }
    .map_err(|e| driver_err("cuMemPoolGetAttribute", e))?;
    Ok(value)
}

/// Restart [`pool_peak_bytes`] from the memory in use now.
pub fn pool_reset_peak(dev: &candle_core::CudaDevice) -> candle_core::Result<()> {
    use cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
    // The driver only accepts 0 here: the watermark restarts from the current use.
    set_pool_u64(dev, CU_MEMPOOL_ATTR_USED_MEM_HIGH, 0)
}

/// Flash attention over one or two key/value segments (`q`, `k1`, `v1` are the op's inputs;
/// the optional second segment rides along in the op).
struct FlashOp {
    second: Option<(Tensor, Tensor)>,
    scale: f32,
    kernel: FlashKernel,
    /// Every tensor `[B, L, H, 64]` (the mma kernel's `flash_mma_tm_*` entry points) instead
    /// of `[B, H, L, 64]`.
    token_major: bool,
}

fn cuda_ptr_check(l: &Layout, what: &str) -> candle_core::Result<usize> {
    let o = contiguous_start(l, &format!("flash attention: {what}"))?;
    if o % 8 != 0 {
        candle_core::bail!("flash attention: {what} starts at an unaligned offset {o}");
    }
    Ok(o)
}

impl CustomOp3 for FlashOp {
    cuda_only!("kandinsky-flash-attention", 3);

    fn cuda_fwd(
        &self,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let tm = self.token_major;
        // (batch, heads, length, head size) whichever the layout.
        let bhld = |l: &Layout| -> candle_core::Result<(usize, usize, usize, usize)> {
            let (a, b, c, d) = l.shape().dims4()?;
            Ok(if tm { (a, c, b, d) } else { (a, b, c, d) })
        };
        let (b, h, lq, d) = bhld(ql)?;
        let l1 = bhld(kl)?.2;
        if d != 64 {
            candle_core::bail!("flash attention: head size {d}, the kernel takes 64");
        }
        let (qo, ko, vo) = (
            cuda_ptr_check(ql, "q")?,
            cuda_ptr_check(kl, "k")?,
            cuda_ptr_check(vl, "v")?,
        );
        let dev = qs.device().clone();
        let second = self
            .second
            .as_ref()
            .map(|(k, v)| (k.storage_and_layout(), v.storage_and_layout()));
        let (rows, threads) = self.kernel.block();
        let cfg = LaunchConfig {
            grid_dim: (lq.div_ceil(rows) as u32, (b * h) as u32, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let (name, module, ptx) = self.kernel.entry(qs.dtype(), tm)?;
        macro_rules! launch {
            ($t:ty) => {{
                let q = qs.as_cuda_slice::<$t>()?.slice(qo..);
                let k1 = ks.as_cuda_slice::<$t>()?.slice(ko..);
                let v1 = vs.as_cuda_slice::<$t>()?.slice(vo..);
                let (k2, v2, l2) = match &second {
                    Some(((k2s, k2l), (v2s, v2l))) => {
                        let (candle_core::Storage::Cuda(k2c), candle_core::Storage::Cuda(v2c)) =
                            (&**k2s, &**v2s)
                        else {
                            candle_core::bail!("flash attention: second segment is not on the GPU");
                        };
                        let k2o = cuda_ptr_check(k2l, "k2")?;
                        let v2o = cuda_ptr_check(v2l, "v2")?;
                        (
                            k2c.as_cuda_slice::<$t>()?.slice(k2o..),
                            v2c.as_cuda_slice::<$t>()?.slice(v2o..),
                            bhld(k2l)?.2,
                        )
                    }
                    None => (
                        ks.as_cuda_slice::<$t>()?.slice(ko..),
                        vs.as_cuda_slice::<$t>()?.slice(vo..),
                        0,
                    ),
                };
                let out = unsafe { dev.alloc::<$t>(b * h * lq * d)? };
                let f = dev.get_or_load_custom_func(&name, module, ptx)?;
                let (l1i, l2i, lqi, hi) = (l1 as i32, l2 as i32, lq as i32, h as i32);
                let mut a = f.builder();
                a.arg(&q);
                a.arg(&k1);
                a.arg(&v1);
                a.arg(&l1i);
                a.arg(&k2);
                a.arg(&v2);
                a.arg(&l2i);
                a.arg(&out);
                a.arg(&lqi);
                a.arg(&self.scale);
                if tm {
                    a.arg(&hi);
                }
                unsafe { a.launch(cfg) }.w()?;
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match qs.dtype() {
            DType::F16 => launch!(half::f16),
            DType::BF16 => launch!(half::bf16),
            dt => candle_core::bail!("flash attention: unsupported dtype {dt:?}"),
        };
        Ok((out, ql.shape().clone()))
    }
}

/// Whether the attention entry point dispatches to [`flash_attention`]: CUDA, f16 or bf16,
/// head size 64, one or two key segments, no mask. (bf16 joined once both kernels multiplied
/// V by a two-term split of the probabilities: measured on an H200 at every UNet level,
/// ≤ 2.2e-3 relative error against f32, bar 1e-2.)
pub fn flash_covers(q: &Tensor, segments: usize, masked: bool) -> bool {
    q.device().is_cuda()
        && matches!(q.dtype(), DType::F16 | DType::BF16)
        && q.dims().len() == 4
        && q.dims()[3] == 64
        && (1..=2).contains(&segments)
        && !masked
}

/// `softmax(q·kᵀ·scale)·v` with the keys/values of `kv` (one or two `(k, v)` segments,
/// `[B, H, L_i, 64]`) read in place; `q` `[B, H, Lq, 64]`; the mma kernel (the attention
/// entry point picks its kernel by dtype and card).
pub fn flash_attention(
    q: &Tensor,
    kv: &[(&Tensor, &Tensor)],
    scale: f64,
) -> candle_core::Result<Tensor> {
    flash_attention_with(q, kv, scale, FlashKernel::Mma)
}

/// [`flash_attention`] with a chosen kernel (for `gpu_check`'s side-by-side checks).
pub fn flash_attention_with(
    q: &Tensor,
    kv: &[(&Tensor, &Tensor)],
    scale: f64,
    kernel: FlashKernel,
) -> candle_core::Result<Tensor> {
    flash_op(q, kv, scale, kernel, false)
}

/// [`flash_attention_with`] with every tensor token-major, `[B, L, H, 64]` — the layout the
/// projections produce, so neither the heads' split nor their merge is a copy (returns
/// `[B, Lq, H, 64]`; every kernel but the WMMA one). The entry point's layout since GPU run
/// 10 (same error against f32 as head-major; the 768 px UNet step 1.9 ms faster without the
/// head copies); `KANDINSKY_FLASH_TOKEN_MAJOR=0` turns it off.
pub fn flash_attention_token_major(
    q: &Tensor,
    kv: &[(&Tensor, &Tensor)],
    scale: f64,
    kernel: FlashKernel,
) -> candle_core::Result<Tensor> {
    flash_op(q, kv, scale, kernel, true)
}

fn flash_op(
    q: &Tensor,
    kv: &[(&Tensor, &Tensor)],
    scale: f64,
    kernel: FlashKernel,
    token_major: bool,
) -> candle_core::Result<Tensor> {
    let q = q.contiguous()?;
    let (k1, v1) = (kv[0].0.contiguous()?, kv[0].1.contiguous()?);
    let second = match kv.get(1) {
        Some((k, v)) => Some((k.contiguous()?, v.contiguous()?)),
        None => None,
    };
    q.apply_op3_no_bwd(
        &k1,
        &v1,
        &FlashOp {
            second,
            scale: scale as f32,
            kernel,
            token_major,
        },
    )
}

const CONV_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/conv.ptx"));
const CONV_GEMM_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/conv_gemm.ptx"));
const CONV_GEMM_WGMMA_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/conv_gemm_wgmma.ptx"));

/// The shifted-GEMM convolution of [`crate::gpu_conv::ShiftedConv`] (`x`, the weight taps
/// `[k, Cout, k·Cin]` are the op's inputs; bias and residual ride along).
struct ShiftedConvOp {
    k: usize,
    /// `(top, bottom, left, right)` zero padding.
    pad: [usize; 4],
    upsample2x: bool,
    bias: Option<Tensor>,
    residual: Option<Tensor>,
    /// Normalise the input on read (`conv_shift_norm_*`).
    norm: Option<ConvNorm>,
    /// What sums the kernel rows (already checked to cover the dtype and channels).
    gemm: crate::gpu_conv::ConvGemm,
    /// With `Some(groups)` (cuBLAS path only) the crop kernel also leaves the output's
    /// GroupNorm statistics in that many groups, in `stats_out` ([`StatsOut::stash`]), taken
    /// out after the call (a custom op returns one tensor).
    stats_groups: Option<usize>,
    stats_out: std::sync::Mutex<Option<CudaStorage>>,
}

/// The buffer of the statistics a kernel leaves for the norm that reads its output (the crop,
/// the concatenation; `StatsOut` in welford.cuh), while the kernel fills it.
struct StatsOut {
    buf: cudarc::driver::CudaSlice<f32>,
    /// batch·groups.
    bg: usize,
}

impl StatsOut {
    /// The f32 buffer for `bg` = batch·groups groups and `blocks` blocks: the merged
    /// `(count, mean, M2)` per group first (`[bg, 3]`, what the norm reads), then the
    /// per-group counts of finished blocks (`bg` u32, zeroed before the launch), then one slot
    /// per block. Returns `(count offset, slot offset, length)`.
    fn layout(bg: usize, blocks: usize) -> (usize, usize, usize) {
        (3 * bg, 4 * bg, 4 * bg + 3 * blocks)
    }

    /// A [`Self::layout`] buffer for `bg` groups and `blocks` blocks with only its counts
    /// zeroed (the slots and the merged statistics are written before they are read).
    fn new(dev: &candle_core::CudaDevice, bg: usize, blocks: usize) -> candle_core::Result<Self> {
        let (counts, slots, len) = Self::layout(bg, blocks);
        let mut buf = unsafe { dev.alloc::<f32>(len)? };
        dev.cuda_stream()
            .memset_zeros(&mut buf.slice_mut(counts..slots))
            .w()?;
        Ok(Self { buf, bg })
    }

    /// The kernel's `stats`, `partial` and `done` arguments. The counts are u32 in the f32
    /// buffer: the kernel takes an address.
    fn args(&self) -> [cudarc::driver::CudaView<'_, f32>; 3] {
        let (counts, slots, _) = Self::layout(self.bg, 0);
        [
            self.buf.slice(..counts),
            self.buf.slice(slots..),
            self.buf.slice(counts..slots),
        ]
    }

    /// Hand the filled buffer to the op's `slot`, taken out after the call
    /// ([`take_left_stats`]).
    fn stash(
        self,
        slot: &std::sync::Mutex<Option<CudaStorage>>,
        dev: &candle_core::CudaDevice,
    ) -> candle_core::Result<()> {
        *slot
            .lock()
            .map_err(|_| candle_core::Error::Msg("statistics buffer lock".into()))? =
            Some(CudaStorage::wrap_cuda_slice(self.buf, dev.clone()));
        Ok(())
    }
}

/// The statistics an op left in `slot` ([`StatsOut::stash`]) for its `[b, c, hw]` output in
/// `groups` groups, where it was asked for them: the merged partials leading the buffer, one
/// per group.
fn take_left_stats(
    slot: std::sync::Mutex<Option<CudaStorage>>,
    groups: Option<usize>,
    dims: (usize, usize, usize),
) -> candle_core::Result<Option<GroupNormStats>> {
    let buf = slot
        .into_inner()
        .map_err(|_| candle_core::Error::Msg("statistics buffer lock".into()))?;
    let (Some(groups), Some(buf)) = (groups, buf) else {
        return Ok(None);
    };
    let len = buf.as_cuda_slice::<f32>()?.len();
    let buf = Tensor::from_storage(
        candle_core::Storage::Cuda(buf),
        len,
        candle_core::op::BackpropOp::none(),
        false,
    );
    let bg = dims.0 * groups;
    Ok(Some(GroupNormStats {
        partial: buf.narrow(0, 0, 3 * bg)?.reshape((bg, 3))?,
        dims,
        groups,
        splits: 1,
    }))
}

/// The scalar arguments of `conv_shift_norm_*` after the input and geometry.
struct NormScalars {
    splits: i32,
    cpg: i32,
    eps: f32,
    silu: i32,
    margs: ModulationArgs,
    row0: i32,
    hfull: i32,
}

/// The statistics `conv_shift_norm_*` reads: computed for this call, or a whole map's.
enum NormPartial<'a> {
    Own(cudarc::driver::CudaSlice<f32>),
    Given(cudarc::driver::CudaView<'a, f32>),
}

impl<'a> NormPartial<'a> {
    /// The `given` statistics (a held storage and its layout), or `plan`'s pass over `x`.
    fn new<T, G>(
        given: &'a Option<(G, &Layout)>,
        plan: &StatsPlan,
        dev: &candle_core::CudaDevice,
        x: &cudarc::driver::CudaView<'_, T>,
        suffix: &str,
        what: &str,
    ) -> candle_core::Result<Self>
    where
        T: candle_core::cuda_backend::CudaDType,
        G: std::ops::Deref<Target = candle_core::Storage>,
    {
        Ok(match given {
            Some((st, l)) => Self::Given(cuda_view::<f32>(st, l, what)?),
            None => Self::Own(plan.launch::<T>(dev, x, suffix)?),
        })
    }

    /// The statistics as a kernel argument.
    fn view(&self) -> cudarc::driver::CudaView<'_, f32> {
        match self {
            Self::Own(p) => p.slice(..),
            Self::Given(p) => p.slice(..),
        }
    }
}

/// The GroupNorm (+ modulation) (+ SiLU) a [`ShiftedConvOp`] applies to its input on read;
/// `gamma`/`beta` `[Cin]` contiguous in the input's dtype.
struct ConvNorm {
    gamma: Tensor,
    beta: Tensor,
    groups: usize,
    eps: f32,
    silu: bool,
    modulation: Option<KernelModulation>,
    /// The input is rows `[row0, row0 + H)` of a map `hfull` rows high whose statistics are
    /// given ([`group_norm_stats`]); `None`: the input is the whole map.
    band: Option<NormBand>,
}

/// A band of rows of a larger map, normalised with the whole map's statistics.
#[derive(Debug, Clone)]
pub struct NormBand {
    /// The whole map's [`group_norm_stats`].
    pub stats: GroupNormStats,
    /// The band's first row in the whole map.
    pub row0: usize,
    /// The whole map's height.
    pub hfull: usize,
}

/// GroupNorm statistics of a map: (count, mean, M2) per block of `group_norm_stats_*`
/// (`splits` per group), or one per group as the convolution's crop kernel leaves them for
/// its output ([`shifted_conv_with_stats`]), as the normalising kernels merge them.
#[derive(Debug, Clone)]
pub struct GroupNormStats {
    /// `[B·groups·splits, 3]` f32.
    partial: Tensor,
    /// `(B, C, H·W)` of the map.
    dims: (usize, usize, usize),
    groups: usize,
    /// Partials per group.
    splits: usize,
}

impl GroupNormStats {
    /// That these are statistics of a `[b, c, hw]` map in `groups` groups (the caller's
    /// promise that they are of that very map is not checkable).
    fn check(&self, b: usize, c: usize, hw: usize, groups: usize) -> candle_core::Result<()> {
        if self.dims != (b, c, hw)
            || self.groups != groups
            || self.partial.dims() != [b * groups * self.splits, 3]
        {
            candle_core::bail!(
                "GroupNorm statistics of a {:?} map in {} groups ({:?} partials) given for a \
                 {:?} map in {groups} groups",
                self.dims,
                self.groups,
                self.partial.dims(),
                (b, c, hw)
            );
        }
        Ok(())
    }
}

/// `group_norm_stats_*` over a contiguous `[B, C, H, W]` map, as a tensor.
struct GroupNormStatsOp {
    groups: usize,
}

impl candle_core::CustomOp1 for GroupNormStatsOp {
    cuda_only!("kandinsky-group-norm-stats", 1);

    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let xo = contiguous_start(xl, "group-norm statistics: the input")?;
        let (b, c, h, w) = xl.shape().dims4()?;
        let plan = StatsPlan::new(b, c, h * w, self.groups, "group-norm statistics")?;
        let dev = xs.device().clone();
        let partial = match xs.dtype() {
            DType::F32 => plan.launch(&dev, &xs.as_cuda_slice::<f32>()?.slice(xo..), "f32")?,
            DType::F16 => {
                plan.launch(&dev, &xs.as_cuda_slice::<half::f16>()?.slice(xo..), "f16")?
            }
            DType::BF16 => {
                plan.launch(&dev, &xs.as_cuda_slice::<half::bf16>()?.slice(xo..), "bf16")?
            }
            dt => candle_core::bail!("group-norm statistics: unsupported dtype {dt:?}"),
        };
        Ok((
            CudaStorage::wrap_cuda_slice(partial, dev),
            Shape::from((plan.blocks, 3)),
        ))
    }
}

/// The GroupNorm statistics of `x` `[B, C, H, W]` in `groups` groups (f32), for normalising
/// bands of its rows on read ([`NormBand`]).
pub fn group_norm_stats(x: &Tensor, groups: usize) -> candle_core::Result<GroupNormStats> {
    let x = x.contiguous()?;
    let (b, c, h, w) = x.dims4()?;
    let splits = StatsPlan::new(b, c, h * w, groups, "group-norm statistics")?.splits;
    Ok(GroupNormStats {
        partial: x.apply_op1_no_bwd(&GroupNormStatsOp { groups })?,
        dims: (b, c, h * w),
        groups,
        splits,
    })
}

/// A contiguous layout's start offset, or an error naming `what` (the kernel and the tensor).
fn contiguous_start(l: &Layout, what: &str) -> candle_core::Result<usize> {
    l.contiguous_offsets()
        .map(|(o, _)| o)
        .ok_or_else(|| candle_core::Error::Msg(format!("{what} must be contiguous")))
}

/// The start offset and the plane stride (elements from one `(b, c)` map to the next) of a
/// `[B, C, H, W]` layout whose rows are contiguous: a contiguous map (`H·W`), or a band of
/// rows of a taller contiguous map (`narrow` on dimension 2: the taller map's `H·W`), which
/// the convolution kernels read in place.
fn row_band(l: &Layout, what: &str) -> candle_core::Result<(usize, usize)> {
    let dims = l.shape().dims();
    if let ([_, _, h, w], Some((o, _))) = (dims, l.contiguous_offsets()) {
        return Ok((o, h * w));
    }
    if let ([b, c, h, w], s) = (dims, l.stride()) {
        let (b, c, h, w) = (*b, *c, *h, *w);
        // A dimension of size 1 has no meaningful stride.
        let plane = if c > 1 { s[1] } else { s[0] };
        if (w <= 1 || s[3] == 1)
            && (h <= 1 || s[2] == w)
            && plane >= h * w
            && (b <= 1 || c <= 1 || s[0] == c * plane)
        {
            return Ok((l.start_offset(), plane));
        }
    }
    candle_core::bail!(
        "{what} must be a contiguous [B, C, H, W] map or a band of rows of one (shape {:?}, \
         strides {:?})",
        dims,
        l.stride()
    )
}

/// The CUDA data of a storage laid out as [`row_band`] allows, from its start, and the plane
/// stride.
fn cuda_band_view<'a, T: candle_core::cuda_backend::CudaDType>(
    st: &'a candle_core::Storage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<(cudarc::driver::CudaView<'a, T>, usize)> {
    let candle_core::Storage::Cuda(cs) = st else {
        candle_core::bail!("{what} is not on the GPU");
    };
    let (o, plane) = row_band(l, what)?;
    Ok((cs.as_cuda_slice::<T>()?.slice(o..), plane))
}

/// The contiguous CUDA data of a storage (an optional input riding along with an op).
fn cuda_view<'a, T: candle_core::cuda_backend::CudaDType>(
    st: &'a candle_core::Storage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<cudarc::driver::CudaView<'a, T>> {
    let candle_core::Storage::Cuda(cs) = st else {
        candle_core::bail!("{what} is not on the GPU");
    };
    let o = contiguous_start(l, what)?;
    Ok(cs.as_cuda_slice::<T>()?.slice(o..))
}

impl candle_core::CustomOp2 for ShiftedConvOp {
    cuda_only!("kandinsky-shifted-conv", 2);

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        use crate::gpu_conv::ConvGemm;
        use cudarc::cublas::sys as cb;
        use cudarc::driver::{DevicePtr, DevicePtrMut};
        let (b, c, h, w) = xl.shape().dims4()?;
        let (k, cout, kc) = wl.shape().dims3()?;
        if k != self.k || kc != k * c {
            candle_core::bail!(
                "shifted convolution: weight taps {:?} do not fit a {}x{} kernel over {c} channels",
                wl.shape().dims(),
                self.k,
                self.k
            );
        }
        // A band of rows of a taller map is read in place (`plane`: its maps' stride); its
        // norm on read needs the taller map's statistics, given.
        let (xo, plane) = row_band(xl, "shifted convolution: the input")?;
        if plane != h * w && self.norm.as_ref().is_some_and(|nm| nm.band.is_none()) {
            candle_core::bail!(
                "shifted convolution: a band of rows normalised on read needs the whole map's \
                 statistics"
            );
        }
        let wo = contiguous_start(wl, "shifted convolution: the weight")?;
        let [pt, _, pl, _] = self.pad;
        let up = usize::from(self.upsample2x);
        let g = crate::gpu_conv::Geometry::new(
            h,
            w,
            k,
            self.pad,
            self.upsample2x,
            self.gemm.one_copy(),
        )
        .map_err(candle_core::Error::wrap)?;
        let (hp, wp, oh, ow) = (g.hp, g.wp, g.oh, g.ow);
        let (n, s) = (oh * wp, hp * wp);
        // The kernels index one channel's map, the output rows and the GEMM sizes in 32 bits.
        if [b * k * c, b * cout * oh, s, n]
            .iter()
            .any(|&v| v > i32::MAX as usize)
        {
            candle_core::bail!(
                "shifted convolution: a padded {hp}x{wp} map of {c} channels is too large for 32-bit indices"
            );
        }
        let dev = xs.device().clone();
        let stream = dev.cuda_stream();
        let blas = dev.cublas_handle();
        let residual = match &self.residual {
            Some(r) => {
                if r.dims() != [b, cout, oh, ow] {
                    candle_core::bail!(
                        "shifted convolution: residual {:?}, output [{b}, {cout}, {oh}, {ow}]",
                        r.dims()
                    );
                }
                Some(r.storage_and_layout())
            }
            None => None,
        };
        // Rows per (b, c) map of the residual: `oh`, or a taller map's for a band of its rows
        // (read in place by the crop kernel; the fused GEMM kernels take contiguous ones).
        let res_rows = match &residual {
            Some((_, l)) => {
                let plane = row_band(l, "shifted convolution: the residual")?.1;
                if ow == 0 || plane % ow != 0 || (plane != oh * ow && self.gemm != ConvGemm::Cublas)
                {
                    candle_core::bail!(
                        "shifted convolution: a residual with maps of {plane} elements, output \
                         rows of {ow} on {:?}",
                        self.gemm
                    );
                }
                plane / ow
            }
            None => oh,
        };
        let bias = self.bias.as_ref().map(|t| t.storage_and_layout());
        // The normalisation on read: its statistics' plan and scalar arguments, its tensors
        // held while the kernel runs.
        let norm = match &self.norm {
            Some(nm) => {
                if nm.gamma.dims() != [c] || nm.beta.dims() != [c] {
                    candle_core::bail!(
                        "shifted convolution: norm weight {:?} / bias {:?} for {c} channels",
                        nm.gamma.dims(),
                        nm.beta.dims()
                    );
                }
                // The statistics' plan when this call computes them; given ones (of the whole
                // map, for a band of its rows) bring their own partial count.
                let plan = StatsPlan::new(b, c, h * w, nm.groups, "shifted convolution: the norm")?;
                let splits = match &nm.band {
                    None => plan.splits,
                    Some(band) => {
                        if band.row0 + h > band.hfull {
                            candle_core::bail!(
                                "shifted convolution: rows {}..{} of a {}-row map",
                                band.row0,
                                band.row0 + h,
                                band.hfull
                            );
                        }
                        band.stats.check(b, c, band.hfull * w, nm.groups)?;
                        band.stats.splits
                    }
                };
                let held = nm.modulation.as_ref().and_then(KernelModulation::hold);
                let margs = match &held {
                    None => ModulationArgs::NONE,
                    Some((kind, (_, sl), (_, tl))) => ModulationArgs::new(*kind, sl, tl),
                };
                let (row0, hfull) = nm.band.as_ref().map_or((0, h), |bd| (bd.row0, bd.hfull));
                let scalars = NormScalars {
                    splits: splits as i32,
                    cpg: plan.cpg as i32,
                    eps: nm.eps,
                    silu: i32::from(nm.silu),
                    margs,
                    row0: row0 as i32,
                    hfull: hfull as i32,
                };
                let given = nm
                    .band
                    .as_ref()
                    .map(|bd| bd.stats.partial.storage_and_layout());
                Some((
                    plan,
                    scalars,
                    held,
                    nm.gamma.storage_and_layout(),
                    nm.beta.storage_and_layout(),
                    given,
                ))
            }
            None => None,
        };
        // conv_shift: one block row per (b, dx, c), 8 positions per thread; the one-copy
        // kernels read the padded map alone (dx = 0; 16 elements of slack for their shifted
        // reads past its end).
        let copies = if self.gemm.one_copy() { 1 } else { k };
        let slack = if self.gemm.one_copy() { 16 } else { 0 };
        let shift_cfg = LaunchConfig {
            grid_dim: ((b * copies * c) as u32, s.div_ceil(8 * 256) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let rows = b * cout * oh;
        // The output's statistics: in `groups` groups of whole channels (cuBLAS path).
        let stats_groups = match self.stats_groups {
            Some(g) if g > 0 && cout % g == 0 && self.gemm == ConvGemm::Cublas => Some(g),
            Some(g) => candle_core::bail!(
                "shifted convolution: statistics in {g} groups of {cout} channels on {:?}",
                self.gemm
            ),
            None => None,
        };
        let (tx, ty) = crate::gpu_conv::finish_block(ow, stats_groups.map(|g| cout / g * oh));
        let per_group = stats_groups.map_or(0, |g| cout / g * oh / ty);
        let finish_cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(ty) as u32, 1, 1),
            block_dim: (tx as u32, ty as u32, 1),
            shared_mem_bytes: 0,
        };
        // A 1×1 convolution without padding, upsampling or norm over rows already a multiple
        // of 8 wide (the UNet's shortcuts): its copy would equal the input, so the GEMM reads
        // the input in place.
        let direct = g.reads_input_in_place(k, self.pad, w)
            && norm.is_none()
            && plane == h * w
            && b * c * s > 0;
        let args_i32 = [c, h, w, up, pt, pl, hp, wp].map(|v| v as i32);
        let (s64, k32, copies32, c32) = (s as i64, k as i32, copies as i32, c as i32);
        let (rows32, cout32, oh32, ow32, wp32) =
            (rows as i32, cout as i32, oh as i32, ow as i32, wp as i32);
        let (plane64, res_rows32) = (plane as i64, res_rows as i32);
        macro_rules! launch {
            ($t:ty, $suf:literal, $cuda_t:expr) => {{
                let x = xs.as_cuda_slice::<$t>()?.slice(xo..);
                let x3_own = if direct {
                    None
                } else {
                    let mut x3 = unsafe { dev.alloc::<$t>(b * copies * c * s + slack)? };
                    let name = if norm.is_some() {
                        concat!("conv_shift_norm_", $suf)
                    } else {
                        concat!("conv_shift_", $suf)
                    };
                    let f = dev.get_or_load_custom_func(name, "kandinsky_conv", CONV_PTX)?;
                    let mut a = f.builder();
                    a.arg(&x);
                    a.arg(&mut x3);
                    for v in &args_i32 {
                        a.arg(v);
                    }
                    a.arg(&s64);
                    a.arg(&copies32);
                    // The normalisation's arguments (its statistics: one launch before).
                    let norm_views = match &norm {
                        Some((plan, _, held, (gs, gl), (bs, bl), given)) => Some((
                            cuda_view::<$t>(gs, gl, "shifted convolution: the norm weight")?,
                            cuda_view::<$t>(bs, bl, "shifted convolution: the norm bias")?,
                            // Given: the whole map's statistics (for a band of its rows).
                            NormPartial::new(
                                given,
                                plan,
                                &dev,
                                &x,
                                $suf,
                                "shifted convolution: the norm statistics",
                            )?,
                            modulation_views::<$t, _>(
                                held,
                                &x,
                                "shifted convolution: the norm modulation",
                            )?,
                        )),
                        None => None,
                    };
                    let partial = norm_views.as_ref().map(|(_, _, p, _)| p.view());
                    if let (
                        Some((gamma, beta, _, (mscale, mshift))),
                        Some(partial),
                        Some((_, ns, ..)),
                    ) = (&norm_views, &partial, &norm)
                    {
                        a.arg(gamma);
                        a.arg(beta);
                        a.arg(partial);
                        a.arg(&ns.splits);
                        a.arg(&ns.cpg);
                        a.arg(&ns.eps);
                        a.arg(&ns.silu);
                        a.arg(mscale);
                        a.arg(mshift);
                        a.arg(&ns.margs.kind);
                        a.arg(&ns.margs.ssb);
                        a.arg(&ns.margs.ssc);
                        a.arg(&ns.margs.tsb);
                        a.arg(&ns.margs.tsc);
                        a.arg(&ns.margs.mh);
                        a.arg(&ns.margs.mw);
                        a.arg(&ns.row0);
                        a.arg(&ns.hfull);
                    }
                    a.arg(&plane64);
                    unsafe { a.launch(shift_cfg) }.w()?;
                    Some(x3)
                };
                let x3 = match &x3_own {
                    Some(own) => own.slice(..),
                    None => x.slice(..),
                };
                // Without a bias or a residual the kernels never read them: x stands in.
                let stand_in = xs.as_cuda_slice::<$t>()?.slice(xo..);
                let bias_v = match &bias {
                    Some((st, l)) => Some(cuda_view::<$t>(st, l, "shifted convolution: the bias")?),
                    None => None,
                };
                let res_v = match &residual {
                    Some((st, l)) => {
                        Some(cuda_band_view::<$t>(st, l, "shifted convolution: the residual")?.0)
                    }
                    None => None,
                };
                let (has_bias, has_res) = (i32::from(bias_v.is_some()), i32::from(res_v.is_some()));
                if self.gemm != ConvGemm::Cublas {
                    // All k rows, the crop, bias and residual in one kernel (conv_gemm.cu,
                    // conv_gemm_wgmma.cu): 128 × 128 output tiles, 256 threads.
                    let (name, module, ptx) = match self.gemm {
                        ConvGemm::Wgmma => (
                            concat!("conv_gemm_wgmma_", $suf),
                            "kandinsky_conv_gemm_wgmma",
                            CONV_GEMM_WGMMA_PTX,
                        ),
                        ConvGemm::WgmmaOneCopy => (
                            concat!("conv_gemm1_wgmma_", $suf),
                            "kandinsky_conv_gemm_wgmma",
                            CONV_GEMM_WGMMA_PTX,
                        ),
                        ConvGemm::MmaOneCopy => (
                            concat!("conv_gemm1_", $suf),
                            "kandinsky_conv_gemm",
                            CONV_GEMM_PTX,
                        ),
                        _ => (
                            concat!("conv_gemm_", $suf),
                            "kandinsky_conv_gemm",
                            CONV_GEMM_PTX,
                        ),
                    };
                    let f = dev.get_or_load_custom_func(name, module, ptx)?;
                    // The GEMM's columns: the output's positions, or the grid (cropped).
                    let n = g.fused_columns();
                    let (gx, gy, gz) = crate::gpu_conv::fused_gemm_grid(b, cout, n);
                    let cfg = LaunchConfig {
                        grid_dim: (gx as u32, gy as u32, gz as u32),
                        block_dim: (256, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    let wsl = ws.as_cuda_slice::<$t>()?.slice(wo..);
                    let (kc32, n32) = (kc as i32, n as i32);
                    let mut out = unsafe { dev.alloc::<$t>(b * cout * oh * ow)? };
                    let mut a = f.builder();
                    a.arg(&x3);
                    a.arg(&wsl);
                    a.arg(bias_v.as_ref().unwrap_or(&stand_in));
                    a.arg(res_v.as_ref().unwrap_or(&stand_in));
                    a.arg(&mut out);
                    a.arg(&cout32);
                    a.arg(&kc32);
                    a.arg(&k32);
                    a.arg(&n32);
                    a.arg(&wp32);
                    a.arg(&oh32);
                    a.arg(&ow32);
                    a.arg(&s64);
                    a.arg(&has_bias);
                    a.arg(&has_res);
                    a.arg(&c32);
                    unsafe { a.launch(cfg) }.w()?;
                    drop(x3_own);
                    return Ok((
                        CudaStorage::wrap_cuda_slice(out, dev.clone()),
                        Shape::from((b, cout, oh, ow)),
                    ));
                }
                let mut acc = unsafe { dev.alloc::<f32>(b * cout * n)? };
                {
                    let wsl = ws.as_cuda_slice::<$t>()?;
                    let (x3p, _g1) = x3.device_ptr(&stream);
                    let (wptr, _g2) = wsl.device_ptr(&stream);
                    let (accp, _g3) = acc.device_ptr_mut(&stream);
                    let el = std::mem::size_of::<$t>() as u64;
                    let (one, zero) = (1f32, 0f32);
                    for dy in 0..k {
                        // Column-major view: acc (n × Cout) += X3[dy·Wp ..] (n × kC, ld S)
                        // · taps[dy] (kC × Cout): the row-major [Cout, OH·Wp] map.
                        let beta: *const f32 = if dy == 0 { &zero } else { &one };
                        unsafe {
                            cudarc::cublas::result::gemm_strided_batched_ex(
                                *blas.handle(),
                                cb::cublasOperation_t::CUBLAS_OP_N,
                                cb::cublasOperation_t::CUBLAS_OP_N,
                                n as i32,
                                cout as i32,
                                kc as i32,
                                (&one as *const f32).cast(),
                                (x3p + (dy * wp) as u64 * el) as *const _,
                                $cuda_t,
                                s as i32,
                                (k * c * s) as i64,
                                (wptr + (wo + dy * cout * kc) as u64 * el) as *const _,
                                $cuda_t,
                                kc as i32,
                                0,
                                beta.cast(),
                                accp as *mut _,
                                cb::cudaDataType_t::CUDA_R_32F,
                                n as i32,
                                (cout * n) as i64,
                                b as i32,
                                cb::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                                cb::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
                            )
                        }
                        .map_err(|e| {
                            candle_core::Error::Msg(format!("shifted convolution: cuBLAS: {e:?}"))
                        })?;
                    }
                }
                drop(x3_own);
                // Allocated once the copies are freed: the peak is theirs plus the
                // accumulator, never all three.
                let mut out = unsafe { dev.alloc::<$t>(b * cout * oh * ow)? };
                let f = dev.get_or_load_custom_func(
                    concat!("conv_finish_", $suf),
                    "kandinsky_conv",
                    CONV_PTX,
                )?;
                let stats = stats_groups
                    .map(|g| StatsOut::new(&dev, b * g, rows.div_ceil(ty)))
                    .transpose()?;
                let per_group32 = per_group as i32;
                let mut a = f.builder();
                a.arg(&acc);
                a.arg(bias_v.as_ref().unwrap_or(&stand_in));
                a.arg(res_v.as_ref().unwrap_or(&stand_in));
                a.arg(&mut out);
                a.arg(&rows32);
                a.arg(&cout32);
                a.arg(&oh32);
                a.arg(&ow32);
                a.arg(&wp32);
                a.arg(&has_bias);
                a.arg(&has_res);
                a.arg(&res_rows32);
                let stats_args = stats.as_ref().map(StatsOut::args);
                match &stats_args {
                    Some(args) => {
                        for v in args {
                            a.arg(v);
                        }
                    }
                    // Never read with per_group = 0: the accumulator stands in.
                    None => {
                        for _ in 0..3 {
                            a.arg(&acc);
                        }
                    }
                }
                a.arg(&per_group32);
                unsafe { a.launch(finish_cfg) }.w()?;
                if let Some(st) = stats {
                    st.stash(&self.stats_out, &dev)?;
                }
                drop(acc);
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match xs.dtype() {
            DType::F32 => launch!(f32, "f32", cb::cudaDataType_t::CUDA_R_32F),
            DType::F16 => launch!(half::f16, "f16", cb::cudaDataType_t::CUDA_R_16F),
            DType::BF16 => launch!(half::bf16, "bf16", cb::cudaDataType_t::CUDA_R_16BF),
            dt => candle_core::bail!("shifted convolution: unsupported dtype {dt:?}"),
        };
        Ok((out, Shape::from((b, cout, oh, ow))))
    }
}

/// How [`shifted_conv`] runs beyond its weights.
pub struct ConvOptions<'a> {
    /// `(top, bottom, left, right)` zero padding.
    pub pad: [usize; 4],
    /// Upsample the input 2× (nearest) first, inside the copy kernel.
    pub upsample2x: bool,
    /// Added to the output (its shape).
    pub residual: Option<&'a Tensor>,
    /// Normalise the input on read (and, for a band of a larger map, that map's statistics).
    pub input_norm: Option<(crate::gpu_conv::InputNorm<'a>, Option<NormBand>)>,
    /// What sums the kernel rows (falls back to cuBLAS where the kernel does not cover).
    pub gemm: crate::gpu_conv::ConvGemm,
}

/// `conv2d(pad(upsample2x?(n(x))), taps) + bias (+ residual)` for a stride-1 `k`×`k`
/// kernel, `n` the `input_norm` (applied on read, statistics in f32; with a [`NormBand`], `x`
/// is a band of a larger map whose statistics are given) or the identity: see
/// [`crate::gpu_conv`]. `taps` `[k, Cout, k·Cin]` in `x`'s dtype, `bias` `[Cout]`,
/// `residual` the output's shape; the caller has checked the norm modulation's shapes (of
/// the whole map when `x` is a `band` of its rows).
pub fn shifted_conv(
    x: &Tensor,
    taps: &Tensor,
    bias: Option<&Tensor>,
    options: ConvOptions<'_>,
) -> candle_core::Result<Tensor> {
    Ok(shifted_conv_with_stats(x, taps, bias, options, None)?.0)
}

/// [`shifted_conv`], with `stats_groups` also the GroupNorm statistics of its output in that
/// many groups, left by the crop kernel for the norm that reads the output next (which then
/// skips its statistics pass): where the cuBLAS path sums the rows and the groups divide the
/// output channels, else `None`.
pub fn shifted_conv_with_stats(
    x: &Tensor,
    taps: &Tensor,
    bias: Option<&Tensor>,
    options: ConvOptions<'_>,
    stats_groups: Option<usize>,
) -> candle_core::Result<(Tensor, Option<GroupNormStats>)> {
    let ConvOptions {
        pad,
        upsample2x,
        residual,
        input_norm,
        gemm,
    } = options;
    // A band of rows of a taller map (`in_bands`) is read in place, unless its norm on read
    // would compute statistics from it (they must be the taller map's).
    let band_ok = |t: &Tensor| row_band(t.layout(), "").is_ok();
    let stats_given = input_norm.as_ref().is_none_or(|(_, band)| band.is_some());
    let x = if stats_given && band_ok(x) {
        x.clone()
    } else {
        x.contiguous()?
    };
    let k = taps.dim(0)?;
    let taps = taps.to_dtype(x.dtype())?.contiguous()?;
    let bias = bias
        .map(|b| b.to_dtype(x.dtype())?.contiguous())
        .transpose()?;
    let norm = match input_norm {
        Some((n, band)) => {
            let (gamma, beta, groups, eps) = n.norm.parts();
            Some(ConvNorm {
                gamma: gamma.to_dtype(x.dtype())?.contiguous()?,
                beta: beta.to_dtype(x.dtype())?.contiguous()?,
                groups,
                eps: eps as f32,
                silu: n.silu,
                modulation: n
                    .modulation
                    .map(|m| KernelModulation::new(m, x.dtype()))
                    .transpose()?,
                band,
            })
        }
        None => None,
    };
    let gemm = gemm.effective(x.dtype(), k, x.dim(1)?);
    // The crop kernel reads a band of a taller residual in place; the fused GEMMs do not.
    let residual = residual
        .map(|r| {
            let r = r.to_dtype(x.dtype())?;
            if gemm == crate::gpu_conv::ConvGemm::Cublas && band_ok(&r) {
                Ok(r)
            } else {
                r.contiguous()
            }
        })
        .transpose()?;
    let cout = taps.dim(1)?;
    let stats_groups = stats_groups
        .filter(|&g| g > 0 && cout % g == 0 && gemm == crate::gpu_conv::ConvGemm::Cublas);
    let op = ShiftedConvOp {
        k,
        pad,
        upsample2x,
        bias,
        residual,
        norm,
        gemm,
        stats_groups,
        stats_out: std::sync::Mutex::new(None),
    };
    let y = x.apply_op2_no_bwd(&taps, &op)?;
    let (b, _, oh, ow) = y.dims4()?;
    let stats = take_left_stats(op.stats_out, stats_groups, (b, cout, oh * ow))?;
    Ok((y, stats))
}

/// `cat_channels_*`: the channel concatenation of two contiguous `[B, C1|C2, H, W]` maps of one
/// dtype, with `Some(groups)` leaving its GroupNorm statistics in `stats_out` (taken out after
/// the call, as [`ShiftedConvOp`]'s).
struct CatChannelsOp {
    groups: Option<usize>,
    stats_out: std::sync::Mutex<Option<CudaStorage>>,
}

impl candle_core::CustomOp2 for CatChannelsOp {
    cuda_only!(
        "kandinsky-cat-channels",
        2,
        "kandinsky-cat-channels is a CUDA kernel; the CPU uses Tensor::cat"
    );

    fn cuda_fwd(
        &self,
        as_: &CudaStorage,
        al: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let ao = contiguous_start(al, "channel concatenation: the first map")?;
        let bo = contiguous_start(bl, "channel concatenation: the second map")?;
        let (b, c1, h, w) = al.shape().dims4()?;
        let (b2, c2, h2, w2) = bl.shape().dims4()?;
        if (b2, h2, w2) != (b, h, w) || as_.dtype() != bs.dtype() {
            candle_core::bail!(
                "channel concatenation of {:?} {:?} and {:?} {:?}",
                al.shape().dims(),
                as_.dtype(),
                bl.shape().dims(),
                bs.dtype()
            );
        }
        let (c, hw) = (c1 + c2, h * w);
        let groups = self.groups.unwrap_or(1);
        let plan = StatsPlan::new(b, c, hw, groups, "channel concatenation")?;
        let dev = as_.device().clone();
        let per_group = if self.groups.is_some() {
            plan.splits
        } else {
            0
        };
        let (c1_32, c2_32, hw64, ge, ch, sp, cp, gr, pg) = (
            c1 as i32,
            c2 as i32,
            hw as i64,
            plan.group_elems as i64,
            plan.chunk as i64,
            plan.splits as i32,
            plan.cpg as i32,
            groups as i32,
            per_group as i32,
        );
        macro_rules! launch {
            ($t:ty, $suf:literal) => {{
                let a = as_.as_cuda_slice::<$t>()?.slice(ao..);
                let bv = bs.as_cuda_slice::<$t>()?.slice(bo..);
                let mut out = unsafe { dev.alloc::<$t>(b * c * hw)? };
                let stats = self
                    .groups
                    .map(|g| StatsOut::new(&dev, b * g, plan.blocks))
                    .transpose()?;
                let f = dev.get_or_load_custom_func(
                    concat!("cat_channels_", $suf),
                    "kandinsky_group_norm",
                    GROUP_NORM_PTX,
                )?;
                let mut l = f.builder();
                l.arg(&a);
                l.arg(&bv);
                l.arg(&mut out);
                l.arg(&c1_32);
                l.arg(&c2_32);
                l.arg(&hw64);
                l.arg(&ge);
                l.arg(&ch);
                l.arg(&sp);
                l.arg(&cp);
                l.arg(&gr);
                l.arg(&plan.vec8);
                let stats_args = stats.as_ref().map(StatsOut::args);
                match &stats_args {
                    Some(args) => {
                        for v in args {
                            l.arg(v);
                        }
                    }
                    // Never touched with per_group = 0: the first map stands in.
                    None => {
                        for _ in 0..3 {
                            l.arg(&a);
                        }
                    }
                }
                l.arg(&pg);
                unsafe { l.launch(plan.launch_config()) }.w()?;
                if let Some(st) = stats {
                    st.stash(&self.stats_out, &dev)?;
                }
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match as_.dtype() {
            DType::F32 => launch!(f32, "f32"),
            DType::F16 => launch!(half::f16, "f16"),
            DType::BF16 => launch!(half::bf16, "bf16"),
            dt => candle_core::bail!("channel concatenation: unsupported dtype {dt:?}"),
        };
        Ok((out, Shape::from((b, c, h, w))))
    }
}

/// `[a, b]` along the channels of two CUDA `[B, C1|C2, H, W]` maps in one kernel, and with
/// `stats_groups` (dividing `C1 + C2`) the GroupNorm statistics of the result in that many
/// groups, left for the norm that reads it next.
pub fn cat_channels_with_stats(
    a: &Tensor,
    b: &Tensor,
    stats_groups: Option<usize>,
) -> candle_core::Result<(Tensor, Option<GroupNormStats>)> {
    let a = a.contiguous()?;
    let b = b.to_dtype(a.dtype())?.contiguous()?;
    let op = CatChannelsOp {
        groups: stats_groups,
        stats_out: std::sync::Mutex::new(None),
    };
    let y = a.apply_op2_no_bwd(&b, &op)?;
    let (bb, c, h, w) = y.dims4()?;
    let stats = take_left_stats(op.stats_out, stats_groups, (bb, c, h * w))?;
    Ok((y, stats))
}

const SOFTMAX_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/softmax.ptx"));

/// `softmax(scale · x)` along the last dimension, in f32 whatever the storage type; the
/// probabilities in `out` (f32 scores may give f16/bf16 probabilities; otherwise `x`'s type).
struct SoftmaxOp {
    scale: f32,
    out: DType,
}

impl candle_core::CustomOp1 for SoftmaxOp {
    cuda_only!("kandinsky-softmax", 1);

    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let xo = contiguous_start(xl, "softmax kernel: the input")?;
        let ncols = xl.shape().dims().last().copied().unwrap_or(1);
        let numel = xl.shape().elem_count();
        let rows = numel / ncols.max(1);
        if ncols == 0 || ncols > i32::MAX as usize || rows > i32::MAX as usize {
            candle_core::bail!("softmax kernel: {rows} rows of {ncols}, each at most 2^31 - 1");
        }
        let dev = xs.device().clone();
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let n32 = ncols as i32;
        macro_rules! launch {
            ($t:ty, $suf:literal) => {
                launch!($t, $t, $suf)
            };
            ($t:ty, $to:ty, $suf:literal) => {{
                let x = xs.as_cuda_slice::<$t>()?.slice(xo..);
                let mut out = unsafe { dev.alloc::<$to>(numel)? };
                let f = dev.get_or_load_custom_func(
                    concat!("softmax_rows_", $suf),
                    "kandinsky_softmax",
                    SOFTMAX_PTX,
                )?;
                let mut a = f.builder();
                a.arg(&x);
                a.arg(&mut out);
                a.arg(&n32);
                a.arg(&self.scale);
                unsafe { a.launch(cfg) }.w()?;
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match (xs.dtype(), self.out) {
            (DType::F32, DType::F32) => launch!(f32, "f32"),
            (DType::F16, DType::F16) => launch!(half::f16, "f16"),
            (DType::BF16, DType::BF16) => launch!(half::bf16, "bf16"),
            (DType::F32, DType::F16) => launch!(f32, half::f16, "f32_f16"),
            (DType::F32, DType::BF16) => launch!(f32, half::bf16, "f32_bf16"),
            (dt, to) => candle_core::bail!("softmax kernel: unsupported dtypes {dt:?} -> {to:?}"),
        };
        Ok((out, xl.shape().clone()))
    }
}

/// `softmax(scale · x)` over the last dimension of a CUDA tensor: exponentials and sums in
/// f32, one rounding to `x`'s dtype (the plain attention path's scores, unscaled).
pub fn softmax_scaled(x: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    softmax_scaled_to(x, scale, x.dtype())
}

/// [`softmax_scaled`] with the probabilities in `out`: `x`'s dtype, or f16/bf16 from f32
/// scores.
pub fn softmax_scaled_to(x: &Tensor, scale: f64, out: DType) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&SoftmaxOp {
        scale: scale as f32,
        out,
    })
}

/// `q · kᵀ` per batch in f32, for f16/bf16 `q` `[.., M, D]` and `k` `[.., N, D]` (one cuBLAS
/// strided-batched GEMM, f32 accumulation and output, `k` read in place).
struct ScoresOp;

impl candle_core::CustomOp2 for ScoresOp {
    cuda_only!("kandinsky-scores-f32", 2);

    fn cuda_fwd(
        &self,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        use cudarc::cublas::sys as cb;
        use cudarc::driver::{DevicePtr, DevicePtrMut};
        let (qd, kd) = (ql.shape().dims(), kl.shape().dims());
        let r = qd.len();
        if r < 2 || kd.len() != r || qd[..r - 2] != kd[..r - 2] || qd[r - 1] != kd[r - 1] {
            candle_core::bail!("attention scores: q {qd:?} and k {kd:?} do not match");
        }
        let (m, n, d) = (qd[r - 2], kd[r - 2], qd[r - 1]);
        let batch: usize = qd[..r - 2].iter().product();
        if [m, n, d, batch].iter().any(|&v| v > i32::MAX as usize) {
            candle_core::bail!("attention scores: {qd:?} x {kd:?} is too large for cuBLAS");
        }
        let qo = contiguous_start(ql, "attention scores: q")?;
        let ko = contiguous_start(kl, "attention scores: k")?;
        let dev = qs.device().clone();
        let stream = dev.cuda_stream();
        let blas = dev.cublas_handle();
        let mut out = unsafe { dev.alloc::<f32>(batch * m * n)? };
        macro_rules! gemm {
            ($t:ty, $cuda_t:expr) => {{
                let q = qs.as_cuda_slice::<$t>()?.slice(qo..);
                let k = ks.as_cuda_slice::<$t>()?.slice(ko..);
                let (qp, _g1) = q.device_ptr(&stream);
                let (kp, _g2) = k.device_ptr(&stream);
                let (op, _g3) = out.device_ptr_mut(&stream);
                let (one, zero) = (1f32, 0f32);
                // Column-major: Sᵀ (n × m, ld n) = K (kᵀ viewed n × d, op T) · Qᵀ (d × m).
                unsafe {
                    cudarc::cublas::result::gemm_strided_batched_ex(
                        *blas.handle(),
                        cb::cublasOperation_t::CUBLAS_OP_T,
                        cb::cublasOperation_t::CUBLAS_OP_N,
                        n as i32,
                        m as i32,
                        d as i32,
                        (&one as *const f32).cast(),
                        kp as *const _,
                        $cuda_t,
                        d as i32,
                        (n * d) as i64,
                        qp as *const _,
                        $cuda_t,
                        d as i32,
                        (m * d) as i64,
                        (&zero as *const f32).cast(),
                        op as *mut _,
                        cb::cudaDataType_t::CUDA_R_32F,
                        n as i32,
                        (m * n) as i64,
                        batch as i32,
                        cb::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        cb::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
                    )
                }
                .map_err(|e| candle_core::Error::Msg(format!("attention scores: cuBLAS: {e:?}")))?;
            }};
        }
        match (qs.dtype(), ks.dtype()) {
            (DType::F16, DType::F16) => gemm!(half::f16, cb::cudaDataType_t::CUDA_R_16F),
            (DType::BF16, DType::BF16) => gemm!(half::bf16, cb::cudaDataType_t::CUDA_R_16BF),
            (a, b) => candle_core::bail!("attention scores: unsupported dtypes {a:?}, {b:?}"),
        }
        let mut shape = qd.to_vec();
        shape[r - 1] = n;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(shape)))
    }
}

/// `q · kᵀ` in f32 for f16/bf16 `q` `[.., M, D]` and `k` `[.., N, D]`: the plain attention
/// path's scores, never rounded to 16 bits (bf16 scores lose ≈ 0.4 % of each logit: 1.4e-2
/// relative error on MoVQ's 9216-key attention, GPU run 10).
pub fn attention_scores_f32(q: &Tensor, k: &Tensor) -> candle_core::Result<Tensor> {
    q.contiguous()?
        .apply_op2_no_bwd(&k.contiguous()?, &ScoresOp)
}

const TRANSPOSE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/transpose.ptx"));

/// `x` `[B, M, N]` → `[B, N, M]` (+ the addend, riding along).
struct TransposeOp {
    addend: Option<Tensor>,
}

impl candle_core::CustomOp1 for TransposeOp {
    cuda_only!("kandinsky-transpose", 1);

    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (b, m, n) = xl.shape().dims3()?;
        let xo = contiguous_start(xl, "transpose kernel: the input")?;
        if b > 65535 || m.div_ceil(32) > 65535 || m * n > i32::MAX as usize {
            candle_core::bail!("transpose kernel: [{b}, {m}, {n}] is too large for its grid");
        }
        let addend = match &self.addend {
            Some(a) if a.dims() != [b, n, m] => candle_core::bail!(
                "transpose kernel: addend {:?}, output [{b}, {n}, {m}]",
                a.dims()
            ),
            Some(a) => Some(a.storage_and_layout()),
            None => None,
        };
        let dev = xs.device().clone();
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(32) as u32, m.div_ceil(32) as u32, b as u32),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (m32, n32, has_y) = (m as i32, n as i32, i32::from(addend.is_some()));
        macro_rules! launch {
            ($t:ty, $suf:literal) => {{
                let x = xs.as_cuda_slice::<$t>()?.slice(xo..);
                let y = match &addend {
                    Some((st, l)) => Some(cuda_view::<$t>(st, l, "transpose kernel: the addend")?),
                    None => None,
                };
                let mut out = unsafe { dev.alloc::<$t>(b * m * n)? };
                let f = dev.get_or_load_custom_func(
                    concat!("transpose_add_", $suf),
                    "kandinsky_transpose",
                    TRANSPOSE_PTX,
                )?;
                let mut a = f.builder();
                a.arg(&x);
                // Without an addend the kernel never reads it: x stands in.
                a.arg(y.as_ref().unwrap_or(&x));
                a.arg(&mut out);
                a.arg(&m32);
                a.arg(&n32);
                a.arg(&has_y);
                unsafe { a.launch(cfg) }.w()?;
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match xs.dtype() {
            DType::F32 => launch!(f32, "f32"),
            DType::F16 => launch!(half::f16, "f16"),
            DType::BF16 => launch!(half::bf16, "bf16"),
            dt => candle_core::bail!("transpose kernel: unsupported dtype {dt:?}"),
        };
        Ok((out, Shape::from((b, n, m))))
    }
}

/// `x` `[B, M, N]` → contiguous `[B, N, M]`, plus `addend` `[B, N, M]` where given (in `x`'s
/// dtype), with 32 × 32 tiles through shared memory (`kernels/transpose.cu`).
pub fn transpose_add(x: &Tensor, addend: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let addend = addend
        .map(|a| a.to_dtype(x.dtype())?.contiguous())
        .transpose()?;
    x.contiguous()?.apply_op1_no_bwd(&TransposeOp { addend })
}

/// One cuBLASLt handle (with its workspace) per CUDA stream, made on first use: candle keeps
/// only a cuBLAS handle, whose GEMMs cannot add a bias.
fn blas_lt(
    dev: &candle_core::CudaDevice,
) -> candle_core::Result<std::sync::Arc<cudarc::cublaslt::CudaBlasLT>> {
    use std::sync::{Arc, Mutex, OnceLock};
    type Handles = Mutex<Vec<(usize, Arc<cudarc::cublaslt::CudaBlasLT>)>>;
    static HANDLES: OnceLock<Handles> = OnceLock::new();
    let stream = dev.cuda_stream();
    let key = stream.cu_stream() as usize;
    let mut handles = HANDLES
        .get_or_init(|| Mutex::new(Vec::new()))
        .lock()
        .map_err(|_| candle_core::Error::Msg("cuBLASLt handle cache poisoned".into()))?;
    if let Some((_, h)) = handles.iter().find(|(k, _)| *k == key) {
        return Ok(h.clone());
    }
    let h = Arc::new(
        cudarc::cublaslt::CudaBlasLT::new(stream)
            .map_err(|e| candle_core::Error::Msg(format!("cuBLASLt: {e:?}")))?,
    );
    handles.push((key, h.clone()));
    Ok(h)
}

/// `x·Wᵀ + b` with the bias added in the GEMM's epilogue (f16/bf16, f32 accumulation).
struct LinearBiasOp;

impl CustomOp3 for LinearBiasOp {
    cuda_only!("kandinsky-linear-bias", 3);

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        use cudarc::cublaslt::{Matmul, MatmulConfig};
        let xo = contiguous_start(xl, "linear kernel: the input")?;
        let wo = contiguous_start(wl, "linear kernel: the weight")?;
        let bo = contiguous_start(bl, "linear kernel: the bias")?;
        let (n, k) = wl.shape().dims2()?;
        let dims = xl.shape().dims();
        if dims.last() != Some(&k) || bl.shape().elem_count() != n {
            candle_core::bail!(
                "linear: input {dims:?}, weight [{n}, {k}], bias {:?}",
                bl.shape().dims()
            );
        }
        let m = xl.shape().elem_count() / k.max(1);
        let dev = xs.device().clone();
        let lt = blas_lt(&dev)?;
        // Column-major: yᵀ (n × m, ld n) = W (the row-major [n, k] weight read transposed)
        // · xᵀ (k × m, ld k), bias per row of yᵀ, i.e. per output feature.
        let cfg = MatmulConfig {
            transa: true,
            transb: false,
            transc: false,
            m: n as u64,
            n: m as u64,
            k: k as u64,
            alpha: 1.0,
            lda: k as i64,
            ldb: k as i64,
            beta: 0.0,
            ldc: n as i64,
            stride_a: None,
            stride_b: None,
            stride_c: None,
            stride_bias: None,
            batch_size: None,
        };
        macro_rules! launch {
            ($t:ty) => {{
                let x = xs.as_cuda_slice::<$t>()?.slice(xo..);
                let w = ws.as_cuda_slice::<$t>()?.slice(wo..);
                let b = bs.as_cuda_slice::<$t>()?.slice(bo..);
                let mut out = unsafe { dev.alloc::<$t>(m * n)? };
                unsafe { lt.matmul(cfg, &w, &x, &mut out, Some(&b), None) }
                    .map_err(|e| candle_core::Error::Msg(format!("linear: cuBLASLt: {e:?}")))?;
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match xs.dtype() {
            DType::F16 => launch!(half::f16),
            DType::BF16 => launch!(half::bf16),
            dt => candle_core::bail!("linear kernel: {dt:?}, only f16 and bf16"),
        };
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = n;
        }
        Ok((out, Shape::from(out_dims)))
    }
}

/// Whether [`linear_bias`] takes `x` `[…, K]` times `weight` `[N, K]`: f16/bf16 on CUDA, `K`
/// and `N` multiples of 8 (every projection of these networks; the shapes `gpu_check`
/// measured), so every row starts 16-byte aligned for cuBLASLt's tensor-core kernels.
pub fn linear_bias_covers(x: &Tensor, weight: &Tensor) -> bool {
    x.device().is_cuda()
        && matches!(x.dtype(), DType::F16 | DType::BF16)
        && x.dims().last().is_some_and(|k| k % 8 == 0)
        && weight.dims().first().is_some_and(|n| n % 8 == 0)
}

/// `x·Wᵀ + b` for `x` `[…, K]`, `weight` `[N, K]`, `bias` `[N]` on CUDA in f16/bf16: one
/// cuBLASLt GEMM with the bias in its epilogue (candle runs the GEMM, then a broadcast add
/// that took longer than the GEMM itself at the UNet's attention shapes on an H200).
pub fn linear_bias(x: &Tensor, weight: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    // cuBLASLt's heuristics assume 256-byte aligned matrices: views into a larger buffer
    // are copied to a fresh (aligned) one first.
    let fresh = |t: Tensor| -> candle_core::Result<Tensor> {
        if t.is_contiguous() && t.layout().start_offset() == 0 {
            Ok(t)
        } else {
            t.copy()
        }
    };
    let x = fresh(x.clone())?;
    let w = fresh(weight.to_dtype(x.dtype())?)?;
    let b = fresh(bias.to_dtype(x.dtype())?)?;
    x.apply_op3_no_bwd(&w, &b, &LinearBiasOp)
}

/// A CUDA graph of the work `f` queues on `device`'s stream, and what the captured call of `f`
/// returned (its tensors live in the graph's memory: every replay rewrites them in place).
///
/// `f` runs twice: once eagerly, with candle's capture cache on, so that every small
/// host-to-device upload it makes (dims, strides, constants) is cached by content, then under
/// capture, where those uploads become device copies from the cache. So `f` must upload the
/// same host data both times (whatever varies between replays belongs in device buffers the
/// caller refills before each `launch`), and must not copy to the host. The cached uploads
/// live in thread-local storage: replay on the capturing thread. Drop the returned value
/// before the graph.
pub fn capture_graph<T>(
    device: &candle_core::CudaDevice,
    f: impl Fn() -> candle_core::Result<T>,
) -> candle_core::Result<(cudarc::driver::CudaGraph, T)> {
    use cudarc::driver::sys;
    let _cache = device.enable_cuda_graph_htod_cache();
    drop(f()?);
    let stream = device.cuda_stream();
    stream.synchronize().w()?;
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        .w()?;
    let captured = f();
    // End the capture whatever happened, or the stream stays unusable.
    let graph = stream.end_capture(
        sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
    );
    let captured = captured?;
    let graph = graph
        .w()?
        .ok_or_else(|| candle_core::Error::Msg("CUDA graph capture recorded no work".into()))?;
    graph.upload().w()?;
    Ok((graph, captured))
}
