//! A 3×3, stride 1, padding 1 convolution for the CPU (f32 NCHW), as an implicit GEMM.
//!
//! candle 0.11.1's CPU `conv2d` rebuilds the `[out, 9·in]` weight matrix with a
//! single-threaded strided copy on every call (8–81 ms for the UNet's 768–1536-channel
//! weights) and builds a full im2col matrix (9× the input) before its GEMM. Here the weights
//! are arranged once at load ([`PackedConv3x3`]) and the input is never expanded: a band of
//! output rows is computed over the zero-padded width `Wp = W + 2`, where the input samples of
//! tap `(ky, kx)` for consecutive output positions are consecutive in the padded map, so the
//! band is `out[Cout, rows·Wp] = Σ_taps W_tap[Cout, Cin] · X_pad[Cin, offset ky·Wp + kx …]`.
//! On x86 with AVX2/FMA the nine taps accumulate in the registers of one micro-kernel
//! (`cpu_gemm::tap_tiles_raw`, input windows packed per 16 positions); elsewhere each tap is
//! one `gemm`-crate GEMM adding into the band. The two garbage columns per row are dropped
//! when the band is copied out (with the bias). Extra memory is one padded input band and one
//! output band (bounded by `BAND_BYTES`), so the 1024² MoVQ maps need no more than the output.
//! Small maps (W ≤ 16, where the padded width wastes 12–50 % of the GEMM) use an im2col
//! matrix with the same packed weight instead: one GEMM `[Cout, 9·Cin] · [9·Cin, H·W]`.
//! Layers with ≥ 64 channels on maps with ≥ 128 tiles per batch run Winograd F(2×2, 3×3)
//! instead (`cpu_winograd`: 16 products per 2×2 outputs instead of 36, 1.3–1.9× faster on
//! the 2-core EPYC at every UNet and MoVQ level; [`Conv3x3Path`] picks one explicitly).
//!
//! Computes in f32 whatever the input dtype and returns the input's dtype, as the model crates'
//! CPU convolutions already do for bf16.

use std::sync::Arc;

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Bytes of one band's padded input plus its output (per task). On the 2-core EPYC, MoVQ
/// 128 ch 256² (1 item, 2 threads): 8 MiB 158 ms, 16 MiB 151–153 ms, 32 MiB 172 ms.
const BAND_BYTES: usize = 16 << 20;

/// Packed input windows per task of [`PackedConv3x3`]'s tap kernel: with a 6-row slice of
/// the weight, they stay in L2 (512 KiB per core here).
const PACKED_BLOCK_BYTES: usize = 256 << 10;

/// Maps at most this wide use im2col (the padded width wastes 2/`W` of the GEMM). Batch 2,
/// 2 threads, ms with im2col up to width 8 / 16: 768 ch 16² 35 / 30.5, 1152 ch 8² 18 / 18,
/// 1536 ch 4² 9 / 9; without im2col (under load 3, against 38 / 20 ms with it at the same
/// time): 1152 ch 8² 49 ms, 1536 ch 4² 42 ms.
const IM2COL_MAX_WIDTH: usize = 16;

/// How [`PackedConv3x3`] computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conv3x3Path {
    /// Winograd where it was measured to win (the shapes of `cpu_winograd::worth`), else `Direct`;
    /// `KANDINSKY_WINOGRAD=0` / `=1` (read once) forces one or the other.
    Auto,
    /// The nine taps summed per output (the tap kernel, or im2col for small maps).
    Direct,
    /// Winograd F(2×2, 3×3): 16 products per 2×2 outputs instead of 36, sums in another order.
    Winograd,
}

/// A 3×3, stride 1, padding 1 convolution's weights pre-arranged for [`PackedConv3x3::forward`].
#[derive(Debug, Clone)]
pub struct PackedConv3x3 {
    /// `[Cout, 9·Cin]` row-major in `(ky, kx, c)` order: tap `t`'s `[Cout, Cin]` matrix starts at
    /// column `t·Cin` (row stride `9·Cin`), and the whole matrix is the im2col weight.
    /// Shared, so that cloning a layer stays as cheap as cloning candle tensors.
    weight: Arc<[f32]>,
    bias: Option<Arc<[f32]>>,
    cin: usize,
    cout: usize,
}

