//! Stride-1 convolutions on CUDA without an im2col matrix.
//!
//! candle 0.11.1's CUDA convolution builds a `k²·C`-row im2col matrix with a kernel that
//! took 45 % of a 768 px UNet step's GPU time and 64 % of a MoVQ decode's on an H200 (ncu,
//! benches/RESULTS.md, GPU run 5), then multiplies and transposes the result from NHWC.
//! [`ShiftedConv`] writes `k` copies of the zero-padded input instead, each shifted by one
//! column (`dx`) and flattened with a row stride `Wp`; row `dy` of the kernel is then one
//! cuBLAS GEMM of the `[Cout, k·C]` weight slice with the copies read from offset `dy·Wp`,
//! and the `k` GEMMs accumulate in f32 (as cuDNN does). Output columns past the map's width
//! read across a row end and are cropped by the last kernel, which also adds the bias (and
//! optionally a residual) and rounds once. No NHWC transpose, `k`× the input in scratch
//! instead of `k²`×, the nearest-2× upsampling of the decoder's up blocks folded into the copy.
//!
//! [`ConvGemm`] picks what sums the `k` rows: the cuBLAS GEMMs (default), or one tensor-core
//! kernel reading the same shifted copies that keeps the sums in registers and crops, adds
//! and rounds in its epilogue — no f32 accumulator in memory (40 % of the scratch) and one
//! launch instead of `k + 1` — optionally from one padded copy instead of the `k` shifted
//! ones (`KANDINSKY_CONV_GEMM=mma|wgmma|mma-1copy|wgmma-1copy`, opt-in until measured).

use candle_core::Tensor;

use crate::nn::{GroupNorm, NormModulation};
use crate::{Error, Result};

/// `KANDINSKY_CONV_SCRATCH_MB` in bytes, read once (`None`: unset, each convolution's own
/// limit applies; `Some(0)`: no banding).
fn scratch_limit_env() -> Option<usize> {
    static LIMIT: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        let v = std::env::var("KANDINSKY_CONV_SCRATCH_MB").ok()?;
        match v.trim().parse::<usize>() {
            Ok(mb) => Some(mb << 20),
            Err(_) => {
                tracing::warn!(
                    "KANDINSKY_CONV_SCRATCH_MB={v}: not a number of MiB, using each network's limit"
                );
                None
            }
        }
    })
}

/// `KANDINSKY_CONV_NORM=1`, read once: [`ShiftedConv::forward_normed`] normalises the input
/// inside the convolution's copy kernel on CUDA. Opt-in: correct on the card but slower
/// (GPU run 10: 768 px UNet step 23.5 vs 21.1 ms, MoVQ decode 44.3 vs 30.2 ms).
#[cfg(feature = "cuda")]
fn norm_on_read() -> bool {
    env_switch!("KANDINSKY_CONV_NORM")
}

/// `KANDINSKY_CONV_PADDED_ROWS=1`, read once: the `k` shifted copies keep rows of the padded
/// width, as GPU runs 6–9 measured them ([`Geometry`]), to time the narrow rows against.
fn padded_rows() -> bool {
    env_switch!("KANDINSKY_CONV_PADDED_ROWS")
}

/// `KANDINSKY_CONV_SUBPIXEL=1`, read once: a 3×3 convolution of a nearest-2×-upsampled map
/// runs as four 2×2 convolutions of the map itself ([`ShiftedConv::forward_subpixel`]).
/// Opt-in: faster alone at the UNet's 24² → 48² shape but no faster in the networks (GPU
/// run 10: UNet step 21.3 vs 21.1 ms, MoVQ 30.6 vs 30.2 ms, and +130 MiB UNet peak).
fn subpixel() -> bool {
    env_switch!("KANDINSKY_CONV_SUBPIXEL")
}

/// `KANDINSKY_CONV_STATS=1`, read once: [`ShiftedConv::forward_normed_stats`] has the crop
/// kernel leave its output's GroupNorm statistics for the norm that reads it next. Opt-in:
/// slower on the card (GPU run 10: UNet step 21.6 vs 21.1 ms, MoVQ 31.2 vs 30.2 ms).
#[cfg(feature = "cuda")]
fn output_stats() -> bool {
    env_switch!("KANDINSKY_CONV_STATS")
}

/// What sums the `k` kernel rows of a shifted convolution on CUDA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvGemm {
    /// `k` cuBLAS GEMMs accumulating in an f32 buffer, then a crop kernel (bias, residual,
    /// rounding): the path GPU runs 6–9 measured, and the only one for f32.
    Cublas,
    /// One tensor-core kernel (`kernels/conv_gemm.cu`, mma.sync) that accumulates all `k`
    /// rows in registers and crops, adds and rounds in its epilogue: no f32 accumulator in
    /// memory. f16/bf16 with `k·Cin` a multiple of 8; anything else takes [`Self::Cublas`].
    Mma,
    /// The same on Hopper's warpgroup tensor cores (`kernels/conv_gemm_wgmma.cu`), where the
    /// kernels were built for sm_90a (`CUDA_COMPUTE_CAP=90`); elsewhere [`Self::Mma`].
    Wgmma,
    /// [`Self::Mma`] reading one padded copy of the input instead of `k` shifted ones (the
    /// shift applied in registers as it loads): a third of the copy's writes and scratch.
    /// Kernels up to 3×3.
    MmaOneCopy,
    /// [`Self::Wgmma`] reading one padded copy (as [`Self::MmaOneCopy`]).
    WgmmaOneCopy,
}

