//! 2-D convolutions that bound their working memory on large maps.
//!
//! A decoder output of 1024² pixels runs 3×3 convolutions over 128- and 256-channel maps of
//! 1024² (0.5–1 GB each in f32). Whatever the backend does internally (candle's CPU kernel
//! copies the input to NHWC; other kernels build im2col matrices of 9× the input), doing it
//! on the whole map multiplies the peak memory. [`Conv2d`] instead convolves horizontal
//! bands of output rows (each with the input rows its kernel reaches, zero-padded explicitly
//! at the borders) and writes them into one preallocated output, so the extra memory is one
//! band. Each band is one matrix product of the `[out, k²·in]` weight matrix with the band's
//! im2col matrix (built from k² shifted views; measured 1.7× faster than candle 0.11.1's
//! tiled CPU kernel for a 128-channel 256² map, and bit-identical to it).
//! The nearest-2× upsampling of `Upsample2D` is fused in the same way
//! ([`Conv2d::forward_upsample2x`]), so the 4× larger upsampled map never exists.
//! On the CPU, the 3×3 stride-1 convolutions go further with kandinsky-core's
//! [`PackedConv3x3`] (no im2col matrix at all, weight arranged once at load; same banding).

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use kandinsky_core::cpu_conv::PackedConv3x3;
use kandinsky_core::gpu_conv::ShiftedConv;
use kandinsky_core::nn::use_fused_kernels;
use kandinsky_core::Result;

/// Largest im2col matrix (bytes) of one band.
const BAND_BYTES: usize = 64 << 20;

/// Bytes of scratch above which a CUDA convolution runs in bands of output rows (at 768 px
/// the 256 → 128-channel convolution at 768², 1.2 GB of scratch whole). Measured on an H200
/// (GPU run 10, f16, 768 px decode), peak / time: none 1901 MiB / 31.0 ms; 768 MiB 1607 /
/// 32.0; 512 MiB 1401 / 35.1; 96 MiB 1125 / 40.3; diffusers 1614 / 70.
const CONV_SCRATCH_LIMIT: usize = 768 << 20;

/// Zero padding on each side, `(top, bottom, left, right)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Padding {
    /// Rows added above.
    pub top: usize,
    /// Rows added below.
    pub bottom: usize,
    /// Columns added on the left.
    pub left: usize,
    /// Columns added on the right.
    pub right: usize,
}

impl Padding {
    /// The same padding on every side.
    pub fn same(p: usize) -> Self {
        Self {
            top: p,
            bottom: p,
            left: p,
            right: p,
        }
    }
}

/// A 2-D convolution with bias (`weight [out, in, k, k]`, `bias [out]`).
///
/// On the CPU the 3×3 stride-1 padding-1 convolutions (almost all of the decoder's time) keep
/// their weight pre-arranged from load and run kandinsky-core's [`PackedConv3x3`] (implicit
/// GEMM over the padded width, memory bounded by bands as well, the 2× upsampling fused).
/// On CUDA, every stride-1 convolution runs kandinsky-core's [`ShiftedConv`] (no im2col
/// matrix, f32 accumulation, bias, upsampling and a residual add fused). The rest (the
/// encoder's stride-2 downsampling, 1×1s on the CPU, or `KANDINSKY_PLAIN_KERNELS=1` read at
/// load) use the banded im2col path below.
#[derive(Debug, Clone)]
pub struct Conv2d(ConvKind);

#[derive(Debug, Clone)]
enum ConvKind {
    Banded(BandedConv),
    /// Only the packed copy is kept (the candle weight is dropped after packing).
    Packed3x3(PackedConv3x3),
    /// Only the rearranged taps are kept.
    Shifted(ShiftedConv),
}

