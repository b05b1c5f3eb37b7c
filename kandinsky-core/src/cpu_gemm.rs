//! Register-tiled f32 GEMM micro-kernels for the CPU (x86-64 AVX2/FMA), and the linear layer
//! built on them.
//!
//! One kernel shape serves every product: `C[R × 16] (+)= scale · A[R × k] · B[k × 16]` with
//! `R ≤ 6` rows of `A` broadcast from their row-major storage and `B` read as two registers
//! per `k` (12 accumulators of the 16 ymm registers). `B` is either a packed panel (16
//! columns interleaved per `k`: the keys of attention's `Q·Kᵀ`, a linear layer's weight) or
//! a row-major matrix whose rows already hold 16 adjacent columns (`V` in `P·V`).
//!
//! Why not the `gemm` crate (what candle uses): it packs both operands on every call, which
//! at the shapes here (short depths, small `M`) costs more than the arithmetic saves; a
//! weight packed once at load and read in place does not. Measured single-thread on the
//! 2-core EPYC: 89 GFLOP/s against the crate's 78 for attention's `Q·Kᵀ`.

use candle_core::{CpuStorage, DType, Device, Layout, Storage, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Columns of a packed panel: two AVX2 registers.
pub(crate) const PANEL: usize = 16;
/// Rows of `A` per micro-tile: 6 rows × 2 registers = 12 accumulators.
pub(crate) const MR: usize = 6;

/// Whether the AVX2/FMA micro-kernels can run on this CPU.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `rows` row-major rows of `depth` values (a `[rows, depth]` matrix) as transposed panels:
/// panel `p` holds, for each `k` in turn, rows `16p … 16p+15` (zero past `rows`), so it is
/// the `B` operand of `A · Mᵀ`.
pub(crate) fn pack_panels(m: &[f32], rows: usize, depth: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows.div_ceil(PANEL) * PANEL * depth];
    for (i, row) in m.chunks_exact(depth).take(rows).enumerate() {
        let base = (i / PANEL) * PANEL * depth + i % PANEL;
        for (k, &x) in row.iter().enumerate() {
            out[base + k * PANEL] = x;
        }
    }
    out
}

/// The operands of one call of [`gemm_tiles`]: `C[rows × 16·panels] (+)= scale · A · B`.
#[derive(Clone, Copy)]
pub(crate) struct Tiles {
    /// Rows of `A` and `C`.
    pub rows: usize,
    /// Depth of the product.
    pub k: usize,
    /// Column panels of 16.
    pub panels: usize,
    /// Row stride of `A`.
    pub lda: usize,
    /// Stride between consecutive `k` in `B` (16 for packed panels).
    pub ldb: usize,
    /// Offset between consecutive panels in `B` (`16·k` packed, 16 for a row-major `B`).
    pub panel_stride: usize,
    /// Row stride of `C`.
    pub ldc: usize,
    /// Add to `C` (true) or overwrite it (false).
    pub accumulate: bool,
    /// Multiplies the product (and not what `C` held).
    pub scale: f32,
}

/// Run the micro-kernels over a whole `rows × 16·panels` block of `C`. The caller checked
/// [`available`] and that the slices hold every element the strides reach (see the asserts).
pub(crate) fn gemm_tiles(a: &[f32], b: &[f32], c: &mut [f32], t: Tiles) {
    if t.rows == 0 || t.panels == 0 {
        return;
    }
    assert!(c.len() >= (t.rows - 1) * t.ldc + t.panels * PANEL);
    // SAFETY: the asserts bound every access.
    unsafe { gemm_tiles_raw(a, b, c.as_mut_ptr(), t) }
}

/// [`gemm_tiles`] writing through a raw `C` pointer, for tasks that share one output buffer
/// (each owning a disjoint block of it).
///
/// # Safety
/// `c` must be valid for writes of rows `0..t.rows` × columns `0..16·t.panels` at row stride
/// `t.ldc`, and no other thread may access those elements meanwhile.
unsafe fn gemm_tiles_raw(a: &[f32], b: &[f32], c: *mut f32, t: Tiles) {
    assert!(available());
    assert!(t.k == 0 || a.len() >= (t.rows - 1) * t.lda + t.k);
    assert!(t.k == 0 || b.len() >= (t.panels - 1) * t.panel_stride + (t.k - 1) * t.ldb + PANEL);
    #[cfg(target_arch = "x86_64")]
    x86::gemm_tiles(a.as_ptr(), b.as_ptr(), c, t);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = c;
}