impl ConvGemm {
    /// The names `KANDINSKY_CONV_GEMM` takes.
    pub const NAMED: [(&'static str, ConvGemm); 5] = [
        ("cublas", ConvGemm::Cublas),
        ("mma", ConvGemm::Mma),
        ("wgmma", ConvGemm::Wgmma),
        ("mma-1copy", ConvGemm::MmaOneCopy),
        ("wgmma-1copy", ConvGemm::WgmmaOneCopy),
    ];

    /// `KANDINSKY_CONV_GEMM` (a name of [`Self::NAMED`]; cuBLAS when unset, or unknown with
    /// a warning), read once. Opt-in: correct on the card but 2.5–3.5× slower than cuBLAS at
    /// the UNet's shapes (GPU run 10: UNet step 32.3 vs 21.1 ms).
    pub fn selected() -> Self {
        static GEMM: std::sync::OnceLock<ConvGemm> = std::sync::OnceLock::new();
        *GEMM.get_or_init(|| {
            let Ok(name) = std::env::var("KANDINSKY_CONV_GEMM") else {
                return ConvGemm::Cublas;
            };
            Self::NAMED
                .iter()
                .find(|(n, _)| *n == name)
                .map(|&(_, g)| g)
                .unwrap_or_else(|| {
                    tracing::warn!("KANDINSKY_CONV_GEMM={name}: no such kernel, using cublas");
                    ConvGemm::Cublas
                })
        })
    }

    /// Whether the kernel reads one padded copy of the input (not `k` shifted ones).
    pub fn one_copy(self) -> bool {
        matches!(self, ConvGemm::MmaOneCopy | ConvGemm::WgmmaOneCopy)
    }

    /// The path that actually runs for a `k`×`k` kernel over `cin` channels in `dtype`.
    pub fn effective(self, dtype: candle_core::DType, k: usize, cin: usize) -> Self {
        use candle_core::DType;
        let fused = matches!(dtype, DType::F16 | DType::BF16) && (k * cin) % 8 == 0;
        let wgmma = cfg!(kandinsky_wgmma);
        match self {
            _ if !fused => ConvGemm::Cublas,
            ConvGemm::WgmmaOneCopy if k <= 3 && wgmma => self,
            ConvGemm::MmaOneCopy | ConvGemm::WgmmaOneCopy if k <= 3 => ConvGemm::MmaOneCopy,
            ConvGemm::Wgmma | ConvGemm::WgmmaOneCopy if wgmma => ConvGemm::Wgmma,
            ConvGemm::Cublas => ConvGemm::Cublas,
            _ => ConvGemm::Mma,
        }
    }
}

/// The grid of the fused convolution GEMMs (`kernels/conv_gemm_common.cuh`): 128-column
/// tiles of the `n` GEMM columns ([`Geometry::fused_columns`]), 128-channel tiles of `cout`,
/// the batch.
pub(crate) fn fused_gemm_grid(b: usize, cout: usize, n: usize) -> (usize, usize, usize) {
    (n.div_ceil(128), cout.div_ceil(128), b)
}

/// The GPU's multiprocessors (without the `cuda` feature there is no GPU to ask).
#[cfg(feature = "cuda")]
fn multiprocessors(device: &candle_core::Device) -> Result<usize> {
    Ok(crate::cuda::multiprocessors(device)?)
}
#[cfg(not(feature = "cuda"))]
fn multiprocessors(_: &candle_core::Device) -> Result<usize> {
    Ok(1)
}

/// The GroupNorm statistics of a map, as the kernel that wrote it left them (a CUDA
/// convolution's crop kernel, [`ShiftedConv::forward_normed_stats`]; the concatenation,
/// [`cat_channels`]): the norm that reads
/// the map next ([`InputNorm::stats`]) skips its own pass over it. Only made on CUDA.
#[derive(Debug, Clone)]
pub struct MapStats(MapStatsInner);

#[cfg(feature = "cuda")]
type MapStatsInner = crate::cuda::GroupNormStats;
/// Without CUDA there are none to make.
#[cfg(not(feature = "cuda"))]
type MapStatsInner = std::convert::Infallible;

#[cfg(feature = "cuda")]
impl From<crate::cuda::GroupNormStats> for MapStats {
    fn from(stats: crate::cuda::GroupNormStats) -> Self {
        Self(stats)
    }
}

impl MapStats {
    /// The statistics in the CUDA kernels' form.
    #[cfg(feature = "cuda")]
    pub(crate) fn cuda(&self) -> &crate::cuda::GroupNormStats {
        &self.0
    }
}

/// `[a, b]` along the channels of two `[B, C1|C2, H, W]` maps (the UNet's skip
/// connections), and with `stats_groups` the GroupNorm statistics of the result in that many
/// groups for the norm that reads it next: one copy kernel that leaves them where
/// `KANDINSKY_CONV_STATS=1` (read once) on CUDA (the groups dividing `C1 + C2`); elsewhere
/// candle's concatenation and no statistics.
pub fn cat_channels(
    a: &Tensor,
    b: &Tensor,
    stats_groups: Option<usize>,
) -> Result<(Tensor, Option<MapStats>)> {
    #[cfg(feature = "cuda")]
    if let Some(g) = stats_groups {
        let c = a.dim(1)? + b.dim(1)?;
        if a.device().is_cuda()
            && output_stats()
            && crate::nn::use_fused_kernels()
            && a.rank() == 4
            && g > 0
            && c % g == 0
        {
            let (y, stats) = crate::cuda::cat_channels_with_stats(a, b, Some(g))?;
            return Ok((y, stats.map(MapStats)));
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = stats_groups;
    Ok((Tensor::cat(&[a, b], 1)?, None))
}

/// The GroupNorm (+ modulation) (+ SiLU) in front of a convolution: `silu(norm(x)·… + …)` is
/// its input ([`ShiftedConv::forward_normed`]).
#[derive(Debug, Clone, Copy)]
pub struct InputNorm<'a> {
    /// The GroupNorm.
    pub norm: &'a GroupNorm,
    /// The modulation applied after it.
    pub modulation: Option<NormModulation<'a>>,
    /// SiLU last.
    pub silu: bool,
    /// The statistics of exactly the map this norm reads, where the kernel that wrote it left
    /// them ([`MapStats`]); checked against its shape and groups, not its values.
    pub stats: Option<&'a MapStats>,
}

impl InputNorm<'_> {
    /// The normalised map, materialised.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self
            .norm
            .forward_with_stats(x, self.modulation, self.silu, self.stats)?)
    }

    /// That the modulation fits `x` (what [`Self::apply`] checks, for the paths that
    /// normalise inside a kernel instead).
    #[cfg(feature = "cuda")]
    fn check(&self, x: &Tensor) -> Result<()> {
        if let Some(m) = &self.modulation {
            m.check(x)?;
        }
        Ok(())
    }
}

/// Zero padding `(top, bottom, left, right)`.
pub type Padding4 = [usize; 4];

/// The padded map of one shifted convolution, as the CUDA op allocates it and the reference
/// computes it: the (upsampled) map `hu` rows high, padded to `hp × wfull`, its copies stored
/// with the row stride `wp`, and the output `oh × ow`.
///
/// `wp` is a multiple of 8 elements (every GEMM view starts 16-byte aligned) and is also the
/// row stride of the GEMM's output grid `oh × wp`, whose columns past `ow` are computed and
/// dropped. Where each of the `k` copies is already shifted by its column offset (cuBLAS and
/// the `k`-copy fused kernels), a row needs only the output's `ow` columns: `wp` is `ow`
/// rounded up, and at the UNet's 96/48/24-wide levels the GEMMs compute 8/14/25 % fewer
/// columns than with the padded width. The one-copy kernels shift inside the GEMM and read
/// `dx` columns further, so there a row holds the whole padded width `wfull`, rounded up
/// (as every copy did before, and does with `KANDINSKY_CONV_PADDED_ROWS=1`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub hu: usize,
    pub hp: usize,
    pub wfull: usize,
    pub wp: usize,
    pub oh: usize,
    pub ow: usize,
}

