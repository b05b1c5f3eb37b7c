//! Fused GroupNorm (+ modulation, + SiLU) for the CPU.
//!
//! candle's composite (`nn::GroupNorm::forward_plain`) is about ten ops, each a full pass over
//! the activation and several allocating a full-size f32 temporary. Here the input buffer is
//! read in place (any of f32 / bf16 / f16, statistics always in f64 → f32 coefficients):
//! one pass per channel for its shifted moments (combined per group with Chan's formula, as
//! exact as a two-pass mean/centred-variance), then one pass writing
//! `act(((x − μ)·σ⁻¹·γ + β) [· scale + shift])` straight into the output buffer. Both passes
//! are rayon-parallel over `(batch, channel)` planes, and the SiLU uses a vectorisable
//! polynomial `exp` (candle's scalar `expf` is the slowest part of its SiLU).

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, DType, Layout, Storage, Tensor, WithDType};
use rayon::prelude::*;

/// Elements per rayon task (at least): small planes (the UNet's 4×4 level) are grouped.
const MIN_TASK_ELEMS: usize = 16 * 1024;
/// Below this many elements the loops run on the calling thread: waking the rayon pool
/// costs more than the work (and its spinning workers slow the next serial op).
const MIN_PARALLEL_ELEMS: usize = 256 * 1024;

/// What is applied after the normalisation, inside the output pass.
#[derive(Debug, Clone, Copy)]
pub(crate) enum CpuModulation<'a> {
    /// Nothing.
    None,
    /// `y·scale[b, c] + shift[b, c]`, `[B·C]` each (scale already `1 + scale` for diffusers'
    /// `scale_shift`).
    Channel { scale: &'a [f32], shift: &'a [f32] },
    /// `y·scale[b, c, i/sh, j/sw] + shift[…]`, maps `[B, C, mh, mw]` with `H = mh·sh`,
    /// `W = mw·sw` (nearest-neighbour upsampling on the fly).
    Spatial {
        scale: &'a [f32],
        shift: &'a [f32],
        mh: usize,
        mw: usize,
    },
}

/// Shape and parameters of one call.
pub(crate) struct Params<'a> {
    pub b: usize,
    pub c: usize,
    pub groups: usize,
    /// Spatial extent `(H, W)`; for rank ≠ 4 inputs `(1, product of dims[2..])`.
    pub hw: (usize, usize),
    pub eps: f64,
    pub gamma: &'a [f32],
    pub beta: &'a [f32],
    pub silu: bool,
}

/// Element types the kernel reads and writes (arithmetic always in f32/f64).
pub(crate) trait Elem: WithDType + Copy + Send + Sync {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

macro_rules! half_elem {
    ($($t:ty),*) => {$(
        impl Elem for $t {
            #[inline(always)]
            fn to_f32(self) -> f32 {
                <$t>::to_f32(self)
            }
            #[inline(always)]
            fn from_f32(v: f32) -> Self {
                <$t>::from_f32(v)
            }
        }
    )*};
}
half_elem!(half::bf16, half::f16);

/// The contiguous f32 slice of a CPU tensor's storage guard (`None` for any other storage).
pub(crate) fn f32_slice<'a>(storage: &'a Storage, layout: &Layout) -> Option<&'a [f32]> {
    let (start, end) = layout.contiguous_offsets()?;
    match storage {
        Storage::Cpu(CpuStorage::F32(v)) => v.get(start..end),
        _ => None,
    }
}

/// Run the fused GroupNorm on a contiguous CPU tensor `x`; `None` when its storage or dtype
/// is not handled here (the caller then takes the plain path).
pub(crate) fn group_norm(
    x: &Tensor,
    p: &Params<'_>,
    m: CpuModulation<'_>,
) -> candle_core::Result<Option<Tensor>> {
    let (storage, layout) = x.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Ok(None);
    };
    let Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    let shape = layout.shape().clone();
    let dev = x.device();
    macro_rules! go {
        ($v:expr) => {{
            let xs = $v.get(start..end).ok_or_else(|| {
                candle_core::Error::Msg("group norm: storage shorter than the layout".into())
            })?;
            Tensor::from_vec(run(xs, p, m), shape, dev)?
        }};
    }
    Ok(Some(match cpu {
        CpuStorage::F32(v) => go!(v),
        CpuStorage::BF16(v) => go!(v),
        CpuStorage::F16(v) => go!(v),
        _ => return Ok(None),
    }))
}