/// A multi-tap product written once: `C[rows × 16·panels] = Σ_{(ao, bo) ∈ taps}
/// A[:, ao .. ao + k] · B[bo + k'·ldb + column]` (`lda`, `ldb`, `ldc`, `panel_stride` as in
/// [`Tiles`]; `accumulate`/`scale` ignored: `C` is overwritten). A 3×3 convolution is this
/// with nine taps over packed input windows (`cpu_conv`): each output value is summed over
/// all 9·Cin products in registers, instead of nine GEMMs each reading and writing the whole
/// output. Rows outside, panels inside: a 6-row slice of `A` stays in L2 while the panels
/// stream past it.
///
/// # Safety
/// `c` must be valid for writes of rows `0..t.rows` × columns `0..16·t.panels` at row stride
/// `t.ldc`, and no other thread may access those elements meanwhile. `a` and `b` are bounds
/// checked here.
pub(crate) unsafe fn tap_tiles_raw(
    a: &[f32],
    b: &[f32],
    c: *mut f32,
    t: Tiles,
    taps: &[(usize, usize)],
) {
    if t.rows == 0 || t.panels == 0 || t.k == 0 {
        return;
    }
    assert!(available());
    let (amax, bmax) = taps
        .iter()
        .fold((0, 0), |m, &(ao, bo)| (m.0.max(ao), m.1.max(bo)));
    assert!(a.len() >= (t.rows - 1) * t.lda + amax + t.k);
    assert!(b.len() >= bmax + (t.panels - 1) * t.panel_stride + (t.k - 1) * t.ldb + PANEL);
    #[cfg(target_arch = "x86_64")]
    x86::tap_tiles(a.as_ptr(), b.as_ptr(), c, t, taps);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = c;
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Tiles, MR, PANEL};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gemm_tiles(a: *const f32, b: *const f32, c: *mut f32, t: Tiles) {
        let scale = _mm256_set1_ps(t.scale);
        // Panels outside, rows inside: a panel (≤ 16 KiB at k = 256) stays in L1 while every
        // row tile streams past it.
        for p in 0..t.panels {
            let bp = b.add(p * t.panel_stride);
            let mut r = 0;
            while r < t.rows {
                let (ar, cr) = (a.add(r * t.lda), c.add(r * t.ldc + p * PANEL));
                tile_rows(t.rows - r, ar, bp, cr, &t, scale, &[(0, 0)]);
                r += MR;
            }
        }
    }

    /// [`super::tap_tiles_raw`]: rows outside, panels inside, so a 6-row slice of `A`
    /// (6 × 9·Cin floats, ≤ 108 KiB at Cin 512) stays in L2 while the panels stream past.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tap_tiles(
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        t: Tiles,
        taps: &[(usize, usize)],
    ) {
        let scale = _mm256_set1_ps(1.0);
        let mut r = 0;
        while r < t.rows {
            for p in 0..t.panels {
                let (ar, bp) = (a.add(r * t.lda), b.add(p * t.panel_stride));
                let cr = c.add(r * t.ldc + p * PANEL);
                tile_rows(t.rows - r, ar, bp, cr, &t, scale, taps);
            }
            r += MR;
        }
    }

    /// One tile of `min(left, 6)` rows.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_rows(
        left: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        t: &Tiles,
        scale: __m256,
        taps: &[(usize, usize)],
    ) {
        match left {
            1 => tile::<1>(a, b, c, t, scale, taps),
            2 => tile::<2>(a, b, c, t, scale, taps),
            3 => tile::<3>(a, b, c, t, scale, taps),
            4 => tile::<4>(a, b, c, t, scale, taps),
            5 => tile::<5>(a, b, c, t, scale, taps),
            _ => tile::<MR>(a, b, c, t, scale, taps),
        }
    }

    /// `C[R × 16] (+)= scale · Σ_taps A[:, a_off + k] · B[b_off + k·ldb]` over `k < t.k`:
    /// every tap accumulates in the same registers (one tap `(0, 0)` is a plain product).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const R: usize>(
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        t: &Tiles,
        scale: __m256,
        taps: &[(usize, usize)],
    ) {
        let mut lo = [_mm256_setzero_ps(); R];
        let mut hi = [_mm256_setzero_ps(); R];
        for &(a_off, b_off) in taps {
            let (a, b) = (a.add(a_off), b.add(b_off));
            for k in 0..t.k {
                let b0 = _mm256_loadu_ps(b.add(k * t.ldb));
                let b1 = _mm256_loadu_ps(b.add(k * t.ldb + 8));
                for i in 0..R {
                    let x = _mm256_set1_ps(*a.add(i * t.lda + k));
                    lo[i] = _mm256_fmadd_ps(x, b0, lo[i]);
                    hi[i] = _mm256_fmadd_ps(x, b1, hi[i]);
                }
            }
        }
        for i in 0..R {
            let (c0, c1) = (c.add(i * t.ldc), c.add(i * t.ldc + 8));
            let (mut v0, mut v1) = (_mm256_mul_ps(lo[i], scale), _mm256_mul_ps(hi[i], scale));
            if t.accumulate {
                v0 = _mm256_add_ps(v0, _mm256_loadu_ps(c0));
                v1 = _mm256_add_ps(v1, _mm256_loadu_ps(c1));
            }
            _mm256_storeu_ps(c0, v0);
            _mm256_storeu_ps(c1, v1);
        }
    }
}