impl Geometry {
    /// For an `h × w` input, a `k × k` kernel, `padding`, optionally upsampled 2× first, laid
    /// out as one padded copy (`one_copy`) or `k` shifted ones.
    pub(crate) fn new(
        h: usize,
        w: usize,
        k: usize,
        padding: Padding4,
        upsample2x: bool,
        one_copy: bool,
    ) -> Result<Self> {
        let [pt, pb, pl, pr] = padding;
        let up = usize::from(upsample2x);
        let (hu, wu) = (h << up, w << up);
        let (hp, wfull) = (hu + pt + pb, wu + pl + pr);
        if hp < k || wfull < k {
            return Err(Error::invalid(format!(
                "shifted convolution: a {hu}x{wu} map padded by {padding:?} is smaller than \
                 the {k}x{k} kernel"
            )));
        }
        let ow = wfull + 1 - k;
        Ok(Self {
            hu,
            hp,
            wfull,
            wp: if one_copy || padded_rows() { wfull } else { ow }.div_ceil(8) * 8,
            oh: hp + 1 - k,
            ow,
        })
    }
}

impl Geometry {
    /// Whether the copy of a `k`×`k` convolution's input (without a norm read on the way)
    /// would equal the input itself, so the GEMM reads the input in place: a 1×1 kernel
    /// without padding or upsampling over rows already a multiple of 8 wide (the UNet's
    /// shortcuts).
    pub(crate) fn reads_input_in_place(&self, k: usize, padding: Padding4, w: usize) -> bool {
        k == 1 && padding == [0; 4] && self.wfull == w && self.wp == w
    }

    /// The columns of the fused kernels' GEMM (`kernels/conv_gemm_common.cuh`, `grid_at`):
    /// the output's positions where its width is a multiple of 8 (a 16-byte chunk never
    /// crosses a row), else the whole `oh × wp` grid, cropped in their epilogue.
    pub(crate) fn fused_columns(&self) -> usize {
        if self.ow % 8 == 0 {
            self.oh * self.ow
        } else {
            self.oh * self.wp
        }
    }
}

/// The crop kernel's block (`conv_finish`), `(tx, ty)`: 4 columns per thread, as many output
/// rows per block as fit in 256 threads (the 12×12 maps would leave most of a one-row block
/// idle). Where the kernel leaves GroupNorm statistics, the rows per block are halved until
/// they divide a group's `group_rows` (`cpg·OH`), so that each block lies in one group (`ty`
/// is a power of two: 1 always divides). Pure, so tested without the `cuda` feature.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn finish_block(ow: usize, group_rows: Option<usize>) -> (usize, usize) {
    let tx = ow.div_ceil(4).div_ceil(32).clamp(1, 8) * 32;
    let mut ty = 256 / tx;
    if let Some(r) = group_rows {
        while r % ty != 0 {
            ty /= 2;
        }
    }
    (tx, ty)
}

/// A stride-1, dilation-1, ungrouped `k`×`k` convolution kept in the layout the CUDA kernel
/// reads (weight taps `[k, Cout, k·Cin]`, arranged once at load).
#[derive(Debug, Clone)]
pub struct ShiftedConv {
    taps: Tensor,
    bias: Option<Tensor>,
    padding: Padding4,
    /// The four 2×2 phase convolutions of [`Self::forward_subpixel`], made at first use.
    phases: std::sync::OnceLock<Vec<ShiftedConv>>,
    /// Bytes of scratch above which a call runs in bands ([`Self::with_scratch_limit`]).
    scratch_limit: Option<usize>,
}

impl ShiftedConv {
    /// Whether a convolution with these parameters can run here (CUDA only).
    pub fn covers(
        device: &candle_core::Device,
        kernel: (usize, usize),
        stride: usize,
        dilation: usize,
        groups: usize,
    ) -> bool {
        cfg!(feature = "cuda")
            && device.is_cuda()
            && kernel.0 == kernel.1
            && stride == 1
            && dilation == 1
            && groups == 1
    }

    /// Arrange `weight` `[Cout, Cin, k, k]` (and keep `bias` `[Cout]`) for the kernel.
    pub fn new(weight: &Tensor, bias: Option<&Tensor>, padding: Padding4) -> Result<Self> {
        let (_, _, kh, kw) = weight.dims4()?;
        if kh != kw {
            return Err(Error::invalid(format!(
                "shifted convolution: {kh}x{kw} kernel, only square kernels are supported"
            )));
        }
        // (dy, co, dx, ci): row dy of the kernel is one [Cout, k·Cin] matrix.
        let taps = weight.permute((2, 0, 3, 1))?.contiguous()?;
        let (k, cout, _, cin) = taps.dims4()?;
        Ok(Self {
            taps: taps.reshape((k, cout, k * cin))?,
            bias: bias.cloned(),
            padding,
            phases: std::sync::OnceLock::new(),
            scratch_limit: None,
        })
    }

    /// Run calls whose scratch (the shifted copies and the f32 accumulator) would exceed
    /// `bytes` in bands of output rows ([`Self::forward_banded`]); `None` (the default):
    /// never. The networks set it from GPU measurements, to keep peak memory at or below
    /// diffusers' (`KANDINSKY_CONV_SCRATCH_MB=N` overrides it for every convolution, `0`
    /// turns banding off).
    pub fn with_scratch_limit(mut self, bytes: Option<usize>) -> Self {
        self.scratch_limit = bytes;
        self
    }

    /// Whether [`Self::forward_subpixel`] applies: a 3×3 kernel padded by one on every side
    /// (the upsampling convolutions of the UNet's and MoVQ's decoders).
    pub fn subpixel_covers(&self) -> bool {
        self.taps.dim(0).ok() == Some(3) && self.padding == [1; 4]
    }

