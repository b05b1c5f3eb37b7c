//! Winograd F(2×2, 3×3) for [`crate::cpu_conv::PackedConv3x3`] on x86 with AVX2/FMA.
//!
//! Each 2×2 output tile comes from its 4×4 input tile with 16 products per (input, output)
//! channel pair instead of 36 (Lavin & Gray, "Fast Algorithms for Convolutional Neural
//! Networks", 2016): with `V = Bᵀ·d·B` (input tile), `U = G·g·Gᵀ` (kernel) and
//! `y = Aᵀ·(U ⊙ V)·A`, the sum over input channels becomes 16 independent GEMMs
//! `M_e[Cout, tiles] = U_e[Cout, Cin] · V_e[Cin, tiles]`, one per element `e` of the 4×4
//! transformed tile, run on the register-tiled micro-kernels of `cpu_gemm`. The transforms
//! only add and halve (exact in binary), so the result differs from the direct sum by
//! rounding alone: the full-size UNet matches diffusers at a relative 4.0e-6 with it, 4.5e-6
//! without (`cargo xtask unet-full`).
//!
//! The kernel weights are transformed on every call (keeping `U` would hold 16/9 of every
//! convolution's weight next to the packed one). The transforms work on eight tiles or eight
//! channels at a time as `[f32; 8]` values that the compiler turns into AVX registers.
//! Tiles are numbered row by row (rows padded to a multiple of 8 tiles, the transforms'
//! width) and grouped in panels of 16, the GEMMs' column blocks; maps of any size work (tiles
//! past the right or bottom edge read zeros and their outputs are dropped). Large maps run in
//! bands of tile rows so that the transformed tiles `V` and products `M` stay within
//! [`BAND_BYTES`] (a 512² MoVQ map whole would need 1 GiB of them).

use rayon::prelude::*;

use crate::cpu_gemm::{packed_product, SendPtr, Tiles, PANEL};

/// Bytes of `V` plus `M` per band of tile rows (the first band is never cut below one row).
const BAND_BYTES: usize = 32 << 20;

/// Eight lanes: one AVX register once compiled with AVX2 enabled.
type V8 = [f32; 8];

#[inline(always)]
fn add(a: V8, b: V8) -> V8 {
    std::array::from_fn(|i| a[i] + b[i])
}

#[inline(always)]
fn sub(a: V8, b: V8) -> V8 {
    std::array::from_fn(|i| a[i] - b[i])
}

#[inline(always)]
fn half(a: V8) -> V8 {
    std::array::from_fn(|i| a[i] * 0.5)
}

#[inline(always)]
fn load(s: &[f32]) -> V8 {
    std::array::from_fn(|i| s[i])
}

/// Up to 8 values of `s` (zeros past its end).
#[inline(always)]
fn load_partial(s: &[f32]) -> V8 {
    std::array::from_fn(|i| s.get(i).copied().unwrap_or(0.0))
}

/// Geometry of one batch item: the output map `h × w`, read from a source map `h/scale ×
/// w/scale` (nearest upsampling by `scale` ∈ {1, 2} folded into the input transform).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Map {
    pub h: usize,
    pub w: usize,
    pub scale: usize,
    /// Budget of `V` plus `M` per band ([`BAND_BYTES`]; tests make it small).
    pub band_bytes: usize,
}

impl Map {
    /// The map `h × w` read from a source upsampled by `scale`, banded by [`BAND_BYTES`].
    pub(crate) fn new(h: usize, w: usize, scale: usize) -> Self {
        Self {
            h,
            w,
            scale,
            band_bytes: BAND_BYTES,
        }
    }

    /// Tile rows.
    fn th(&self) -> usize {
        self.h.div_ceil(2)
    }

    /// Tiles per row, padded to a multiple of 8 (the transforms' vector width).
    fn twp(&self) -> usize {
        self.w.div_ceil(2).next_multiple_of(8)
    }

    /// Tile rows per band for `cin` → `cout` channels.
    fn band_rows(&self, cin: usize, cout: usize) -> usize {
        let per_row = 16 * (cin + cout) * self.twp() * 4;
        (self.band_bytes / per_row).clamp(1, self.th().max(1))
    }
}