/// [`gemm_tiles_raw`] over packed panels (`ldb` 16, `panel_stride` 16·`t.k`) in depth blocks of
/// `kc`, so that a panel block stays in L1; `t.accumulate` and `t.scale` are ignored (`C` is
/// overwritten with the plain product).
///
/// # Safety
/// As [`gemm_tiles_raw`].
unsafe fn depth_blocks(a: &[f32], b: &[f32], c: *mut f32, t: Tiles, kc: usize) {
    for k0 in (0..t.k).step_by(kc) {
        let tiles = Tiles {
            k: kc.min(t.k - k0),
            accumulate: k0 > 0,
            scale: 1.0,
            ..t
        };
        gemm_tiles_raw(&a[k0..], &b[k0 * t.ldb..], c, tiles);
    }
}

/// `C[rows × 16·panels] = A[rows × k] · B` on the calling thread for `B` packed panels
/// (`[panels][k][16]`; `t.ldb`, `t.panel_stride`, `t.accumulate`, `t.scale` ignored), `A` and
/// `C` row-major with the strides of `t`. Blocked for a long `B`: a block of [`MC`] rows ×
/// [`PRODUCT_KC`] depth of `A` stays in L2 while every panel's matching depth block passes
/// through L1 once.
pub(crate) fn packed_product(a: &[f32], b: &[f32], c: &mut [f32], t: Tiles) {
    let (m, k, panels) = (t.rows, t.k, t.panels);
    if m == 0 || panels == 0 || k == 0 {
        return;
    }
    assert!(t.ldc >= panels * PANEL && c.len() >= (m - 1) * t.ldc + panels * PANEL);
    assert!(t.lda >= k && a.len() >= (m - 1) * t.lda + k && b.len() >= panels * PANEL * k);
    let kc = k.div_ceil(k.div_ceil(PRODUCT_KC));
    for r0 in (0..m).step_by(MC) {
        let tiles = Tiles {
            rows: MC.min(m - r0),
            ldb: PANEL,
            panel_stride: PANEL * k,
            ..t
        };
        // SAFETY: rows r0.. of `c` × every panel lie inside `c` (asserted above); `c` is
        // borrowed mutably, so nothing else touches it.
        unsafe {
            depth_blocks(
                &a[r0 * t.lda..],
                b,
                c.as_mut_ptr().add(r0 * t.ldc),
                tiles,
                kc,
            )
        };
    }
}

/// Deepest block of [`packed_product`]: depths up to 384 run as one block (a panel block of
/// 24 KiB still fits L1) and deeper ones as equal blocks, so that `C` is reloaded less often.
/// Winograd GEMMs on the 2-core EPYC, 384 → 384 ch at 64²: 100/97 ms with blocks of 256 +
/// 128, 83/79 ms as one block of 384.
const PRODUCT_KC: usize = 384;

/// Depth of one block of the product: `A`'s 6 rows × 256 and a 16 KiB weight panel block
/// stay in L1.
const KC: usize = 256;
/// Rows of `A` per task: ≤ 120 rows × 256 × 4 B = 120 KiB of `A` stays in L2.
const MC: usize = 120;
/// Panels per task (64 output features).
const NC_PANELS: usize = 4;