    /// `conv(pad(nearest_2x(x)))` (+ bias, + `residual`) as four 2×2 convolutions of `x`.
    /// Output pixel (2i + py, 2j + px) reads upsampled rows 2i + py − 1 ..= 2i + py + 1,
    /// which are rows i − 1, i, i of `x` for py = 0 and i, i, i + 1 for py = 1 (columns
    /// alike): per output phase (py, px) the 3×3 taps fold into 2×2 ones (summed where two
    /// read the same pixel of `x`) over `x` padded by one on the phase's side. 16 instead of
    /// 36 products per output and input channel, and no copies of the upsampled map; the
    /// folded weights are summed in f32 and rounded once to the storage type (the only
    /// difference to the direct convolution: at most one rounding of a weight). The four
    /// outputs are interleaved by two stacking copies. Needs [`Self::subpixel_covers`].
    pub fn forward_subpixel(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        if !self.subpixel_covers() {
            return Err(Error::invalid(format!(
                "sub-pixel convolution: needs a 3x3 kernel padded by 1, got {}x{} padded by {:?}",
                self.taps.dim(0)?,
                self.taps.dim(0)?,
                self.padding
            )));
        }
        let (b, _, h, w) = x.dims4()?;
        let cout = self.out_channels();
        let phases = self.phases()?;
        let phase = |i: usize| -> Result<Tensor> { phases[i].forward(x, false, None) };
        // Output rows of phase py: its two column phases interleaved along the width.
        let rows = |py: usize| -> Result<Tensor> {
            Ok(
                Tensor::stack(&[phase(2 * py)?, phase(2 * py + 1)?], 4)?.reshape((
                    b,
                    cout,
                    h,
                    2 * w,
                ))?,
            )
        };
        let y = Tensor::stack(&[rows(0)?, rows(1)?], 3)?.reshape((b, cout, 2 * h, 2 * w))?;
        Ok(match residual {
            Some(r) => (y + r)?,
            None => y,
        })
    }

    /// The phase convolutions of [`Self::forward_subpixel`], phase (py, px) at 2·py + px:
    /// 2×2 taps `[2, Cout, 2·Cin]`, padding `[1 − py, py, 1 − px, px]`.
    fn phases(&self) -> Result<&[ShiftedConv]> {
        if let Some(p) = self.phases.get() {
            return Ok(p);
        }
        let (_, cout, kc) = self.taps.dims3()?;
        let c = kc / 3;
        let taps = self
            .taps
            .to_dtype(candle_core::DType::F32)?
            .reshape((3, cout, 3, c))?;
        // The 3×3 taps that tap e of phase p reads: (0, 0) the first alone, (0, 1) the
        // second and third, (1, 0) the first and second, (1, 1) the third.
        let fold = |p: usize, e: usize| match (p, e) {
            (0, 0) => (0, 1),
            (0, _) => (1, 2),
            (_, 0) => (0, 2),
            _ => (2, 1),
        };
        let mut out = Vec::with_capacity(4);
        for py in 0..2 {
            for px in 0..2 {
                let mut rows = Vec::with_capacity(2);
                for ey in 0..2 {
                    let (y0, ny) = fold(py, ey);
                    let row = taps.narrow(0, y0, ny)?.sum_keepdim(0)?;
                    let mut cols = Vec::with_capacity(2);
                    for ex in 0..2 {
                        let (x0, nx) = fold(px, ex);
                        cols.push(row.narrow(2, x0, nx)?.sum_keepdim(2)?);
                    }
                    rows.push(Tensor::cat(&cols, 2)?);
                }
                out.push(ShiftedConv {
                    taps: Tensor::cat(&rows, 0)?
                        .reshape((2, cout, 2 * c))?
                        .to_dtype(self.taps.dtype())?,
                    bias: self.bias.clone(),
                    padding: [1 - py, py, 1 - px, px],
                    phases: std::sync::OnceLock::new(),
                    scratch_limit: self.scratch_limit,
                });
            }
        }
        // A concurrent first call may have set them already: either set is the same.
        let _ = self.phases.set(out);
        self.phases
            .get()
            .map(Vec::as_slice)
            .ok_or_else(|| Error::invalid("sub-pixel convolution: phases not made"))
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.taps.dims()[1]
    }

    /// `conv(pad(x)) + bias`, or with `upsample2x` `conv(pad(nearest_2x(x))) + bias`
    /// (the upsampled map is never materialised), plus `residual` where given (same shape
    /// as the output), for `x` `[B, Cin, H, W]`: the CUDA kernels on a CUDA device (with the
    /// `cuda` feature), [`Self::forward_reference`] elsewhere. With
    /// a scratch limit ([`Self::with_scratch_limit`], or `KANDINSKY_CONV_SCRATCH_MB=N`, read
    /// once) a convolution whose scratch would exceed it runs in bands of output rows
    /// ([`Self::forward_banded`]), and with `KANDINSKY_CONV_SUBPIXEL=1` an upsampling 3×3
    /// one as [`Self::forward_subpixel`] (off by default: slower in GPU run 10).
    pub fn forward(
        &self,
        x: &Tensor,
        upsample2x: bool,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        if upsample2x && subpixel() && self.subpixel_covers() {
            return self.forward_subpixel(x, residual);
        }
        match self.band_limit(x, upsample2x)? {
            Some(limit) => self.forward_banded(x, upsample2x, residual, limit),
            None => self.run(x, upsample2x, residual, self.padding),
        }
    }

    /// `Some(limit)` when a whole-map call on `x` would take more scratch than the limit
    /// (`KANDINSKY_CONV_SCRATCH_MB`, else [`Self::with_scratch_limit`]'s): the convolution
    /// then runs in bands.
    fn band_limit(&self, x: &Tensor, upsample2x: bool) -> Result<Option<usize>> {
        let limit = match scratch_limit_env() {
            Some(0) => None,
            Some(env) => Some(env),
            None => self.scratch_limit,
        };
        Ok(match limit {
            Some(limit) if self.scratch_bytes(x, upsample2x)? > limit => Some(limit),
            _ => None,
        })
    }

    /// [`Self::forward`] of `input_norm` applied to `x`. With `KANDINSKY_CONV_NORM=1` on
    /// CUDA the copy kernel normalises on read (the statistics one pass before, or those of
    /// [`InputNorm::stats`]; in bands, the whole map's), so the normalised map is never
    /// written; otherwise the norm is applied first.
    pub fn forward_normed(
        &self,
        x: &Tensor,
        input_norm: InputNorm<'_>,
        upsample2x: bool,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        Ok(self
            .forward_normed_stats(x, input_norm, upsample2x, residual, None)?
            .0)
    }