/// Both passes over `xs` (`B·C·H·W` elements, the caller checked the sizes).
fn run<T: Elem>(xs: &[T], p: &Params<'_>, m: CpuModulation<'_>) -> Vec<T> {
    let (h, w) = p.hw;
    let plane = h * w;
    let n = p.b * p.c * plane;
    let min_planes = (MIN_TASK_ELEMS / plane.max(1)).max(1);

    // Pass 1: per-channel (mean, M2) in f64.
    let parallel = n >= MIN_PARALLEL_ELEMS;
    let moments: Vec<(f64, f64)> = if parallel {
        xs.par_chunks(plane)
            .with_min_len(min_planes)
            .map(channel_moments)
            .collect()
    } else {
        xs.chunks(plane).map(channel_moments).collect()
    };

    // Per-group statistics, folded into one (mean, scale, bias) triple per (b, c).
    let cpg = p.c / p.groups;
    let mut coef = Vec::with_capacity(p.b * p.c);
    for (bg, ms) in moments.chunks(cpg).enumerate() {
        let k = cpg as f64;
        let mean = ms.iter().map(|m| m.0).sum::<f64>() / k;
        // Chan et al.: M2 of a union = Σ M2ᵢ + Σ nᵢ (meanᵢ − mean)².
        let m2: f64 = ms
            .iter()
            .map(|&(mi, m2i)| m2i + plane as f64 * (mi - mean) * (mi - mean))
            .sum();
        let var = m2 / (k * plane as f64);
        let rstd = 1.0 / (var + p.eps).sqrt();
        let bi = bg / p.groups;
        for j in 0..cpg {
            let ch = (bg % p.groups) * cpg + j;
            let mut a = rstd * p.gamma[ch] as f64;
            let mut beta = p.beta[ch] as f64;
            if let CpuModulation::Channel { scale, shift } = m {
                // (y·a + β)·s + t = y·(a·s) + (β·s + t): one multiply-add per element.
                let s = scale[bi * p.c + ch] as f64;
                a *= s;
                beta = beta * s + shift[bi * p.c + ch] as f64;
            }
            coef.push((mean as f32, a as f32, beta as f32));
        }
    }

    // Pass 2: the output, written once.
    let mut out: Vec<T> = Vec::with_capacity(n);
    let write_plane = |(bc, (o, x)): (usize, (&mut [MaybeUninit<T>], &[T]))| {
        let (mean, a, beta) = coef[bc];
        match m {
            CpuModulation::Spatial {
                scale,
                shift,
                mh,
                mw,
            } => {
                let (sh, sw) = (h / mh, w / mw);
                let map = bc * mh * mw;
                // A map row expanded to the full width (by runs of `sw`, no per-element
                // division), reused for its `sh` rows; read in place when `sw == 1`.
                let mut srow = vec![0f32; if sw == 1 { 0 } else { w }];
                let mut trow = srow.clone();
                for (r, (orow, xrow)) in o.chunks_mut(w).zip(x.chunks(w)).enumerate() {
                    let base = map + (r / sh) * mw;
                    let (ms, mt) = (&scale[base..base + mw], &shift[base..base + mw]);
                    if sw == 1 {
                        apply(xrow, orow, mean, a, beta, Some((ms, mt)), p.silu);
                        continue;
                    }
                    if r % sh == 0 {
                        for (j, (sv, tv)) in ms.iter().zip(mt).enumerate() {
                            srow[j * sw..(j + 1) * sw].fill(*sv);
                            trow[j * sw..(j + 1) * sw].fill(*tv);
                        }
                    }
                    apply(xrow, orow, mean, a, beta, Some((&srow, &trow)), p.silu);
                }
            }
            _ => apply(x, o, mean, a, beta, None, p.silu),
        }
    };
    if parallel {
        out.spare_capacity_mut()[..n]
            .par_chunks_mut(plane)
            .with_min_len(min_planes)
            .zip(xs.par_chunks(plane))
            .enumerate()
            .for_each(write_plane);
    } else {
        out.spare_capacity_mut()[..n]
            .chunks_mut(plane)
            .zip(xs.chunks(plane))
            .enumerate()
            .for_each(write_plane);
    }
    // SAFETY: the `B·C` planes of `plane` elements each cover `[0, n)`, and every element of
    // every plane was written above.
    unsafe { out.set_len(n) };
    out
}