/// An f32 linear layer whose weight is rearranged for the micro-kernels at load:
/// `y = x · Wᵀ + b` with `W` `[out, in]`.
///
/// The 16 rows of each panel are interleaved in place (panel `p` occupies rows
/// `16p … 16p+15` of the original `[out, in]` storage, as `in` groups of 16), so packing
/// needs one 16-row scratch and the layer holds exactly the weight's memory: a packed copy
/// next to the original left ~220 MiB of freed-but-kept heap in the CLIP bigG process.
#[derive(Debug, Clone)]
pub struct PackedLinear {
    /// The weight tensor, its storage rearranged in place (never used as a tensor again).
    packed: Tensor,
    bias: Option<Vec<f32>>,
    in_dim: usize,
    out_dim: usize,
}

/// Interleave each group of 16 rows of a contiguous `[rows, depth]` f32 storage in place.
struct PackRowsInPlace {
    rows: usize,
    depth: usize,
}

impl candle_core::InplaceOp1 for PackRowsInPlace {
    fn name(&self) -> &'static str {
        "pack-linear-weight"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (CpuStorage::F32(v), Some((lo, hi))) = (storage, layout.contiguous_offsets()) else {
            candle_core::bail!("packing a linear weight needs contiguous f32 storage")
        };
        let (rows, depth) = (self.rows, self.depth);
        if hi - lo != rows * depth || rows % PANEL != 0 {
            candle_core::bail!(
                "packing a linear weight: {rows}×{depth} in {} floats",
                hi - lo
            )
        }
        let mut scratch = vec![0f32; PANEL * depth];
        for panel in v[lo..hi].chunks_exact_mut(PANEL * depth) {
            scratch.copy_from_slice(panel);
            for (i, row) in scratch.chunks_exact(depth).enumerate() {
                for (k, &x) in row.iter().enumerate() {
                    panel[k * PANEL + i] = x;
                }
            }
        }
        Ok(())
    }
}

/// `SendPtr` lets tasks write disjoint blocks of one output buffer.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: tasks write disjoint (row block, panel group) regions only.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl PackedLinear {
    /// Rearrange `weight [out, in]` in place (it must not be used as a tensor afterwards) and
    /// keep `bias [out]`; `None` (weight untouched) when the micro-kernels cannot run here,
    /// the tensors are not contiguous f32 on the CPU, or `out` is not a multiple of 16.
    pub fn new(weight: Tensor, bias: Option<&Tensor>) -> Result<std::result::Result<Self, Tensor>> {
        if !Self::applies(&weight) {
            return Ok(Err(weight));
        }
        let (out_dim, in_dim) = weight.dims2()?;
        if bias.is_some_and(|b| b.dtype() != DType::F32 || b.dims() != [out_dim]) {
            return Ok(Err(weight));
        }
        let bias = bias.map(|b| b.to_vec1::<f32>()).transpose()?;
        weight.inplace_op1(&PackRowsInPlace {
            rows: out_dim,
            depth: in_dim,
        })?;
        Ok(Ok(Self {
            packed: weight,
            bias,
            in_dim,
            out_dim,
        }))
    }

    /// Whether [`PackedLinear::new`] takes this weight: a contiguous f32 `[out, in]` CPU
    /// tensor with `out` a multiple of 16, on a CPU with AVX2/FMA.
    pub fn applies(weight: &Tensor) -> bool {
        available()
            && weight.device().is_cpu()
            && weight.dtype() == DType::F32
            && weight.is_contiguous()
            && weight.dims2().is_ok_and(|(out, _)| out % PANEL == 0)
    }

    /// `x [..., in] → [..., out]`; `x` f32 on the CPU.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let Some((&last, lead)) = dims.split_last() else {
            return Err(Error::invalid("linear layer input is a scalar"));
        };
        if last != self.in_dim || x.dtype() != DType::F32 || !x.device().is_cpu() {
            return Err(Error::invalid(format!(
                "packed linear layer: expected f32 CPU input [..., {}], got {:?} {:?}",
                self.in_dim,
                x.dtype(),
                dims
            )));
        }
        let m: usize = lead.iter().product();
        let x = x.contiguous()?;
        let xg = x.storage_and_layout();
        let wg = self.packed.storage_and_layout();
        let y = self.run(cpu_f32(&xg)?, cpu_f32(&wg)?, m);
        let mut shape = lead.to_vec();
        shape.push(self.out_dim);
        Ok(Tensor::from_vec(y, shape, &Device::Cpu)?)
    }

    fn run(&self, a: &[f32], w: &[f32], m: usize) -> Vec<f32> {
        let (k, n) = (self.in_dim, self.out_dim);
        let panels = n / PANEL;
        let mut c = vec![0f32; m * n];
        let ptr = SendPtr(c.as_mut_ptr());
        let row_blocks = m.div_ceil(MC);
        let groups = panels.div_ceil(NC_PANELS);
        let bias = self.bias.as_deref();
        // Consecutive tasks (which rayon hands to one thread in ranges) share the operand
        // that would otherwise stream from memory once per task: with more outputs than
        // input rows (CLIP's and the prior's 154–162 tokens against 1280–5120 features)
        // the weight panels, so a group's row blocks follow each other and the weights
        // are read from memory once, not once per row block; otherwise the rows of `x`.
        let weight_major = n > m;
        (0..row_blocks * groups).into_par_iter().for_each(|task| {
            let (rb, g) = if weight_major {
                (task % row_blocks, task / row_blocks)
            } else {
                (task / groups, task % groups)
            };
            let (r0, rows) = (rb * MC, MC.min(m - rb * MC));
            let (p0, np) = (g * NC_PANELS, NC_PANELS.min(panels - g * NC_PANELS));
            let p = ptr;
            // SAFETY: `c` holds m × n floats; this task alone writes rows r0..r0+rows ×
            // columns 16·p0..16·(p0+np), which the pointer and tiles span.
            unsafe {
                depth_blocks(
                    &a[r0 * k..],
                    &w[p0 * PANEL * k..],
                    p.0.add(r0 * n + p0 * PANEL),
                    Tiles {
                        rows,
                        k,
                        panels: np,
                        lda: k,
                        ldb: PANEL,
                        panel_stride: PANEL * k,
                        ldc: n,
                        accumulate: false,
                        scale: 1.0,
                    },
                    KC,
                )
            };
            // The bias while the task's block is in cache, in parallel (a pass over the
            // whole output on one thread afterwards was ≈ 2 % of a CLIP fc1).
            if let Some(b) = bias {
                let cols = PANEL * p0..PANEL * (p0 + np);
                for r in r0..r0 + rows {
                    // SAFETY: the same region this task alone wrote above.
                    let row = unsafe {
                        std::slice::from_raw_parts_mut(p.0.add(r * n + cols.start), cols.len())
                    };
                    for (v, bi) in row.iter_mut().zip(&b[cols.clone()]) {
                        *v += bi;
                    }
                }
            }
        });
        c
    }
}