/// Tile rows `ty0 .. ty0 + rows` of a map: their tiles in row order (flat index
/// `(ty − ty0)·twp + tx`), padded to whole panels of 16.
#[derive(Debug, Clone, Copy)]
struct Band {
    ty0: usize,
    rows: usize,
    twp: usize,
}

impl Band {
    fn panels(&self) -> usize {
        (self.rows * self.twp).div_ceil(PANEL)
    }
}

/// Whether the Winograd path is expected to beat the direct kernels for this layer and map.
/// `cpu_profile conv` on the 2-core EPYC (2 threads, time direct / Winograd): 1.3–1.9× at
/// every UNet and MoVQ level with ≥ 128 tiles in the batch (batch 2 at 16² and up, 512 px
/// MoVQ maps included), but 0.35–0.58× at batch 2 × 8² and smaller (the weight transform
/// is not paid back by 32 tiles) and 0.3× for 3 or 4 channels (transforms without products).
pub(crate) fn worth(cin: usize, cout: usize, batch: usize, map: Map) -> bool {
    static FORCED: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    let forced = FORCED.get_or_init(|| match std::env::var("KANDINSKY_WINOGRAD").as_deref() {
        Ok("0") => Some(false),
        Ok("1") => Some(true),
        _ => None,
    });
    crate::cpu_gemm::available()
        && forced.unwrap_or(cin >= 64 && cout >= 64 && batch * map.th() * map.w.div_ceil(2) >= 128)
}

/// The transformed weights `U` of a packed weight (`[Cout, 9·Cin]`, taps `(ky, kx)` then
/// channels) as `[16][Cout][Cin]`: `U_e` is one row-major matrix.
pub(crate) fn transform_weights(w: &[f32], cin: usize, cout: usize) -> Vec<f32> {
    let mut u = vec![0f32; 16 * cout * cin];
    let ptr = SendPtr(u.as_mut_ptr());
    w.par_chunks(9 * cin).enumerate().for_each(|(o, g)| {
        let u = ptr;
        // SAFETY: task `o` alone writes row `o` of every U_e, inside `u` (16·cout·cin floats);
        // callers reach this module only when `cpu_gemm::available()`.
        unsafe { weights_row(g, u, o, cin, cout) }
    });
    u
}

#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
unsafe fn weights_row(g: &[f32], u: SendPtr, o: usize, cin: usize, cout: usize) {
    let mut c = 0;
    while c < cin {
        let n = 8.min(cin - c);
        let g: [V8; 9] = if n == 8 {
            std::array::from_fn(|t| load(&g[t * cin + c..]))
        } else {
            std::array::from_fn(|t| load_partial(&g[t * cin + c..t * cin + cin]))
        };
        // t = G·g (4 × 3), rows of G: [1 0 0], [½ ½ ½], [½ −½ ½], [0 0 1]; then U = t·Gᵀ.
        let mut t = [[[0f32; 8]; 3]; 4];
        for kx in 0..3 {
            let (g0, g1, g2) = (g[kx], g[3 + kx], g[6 + kx]);
            t[0][kx] = g0;
            t[1][kx] = half(add(add(g0, g1), g2));
            t[2][kx] = half(add(sub(g0, g1), g2));
            t[3][kx] = g2;
        }
        for (a, ta) in t.iter().enumerate() {
            let row = [
                ta[0],
                half(add(add(ta[0], ta[1]), ta[2])),
                half(add(sub(ta[0], ta[1]), ta[2])),
                ta[2],
            ];
            for (b, v) in row.iter().enumerate() {
                let at = ((4 * a + b) * cout + o) * cin + c;
                std::ptr::copy_nonoverlapping(v.as_ptr(), u.0.add(at), n);
            }
        }
        c += 8;
    }
}

/// Scratch of one band: `V` `[16][panels][Cin][16]` (the GEMMs' packed `B`) and `M`
/// `[16][Cout][panels·16]`, sized for the largest band.
pub(crate) struct Scratch {
    v: Vec<f32>,
    m: Vec<f32>,
}

impl Scratch {
    pub(crate) fn new(cin: usize, cout: usize, map: Map) -> Self {
        let rows = map.band_rows(cin, cout);
        let tiles = (rows * map.twp()).next_multiple_of(PANEL);
        Self {
            v: vec![0f32; 16 * tiles * cin],
            m: vec![0f32; 16 * tiles * cout],
        }
    }
}