/// `[Cout, Cin, 3, 3]` → `[Cout, 9·Cin]` in `(ky, kx, c)` order, as one f32 conversion of the
/// contiguous weight and one rearranging pass, output rows in parallel. (candle's
/// `permute(..).flatten_all()` is a strided element-by-element copy: with the extra copies
/// around it, several seconds of loading a 1.2B-parameter UNet.)
fn pack_taps(weight: &Tensor, cout: usize, cin: usize) -> Result<Arc<[f32]>> {
    use rayon::prelude::*;
    let w = weight.to_device(&candle_core::Device::Cpu)?;
    let w = match crate::loading::half_to_f32_parallel(&w, DType::F32) {
        Some(w) => w,
        None => w.to_dtype(DType::F32)?.contiguous()?,
    };
    let guard = w.storage_and_layout();
    let src = crate::cpu_gemm::cpu_f32(&guard)?;
    let row = 9 * cin;
    // Written in place (no zeroing, no copy into the Arc afterwards).
    let mut out = Arc::<[f32]>::new_uninit_slice(cout * row);
    let dst = Arc::get_mut(&mut out).expect("a fresh Arc has one owner");
    dst.par_chunks_mut(row)
        .zip(src.par_chunks(row))
        .for_each(|(d, s)| {
            // s: [Cin, 9] (c, tap); d: [9, Cin] (tap, c).
            for (c, taps) in s.chunks_exact(9).enumerate() {
                for (t, &v) in taps.iter().enumerate() {
                    d[t * cin + c].write(v);
                }
            }
        });
    // SAFETY: each row's 9·Cin slots are written once above (every (tap, c) pair).
    Ok(unsafe { out.assume_init() })
}