impl Conv2d {
    /// Load `weight` and `bias` of a `kernel`×`kernel` convolution.
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: Padding,
        vb: VarBuilder,
    ) -> Result<Self> {
        let packable = kernel == 3
            && stride == 1
            && padding == Padding::same(1)
            && vb.device().is_cpu()
            // f64 stays exact on the banded path; the packed kernel computes in f32.
            && vb.dtype() != DType::F64
            && use_fused_kernels();
        let shifted =
            ShiftedConv::covers(vb.device(), (kernel, kernel), stride, 1, 1) && use_fused_kernels();
        let conv = BandedConv::new(in_channels, out_channels, kernel, stride, padding, vb)?;
        // The manifest checks' zero-stride placeholders are not weights: packing would
        // materialise them.
        if !conv.weight.is_contiguous() {
            return Ok(Self(ConvKind::Banded(conv)));
        }
        if shifted {
            let p = [padding.top, padding.bottom, padding.left, padding.right];
            return Ok(Self(ConvKind::Shifted(
                ShiftedConv::new(&conv.weight, Some(&conv.bias), p)?
                    .with_scratch_limit(Some(CONV_SCRATCH_LIMIT)),
            )));
        }
        if !packable {
            return Ok(Self(ConvKind::Banded(conv)));
        }
        let packed = PackedConv3x3::new(&conv.weight, Some(&conv.bias))?;
        Ok(Self(ConvKind::Packed3x3(packed)))
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        match &self.0 {
            ConvKind::Banded(c) => c.out_channels(),
            ConvKind::Packed3x3(p) => p.out_channels(),
            ConvKind::Shifted(s) => s.out_channels(),
        }
    }

    /// Convolve `x` `[B, C, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.0 {
            ConvKind::Banded(c) => c.forward(x),
            ConvKind::Packed3x3(p) => p.forward(x),
            ConvKind::Shifted(s) => s.forward(x, false, None),
        }
    }

    /// The CUDA convolution, which can normalise its input on read
    /// ([`ShiftedConv::forward_normed`]); `None` on other paths.
    pub fn shifted(&self) -> Option<&ShiftedConv> {
        match &self.0 {
            ConvKind::Shifted(s) => Some(s),
            _ => None,
        }
    }

    /// `conv(x) + residual` (one kernel on CUDA). Takes `x` so that elsewhere it is freed
    /// before the add (one full-size map less at the peak).
    pub fn forward_add(&self, x: Tensor, residual: &Tensor) -> Result<Tensor> {
        match &self.0 {
            ConvKind::Shifted(s) => s.forward(&x, false, Some(residual)),
            _ => {
                let y = self.forward(&x)?;
                drop(x);
                Ok((residual + y)?)
            }
        }
    }

    /// `conv(nearest_upsample_2x(x))` without materialising the upsampled map
    /// (requires stride 1 and symmetric padding, as `Upsample2D`'s convolution has).
    pub fn forward_upsample2x(&self, x: &Tensor) -> Result<Tensor> {
        match &self.0 {
            ConvKind::Banded(c) => c.forward_upsample2x(x),
            ConvKind::Packed3x3(p) => p.forward_upsample2x(x),
            ConvKind::Shifted(s) => s.forward(x, true, None),
        }
    }
}

/// The banded im2col convolution (any kernel, stride and padding).
#[derive(Debug, Clone)]
struct BandedConv {
    weight: Tensor,
    bias: Tensor,
    kernel: usize,
    stride: usize,
    padding: Padding,
}