/// One batch item: `out` `[Cout, h, w]` from `x` `[Cin, h/scale, w/scale]` with the
/// transformed weights `u` of [`transform_weights`] and the bias.
pub(crate) fn conv_item(
    x: &[f32],
    u: &[f32],
    bias: Option<&[f32]>,
    (cin, cout): (usize, usize),
    map: Map,
    scratch: &mut Scratch,
    out: &mut [f32],
) {
    let (th, step) = (map.th(), map.band_rows(cin, cout));
    for ty0 in (0..th).step_by(step) {
        let band = Band {
            ty0,
            rows: step.min(th - ty0),
            twp: map.twp(),
        };
        let panels = band.panels();
        let tiles = panels * PANEL;
        input_transform(x, cin, map, band, &mut scratch.v);
        let v = &scratch.v;
        scratch.m[..16 * cout * tiles]
            .par_chunks_mut(cout * tiles)
            .enumerate()
            .for_each(|(e, m)| {
                packed_product(
                    &u[e * cout * cin..],
                    &v[e * panels * cin * PANEL..][..panels * cin * PANEL],
                    m,
                    Tiles {
                        rows: cout,
                        k: cin,
                        panels,
                        lda: cin,
                        ldb: PANEL,
                        panel_stride: PANEL * cin,
                        ldc: tiles,
                        accumulate: false,
                        scale: 1.0,
                    },
                )
            });
        let m = &scratch.m;
        out.par_chunks_mut(map.h * map.w)
            .enumerate()
            .for_each(|(o, plane)| {
                let b = bias.map_or(0.0, |b| b[o]);
                // SAFETY: callers reach this module only when `cpu_gemm::available()`.
                unsafe { output_band(m, o, cout, map, band, b, plane) }
            });
    }
}

/// `V` of a band, its tile rows in parallel (each task writes its own tiles' lanes of every
/// `V_e`). The last panel's lanes past the band keep whatever they held: GEMM columns are
/// independent, and those columns of `M` are never read.
fn input_transform(x: &[f32], cin: usize, map: Map, band: Band, v: &mut [f32]) {
    let (sh, sw) = (map.h / map.scale, map.w / map.scale);
    let panels = band.panels();
    assert!(x.len() >= cin * sh * sw && v.len() >= 16 * panels * PANEL * cin);
    let ptr = SendPtr(v.as_mut_ptr());
    (0..band.rows).into_par_iter().for_each(|r| {
        let p = ptr;
        // SAFETY: task `r` alone writes the lanes of tiles r·twp .. (r+1)·twp of each V_e
        // (inside `v`, asserted above); the module runs only when `cpu_gemm::available()`.
        unsafe { input_row(x, cin, map, band, r, p) }
    });
}

#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
unsafe fn input_row(x: &[f32], cin: usize, map: Map, band: Band, r: usize, v: SendPtr) {
    let (sh, sw) = (map.h / map.scale, map.w / map.scale);
    let (twp, panels, ty) = (band.twp, band.panels(), band.ty0 + r);
    // Even / odd samples of the zero-padded input rows 2ty−1 … 2ty+2: with p[j] = x[j − 1],
    // tile tx reads p[2tx … 2tx+3] = E[tx], O[tx], E[tx+1], O[tx+1].
    let mut even: [Vec<f32>; 4] = std::array::from_fn(|_| vec![0f32; twp + 1]);
    let mut odd = even.clone();
    for c in 0..cin {
        let chan = &x[c * sh * sw..(c + 1) * sh * sw];
        for i in 0..4 {
            let y = (2 * ty + i) as isize - 1;
            if y < 0 || y as usize >= map.h {
                even[i].fill(0.0);
                odd[i].fill(0.0);
            } else {
                let s = &chan[(y as usize / map.scale) * sw..][..sw];
                fill_even_odd(s, map.scale, &mut even[i], &mut odd[i]);
            }
        }
        for tx in (0..twp).step_by(8) {
            let d: [[V8; 4]; 4] = std::array::from_fn(|i| {
                let (e, o) = (&even[i], &odd[i]);
                [
                    load(&e[tx..]),
                    load(&o[tx..]),
                    load(&e[tx + 1..]),
                    load(&o[tx + 1..]),
                ]
            });
            // s = Bᵀ·d, rows of Bᵀ: [1 0 −1 0], [0 1 1 0], [0 −1 1 0], [0 1 0 −1]; V = s·B.
            let mut s = [[[0f32; 8]; 4]; 4];
            for j in 0..4 {
                s[0][j] = sub(d[0][j], d[2][j]);
                s[1][j] = add(d[1][j], d[2][j]);
                s[2][j] = sub(d[2][j], d[1][j]);
                s[3][j] = sub(d[1][j], d[3][j]);
            }
            let flat = r * twp + tx;
            let (p, lane) = (flat / PANEL, flat % PANEL);
            for (a, sa) in s.iter().enumerate() {
                let row = [
                    sub(sa[0], sa[2]),
                    add(sa[1], sa[2]),
                    sub(sa[2], sa[1]),
                    sub(sa[1], sa[3]),
                ];
                for (b, val) in row.iter().enumerate() {
                    let at = (((4 * a + b) * panels + p) * cin + c) * PANEL + lane;
                    std::ptr::copy_nonoverlapping(val.as_ptr(), v.0.add(at), 8);
                }
            }
        }
    }
}

