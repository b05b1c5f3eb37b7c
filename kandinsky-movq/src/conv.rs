//! 2-D convolutions that bound their working memory on large maps.
//!
//! A decoder output of 1024² pixels runs 3×3 convolutions over 128- and 256-channel maps of
//! 1024² (0.5–1 GB each in f32). Whatever the backend does internally (candle's CPU kernel
//! copies the input to NHWC; other kernels build im2col matrices of 9× the input), doing it
//! on the whole map multiplies the peak memory. [`Conv2d`] instead convolves horizontal
//! bands of output rows (each with the input rows its kernel reaches, zero-padded explicitly
//! at the borders) and writes them into one preallocated output, so the extra memory is one
//! band. Each output pixel is computed from exactly the same inputs as a single convolution.
//! The nearest-2× upsampling of `Upsample2D` is fused in the same way
//! ([`Conv2d::forward_upsample2x`]), so the 4× larger upsampled map never exists.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use kandinsky_core::Result;

/// Maps below this many bytes (input or output) are convolved in one call.
const BAND_BYTES: usize = 32 << 20;

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
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    kernel: usize,
    stride: usize,
    padding: Padding,
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
        let (b, c, h, w) = x.dims4()?;
        let (oh, ow) = self.out_size(h, w);
        let elt = x.dtype().size_in_bytes();
        let in_bytes = b * c * h * w * elt;
        let out_bytes = b * self.out_channels() * oh * ow * elt;
        let p = self.padding;
        let symmetric = p == Padding::same(p.top);
        if in_bytes.max(out_bytes) <= BAND_BYTES && symmetric {
            let y = self.conv(x, p.top)?;
            return Ok(y.broadcast_add(&self.bias4(y.dtype())?)?);
        }
        // Rows per band: bounded by the bigger of the input rows it reads and the output it writes.
        let row_bytes = (b * c * w * self.stride).max(b * self.out_channels() * ow) * elt;
        let rows = (BAND_BYTES / row_bytes.max(1)).max(1);
        self.banded(oh, ow, rows, x.dtype(), x.device(), |r0, r1| {
            // Padded input rows [r0·s, (r1−1)·s + k) in unpadded coordinates.
            let lo = (r0 * self.stride) as isize - p.top as isize;
            let hi = ((r1 - 1) * self.stride + self.kernel) as isize - p.top as isize;
            self.band_input(x, lo, hi, h)
        })
    }

    /// `conv(nearest_upsample_2x(x))` without materialising the upsampled map
    /// (requires stride 1 and symmetric padding, as `Upsample2D`'s convolution has).
    pub fn forward_upsample2x(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let (uh, uw) = (2 * h, 2 * w);
        let elt = x.dtype().size_in_bytes();
        let p = self.padding;
        let (oh, ow) = self.out_size(uh, uw);
        let big = b * c.max(self.out_channels()) * uh * uw * elt > BAND_BYTES;
        if !big || self.stride != 1 || p != Padding::same(p.top) {
            let up = x.upsample_nearest2d(uh, uw)?;
            return self.forward(&up);
        }
        let row_bytes = b * c.max(self.out_channels()) * uw * elt;
        let rows = (BAND_BYTES / row_bytes.max(1)).max(1);
        self.banded(oh, ow, rows, x.dtype(), x.device(), |r0, r1| {
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

    /// The raw convolution (no bias). candle's CPU kernels have no bf16 GEMM: widen to f32.
    fn conv(&self, x: &Tensor, padding: usize) -> candle_core::Result<Tensor> {
        if x.dtype() == DType::BF16 && x.device().is_cpu() {
            let w = self.weight.to_dtype(DType::F32)?;
            return x
                .to_dtype(DType::F32)?
                .conv2d(&w, padding, self.stride, 1, 1)?
                .to_dtype(DType::BF16);
        }
        x.conv2d(&self.weight, padding, self.stride, 1, 1)
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
        oh: usize,
        ow: usize,
        rows: usize,
        dtype: DType,
        device: &candle_core::Device,
        band_rows: impl Fn(usize, usize) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let p = self.padding;
        let bias = self.bias4(dtype)?;
        let mut out: Option<Tensor> = None;
        let mut r0 = 0;
        while r0 < oh {
            let r1 = (r0 + rows).min(oh);
            let band = band_rows(r0, r1)?.pad_with_zeros(3, p.left, p.right)?;
            let y = self.conv(&band, 0)?.broadcast_add(&bias)?;
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