impl BandedConv {
    /// Load `weight` and `bias` of a `kernel`×`kernel` convolution.
    fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: Padding,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            weight: vb.get((out_channels, in_channels, kernel, kernel), "weight")?,
            bias: vb.get(out_channels, "bias")?,
            kernel,
            stride,
            padding,
        })
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }

    fn out_size(&self, h: usize, w: usize) -> (usize, usize) {
        let p = self.padding;
        let oh = (h + p.top + p.bottom - self.kernel) / self.stride + 1;
        let ow = (w + p.left + p.right - self.kernel) / self.stride + 1;
        (oh, ow)
    }

    fn bias4(&self, dtype: DType) -> candle_core::Result<Tensor> {
        self.bias.to_dtype(dtype)?.reshape((1, (), 1, 1))
    }

    /// Convolve `x` `[B, C, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !x.device().is_cpu() {
            return self.forward_whole(x);
        }
        let (_, _, h, w) = x.dims4()?;
        let (oh, ow) = self.out_size(h, w);
        let p = self.padding;
        let rows = self.rows_per_band(x, ow);
        self.banded(x, oh, ow, rows, |r0, r1| {
            // Padded input rows [r0·s, (r1−1)·s + k) in unpadded coordinates.
            let lo = (r0 * self.stride) as isize - p.top as isize;
            let hi = ((r1 - 1) * self.stride + self.kernel) as isize - p.top as isize;
            self.band_input(x, lo, hi, h)
        })
    }

    /// The whole map in one candle convolution: on a GPU the banding (a CPU memory measure)
    /// would only add launches.
    fn forward_whole(&self, x: &Tensor) -> Result<Tensor> {
        let p = self.padding;
        let x = x
            .pad_with_zeros(2, p.top, p.bottom)?
            .pad_with_zeros(3, p.left, p.right)?;
        let w = self.weight.to_dtype(x.dtype())?;
        let y = x.conv2d(&w, 0, self.stride, 1, 1)?;
        Ok(y.broadcast_add(&self.bias4(x.dtype())?)?)
    }

    /// Output rows per band: the im2col matrix of a band (`k²·C` values per output pixel)
    /// stays within [`BAND_BYTES`].
    fn rows_per_band(&self, x: &Tensor, ow: usize) -> usize {
        let (b, c, _, _) = x.dims4().unwrap_or((1, 1, 1, 1));
        let per_pixel = (self.kernel * self.kernel * c).max(self.out_channels());
        let row_bytes = b * per_pixel * ow * x.dtype().size_in_bytes().max(4);
        (BAND_BYTES / row_bytes.max(1)).max(1)
    }

    /// `conv(nearest_upsample_2x(x))` without materialising the upsampled map
    /// (requires stride 1 and symmetric padding, as `Upsample2D`'s convolution has).
    pub fn forward_upsample2x(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (uh, uw) = (2 * h, 2 * w);
        let p = self.padding;
        if self.stride != 1 || p != Padding::same(p.top) || !x.device().is_cpu() {
            let up = x.upsample_nearest2d(uh, uw)?;
            return self.forward(&up);
        }
        let (oh, ow) = self.out_size(uh, uw);
        let rows = self.rows_per_band(x, ow);
        self.banded(x, oh, ow, rows, |r0, r1| {
            // Upsampled rows [lo, hi) needed, clipped to the map; the rest is zero padding.
            let lo = r0 as isize - p.top as isize;
            let hi = (r1 - 1 + self.kernel) as isize - p.top as isize;
            let (clo, chi) = (lo.max(0) as usize, (hi.min(uh as isize)) as usize);
            let (slo, shi) = (clo / 2, (chi - 1) / 2 + 1);
            let src = x.narrow(2, slo, shi - slo)?;
            let up = src.upsample_nearest2d(2 * (shi - slo), uw)?;
            let up = up.narrow(2, clo - 2 * slo, chi - clo)?;
            let top = (clo as isize - lo) as usize;
            let bottom = (hi - chi as isize) as usize;
            Ok(up.pad_with_zeros(2, top, bottom)?)
        })
    }

    /// The weight as a `[out, k·k·in]` matrix in (kh, kw, c) order, for the im2col product.
    fn weight_matrix(&self) -> candle_core::Result<Tensor> {
        let (o, i, k, _) = self.weight.dims4()?;
        let w = self.weight.permute((0, 2, 3, 1))?.contiguous()?;
        let w = w.reshape((o, k * k * i))?;
        // candle's CPU GEMM has no bf16 kernel: the product runs in f32 (see `conv_padded`).
        if w.dtype() == DType::BF16 && w.device().is_cpu() {
            w.to_dtype(DType::F32)
        } else {
            Ok(w)
        }
    }

    /// Convolution without padding of an already padded band, as one matrix product of the
    /// weight matrix `wm` with the band's im2col matrix (stride 1), or candle's kernel.
    fn conv_padded(&self, x: &Tensor, wm: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let k = self.kernel;
        if self.stride != 1 {
            let (x, wt) = if x.dtype() == DType::BF16 && x.device().is_cpu() {
                (x.to_dtype(DType::F32)?, self.weight.to_dtype(DType::F32)?)
            } else {
                (x.clone(), self.weight.clone())
            };
            return x
                .conv2d(&wt, 0, self.stride, 1, 1)?
                .to_dtype(self.weight.dtype());
        }
        let (oh, ow) = (h + 1 - k, w + 1 - k);
        let col = if k == 1 {
            x.reshape((b, c, h * w))?
        } else {
            let mut taps = Vec::with_capacity(k * k);
            for kh in 0..k {
                for kw in 0..k {
                    taps.push(x.narrow(2, kh, oh)?.narrow(3, kw, ow)?);
                }
            }
            Tensor::cat(&taps, 1)?.reshape((b, k * k * c, oh * ow))?
        };
        let col = col.to_dtype(wm.dtype())?;
        // A materialised batch copy of the weight: candle mis-handles some stride-0 batches.
        let wb = if b == 1 {
            wm.unsqueeze(0)?
        } else {
            wm.broadcast_left(b)?.contiguous()?
        };
        wb.matmul(&col)?
            .to_dtype(x.dtype())?
            .reshape((b, self.out_channels(), oh, ow))
    }

    /// Narrow input rows `[lo, hi)` (may reach outside `[0, h)`: zero rows) and pad the width.
    fn band_input(&self, x: &Tensor, lo: isize, hi: isize, h: usize) -> Result<Tensor> {
        let (clo, chi) = (lo.max(0) as usize, hi.min(h as isize).max(0) as usize);
        let band = x.narrow(2, clo, chi.saturating_sub(clo))?;
        let top = (clo as isize - lo) as usize;
        let bottom = (hi - chi as isize).max(0) as usize;
        Ok(band.pad_with_zeros(2, top, bottom)?)
    }

    /// Run the convolution band by band; `band_rows(r0, r1)` returns the vertically padded
    /// input rows for output rows `[r0, r1)` (the width is padded here).
    fn banded(
        &self,
        x: &Tensor,
        oh: usize,
        ow: usize,
        rows: usize,
        band_rows: impl Fn(usize, usize) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (dtype, device) = (x.dtype(), x.device());
        let p = self.padding;
        let bias = self.bias4(dtype)?;
        let wm = self.weight_matrix()?;
        let mut out: Option<Tensor> = None;
        let mut r0 = 0;
        while r0 < oh {
            let r1 = (r0 + rows).min(oh);
            let band = band_rows(r0, r1)?.pad_with_zeros(3, p.left, p.right)?;
            let y = self.conv_padded(&band, &wm)?.broadcast_add(&bias)?;
            if r0 == 0 && r1 == oh {
                return Ok(y);
            }
            let dst = match &out {
                Some(o) => o,
                None => {
                    let (b, c, _, _) = y.dims4()?;
                    out.insert(Tensor::zeros((b, c, oh, ow), dtype, device)?)
                }
            };
            dst.slice_set(&y, 2, r0)?;
            r0 = r1;
        }
        out.ok_or_else(|| kandinsky_core::Error::invalid("convolution over an empty map"))
    }
}