/// The f32 elements of a contiguous CPU tensor's storage guard (an error for any other
/// storage; [`crate::cpu_norm::f32_slice`] is the `Option` form).
pub(crate) fn cpu_f32<'a, G: std::ops::Deref<Target = Storage>>(
    (storage, layout): &'a (G, &Layout),
) -> Result<&'a [f32]> {
    crate::cpu_norm::f32_slice(storage, layout)
        .ok_or_else(|| Error::invalid("expected a contiguous f32 CPU tensor"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against candle's matmul, with partial row tiles, row blocks, depth blocks and panels.
    #[test]
    fn packed_linear_matches_candle() -> Result<()> {
        if !available() {
            return Ok(());
        }
        let dev = Device::Cpu;
        for &(m, k, n, bias) in &[
            (1, 1, 16, true),
            (7, 64, 16, false),
            (154, 300, 80, true),
            (250, 513, 144, true),
            (2, 1280, 1280, false),
            // More outputs than rows over two row blocks: the weight-major task order.
            (154, 256, 336, true),
        ] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
            let b = Tensor::randn(0f32, 1.0, n, &dev)?;
            let b = bias.then_some(&b);
            let want = candle_nn::Linear::new(w.clone(), b.cloned());
            let want = candle_core::Module::forward(&want, &x)?;
            // A copy: packing rearranges the weight's storage in place.
            let lin = PackedLinear::new(w.copy()?, b)?.expect("f32 on an AVX2 CPU");
            let got = lin.forward(&x)?;
            let err = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            // f32 sums of up to 1280 products of N(0,1) values in another order.
            assert!(err < 2e-4 * (k as f32).sqrt(), "{m}×{k}→{n}: {err}");
        }
        // Leading dimensions are kept.
        let x = Tensor::randn(0f32, 1.0, (2, 3, 40), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (32, 40), &dev)?;
        let y = PackedLinear::new(w, None)?.expect("packed").forward(&x)?;
        assert_eq!(y.dims(), &[2, 3, 32]);
        // Widths the panels do not divide stay candle's: the weight comes back untouched.
        let w = Tensor::randn(0f32, 1.0, (24, 40), &dev)?;
        let back = PackedLinear::new(w.copy()?, None)?.expect_err("24 outputs");
        assert_eq!((back - &w)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }
}