impl PackedConv3x3 {
    /// Pack a candle weight `[Cout, Cin, 3, 3]` (any float dtype, any device) and an optional
    /// bias `[Cout]`.
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let (cout, cin, kh, kw) = weight.dims4()?;
        if (kh, kw) != (3, 3) || cin == 0 {
            return Err(Error::invalid(format!(
                "PackedConv3x3: weight [{cout}, {cin}, {kh}, {kw}], expected [out, in > 0, 3, 3]"
            )));
        }
        let weight = pack_taps(weight, cout, cin)?;
        let bias = match bias {
            Some(b) => {
                let b = b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                if b.len() != cout {
                    return Err(Error::invalid(format!(
                        "PackedConv3x3: bias of {} values for {cout} output channels",
                        b.len()
                    )));
                }
                Some(b.into())
            }
            None => None,
        };
        Ok(Self {
            weight,
            bias,
            cin,
            cout,
        })
    }

    /// Input channels.
    pub fn in_channels(&self) -> usize {
        self.cin
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.cout
    }

    /// Convolve `x` `[B, Cin, H, W]` (on the CPU) into `[B, Cout, H, W]` in `x`'s dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, false, Conv3x3Path::Auto)
    }

    /// `conv(nearest_upsample_2x(x))`: `[B, Cin, H, W]` → `[B, Cout, 2H, 2W]`, reading the
    /// source map directly (the upsampled map never exists).
    pub fn forward_upsample2x(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, true, Conv3x3Path::Auto)
    }

    /// [`PackedConv3x3::forward`] (or, with `upsample`, [`forward_upsample2x`]) by a chosen
    /// algorithm, for benchmarks and tests; `Winograd` without AVX2/FMA runs `Direct`.
    ///
    /// [`forward_upsample2x`]: PackedConv3x3::forward_upsample2x
    pub fn forward_with(&self, x: &Tensor, upsample: bool, path: Conv3x3Path) -> Result<Tensor> {
        self.run(x, upsample, path)
    }

    /// What [`Conv3x3Path::Auto`] runs for a batch of `batch` maps of `h × w` outputs
    /// (after the upsampling of [`forward_upsample2x`]): `Winograd` or `Direct`.
    ///
    /// [`forward_upsample2x`]: PackedConv3x3::forward_upsample2x
    pub fn auto_path(&self, batch: usize, h: usize, w: usize) -> Conv3x3Path {
        let map = crate::cpu_winograd::Map::new(h, w, 1);
        if crate::cpu_winograd::worth(self.cin, self.cout, batch, map) {
            Conv3x3Path::Winograd
        } else {
            Conv3x3Path::Direct
        }
    }

    fn run(&self, x: &Tensor, upsample: bool, path: Conv3x3Path) -> Result<Tensor> {
        let (b, c, sh, sw) = x.dims4()?;
        if c != self.cin {
            return Err(Error::invalid(format!(
                "PackedConv3x3: input has {c} channels, the weight expects {}",
                self.cin
            )));
        }
        if !x.device().is_cpu() {
            return Err(Error::invalid("PackedConv3x3 runs on the CPU only"));
        }
        let dtype = x.dtype();
        let scale = if upsample { 2 } else { 1 };
        let (h, w) = (sh * scale, sw * scale);
        let mut out = vec![0f32; b * self.cout * h * w];
        let xf = x.to_dtype(DType::F32)?.contiguous()?;
        {
            let guard = xf.storage_and_layout();
            let data = crate::cpu_gemm::cpu_f32(&guard)?;
            let src = Source {
                h: sh,
                w: sw,
                scale,
            };
            self.conv_f32(data, b, src, path, &mut out);
        }
        let y = Tensor::from_vec(out, (b, self.cout, h, w), x.device())?;
        Ok(y.to_dtype(dtype)?)
    }

    /// `out` `[B, Cout, H, W]` from `x` `[B, Cin, src.h, src.w]` (lengths checked by the caller).
    fn conv_f32(&self, x: &[f32], b: usize, src: Source, path: Conv3x3Path, out: &mut [f32]) {
        let (h, w) = (src.h * src.scale, src.w * src.scale);
        let (in_item, out_item) = (self.cin * src.h * src.w, self.cout * h * w);
        if out_item == 0 {
            return;
        }
        let path = match path {
            Conv3x3Path::Auto => self.auto_path(b, h, w),
            chosen => chosen,
        };
        if path == Conv3x3Path::Winograd && crate::cpu_gemm::available() {
            self.winograd(x, b, crate::cpu_winograd::Map::new(h, w, src.scale), out);
            return;
        }
        let threads = rayon::current_num_threads();
        // Enough batch items to keep every thread busy: one item per task, serial GEMMs
        // (no fork/join per GEMM); otherwise the GEMMs split across the threads. Batch 2 on
        // 2 threads, per item vs split GEMMs: 1536 ch 4² 8.6 vs 13.0 ms, 384 ch 32² 32.6 vs
        // 34.5 ms.
        let per_item = b >= threads;
        let par = if per_item {
            gemm::Parallelism::None
        } else {
            gemm::Parallelism::Rayon(threads)
        };
        let item = |(i, o): (usize, &mut [f32])| {
            let xi = &x[i * in_item..(i + 1) * in_item];
            // im2col only while its 9·Cin·H·W matrix stays within a band's budget.
            if w <= IM2COL_MAX_WIDTH && 9 * self.cin * h * w * 4 <= BAND_BYTES {
                self.im2col_item(xi, src, o, par);
            } else {
                self.banded_item(xi, src, o, par);
            }
        };
        if per_item {
            out.par_chunks_mut(out_item).enumerate().for_each(item);
        } else {
            out.chunks_mut(out_item).enumerate().for_each(item);
        }
    }

    /// All batch items with Winograd F(2×2, 3×3) ([`crate::cpu_winograd`]; AVX2/FMA only):
    /// the weights are transformed once per call, the items run one after another (each
    /// parallel inside).
    fn winograd(&self, x: &[f32], b: usize, map: crate::cpu_winograd::Map, out: &mut [f32]) {
        use crate::cpu_winograd::{conv_item, transform_weights, Scratch};
        let (cin, cout) = (self.cin, self.cout);
        let in_item = cin * (map.h / map.scale) * (map.w / map.scale);
        let out_item = cout * map.h * map.w;
        let u = transform_weights(&self.weight, cin, cout);
        let mut scratch = Scratch::new(cin, cout, map);
        for i in 0..b {
            conv_item(
                &x[i * in_item..(i + 1) * in_item],
                &u,
                self.bias.as_deref(),
                (cin, cout),
                map,
                &mut scratch,
                &mut out[i * out_item..(i + 1) * out_item],
            );
        }
    }

    /// One batch item by bands of output rows and the padded-width trick.
    fn banded_item(&self, x: &[f32], src: Source, out: &mut [f32], par: gemm::Parallelism) {
        let (h, w) = (src.h * src.scale, src.w * src.scale);
        let wp = w + 2;
        let (cin, cout) = (self.cin, self.cout);
        // Padded input (rows + 2)·Wp·Cin plus output rows·Wp·Cout floats per band.
        let per_row = (cin + cout) * wp * 4;
        let rows = (BAND_BYTES.saturating_sub(2 * cin * wp * 4) / per_row).clamp(1, h);
        let taps = crate::cpu_gemm::available();
        // Rows of whole 16-column panels: the tap kernel writes straight into `out` (no band
        // buffer, no copy-out pass).
        let direct = taps && w % 16 == 0;
        // Otherwise, with the tap kernel the band's rows are whole 16-column panels (row
        // stride rounded up) and the last panel reads up to 15 floats past the padded band.
        let ldc_max = if taps {
            (rows * wp).next_multiple_of(16)
        } else {
            rows * wp
        };
        let mut pad = vec![0f32; cin * (rows + 2) * wp + 16];
        let mut tmp = if direct {
            Vec::new()
        } else {
            vec![0f32; cout * ldc_max]
        };
        let mut r0 = 0;
        while r0 < h {
            let r = rows.min(h - r0);
            let plane = (r + 2) * wp;
            fill_padded(x, src, r0 as isize - 1, r + 2, &mut pad[..cin * plane]);
            // Output position j = y·Wp + x' (x' < W useful). The last useful one is
            // (r−1)·Wp + W − 1 = r·Wp − 3, so n = r·Wp − 2 columns suffice, and tap
            // (2, 2) then reads up to (Cin−1)·plane + 2·Wp + 2 + n − 1 = Cin·plane − 1.
            let n = r * wp - 2;
            let pad_band = &pad[..cin * plane + 16];
            if direct {
                let band = Band {
                    plane,
                    wp,
                    panels: r * w / 16,
                    row_panels: Some(w / 16),
                };
                self.band_taps(pad_band, band, &mut out[r0 * w..], h * w, true, par);
                r0 += r;
                continue;
            }
            let ldc = if taps {
                (r * wp).next_multiple_of(16)
            } else {
                r * wp
            };
            let tmp = &mut tmp[..cout * ldc];
            if taps {
                let band = Band {
                    plane,
                    wp,
                    panels: n.div_ceil(16),
                    row_panels: None,
                };
                self.band_taps(pad_band, band, tmp, ldc, false, par);
            }
            for t in (0..9).filter(|_| !taps) {
                let (ky, kx) = (t / 3, t % 3);
                let off = ky * wp + kx;
                debug_assert!((cin - 1) * plane + off + n <= pad.len());
                // SAFETY: dst is `cout × n` with row stride r·Wp ≥ n inside `tmp`
                // (cout·r·Wp floats); lhs is tap t of the `[cout, 9·cin]` weight (column
                // offset t·cin, cin columns, row stride 9·cin), inside `self.weight`; rhs
                // element (c, j) is at off + c·plane + j ≤ Cin·plane − 1 (shown above), inside
                // `pad`. No two pointers alias (dst is a distinct buffer).
                unsafe {
                    gemm::gemm(
                        cout,
                        n,
                        cin,
                        tmp.as_mut_ptr(),
                        1,
                        ldc as isize,
                        t > 0,
                        self.weight.as_ptr().add(t * cin),
                        1,
                        (9 * cin) as isize,
                        pad.as_ptr().add(off),
                        1,
                        plane as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        par,
                    );
                }
            }
            for o in 0..cout {
                let bias = self.bias.as_ref().map_or(0.0, |b| b[o]);
                for y in 0..r {
                    let from = &tmp[o * ldc + y * wp..][..w];
                    let to = &mut out[(o * h + r0 + y) * w..][..w];
                    for (d, s) in to.iter_mut().zip(from) {
                        *d = s + bias;
                    }
                }
            }
            r0 += r;
        }
    }

    /// One band with the register-accumulating tap kernel: `dst[o·ldc + 16·p …]` for the
    /// band's panels `p` of 16 output positions, from `pad` `[Cin, rows + 2, wp]` (+16 floats
    /// of slack); `bias` adds the bias (the direct layout, where no copy-out pass does).
    /// Per panel the input windows are packed first: for each tap row `ky` and channel `c`,
    /// the 18 floats at `ky·wp + j0` hold what all three taps `(ky, 0..3)` read, so the
    /// kernel walks `Cin` with a stride of 18 floats instead of a whole padded plane (which
    /// cost a TLB miss per step and ran at 113–137 GFLOP/s against the `gemm` crate's
    /// 125–166 on the MoVQ shapes).
    fn band_taps(
        &self,
        pad: &[f32],
        band: Band,
        dst: &mut [f32],
        ldc: usize,
        bias: bool,
        par: gemm::Parallelism,
    ) {
        const WIN: usize = 18;
        let (cin, cout) = (self.cin, self.cout);
        let Band {
            plane,
            wp,
            panels,
            row_panels,
        } = band;
        // Where panel p's first output position sits in the padded band.
        let j0 = |p: usize| match row_panels {
            Some(rp) => (p / rp) * wp + (p % rp) * 16,
            None => p * 16,
        };
        let per_panel = 3 * cin * WIN;
        let block = (PACKED_BLOCK_BYTES / (per_panel * 4)).clamp(1, panels);
        let taps: [(usize, usize); 9] =
            std::array::from_fn(|t| (t * cin, (t / 3) * cin * WIN + t % 3));
        assert!(dst.len() >= (cout - 1) * ldc + panels * 16 && ldc >= panels * 16);
        assert!(panels == 0 || (cin - 1) * plane + 2 * wp + j0(panels - 1) + WIN <= pad.len());
        let out = crate::cpu_gemm::SendPtr(dst.as_mut_ptr());
        let run = |bi: usize| {
            let (p0, np) = (bi * block, block.min(panels - bi * block));
            let mut packed = vec![0f32; np * per_panel];
            for (p, win) in packed.chunks_exact_mut(per_panel).enumerate() {
                let j = j0(p0 + p);
                for (row, w) in win.chunks_exact_mut(WIN).enumerate() {
                    let (ky, c) = (row / cin, row % cin);
                    w.copy_from_slice(&pad[c * plane + ky * wp + j..][..WIN]);
                }
            }
            let o = out;
            // SAFETY: `dst` holds cout rows of stride ldc ≥ 16·panels (asserted); this
            // block alone writes columns 16·p0 .. 16·(p0 + np) of each row.
            unsafe {
                crate::cpu_gemm::tap_tiles_raw(
                    &self.weight,
                    &packed,
                    o.0.add(p0 * 16),
                    crate::cpu_gemm::Tiles {
                        rows: cout,
                        k: cin,
                        panels: np,
                        lda: 9 * cin,
                        ldb: WIN,
                        panel_stride: per_panel,
                        ldc,
                        accumulate: false,
                        scale: 1.0,
                    },
                    &taps,
                )
            };
            if let (true, Some(b)) = (bias, &self.bias) {
                for (ch, &bo) in b.iter().enumerate() {
                    // SAFETY: the columns this block just wrote (still in cache).
                    let row = unsafe {
                        std::slice::from_raw_parts_mut(o.0.add(ch * ldc + p0 * 16), np * 16)
                    };
                    for v in row {
                        *v += bo;
                    }
                }
            }
        };
        let blocks = panels.div_ceil(block);
        if matches!(par, gemm::Parallelism::Rayon(_)) {
            (0..blocks).into_par_iter().for_each(run);
        } else {
            (0..blocks).for_each(run);
        }
    }

    /// One batch item (a small map) as im2col + one GEMM with the packed weight.
    fn im2col_item(&self, x: &[f32], src: Source, out: &mut [f32], par: gemm::Parallelism) {
        let (h, w) = (src.h * src.scale, src.w * src.scale);
        let (wp, hw, cin, cout) = (w + 2, h * w, self.cin, self.cout);
        let plane = (h + 2) * wp;
        let mut pad = vec![0f32; cin * plane];
        fill_padded(x, src, -1, h + 2, &mut pad);
        // col row t·Cin + c, column y·W + x = pad[c][y + ky][x + kx].
        let mut col = vec![0f32; 9 * cin * hw];
        for (row, dst) in col.chunks_mut(hw).enumerate() {
            let (t, c) = (row / cin, row % cin);
            let (ky, kx) = (t / 3, t % 3);
            let p = &pad[c * plane..(c + 1) * plane];
            for y in 0..h {
                dst[y * w..(y + 1) * w].copy_from_slice(&p[(y + ky) * wp + kx..][..w]);
            }
        }
        // SAFETY: dst `out` is cout × hw row-major (its length), lhs `self.weight` is
        // cout × 9·cin row-major, rhs `col` is 9·cin × hw row-major; distinct buffers.
        unsafe {
            gemm::gemm(
                cout,
                hw,
                9 * cin,
                out.as_mut_ptr(),
                1,
                hw as isize,
                false,
                self.weight.as_ptr(),
                1,
                (9 * cin) as isize,
                col.as_ptr(),
                1,
                hw as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                par,
            );
        }
        if let Some(bias) = &self.bias {
            for (o, row) in out.chunks_mut(hw).enumerate() {
                for v in row {
                    *v += bias[o];
                }
            }
        }
    }
}