    /// [`Self::forward_normed`], and with `stats_groups` also the GroupNorm statistics of the
    /// output in that many groups, for the norm that reads it next ([`InputNorm::stats`]):
    /// left by the crop kernel where `KANDINSKY_CONV_STATS=1` (read once) and the call runs on
    /// CUDA over the whole map with cuBLAS summing the rows; `None` elsewhere.
    pub fn forward_normed_stats(
        &self,
        x: &Tensor,
        input_norm: InputNorm<'_>,
        upsample2x: bool,
        residual: Option<&Tensor>,
        stats_groups: Option<usize>,
    ) -> Result<(Tensor, Option<MapStats>)> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() && crate::nn::use_fused_kernels() {
            let stats_groups = stats_groups.filter(|_| output_stats());
            // An upsampling convolution run as phases (KANDINSKY_CONV_SUBPIXEL=1) reads the
            // small map four times: normalising it once first costs less than what the phases
            // save.
            let phased = upsample2x && subpixel() && self.subpixel_covers();
            if norm_on_read() && !phased {
                return match self.band_limit(x, upsample2x)? {
                    Some(limit) => Ok((
                        self.forward_norm_on_read_banded(
                            x, input_norm, upsample2x, residual, limit,
                        )?,
                        None,
                    )),
                    None => {
                        self.norm_on_read_stats(x, input_norm, upsample2x, residual, stats_groups)
                    }
                };
            }
            if stats_groups.is_some() && !phased {
                let h = input_norm.apply(x)?;
                if self.band_limit(&h, upsample2x)?.is_none() {
                    return self.cuda_stats(&h, None, upsample2x, residual, stats_groups);
                }
                return Ok((self.forward(&h, upsample2x, residual)?, None));
            }
        }
        #[cfg(not(feature = "cuda"))]
        let _ = stats_groups;
        Ok((
            self.forward(&input_norm.apply(x)?, upsample2x, residual)?,
            None,
        ))
    }

    /// [`Self::forward_norm_on_read`] in bands of output rows ([`Self::forward_banded`]),
    /// each band normalised with the whole map's statistics (computed once, or those of
    /// [`InputNorm::stats`]). CUDA only.
    #[cfg(feature = "cuda")]
    pub fn forward_norm_on_read_banded(
        &self,
        x: &Tensor,
        input_norm: InputNorm<'_>,
        upsample2x: bool,
        residual: Option<&Tensor>,
        max_scratch_bytes: usize,
    ) -> Result<Tensor> {
        input_norm.check(x)?;
        let (_, _, h, _) = x.dims4()?;
        let stats = match input_norm.stats {
            Some(st) => st.cuda().clone(),
            None => crate::cuda::group_norm_stats(x, input_norm.norm.parts().2)?,
        };
        self.in_bands(
            x,
            upsample2x,
            residual,
            max_scratch_bytes,
            |band, row0, padding, res| {
                Ok(crate::cuda::shifted_conv(
                    band,
                    &self.taps,
                    self.bias.as_ref(),
                    crate::cuda::ConvOptions {
                        pad: padding,
                        upsample2x,
                        residual: res,
                        input_norm: Some((
                            input_norm,
                            Some(crate::cuda::NormBand {
                                stats: stats.clone(),
                                row0,
                                hfull: h,
                            }),
                        )),
                        gemm: self.auto_gemm(band, upsample2x, padding)?,
                    },
                )?)
            },
        )
    }

    /// [`Self::forward_normed`] always normalising on read (the kernel `KANDINSKY_CONV_NORM=1`
    /// selects; whole map, no banding), for checks against the two-step path. CUDA only.
    #[cfg(feature = "cuda")]
    pub fn forward_norm_on_read(
        &self,
        x: &Tensor,
        input_norm: InputNorm<'_>,
        upsample2x: bool,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        Ok(self
            .norm_on_read_stats(x, input_norm, upsample2x, residual, None)?
            .0)
    }

    /// The CUDA op over the whole map (on the selected path) that also leaves the output's
    /// GroupNorm statistics in `groups` groups whatever `KANDINSKY_CONV_STATS` says (`None`
    /// where a fused GEMM runs), for checks against the statistics pass. CUDA only.
    #[cfg(feature = "cuda")]
    pub fn forward_leaving_stats(
        &self,
        x: &Tensor,
        upsample2x: bool,
        residual: Option<&Tensor>,
        groups: usize,
    ) -> Result<(Tensor, Option<MapStats>)> {
        self.cuda_stats(x, None, upsample2x, residual, Some(groups))
    }

    /// [`Self::forward_norm_on_read`] that also returns the output's statistics in
    /// `stats_groups` groups where the cuBLAS path runs.
    #[cfg(feature = "cuda")]
    fn norm_on_read_stats(
        &self,
        x: &Tensor,
        input_norm: InputNorm<'_>,
        upsample2x: bool,
        residual: Option<&Tensor>,
        stats_groups: Option<usize>,
    ) -> Result<(Tensor, Option<MapStats>)> {
        input_norm.check(x)?;
        let (_, _, h, _) = x.dims4()?;
        // Given statistics are the whole map's: a band of all its rows.
        let band = input_norm.stats.map(|st| crate::cuda::NormBand {
            stats: st.cuda().clone(),
            row0: 0,
            hfull: h,
        });
        self.cuda_stats(
            x,
            Some((input_norm, band)),
            upsample2x,
            residual,
            stats_groups,
        )
    }

    /// The CUDA op over the whole map on the selected path, with the output's statistics where
    /// asked for and the cuBLAS path runs.
    #[cfg(feature = "cuda")]
    fn cuda_stats(
        &self,
        x: &Tensor,
        input_norm: Option<(InputNorm<'_>, Option<crate::cuda::NormBand>)>,
        upsample2x: bool,
        residual: Option<&Tensor>,
        stats_groups: Option<usize>,
    ) -> Result<(Tensor, Option<MapStats>)> {
        let (y, stats) = crate::cuda::shifted_conv_with_stats(
            x,
            &self.taps,
            self.bias.as_ref(),
            crate::cuda::ConvOptions {
                pad: self.padding,
                upsample2x,
                residual,
                input_norm,
                gemm: self.auto_gemm(x, upsample2x, self.padding)?,
            },
            stats_groups,
        )?;
        Ok((y, stats.map(MapStats)))
    }

    /// One whole-map convolution with explicit padding: the CUDA op, or the reference.
    fn run(
        &self,
        x: &Tensor,
        upsample2x: bool,
        residual: Option<&Tensor>,
        padding: Padding4,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let gemm = self.auto_gemm(x, upsample2x, padding)?;
            return self.run_cuda(x, upsample2x, residual, padding, gemm);
        }
        self.reference(x, upsample2x, residual, padding)
    }

    /// The CUDA op on the whole map with the rows summed by `gemm` (where it covers the
    /// dtype and channels), for checks and timings of one path against the other.
    #[cfg(feature = "cuda")]
    pub fn forward_gemm(
        &self,
        x: &Tensor,
        upsample2x: bool,
        residual: Option<&Tensor>,
        gemm: ConvGemm,
    ) -> Result<Tensor> {
        self.run_cuda(x, upsample2x, residual, self.padding, gemm)
    }

    #[cfg(feature = "cuda")]
    fn run_cuda(
        &self,
        x: &Tensor,
        upsample2x: bool,
        residual: Option<&Tensor>,
        padding: Padding4,
        gemm: ConvGemm,
    ) -> Result<Tensor> {
        Ok(crate::cuda::shifted_conv(
            x,
            &self.taps,
            self.bias.as_ref(),
            crate::cuda::ConvOptions {
                pad: padding,
                upsample2x,
                residual,
                input_norm: None,
                gemm,
            },
        )?)
    }

    /// What sums the kernel rows of this call on the selected path (`KANDINSKY_CONV_GEMM`):
    /// a fused kernel where it covers the dtype and channels and suits the shape
    /// ([`Self::fused_suits`]), cuBLAS otherwise.
    fn auto_gemm(&self, x: &Tensor, upsample2x: bool, padding: Padding4) -> Result<ConvGemm> {
        let (_, c, _, _) = x.dims4()?;
        let k = self.taps.dim(0)?;
        let gemm = ConvGemm::selected().effective(x.dtype(), k, c);
        if gemm == ConvGemm::Cublas || !x.device().is_cuda() {
            return Ok(gemm);
        }
        Ok(if self.fused_suits(x, upsample2x, padding)? {
            gemm
        } else {
            ConvGemm::Cublas
        })
    }

    /// Whether the fused kernels suit this call (and run on the selected path): at least
    /// one 128-channel tile of outputs (the output convolutions' 3 or 8 channels would
    /// leave most of every tile's products unused), and a grid that gives every
    /// multiprocessor of the GPU a block (on the small maps of the UNet's inner levels a
    /// few blocks, each a long serial reduction, would lose to cuBLAS's split kernels).
    pub fn fused_suits(&self, x: &Tensor, upsample2x: bool, padding: Padding4) -> Result<bool> {
        let (b, c, h, w) = x.dims4()?;
        let (k, cout, _) = self.taps.dims3()?;
        if cout < 128 {
            return Ok(false);
        }
        let one_copy = ConvGemm::selected().effective(x.dtype(), k, c).one_copy();
        let g = Geometry::new(h, w, k, padding, upsample2x, one_copy)?;
        let (gx, gy, gz) = fused_gemm_grid(b, cout, g.fused_columns());
        Ok(gx * gy * gz >= multiprocessors(x.device())?)
    }

    /// Bytes of scratch one whole-map call takes: the `k` shifted copies of the padded
    /// input (one for the one-copy kernels) and, where cuBLAS sums the rows, the f32
    /// accumulator (as `cuda::shifted_conv` allocates them).
    pub fn scratch_bytes(&self, x: &Tensor, upsample2x: bool) -> Result<usize> {
        let (b, c, h, w) = x.dims4()?;
        let (k, cout, _) = self.taps.dims3()?;
        let gemm = self.auto_gemm(x, upsample2x, self.padding)?;
        let g = Geometry::new(h, w, k, self.padding, upsample2x, gemm.one_copy())?;
        let copies = if g.reads_input_in_place(k, self.padding, w) {
            0
        } else if gemm.one_copy() {
            1
        } else {
            k
        };
        let acc = match gemm {
            ConvGemm::Cublas => cout * g.oh * g.wp * 4,
            _ => 0,
        };
        Ok(b * (copies * c * g.hp * g.wp * x.dtype().size_in_bytes() + acc))
    }

    /// [`Self::forward`] in horizontal bands of output rows, each band's scratch within
    /// `max_scratch_bytes` (at least one row per band): each band convolves the input rows
    /// its kernel reaches, zero-padded only at the map's borders, and the bands are
    /// concatenated. With the upsampling folded in, a band starting or ending inside a
    /// low-resolution row computes one extra row, which is cropped.
    pub fn forward_banded(
        &self,
        x: &Tensor,
        upsample2x: bool,
        residual: Option<&Tensor>,
        max_scratch_bytes: usize,
    ) -> Result<Tensor> {
        self.in_bands(
            x,
            upsample2x,
            residual,
            max_scratch_bytes,
            |band, _, padding, res| self.run(band, upsample2x, res, padding),
        )
    }

    /// The banding of [`Self::forward_banded`], each band convolved by `run_band(input rows,
    /// index of their first row in x, padding, the residual's rows for its output)`. The
    /// input rows and the residual rows are views into `x` and `residual`, which the CUDA
    /// kernels read in place (GPU run 10: copying them and adding the residual afterwards
    /// with candle's strided kernels took 20 of a banded 768 px MoVQ decode's 55 ms).
    fn in_bands(
        &self,
        x: &Tensor,
        upsample2x: bool,
        residual: Option<&Tensor>,
        max_scratch_bytes: usize,
        mut run_band: impl FnMut(&Tensor, usize, Padding4, Option<&Tensor>) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let (k, cout, _) = self.taps.dims3()?;
        let [pt, _, pl, pr] = self.padding;
        let one_copy = self.auto_gemm(x, upsample2x, self.padding)?.one_copy();
        let Geometry { hu, wp, oh, ow, .. } =
            Geometry::new(h, w, k, self.padding, upsample2x, one_copy)?;
        let per_row = b * wp * (k * c * x.dtype().size_in_bytes() + cout * 4);
        let rows = (max_scratch_bytes / per_row.max(1))
            .saturating_sub(k - 1)
            .max(1);
        // Each band is copied into the output as soon as it exists: one band's result is
        // held at a time, not all of them until a concatenation (an output's worth less at
        // the peak).
        let mut out: Option<Tensor> = None;
        let mut r0 = 0;
        while r0 < oh {
            let r1 = (r0 + rows).min(oh);
            // Rows [a, e) of the (upsampled) map feed output rows [r0, r1); outside the map
            // they are the zero padding.
            let (a, e) = (
                r0 as isize - pt as isize,
                (r1 + k - 1) as isize - pt as isize,
            );
            let (ca, ce) = (a.max(0) as usize, (e.min(hu as isize)).max(0) as usize);
            let (top, bottom) = ((ca as isize - a) as usize, (e - ce as isize) as usize);
            // With the upsampling folded in, a band starting or ending inside a low-resolution
            // row computes one more output row there, cropped below.
            let (lo, hi, extra_top, extra_bottom) = if upsample2x {
                (ca / 2, ce.div_ceil(2), ca % 2, ce % 2)
            } else {
                (ca, ce, 0, 0)
            };
            if hi <= lo {
                return Err(Error::invalid(format!(
                    "shifted convolution: padding {:?} reaches past a whole band of a {k}x{k} \
                     kernel",
                    self.padding
                )));
            }
            let band_in = x.narrow(2, lo, hi - lo)?;
            // The residual's rows for every row the band computes, where they exist (the
            // extra rows' sums are cropped); otherwise it is added after the crop.
            let fused_res = residual
                .filter(|_| r0 >= extra_top && r1 + extra_bottom <= oh)
                .map(|r| r.narrow(2, r0 - extra_top, r1 - r0 + extra_top + extra_bottom))
                .transpose()?;
            let y = run_band(&band_in, lo, [top, bottom, pl, pr], fused_res.as_ref())?;
            let mut y = y.narrow(2, extra_top, r1 - r0)?;
            if let (Some(r), None) = (residual, &fused_res) {
                y = (y + r.narrow(2, r0, r1 - r0)?)?;
            }
            if r0 == 0 && r1 == oh {
                return Ok(y.contiguous()?);
            }
            let dst = match &out {
                Some(o) => o,
                None => out.insert(Tensor::zeros((b, cout, oh, ow), y.dtype(), y.device())?),
            };
            dst.slice_set(&y.contiguous()?, 2, r0)?;
            r0 = r1;
        }
        out.ok_or_else(|| Error::invalid("shifted convolution: an empty output"))
    }

    /// The same decomposition in candle ops (any device): the shifted, flattened copies,
    /// one matrix product per kernel row, the crop. What the CUDA kernels compute, kept as the
    /// reference the unit tests hold against candle's `conv2d`.
    pub fn forward_reference(
        &self,
        x: &Tensor,
        upsample2x: bool,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.reference(x, upsample2x, residual, self.padding)
    }

    fn reference(
        &self,
        x: &Tensor,
        upsample2x: bool,
        residual: Option<&Tensor>,
        padding: Padding4,
    ) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let (k, cout, _) = self.taps.dims3()?;
        let [pt, pb, pl, pr] = padding;
        let x = if upsample2x {
            x.upsample_nearest2d(2 * h, 2 * w)?
        } else {
            x.clone()
        };
        let Geometry {
            hp,
            wfull,
            wp,
            oh,
            ow,
            ..
        } = Geometry::new(h, w, k, padding, upsample2x, false)?;
        let s = hp * wp;
        let n = oh * wp;
        // Zero columns on the right so that every copy's `wp` columns lie inside.
        let padded = x.pad_with_zeros(2, pt, pb)?.pad_with_zeros(
            3,
            pl,
            pr + (wp + k - 1).saturating_sub(wfull),
        )?;
        // Copy dx: column x of each row is column x + dx of the padded map, flattened.
        let copies = (0..k)
            .map(|dx| padded.narrow(3, dx, wp)?.reshape((b, c, s)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let x3 = Tensor::cat(&copies, 1)?;
        let taps = self.taps.to_dtype(x.dtype())?;
        let mut acc: Option<Tensor> = None;
        for dy in 0..k {
            let wd = taps.get(dy)?.unsqueeze(0)?.broadcast_as((b, cout, k * c))?;
            let term = wd
                .contiguous()?
                .matmul(&x3.narrow(2, dy * wp, n)?.contiguous()?)?;
            acc = Some(match acc {
                Some(a) => (a + term)?,
                None => term,
            });
        }
        let Some(acc) = acc else {
            return Err(Error::invalid("shifted convolution: empty kernel"));
        };
        let mut y = acc.reshape((b, cout, oh, wp))?.narrow(3, 0, ow)?;
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(&bias.to_dtype(y.dtype())?.reshape((1, cout, 1, 1))?)?;
        }
        if let Some(r) = residual {
            y = (y + r)?;
        }
        Ok(y.contiguous()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// The decomposition equals candle's convolution: odd sizes (the row stride rounded up
    /// to 8 leaves columns to crop), 1×1 and 3×3 kernels, asymmetric padding, the folded
    /// upsampling and the residual.
    #[test]
    fn shifted_decomposition_equals_candle_conv2d() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        for (cin, cout, k, h, w, pad, up) in [
            (
                5usize,
                7usize,
                3usize,
                9usize,
                11usize,
                [1usize, 1, 1, 1],
                false,
            ),
            (4, 6, 3, 6, 5, [1, 1, 1, 1], true),
            (3, 8, 1, 7, 13, [0, 0, 0, 0], false),
            (6, 4, 3, 8, 8, [0, 1, 0, 1], false),
            (2, 3, 5, 12, 10, [2, 2, 2, 2], false),
        ] {
            let x = Tensor::randn(0f32, 1.0, (2, cin, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1.0, (cout, cin, k, k), &dev)?;
            let bias = Tensor::randn(0f32, 1.0, cout, &dev)?;
            let conv = ShiftedConv::new(&wt, Some(&bias), pad)?;
            let xin = if up {
                x.upsample_nearest2d(2 * h, 2 * w)?
            } else {
                x.clone()
            };
            let expected = xin
                .pad_with_zeros(2, pad[0], pad[1])?
                .pad_with_zeros(3, pad[2], pad[3])?
                .conv2d(&wt, 0, 1, 1, 1)?
                .broadcast_add(&bias.reshape((1, cout, 1, 1))?)?;
            let residual = Tensor::randn(0f32, 1.0, expected.dims(), &dev)?;
            let got = conv.forward(&x, up, Some(&residual))?;
            let expected = (expected + &residual)?;
            assert_eq!(got.dims(), expected.dims());
            let err = (&got - &expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = expected.abs()?.max_all()?.to_scalar::<f32>()?;
            // f32 sums in another order: a few ulps of the largest value.
            assert!(
                err <= 1e-5 * scale,
                "k {k} pad {pad:?} up {up}: {err} of {scale}"
            );
            assert_eq!(got.dtype(), DType::F32);
        }
        Ok(())
    }

    /// Bands of output rows give the whole-map result: one-row bands, bands starting and
    /// ending inside upsampled rows, the residual, asymmetric padding, 1×1 and 5×5 kernels.
    #[test]
    fn banded_equals_whole_map() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        for (cin, cout, k, h, w, pad, up, res) in [
            (
                3usize,
                5usize,
                3usize,
                9usize,
                7usize,
                [1usize, 1, 1, 1],
                false,
                true,
            ),
            (4, 4, 3, 5, 6, [1, 1, 1, 1], true, true),
            (2, 3, 3, 6, 5, [0, 1, 0, 1], false, false),
            (3, 2, 1, 7, 9, [0, 0, 0, 0], true, false),
            (2, 3, 5, 11, 8, [2, 2, 2, 2], false, true),
            (2, 2, 5, 6, 6, [2, 2, 2, 2], true, false),
        ] {
            let x = Tensor::randn(0f32, 1.0, (2, cin, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1.0, (cout, cin, k, k), &dev)?;
            let bias = Tensor::randn(0f32, 1.0, cout, &dev)?;
            let conv = ShiftedConv::new(&wt, Some(&bias), pad)?;
            let whole = conv.forward_reference(&x, up, None)?;
            let residual = Tensor::randn(0f32, 1.0, whole.dims(), &dev)?;
            let (expected, r) = if res {
                ((&whole + &residual)?, Some(&residual))
            } else {
                (whole.clone(), None)
            };
            let scale = expected.abs()?.max_all()?.to_scalar::<f32>()?;
            // From one output row per band up to everything in one band.
            let per_row = conv.scratch_bytes(&x, up)? / whole.dim(2)?;
            for limit in [1usize, 2 * per_row, 3 * per_row + 1, usize::MAX] {
                let got = conv.forward_banded(&x, up, r, limit)?;
                assert_eq!(got.dims(), expected.dims());
                let err = (&got - &expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
                // The same sums per output row; only the GEMM blocking may differ.
                assert!(
                    err <= 1e-5 * scale,
                    "k {k} pad {pad:?} up {up} limit {limit}: {err} of {scale}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn fused_gemms_fall_back_where_they_do_not_cover() {
        use ConvGemm::*;
        let wgmma = cfg!(kandinsky_wgmma);
        for (name, g) in ConvGemm::NAMED {
            // f32, and k·Cin not a multiple of 8 (conv_in: 3·4 channels), stay on cuBLAS.
            assert_eq!(g.effective(DType::F32, 3, 384), Cublas, "{name}");
            assert_eq!(g.effective(DType::F16, 3, 4), Cublas, "{name}");
            // Covered shapes keep the kernel asked for (wgmma where it was built).
            let want = match g {
                Wgmma if !wgmma => Mma,
                WgmmaOneCopy if !wgmma => MmaOneCopy,
                g => g,
            };
            assert_eq!(g.effective(DType::BF16, 3, 384), want, "{name}");
            assert_eq!(g.effective(DType::F16, 1, 8), want, "{name}");
        }
        // The one-copy kernels shift by at most two columns: larger kernels read k copies.
        assert_eq!(MmaOneCopy.effective(DType::F16, 5, 8), Mma);
        let want = if wgmma { Wgmma } else { Mma };
        assert_eq!(WgmmaOneCopy.effective(DType::F16, 5, 8), want);
    }

    /// The four 2×2 phase convolutions equal the 3×3 convolution of the nearest-2×-upsampled
    /// map: odd channel counts, a non-square map, a 1×1 map (every phase's padding reaches
    /// past it), bias and residual, batch 2. f32: the folded weights are exact to f32
    /// rounding, so 1e-5 of the largest output.
    #[test]
    fn subpixel_phases_equal_the_upsampled_convolution() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        for (b, cin, cout, h, w, res) in [
            (2usize, 5usize, 7usize, 4usize, 6usize, true),
            (1, 3, 4, 1, 1, false),
            (1, 8, 16, 5, 3, false),
        ] {
            let weight = Tensor::randn(0f32, 1.0, (cout, cin, 3, 3), &dev)?;
            let bias = Tensor::randn(0f32, 1.0, cout, &dev)?;
            let x = Tensor::randn(0f32, 1.0, (b, cin, h, w), &dev)?;
            let r = Tensor::randn(0f32, 1.0, (b, cout, 2 * h, 2 * w), &dev)?;
            let mut want = x
                .upsample_nearest2d(2 * h, 2 * w)?
                .conv2d(&weight, 1, 1, 1, 1)?
                .broadcast_add(&bias.reshape((1, cout, 1, 1))?)?;
            if res {
                want = (want + &r)?;
            }
            let conv = ShiftedConv::new(&weight, Some(&bias), [1; 4])?;
            assert!(conv.subpixel_covers());
            let got = conv.forward_subpixel(&x, res.then_some(&r))?;
            assert_eq!(got.dims(), want.dims());
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
            let err = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                err <= 1e-5 * scale,
                "{b}x{cin}->{cout} {h}x{w}: {err} of {scale}"
            );
        }
        // Not an upsampling convolution: refused with the reason.
        let one = ShiftedConv::new(
            &Tensor::zeros((2, 2, 1, 1), DType::F32, &dev)?,
            None,
            [0; 4],
        )?;
        assert!(!one.subpixel_covers());
        let e = one
            .forward_subpixel(&Tensor::zeros((1, 2, 2, 2), DType::F32, &dev)?, None)
            .unwrap_err();
        assert!(e.to_string().contains("3x3"), "{e}");
        Ok(())
    }

    /// Only a copy that would equal the input is skipped: 1×1, unpadded, not upsampled, rows
    /// a multiple of 8 (then the copy's `[C, H·W]` rows are the input's).
    #[test]
    fn input_read_in_place_only_where_the_copy_equals_it() -> anyhow::Result<()> {
        let in_place = |h, w, k, pad, up| -> anyhow::Result<bool> {
            let g = Geometry::new(h, w, k, pad, up, false)?;
            Ok(g.reads_input_in_place(k, pad, w))
        };
        assert!(in_place(96, 96, 1, [0; 4], false)?);
        assert!(in_place(5, 16, 1, [0; 4], false)?);
        assert!(
            !in_place(12, 12, 1, [0; 4], false)?,
            "rows of 12 are stored 16 apart"
        );
        assert!(!in_place(8, 8, 1, [0; 4], true)?, "upsampled");
        assert!(!in_place(8, 8, 1, [1; 4], false)?, "padded");
        assert!(
            !in_place(8, 8, 1, [0, 0, 0, 8], false)?,
            "padded on the right only"
        );
        assert!(!in_place(8, 8, 3, [1; 4], false)?, "3x3");
        Ok(())
    }

    /// The crop kernel's blocks with statistics: whole warps, at most 256 threads, and each
    /// block inside one group (its rows divide the group's), for every output width up to
    /// 1024 and the group sizes of the UNet (12–96 channels per group) and MoVQ (4–16) at
    /// their map heights, odd ones included; without statistics the block is as before.
    #[test]
    fn crop_blocks_lie_in_one_group() {
        for ow in 1..=1024usize {
            let (tx, ty) = finish_block(ow, None);
            assert!(
                tx % 32 == 0 && tx * ty <= 256 && tx * ty >= 128,
                "{ow}: {tx}x{ty}"
            );
            for cpg in [1usize, 4, 8, 12, 16, 24, 36, 48, 96] {
                for oh in [1usize, 5, 7, 12, 15, 24, 48, 96, 128, 256, 768] {
                    let (sx, sy) = finish_block(ow, Some(cpg * oh));
                    assert_eq!(sx, tx);
                    assert!(
                        sy >= 1 && sy <= ty && (cpg * oh) % sy == 0,
                        "{ow} {cpg} {oh}"
                    );
                }
            }
        }
    }

    #[test]
    fn non_square_kernels_are_refused() {
        let wt = Tensor::zeros((2, 2, 3, 1), DType::F32, &Device::Cpu).unwrap();
        let e = ShiftedConv::new(&wt, None, [1, 1, 0, 0]).unwrap_err();
        assert!(e.to_string().contains("3x1"), "{e}");
    }
}
