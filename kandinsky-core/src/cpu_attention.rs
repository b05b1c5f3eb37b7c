//! Fused (flash-style) attention for the CPU.
//!
//! candle's generic path materialises the score matrix, scales it, runs a scalar-`exp`
//! softmax over it and multiplies again: five passes over `B·H·Lq·Lk` floats, most of the
//! time going to memory traffic and `expf`. Here each task owns a block of query rows of one
//! head and streams the keys block by block with an online softmax (running max and sum),
//! so a score block never leaves the cache. On x86-64 with AVX2/FMA the two products run in
//! register-tiled micro-kernels (6 query rows × 16 keys, Kᵀ packed once per head) and the
//! exponentials in an eight-lane polynomial; elsewhere the products go through the `gemm`
//! crate (the kernel candle itself uses). Single thread at the UNet's 32×32 level the
//! kernels reach ≈ 89 GFLOP/s against the `gemm` crate's 78 (`Q·Kᵀ`), and the vector `exp`
//! took the softmax from 0.10 to 0.03 ms per 128 × 512 block.
//! Key/value segments are read in place (no concatenation). Computes in f32 whatever the
//! input dtype, as diffusers' `upcast_softmax` blocks do.

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::attention::KvSegment;
use crate::cpu_gemm::{self, Tiles, PANEL};
use crate::error::Result;

/// Query rows per task.
const QUERY_BLOCK: usize = 128;
/// Keys per score block (`QUERY_BLOCK × KEY_BLOCK` f32 = 256 KiB, L2-resident). Measured on
/// the 2-core EPYC at the UNet's 32×32 level, single thread: 64×256 145 ms, 128×256 139 ms,
/// 128×512 138 ms, 256×512 134 ms (≈ 46–50 GFLOP/s per core).
const KEY_BLOCK: usize = 512;

/// `softmax(q·kᵀ·scale + mask)·v`; `q` `[B, H, Lq, D]`, segments `[B, H, L_i, D]` (shapes
/// already checked by the caller), `mask` additive, broadcastable to `[B, H, Lq, Lk]`.
/// Returns `[B, H, Lq, D]` in `q`'s dtype.
pub(crate) fn flash_attention(
    q: &Tensor,
    kv: &[KvSegment<'_>],
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let d = q.dim(3)?;
    flash_attention_with(q, kv, mask, scale, microkernels_available(d))
}

/// An additive mask as f32 rows of `Lk` values: `[Bm, Hm, Lm, Lk]` contiguous with `Bm` in
/// {1, B}, `Hm` in {1, H}, `Lm` in {1, Lq} — the broadcast dimensions are not expanded
/// (a padding mask `[B, 1, 1, Lk]` stays one row per batch).
struct MaskRows {
    data: Tensor,
    dims: [usize; 4],
}

impl MaskRows {
    fn new(mask: &Tensor, b: usize, h: usize, lq: usize, lk: usize) -> Result<Self> {
        let mut dims = [1usize; 4];
        let rank = mask.rank();
        if rank > 4 {
            return Err(crate::error::Error::invalid(format!(
                "attention mask {:?} has more than 4 dimensions",
                mask.dims()
            )));
        }
        dims[4 - rank..].copy_from_slice(mask.dims());
        let target = [b, h, lq, lk];
        for (i, (&m, &t)) in dims.iter().zip(&target).enumerate() {
            if m != t && m != 1 {
                return Err(crate::error::Error::invalid(format!(
                    "attention mask {:?} does not broadcast to [B, H, Lq, Lk] = {target:?} \
                     (dimension {i})",
                    mask.dims()
                )));
            }
        }
        let given = mask.to_dtype(DType::F32)?.reshape(&dims[..])?;
        // Only the key dimension is expanded, so every row is Lk values.
        dims[3] = lk;
        let data = given.broadcast_as(&dims[..])?.contiguous()?;
        Ok(Self { data, dims })
    }

    /// The rows of head `bh` (= batch · H + head): the mask slice and the row stride (0 when
    /// one row serves every query).
    fn head<'a>(&self, values: &'a [f32], bh: usize, h: usize) -> (&'a [f32], usize) {
        let [mb, mh, ml, lk] = self.dims;
        let (bi, hi) = (bh / h, bh % h);
        let idx = (if mb == 1 { 0 } else { bi }) * mh + if mh == 1 { 0 } else { hi };
        let head = &values[idx * ml * lk..(idx + 1) * ml * lk];
        (head, if ml == 1 { 0 } else { lk })
    }
}