/// A band of output rows for [`PackedConv3x3::band_taps`]: the padded input's plane size and
/// row length, the number of 16-position panels, and how they map onto the padded band —
/// `Some(w / 16)` panels per output row (whole rows, written straight into the output), or
/// `None` (consecutive positions of the flattened padded band, garbage columns included).
#[derive(Debug, Clone, Copy)]
struct Band {
    plane: usize,
    wp: usize,
    panels: usize,
    row_panels: Option<usize>,
}

/// The source map of a batch item: `h × w`, read nearest-upsampled by `scale` (1 or 2).
#[derive(Debug, Clone, Copy)]
struct Source {
    h: usize,
    w: usize,
    scale: usize,
}

/// Fill `pad` `[Cin, rows, W + 2]` with the (upsampled) map's rows `y0 .. y0 + rows` (rows
/// outside the map and the first/last column are zero).
fn fill_padded(x: &[f32], src: Source, y0: isize, rows: usize, pad: &mut [f32]) {
    let (h, w) = (src.h * src.scale, src.w * src.scale);
    let wp = w + 2;
    let plane = rows * wp;
    for (c, dst) in pad.chunks_mut(plane).enumerate() {
        let chan = &x[c * src.h * src.w..(c + 1) * src.h * src.w];
        for (i, row) in dst.chunks_mut(wp).enumerate() {
            let y = y0 + i as isize;
            if y < 0 || y >= h as isize {
                row.fill(0.0);
                continue;
            }
            let s = &chan[(y as usize / src.scale) * src.w..][..src.w];
            row[0] = 0.0;
            row[wp - 1] = 0.0;
            if src.scale == 1 {
                row[1..=w].copy_from_slice(s);
            } else {
                for (pair, v) in row[1..=w].chunks_exact_mut(2).zip(s) {
                    pair[0] = *v;
                    pair[1] = *v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn random(shape: &[usize], seed: u64) -> Tensor {
        // A small LCG: deterministic values in [-1, 1) without a test dependency.
        let n: usize = shape.iter().product();
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn reference(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
        let y = x.conv2d(w, 1, 1, 1, 1).unwrap();
        match b {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1)).unwrap()).unwrap(),
            None => y,
        }
    }

    /// max |a − b| / max |b|.
    fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let s = b.abs().unwrap().max_all().unwrap();
        (d.to_scalar::<f32>().unwrap()) / s.to_scalar::<f32>().unwrap().max(1e-12)
    }

    #[test]
    fn equals_candle_conv2d() {
        // (batch, cin, cout, h, w, bias)
        let cases = [
            (1, 4, 4, 8, 8, true),
            (2, 3, 5, 7, 11, true),
            (2, 16, 8, 13, 9, false),
            (1, 8, 16, 1, 1, true),
            (2, 8, 6, 1, 1, false),
            (1, 5, 7, 4, 4, true),
            (2, 32, 24, 20, 17, true),
            (1, 6, 3, 2, 30, false),
        ];
        for (i, &(b, cin, cout, h, w, with_bias)) in cases.iter().enumerate() {
            let x = random(&[b, cin, h, w], 10 + i as u64);
            let wt = random(&[cout, cin, 3, 3], 100 + i as u64);
            let bias = with_bias.then(|| random(&[cout], 1000 + i as u64));
            let packed = PackedConv3x3::new(&wt, bias.as_ref()).unwrap();
            let got = packed.forward(&x).unwrap();
            let want = reference(&x, &wt, bias.as_ref());
            assert_eq!(got.dims(), want.dims());
            let err = rel_err(&got, &want);
            // f32 sums of ≤ 288 products in another order: relative to the output scale.
            assert!(err <= 1e-4, "case {i}: relative error {err}");
        }
    }

    /// The packed weight is candle's `permute(0, 2, 3, 1)` of the weight, from f32, from f16
    /// (converted once) and from a contiguous view that starts inside its storage.
    #[test]
    fn pack_taps_equals_permute() {
        let (cout, cin) = (5, 7);
        let full = random(&[cout + 2, cin, 3, 3], 21);
        for (what, wt) in [
            ("f32", full.narrow(0, 0, cout).unwrap()),
            (
                "f16",
                full.narrow(0, 0, cout)
                    .unwrap()
                    .to_dtype(DType::F16)
                    .unwrap(),
            ),
            ("offset view", full.narrow(0, 2, cout).unwrap()),
        ] {
            let want = wt
                .to_dtype(DType::F32)
                .unwrap()
                .permute((0, 2, 3, 1))
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let got = pack_taps(&wt, cout, cin).unwrap();
            assert_eq!(&got[..], &want[..], "{what}");
        }
    }

    #[test]
    fn banded_path_equals_candle_across_bands() {
        // A map whose padded rows do not fit one band: several bands, and a short last one;
        // a width of whole 16-position panels (written straight to the output) and one not.
        for (i, w) in [120, 128].into_iter().enumerate() {
            let (b, cin, cout, h) = (1, 64, 64, 300);
            let x = random(&[b, cin, h, w], 7 + i as u64);
            let wt = random(&[cout, cin, 3, 3], 8);
            let bias = random(&[cout], 9);
            let per_row = (cin + cout) * (w + 2) * 4;
            assert!(h * per_row > BAND_BYTES, "the test must span several bands");
            let packed = PackedConv3x3::new(&wt, Some(&bias)).unwrap();
            let err = rel_err(
                &packed.forward(&x).unwrap(),
                &reference(&x, &wt, Some(&bias)),
            );
            assert!(err <= 1e-4, "width {w}: relative error {err}");
        }
    }

    #[test]
    fn upsample2x_equals_upsample_then_conv() {
        for (i, &(b, cin, cout, h, w)) in [
            (2, 6, 4, 5, 7),
            (1, 3, 3, 3, 3),
            (1, 4, 2, 1, 1),
            (2, 4, 3, 6, 13),
            // 32 wide once upsampled: whole panels, written straight to the output.
            (1, 5, 7, 9, 16),
        ]
        .iter()
        .enumerate()
        {
            let x = random(&[b, cin, h, w], 20 + i as u64);
            let wt = random(&[cout, cin, 3, 3], 30 + i as u64);
            let bias = random(&[cout], 40 + i as u64);
            let packed = PackedConv3x3::new(&wt, Some(&bias)).unwrap();
            let up = x.upsample_nearest2d(2 * h, 2 * w).unwrap();
            let err = rel_err(
                &packed.forward_upsample2x(&x).unwrap(),
                &reference(&up, &wt, Some(&bias)),
            );
            assert!(err <= 1e-4, "case {i}: relative error {err}");
        }
    }

    #[test]
    fn half_precision_keeps_the_dtype() {
        let x = random(&[1, 4, 6, 6], 1).to_dtype(DType::BF16).unwrap();
        let wt = random(&[3, 4, 3, 3], 2);
        let packed = PackedConv3x3::new(&wt, None).unwrap();
        let y = packed.forward(&x).unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        let want = reference(&x.to_dtype(DType::F32).unwrap(), &wt, None);
        let err = rel_err(&y.to_dtype(DType::F32).unwrap(), &want);
        assert!(err <= 1e-2, "bf16 rounding only: relative error {err}");
    }

    #[test]
    fn both_paths_equal_candle_on_every_size() {
        // The size thresholds pick one path per map; run each path on every shape directly.
        // (…, 16) and (…, 32): whole 16-position panels per row, written straight to the output.
        for (i, &(cin, cout, h, w)) in [
            (3, 5, 1, 1),
            (4, 4, 4, 4),
            (5, 3, 7, 2),
            (2, 6, 9, 20),
            (7, 9, 5, 16),
            (3, 13, 3, 32),
        ]
        .iter()
        .enumerate()
        {
            let x = random(&[1, cin, h, w], 50 + i as u64);
            let wt = random(&[cout, cin, 3, 3], 60 + i as u64);
            let bias = random(&[cout], 70 + i as u64);
            let packed = PackedConv3x3::new(&wt, Some(&bias)).unwrap();
            let want = reference(&x, &wt, Some(&bias));
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let src = Source { h, w, scale: 1 };
            let par = gemm::Parallelism::None;
            for banded in [false, true] {
                let mut out = vec![0f32; cout * h * w];
                if banded {
                    packed.banded_item(&xs, src, &mut out, par);
                } else {
                    packed.im2col_item(&xs, src, &mut out, par);
                }
                let got = Tensor::from_vec(out, (1, cout, h, w), &Device::Cpu).unwrap();
                let err = rel_err(&got, &want);
                assert!(
                    err <= 1e-4,
                    "case {i} banded {banded}: relative error {err}"
                );
            }
        }
    }

    #[test]
    fn winograd_equals_candle_conv2d() {
        if !crate::cpu_gemm::available() {
            return;
        }
        // (batch, cin, cout, h, w, upsample): odd sizes (tiles past the edges), several
        // panels per tile row, a partial last panel, channel counts past the GEMM's blocks.
        for (i, &(b, cin, cout, h, w, up)) in [
            (1, 3, 5, 4, 4, false),
            (2, 7, 9, 5, 7, false),
            (1, 16, 24, 32, 32, false),
            (2, 33, 17, 9, 70, false),
            (1, 300, 130, 6, 36, false),
            // Two depth blocks in the GEMMs.
            (1, 400, 70, 4, 10, false),
            (2, 5, 6, 3, 9, true),
            (1, 20, 18, 16, 16, true),
        ]
        .iter()
        .enumerate()
        {
            let x = random(&[b, cin, h, w], 80 + i as u64);
            let wt = random(&[cout, cin, 3, 3], 90 + i as u64);
            let bias = random(&[cout], 95 + i as u64);
            let packed = PackedConv3x3::new(&wt, Some(&bias)).unwrap();
            let scale = if up { 2 } else { 1 };
            let xin = if up {
                x.upsample_nearest2d(h * scale, w * scale).unwrap()
            } else {
                x.clone()
            };
            let want = reference(&xin, &wt, Some(&bias));
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            // The whole map in one band, and bands of one tile row.
            for band_bytes in [usize::MAX, 1] {
                let map = crate::cpu_winograd::Map {
                    band_bytes,
                    ..crate::cpu_winograd::Map::new(h * scale, w * scale, scale)
                };
                let mut out = vec![f32::NAN; b * cout * map.h * map.w];
                packed.winograd(&xs, b, map, &mut out);
                let got = Tensor::from_vec(out, (b, cout, map.h, map.w), &Device::Cpu).unwrap();
                let err = rel_err(&got, &want);
                // Rounding only (the transforms add and halve): relative to the output scale.
                assert!(
                    err <= 1e-5,
                    "case {i}, band {band_bytes}: relative error {err}"
                );
            }
        }
    }

    #[test]
    fn auto_path_follows_the_measured_rule() {
        if !crate::cpu_gemm::available() || std::env::var_os("KANDINSKY_WINOGRAD").is_some() {
            return;
        }
        let wide = PackedConv3x3::new(&random(&[64, 64, 3, 3], 1), None).unwrap();
        let thin = PackedConv3x3::new(&random(&[64, 4, 3, 3], 2), None).unwrap();
        // 128 tiles in the batch (2 × 8 × 8) and ≥ 64 channels: Winograd; fewer: direct.
        assert_eq!(wide.auto_path(2, 16, 16), Conv3x3Path::Winograd);
        assert_eq!(wide.auto_path(2, 8, 8), Conv3x3Path::Direct);
        assert_eq!(thin.auto_path(2, 64, 64), Conv3x3Path::Direct);
    }

    #[test]
    fn bad_shapes_are_errors() {
        let wt = random(&[3, 4, 3, 3], 2);
        let packed = PackedConv3x3::new(&wt, None).unwrap();
        assert!(packed.forward(&random(&[1, 5, 4, 4], 1)).is_err());
        assert!(PackedConv3x3::new(&random(&[3, 4, 1, 1], 3), None).is_err());
        assert!(PackedConv3x3::new(&wt, Some(&random(&[4], 3))).is_err());
    }
}
