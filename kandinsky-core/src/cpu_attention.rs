//! Fused (flash-style) attention for the CPU.
//!
//! candle's generic path materialises the score matrix, scales it, runs a scalar-`exp`
//! softmax over it and multiplies again: five passes over `B·H·Lq·Lk` floats, most of the
//! time going to memory traffic and `expf`. Here each task owns a block of query rows of one
//! head and streams the keys block by block with an online softmax (running max and sum),
//! so a score block never leaves the cache; the two products go through the `gemm` crate
//! (the kernel candle itself uses) and the exponentials through a vectorisable polynomial.
//! Key/value segments are read in place (no concatenation). Computes in f32 whatever the
//! input dtype, as diffusers' `upcast_softmax` blocks do.

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::attention::KvSegment;
use crate::error::Result;

/// Query rows per task.
const QUERY_BLOCK: usize = 128;
/// Keys per score block (`QUERY_BLOCK × KEY_BLOCK` f32 = 256 KiB, L2-resident). Measured on
/// the 2-core EPYC at the UNet's 32×32 level, single thread: 64×256 145 ms, 128×256 139 ms,
/// 128×512 138 ms, 256×512 134 ms (≈ 46–50 GFLOP/s per core).
const KEY_BLOCK: usize = 512;

/// `softmax(q·kᵀ·scale)·v` without a mask; `q` `[B, H, Lq, D]`, segments `[B, H, L_i, D]`
/// (shapes already checked by the caller). Returns `[B, H, Lq, D]` in `q`'s dtype.
pub(crate) fn flash_attention(q: &Tensor, kv: &[KvSegment<'_>], scale: f64) -> Result<Tensor> {
    let (b, h, lq, d) = q.dims4()?;
    let dtype = q.dtype();
    let host = |t: &Tensor| -> Result<Vec<f32>> {
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    };
    let qv = host(q)?;
    let segs: Vec<(Vec<f32>, Vec<f32>, usize)> = kv
        .iter()
        .map(|s| Ok((host(s.k)?, host(s.v)?, s.k.dim(2)?)))
        .collect::<Result<_>>()?;
    let mut out = vec![0f32; b * h * lq * d];
    let scale = scale as f32;
    out.par_chunks_mut(lq * d)
        .enumerate()
        .for_each(|(bh, out_head)| {
            let q_head = &qv[bh * lq * d..(bh + 1) * lq * d];
            let heads: Vec<(&[f32], &[f32], usize)> = segs
                .iter()
                .map(|(k, v, l)| {
                    let span = bh * l * d..(bh + 1) * l * d;
                    (&k[span.clone()], &v[span], *l)
                })
                .collect();
            out_head
                .par_chunks_mut(QUERY_BLOCK * d)
                .enumerate()
                .for_each(|(blk, o)| {
                    let rows = o.len() / d;
                    let qs = &q_head[blk * QUERY_BLOCK * d..][..rows * d];
                    attend_block(qs, &heads, o, rows, d, scale);
                });
        });
    Ok(Tensor::from_vec(out, (b, h, lq, d), q.device())?.to_dtype(dtype)?)
}

/// One block of `rows` queries against every key segment of one head; writes `o` `[rows, D]`.
fn attend_block(
    q: &[f32],
    segments: &[(&[f32], &[f32], usize)],
    o: &mut [f32],
    rows: usize,
    d: usize,
    scale: f32,
) {
    let mut scores = vec![0f32; rows * KEY_BLOCK];
    let mut row_max = vec![f32::NEG_INFINITY; rows];
    let mut row_sum = vec![0f32; rows];
    o.fill(0.0);
    for &(k, v, len) in segments {
        let mut start = 0;
        while start < len {
            let n = KEY_BLOCK.min(len - start);
            let kb = &k[start * d..(start + n) * d];
            let vb = &v[start * d..(start + n) * d];
            let s = &mut scores[..rows * n];
            // S = scale · Q · Kᵀ (rows × n), K read transposed through its strides.
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
            for r in 0..rows {
                let srow = &mut s[r * n..(r + 1) * n];
                let new_max = row_max[r].max(max_of(srow));
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
            // SAFETY: s is rows×n, vb is n×d, o is rows×d, all row-major and in bounds.
            unsafe {
                gemm::gemm(
                    rows,
                    d,
                    n,
                    o.as_mut_ptr(),
                    1,
                    d as isize,
                    true,
                    s.as_ptr(),
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
            start += n;
        }
    }
    for r in 0..rows {
        let inv = 1.0 / row_sum[r];
        for x in &mut o[r * d..(r + 1) * d] {
            *x *= inv;
        }
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
        // SAFETY: the features the function is compiled for were just detected.
        return unsafe { exp_shifted_sum_avx2(xs, shift) };
    }
    exp_shifted_sum_generic(xs, shift)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shifted_sum_avx2(xs: &mut [f32], shift: f32) -> f32 {
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