/// [`flash_attention`] with the products through the AVX2 micro-kernels (`fast`, only when
/// [`microkernels_available`]) or through the `gemm` crate.
fn flash_attention_with(
    q: &Tensor,
    kv: &[KvSegment<'_>],
    mask: Option<&Tensor>,
    scale: f64,
    fast: bool,
) -> Result<Tensor> {
    let (b, h, lq, d) = q.dims4()?;
    let lk: usize = kv
        .iter()
        .map(|s| s.k.dim(2))
        .sum::<candle_core::Result<usize>>()?;
    let mask = mask.map(|m| MaskRows::new(m, b, h, lq, lk)).transpose()?;
    let mask_guard = mask.as_ref().map(|m| m.data.storage_and_layout());
    let mask_values = mask_guard
        .as_ref()
        .map(|g| cpu_gemm::cpu_f32(g))
        .transpose()?;
    let dtype = q.dtype();
    // f32 contiguous inputs are read in place (a copy of q, k and v was a serial tenth of
    // the two-thread time); other dtypes and layouts are converted once.
    let f32c = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.contiguous()?) };
    let qt = f32c(q)?;
    let kvt: Vec<(Tensor, Tensor)> = kv
        .iter()
        .map(|s| Ok((f32c(s.k)?, f32c(s.v)?)))
        .collect::<Result<_>>()?;
    let q_guard = qt.storage_and_layout();
    let qv = cpu_gemm::cpu_f32(&q_guard)?;
    let kv_guards: Vec<_> = kvt
        .iter()
        .map(|(k, v)| (k.storage_and_layout(), v.storage_and_layout()))
        .collect();
    let segs: Vec<(&[f32], &[f32], usize)> = kv_guards
        .iter()
        .zip(&kvt)
        .map(|((kg, vg), (k, _))| Ok((cpu_gemm::cpu_f32(kg)?, cpu_gemm::cpu_f32(vg)?, k.dim(2)?)))
        .collect::<Result<_>>()?;
    let mut out = vec![0f32; b * h * lq * d];
    let scale = scale as f32;
    out.par_chunks_mut(lq * d)
        .enumerate()
        .for_each(|(bh, out_head)| {
            let q_head = &qv[bh * lq * d..(bh + 1) * lq * d];
            // Kᵀ packed in key panels once per head, shared by all its query blocks.
            let packed: Vec<Option<Vec<f32>>> = segs
                .iter()
                .map(|(k, _, l)| {
                    let span = bh * l * d..(bh + 1) * l * d;
                    fast.then(|| cpu_gemm::pack_panels(&k[span], *l, d))
                })
                .collect();
            let heads: Vec<Segment<'_>> = segs
                .iter()
                .zip(&packed)
                .map(|((k, v, l), kp)| {
                    let span = bh * l * d..(bh + 1) * l * d;
                    Segment {
                        k: &k[span.clone()],
                        k_panels: kp.as_deref(),
                        v: &v[span],
                        len: *l,
                    }
                })
                .collect();
            let mask_head = mask
                .as_ref()
                .zip(mask_values)
                .map(|(m, values)| m.head(values, bh, h));
            out_head
                .par_chunks_mut(QUERY_BLOCK * d)
                .enumerate()
                .for_each(|(blk, o)| {
                    let rows = o.len() / d;
                    let qs = &q_head[blk * QUERY_BLOCK * d..][..rows * d];
                    // This block's mask rows: from its first query on (one shared row
                    // when the stride is 0).
                    let block_mask = mask_head.map(|(m, stride)| BlockMask {
                        rows: &m[blk * QUERY_BLOCK * stride..],
                        stride,
                    });
                    attend_block(qs, &heads, block_mask, o, rows, d, scale);
                });
        });
    Ok(Tensor::from_vec(out, (b, h, lq, d), q.device())?.to_dtype(dtype)?)
}

/// One key/value segment of one head: `k`, `v` `[len, D]` row-major; `k_panels` the packed
/// Kᵀ of [`cpu_gemm::pack_panels`] when the AVX2 kernels run.
struct Segment<'a> {
    k: &'a [f32],
    k_panels: Option<&'a [f32]>,
    v: &'a [f32],
    len: usize,
}

/// The additive mask of one query block: row `r` is `rows[r·stride..][..Lk]`.
#[derive(Clone, Copy)]
struct BlockMask<'a> {
    rows: &'a [f32],
    stride: usize,
}