/// `(mean, Σ(x − mean)²)` of one channel plane in f64, shifted by its first element so
/// that the single pass does not cancel (`Σd² − (Σd)²/n` with `d = x − x₀`).
fn channel_moments<T: Elem>(xs: &[T]) -> (f64, f64) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the features the function is compiled for were just detected.
        return unsafe { channel_moments_avx2(xs) };
    }
    channel_moments_generic(xs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn channel_moments_avx2<T: Elem>(xs: &[T]) -> (f64, f64) {
    channel_moments_generic(xs)
}

#[inline(always)]
fn channel_moments_generic<T: Elem>(xs: &[T]) -> (f64, f64) {
    let Some(first) = xs.first() else {
        return (0.0, 0.0);
    };
    let k = first.to_f32() as f64;
    // Eight independent accumulators so the loop vectorises.
    let mut s1 = [0f64; 8];
    let mut s2 = [0f64; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            let d = c[i].to_f32() as f64 - k;
            s1[i] += d;
            s2[i] += d * d;
        }
    }
    let (mut t1, mut t2) = (s1.iter().sum::<f64>(), s2.iter().sum::<f64>());
    for v in chunks.remainder() {
        let d = v.to_f32() as f64 - k;
        t1 += d;
        t2 += d * d;
    }
    let n = xs.len() as f64;
    (k + t1 / n, (t2 - t1 * t1 / n).max(0.0))
}

/// `act(((x − mean)·a + beta) [· s + t])` for one contiguous run.
fn apply<T: Elem>(
    x: &[T],
    o: &mut [MaybeUninit<T>],
    mean: f32,
    a: f32,
    beta: f32,
    st: Option<(&[f32], &[f32])>,
    silu: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the features the function is compiled for were just detected.
        return unsafe { apply_avx2(x, o, mean, a, beta, st, silu) };
    }
    apply_generic(x, o, mean, a, beta, st, silu)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn apply_avx2<T: Elem>(
    x: &[T],
    o: &mut [MaybeUninit<T>],
    mean: f32,
    a: f32,
    beta: f32,
    st: Option<(&[f32], &[f32])>,
    silu: bool,
) {
    apply_generic(x, o, mean, a, beta, st, silu)
}

#[inline(always)]
fn apply_generic<T: Elem>(
    x: &[T],
    o: &mut [MaybeUninit<T>],
    mean: f32,
    a: f32,
    beta: f32,
    st: Option<(&[f32], &[f32])>,
    silu: bool,
) {
    // One branch-free loop per case, so each vectorises.
    match (st, silu) {
        (None, false) => {
            for (o, x) in o.iter_mut().zip(x) {
                o.write(T::from_f32((x.to_f32() - mean) * a + beta));
            }
        }
        (None, true) => {
            for (o, x) in o.iter_mut().zip(x) {
                o.write(T::from_f32(silu_f32((x.to_f32() - mean) * a + beta)));
            }
        }
        (Some((s, t)), false) => {
            for (((o, x), s), t) in o.iter_mut().zip(x).zip(s).zip(t) {
                o.write(T::from_f32(((x.to_f32() - mean) * a + beta) * s + t));
            }
        }
        (Some((s, t)), true) => {
            for (((o, x), s), t) in o.iter_mut().zip(x).zip(s).zip(t) {
                o.write(T::from_f32(silu_f32(
                    ((x.to_f32() - mean) * a + beta) * s + t,
                )));
            }
        }
    }
}

/// `v·σ(v) = v / (1 + e⁻ᵛ)`.
#[inline(always)]
pub(crate) fn silu_f32(v: f32) -> f32 {
    v / (1.0 + crate::cpu_attention::exp_poly(-v))
}

/// Whether [`group_norm`] handles tensors of this dtype.
pub(crate) fn supports(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silu_polynomial_matches_libm() {
        let mut worst = 0f32;
        let mut v = -100f32;
        while v < 100.0 {
            let exact = v / (1.0 + (-v).exp());
            let d = (silu_f32(v) - exact).abs() / exact.abs().max(1e-30);
            // Either tiny relative error, or both values below f32's useful range.
            if exact.abs() > 1e-30 {
                worst = worst.max(d);
            }
            v += 0.0137;
        }
        // Relative error of the polynomial exp (≈ 1e-7) plus the division's rounding.
        assert!(worst < 1e-6, "worst relative error {worst}");
    }

    #[test]
    fn moments_are_exact_for_a_large_offset() {
        let xs: Vec<f32> = (0..10_001)
            .map(|i| 1000.0 + (i % 7) as f32 * 0.25)
            .collect();
        let (mean, m2) = channel_moments(&xs);
        let n = xs.len() as f64;
        let em = xs.iter().map(|&v| v as f64).sum::<f64>() / n;
        let ev = xs.iter().map(|&v| (v as f64 - em).powi(2)).sum::<f64>();
        // f64 sums of ≤ 10⁴ f32 values: error far below f32 resolution.
        assert!((mean - em).abs() < 1e-9 && (m2 - ev).abs() < 1e-6 * ev);
    }
}