/// The even (`e[i] = p[2i]`) and odd (`o[i] = p[2i+1]`) samples of one zero-padded input
/// row `p[j] = x[j − 1]` of the map (`s` upsampled by `scale`); zeros past the map.
#[inline(always)]
fn fill_even_odd(s: &[f32], scale: usize, e: &mut [f32], o: &mut [f32]) {
    e.fill(0.0);
    o.fill(0.0);
    if scale == 2 {
        // x[j] = s[j / 2]: p[2i] = x[2i − 1] = s[i − 1], p[2i + 1] = x[2i] = s[i].
        e[1..=s.len()].copy_from_slice(s);
        o[..s.len()].copy_from_slice(s);
        return;
    }
    // p[2i] = x[2i − 1] (i ≥ 1), p[2i + 1] = x[2i].
    for (i, pair) in s.chunks(2).enumerate() {
        o[i] = pair[0];
        if let Some(&v) = pair.get(1) {
            e[i + 1] = v;
        }
    }
}

/// Output channel `o`'s rows of a band from `M` (`[16][Cout][tiles]`).
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
unsafe fn output_band(
    m: &[f32],
    o: usize,
    cout: usize,
    map: Map,
    band: Band,
    bias: f32,
    plane: &mut [f32],
) {
    let (h, w, twp) = (map.h, map.w, band.twp);
    let tiles = band.panels() * PANEL;
    let bias = [bias; 8];
    for r in 0..band.rows {
        let ty = band.ty0 + r;
        for tx in (0..w.div_ceil(2)).step_by(8) {
            let at = r * twp + tx;
            let mv: [V8; 16] = std::array::from_fn(|e| load(&m[(e * cout + o) * tiles + at..]));
            // Aᵀ·M·A with rows of Aᵀ: [1 1 1 0], [0 1 −1 −1].
            let t: [[V8; 4]; 2] = std::array::from_fn(|a| {
                std::array::from_fn(|b| {
                    let (m0, m1, m2, m3) = (mv[b], mv[4 + b], mv[8 + b], mv[12 + b]);
                    if a == 0 {
                        add(add(m0, m1), m2)
                    } else {
                        sub(sub(m1, m2), m3)
                    }
                })
            });
            for (a, ta) in t.iter().enumerate() {
                let y = 2 * ty + a;
                if y >= h {
                    break;
                }
                let y0 = add(add(add(ta[0], ta[1]), ta[2]), bias);
                let y1 = add(sub(sub(ta[1], ta[2]), ta[3]), bias);
                let row = &mut plane[y * w..(y + 1) * w];
                let x0 = 2 * tx;
                if x0 + 16 <= w {
                    let dst = &mut row[x0..x0 + 16];
                    for l in 0..8 {
                        dst[2 * l] = y0[l];
                        dst[2 * l + 1] = y1[l];
                    }
                } else {
                    for l in 0..8 {
                        for (bb, yv) in [y0, y1].iter().enumerate() {
                            if let Some(d) = row.get_mut(x0 + 2 * l + bb) {
                                *d = yv[l];
                            }
                        }
                    }
                }
            }
        }
    }
}