/// One block of `rows` queries against every key segment of one head; writes `o` `[rows, D]`.
fn attend_block(
    q: &[f32],
    segments: &[Segment<'_>],
    mask: Option<BlockMask<'_>>,
    o: &mut [f32],
    rows: usize,
    d: usize,
    scale: f32,
) {
    // Score rows padded to whole key panels, so the kernels always store full panels.
    let mut scores = vec![0f32; rows * KEY_BLOCK];
    let mut row_max = vec![f32::NEG_INFINITY; rows];
    let mut row_sum = vec![0f32; rows];
    o.fill(0.0);
    // Index of the segment's first key in the whole key sequence (the mask's columns).
    let mut seg_base = 0;
    for seg in segments {
        let mut start = 0;
        while start < seg.len {
            let n = KEY_BLOCK.min(seg.len - start);
            let vb = &seg.v[start * d..(start + n) * d];
            let lds = match seg.k_panels {
                Some(panels) => {
                    let lds = n.div_ceil(PANEL) * PANEL;
                    let kp = &panels[start * d..][..lds * d];
                    scores_avx2(q, kp, &mut scores[..rows * lds], rows, lds, d, scale);
                    lds
                }
                None => {
                    let kb = &seg.k[start * d..(start + n) * d];
                    scores_gemm(q, kb, &mut scores[..rows * n], rows, n, d, scale);
                    n
                }
            };
            for r in 0..rows {
                let srow = &mut scores[r * lds..r * lds + n];
                if let Some(m) = mask {
                    let mrow = &m.rows[r * m.stride + seg_base + start..][..n];
                    for (s, &a) in srow.iter_mut().zip(mrow) {
                        *s += a;
                    }
                }
                let new_max = row_max[r].max(max_of(srow));
                if new_max == f32::NEG_INFINITY {
                    // Every key so far is masked out: nothing to add (exp(−∞ − −∞) is NaN).
                    srow.fill(0.0);
                    continue;
                }
                // Rescale what was accumulated under the old maximum.
                let correction = if row_max[r] == f32::NEG_INFINITY {
                    0.0
                } else {
                    exp_poly(row_max[r] - new_max)
                };
                row_max[r] = new_max;
                row_sum[r] = row_sum[r] * correction + exp_shifted_sum(srow, new_max);
                if correction != 1.0 {
                    for x in &mut o[r * d..(r + 1) * d] {
                        *x *= correction;
                    }
                }
            }
            // O += P · V (rows × d).
            if seg.k_panels.is_some() {
                accumulate_pv_avx2(&scores, lds, vb, n, o, rows, d);
            } else {
                accumulate_pv_gemm(&scores[..rows * n], vb, o, rows, n, d);
            }
            start += n;
        }
        seg_base += seg.len;
    }
    for r in 0..rows {
        let inv = 1.0 / row_sum[r];
        for x in &mut o[r * d..(r + 1) * d] {
            *x *= inv;
        }
    }
}

/// `s` (rows × n) = scale · q (rows × d) · kbᵀ (kb: n × d), through the `gemm` crate.
fn scores_gemm(q: &[f32], kb: &[f32], s: &mut [f32], rows: usize, n: usize, d: usize, scale: f32) {
    // SAFETY: every pointer/stride pair below stays inside its slice: q is rows×d
    // row-major, kb is n×d row-major (read as d×n with strides (1, d)), s is rows×n.
    unsafe {
        gemm::gemm(
            rows,
            n,
            d,
            s.as_mut_ptr(),
            1,
            n as isize,
            false,
            q.as_ptr(),
            1,
            d as isize,
            kb.as_ptr(),
            d as isize,
            1,
            0.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// `o` (rows × d) += p (rows × n) · vb (n × d), through the `gemm` crate.
fn accumulate_pv_gemm(p: &[f32], vb: &[f32], o: &mut [f32], rows: usize, n: usize, d: usize) {
    // SAFETY: p is rows×n, vb is n×d, o is rows×d, all row-major and in bounds.
    unsafe {
        gemm::gemm(
            rows,
            d,
            n,
            o.as_mut_ptr(),
            1,
            d as isize,
            true,
            p.as_ptr(),
            1,
            n as isize,
            vb.as_ptr(),
            1,
            d as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Whether the AVX2/FMA micro-kernels run: on such a CPU, for a head size whose rows split
/// into whole panels for the `P·V` product.
fn microkernels_available(d: usize) -> bool {
    d % PANEL == 0 && cpu_gemm::available()
}

/// `s` (rows × lds, lds a multiple of [`PANEL`]) = scale · q (rows × d) · Kᵀ from the packed
/// key panels `kp`.
fn scores_avx2(
    q: &[f32],
    kp: &[f32],
    s: &mut [f32],
    rows: usize,
    lds: usize,
    d: usize,
    scale: f32,
) {
    let t = Tiles {
        rows,
        k: d,
        panels: lds / PANEL,
        lda: d,
        ldb: PANEL,
        panel_stride: PANEL * d,
        ldc: lds,
        accumulate: false,
        scale,
    };
    cpu_gemm::gemm_tiles(q, kp, s, t);
}

/// `o` (rows × d) += p (rows × n, row stride `ldp`) · vb (n × d), d a multiple of [`PANEL`]:
/// the rows of `V` already hold 16 adjacent columns, so `V` is read in place.
fn accumulate_pv_avx2(
    p: &[f32],
    ldp: usize,
    vb: &[f32],
    n: usize,
    o: &mut [f32],
    rows: usize,
    d: usize,
) {
    let t = Tiles {
        rows,
        k: n,
        panels: d / PANEL,
        lda: ldp,
        ldb: d,
        panel_stride: PANEL,
        ldc: d,
        accumulate: true,
        scale: 1.0,
    };
    cpu_gemm::gemm_tiles(p, vb, o, t);
}

/// The eight-lane exponential of the softmax (AVX2/FMA).
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::exp_poly;
    use std::arch::x86_64::*;

    /// [`exp_poly`] on eight lanes: the same range reduction and polynomial, written with
    /// intrinsics because the scalar form (clamp, floor, saturating casts) does not
    /// vectorise — the softmax was a third of the attention time. NaN propagates.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn exp8(x: __m256) -> __m256 {
        // max/min return their second operand when one is NaN: keep x second.
        let x = _mm256_min_ps(
            _mm256_set1_ps(88.0),
            _mm256_max_ps(_mm256_set1_ps(-87.0), x),
        );
        let n = _mm256_floor_ps(_mm256_fmadd_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
            _mm256_set1_ps(0.5),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm256_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(_mm256_castsi256_ps(bits), p)
    }

    /// `x ← exp(x − shift)` over `len` floats at `xs`; returns the sum.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_shifted_sum(xs: *mut f32, len: usize, shift: f32) -> f32 {
        let s = _mm256_set1_ps(shift);
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= len {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(xs.add(i)), s));
            _mm256_storeu_ps(xs.add(i), e);
            acc = _mm256_add_ps(acc, e);
            i += 8;
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        let mut sum: f32 = lanes.iter().sum();
        while i < len {
            let e = exp_poly(*xs.add(i) - shift);
            *xs.add(i) = e;
            sum += e;
            i += 1;
        }
        sum
    }
}

fn max_of(xs: &[f32]) -> f32 {
    // Eight independent lanes so the compiler can keep them in one vector register.
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let mut m = acc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for &x in tail {
        m = m.max(x);
    }
    m
}

/// `x ← exp(x − shift)` in place; returns the sum.
fn exp_shifted_sum(xs: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the features the function is compiled for were just detected; the kernel
        // stays inside `xs`.
        return unsafe { x86::exp_shifted_sum(xs.as_mut_ptr(), xs.len(), shift) };
    }
    exp_shifted_sum_generic(xs, shift)
}

#[inline(always)]
fn exp_shifted_sum_generic(xs: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = xs.chunks_exact_mut(8);
    for c in &mut chunks {
        for i in 0..8 {
            let e = exp_poly(c[i] - shift);
            c[i] = e;
            acc[i] += e;
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for x in chunks.into_remainder() {
        let e = exp_poly(*x - shift);
        *x = e;
        sum += e;
    }
    sum
}

/// `exp(x)`, relative error ≈ 1e-7 on [−87, 88] (clamped outside, where SiLU is 0 or the
/// identity to f32 precision anyway): `2ⁿ · p(r)` with `n = ⌊x·log₂e + ½⌋`,
/// `r = x − n·ln 2` (two-constant split) and a degree-6 Taylor polynomial on |r| ≤ ln2/2.
/// Branch-free and without libm calls, so it vectorises. Shared by the softmax here and
/// the fused SiLU of `cpu_norm`.
#[inline(always)]
pub(crate) fn exp_poly(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let bits = ((n as i32 + 127) as u32) << 23;
    f32::from_bits(bits) * p
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Both product paths against the plain (materialised) attention, on shapes that leave
    /// partial micro-tiles everywhere: query blocks not a multiple of 6 rows, key segments
    /// not a multiple of 16 keys, several key blocks per segment, head sizes 16 and 64
    /// (and 40, which the micro-kernels decline).
    #[test]
    fn both_product_paths_match_plain_attention() -> Result<()> {
        let dev = Device::Cpu;
        for &(lq, l1, l2, d) in &[
            (1, 1, 0, 16),
            (7, 32, 45, 64),
            (133, 32, 1100, 64),
            (250, 5, 517, 16),
            (64, 32, 100, 40),
        ] {
            let q = Tensor::randn(0f32, 1.0, (2, 3, lq, d), &dev)?;
            let mut ks = Vec::new();
            for &l in &[l1, l2] {
                if l > 0 {
                    ks.push((
                        Tensor::randn(0f32, 1.0, (2, 3, l, d), &dev)?,
                        Tensor::randn(0f32, 1.0, (2, 3, l, d), &dev)?,
                    ));
                }
            }
            let segs: Vec<KvSegment<'_>> = ks.iter().map(|(k, v)| KvSegment { k, v }).collect();
            let k = Tensor::cat(&ks.iter().map(|(k, _)| k).collect::<Vec<_>>(), 2)?;
            let v = Tensor::cat(&ks.iter().map(|(_, v)| v).collect::<Vec<_>>(), 2)?;
            let scale = 1.0 / (d as f64).sqrt();
            let lk = l1 + l2;
            // The masks the models pass: none; a per-row one [1, 1, Lq, Lk] that hides the
            // first half of the keys from even rows with −∞ (whole key blocks and the first
            // segment masked, so a row's running maximum starts at −∞) and adds noise
            // elsewhere; a per-batch padding row [2, 1, 1, Lk] with a large finite negative;
            // a full [2, 3, Lq, Lk] one.
            let rows: Vec<f32> = (0..lq * lk)
                .map(|i| {
                    let (r, j) = (i / lk, i % lk);
                    if r % 2 == 0 && j < lk.div_ceil(2) && lk > 1 {
                        f32::NEG_INFINITY
                    } else {
                        ((i * 7919) % 13) as f32 * 0.1
                    }
                })
                .collect();
            let padding: Vec<f32> = (0..2 * lk)
                .map(|i| {
                    if i % lk >= lk - lk / 3 && i >= lk {
                        -1e4
                    } else {
                        0.0
                    }
                })
                .collect();
            let masks = [
                None,
                Some(Tensor::from_vec(rows, (1, 1, lq, lk), &dev)?),
                Some(Tensor::from_vec(padding, (2, 1, 1, lk), &dev)?),
                Some(Tensor::randn(0f32, 1.0, (2, 3, lq, lk), &dev)?),
            ];
            for mask in &masks {
                let want = crate::attention::plain(&q, &k, &v, mask.as_ref(), scale)?;
                let mut paths = vec![false];
                if microkernels_available(d) {
                    paths.push(true);
                }
                for fast in paths {
                    let got = flash_attention_with(&q, &segs, mask.as_ref(), scale, fast)?;
                    let err = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                    // f32 sums in another order: a few ulps of values of order 1.
                    assert!(
                        err < 1e-5,
                        "lq {lq} keys {l1}+{l2} d {d} fast {fast} mask {:?}: {err}",
                        mask.as_ref().map(|m| m.dims().to_vec())
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn masks_that_do_not_broadcast_are_refused() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::zeros((2, 3, 5, 16), DType::F32, &dev)?;
        let k = Tensor::zeros((2, 3, 7, 16), DType::F32, &dev)?;
        let segs = [KvSegment { k: &k, v: &k }];
        for dims in [vec![2, 3, 5, 6], vec![3, 1, 1, 7], vec![1, 1, 1, 1, 7]] {
            let mask = Tensor::zeros(dims.clone(), DType::F32, &dev)?;
            let err = flash_attention(&q, &segs, Some(&mask), 0.25)
                .expect_err("a mask that does not broadcast");
            assert!(err.to_string().contains("mask"), "{dims:?}: {err}");
        }
        Ok(())
    }

    #[test]
    fn exp_poly_is_accurate_on_the_softmax_range() {
        let mut worst = 0f64;
        let mut x = -86.0f32;
        while x <= 0.0 {
            let got = exp_poly(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.001;
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert_eq!(exp_poly(0.0), 1.0);
    }
}
