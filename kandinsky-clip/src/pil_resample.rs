//! Pillow's 8-bit image operations that transformers' and diffusers' PIL code paths run, with
//! Pillow's integer arithmetic so the results are bit-identical:
//! - [`resize`] and the per-mode wrappers ([`resize_luma`], [`resize_luma_alpha`],
//!   [`resize_rgb`], [`resize_rgba`], [`resize_bicubic`]): `Image.resize(size, filter)` without
//!   `reducing_gap` (`libImaging/Resample.c`): a separable two-pass convolution (horizontal
//!   first unless Pillow 13 picks vertical first, each pass skipped when its size is
//!   unchanged) whose support grows with the
//!   downscale factor (antialiasing), coefficients normalised then quantised to 22 fractional
//!   bits, each pass rounded and clipped to u8, every channel independently. Modes with alpha
//!   are resized premultiplied, as `Image.resize` does (`RGBA`→`RGBa`→`RGBA`);
//! - [`resize_with_gap`] and [`resize_image`] (every mode): `Image.resize(size, filter,
//!   reducing_gap=g)`, exact too: a box reduction by integer factors ([`reduce`],
//!   `libImaging/Reduce.c`) then the convolution over the fractional source box the reduction
//!   leaves;
//! - [`rgb_to_luma`], [`rgb_to_l`], [`rgba_to_l`], [`luma_alpha_to_l`]: `convert("L")`
//!   (`Convert.c`, ITU-R 601-2 luma in 16-bit fixed point);
//! - [`composite_on_white`]: `Image.alpha_composite(white, rgba)` (`AlphaComposite.c`, 7
//!   fractional bits with rounded divisions by 255).

use image::{GrayAlphaImage, GrayImage, ImageBuffer, Pixel, RgbImage, RgbaImage};
use kandinsky_core::{Error, Result};

/// Fractional bits of the 8-bit resampling coefficients (32 − 8 − 2 in Pillow: two spare bits
/// absorb the overshoot of negative lobes).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// A Pillow resampling filter (`PIL.Image.Resampling`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Filter {
    /// `BICUBIC`: Keys' cubic convolution with a = −0.5, support 2.
    Bicubic,
    /// `LANCZOS`: `sinc(x)·sinc(x/3)` on [−3, 3), support 3.
    Lanczos,
}

impl Filter {
    /// Half-width of the kernel at scale 1.
    fn support(self) -> f64 {
        match self {
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Bicubic => bicubic(x),
            Filter::Lanczos => lanczos(x),
        }
    }
}

/// Pillow's bicubic kernel (a = −0.5), support 2.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Normalised sinc, evaluated as Pillow does (`sin(πx)/(πx)`, same operation order, so the
/// doubles match bit for bit).
fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

/// Pillow's Lanczos-3 window; the half-open interval is Pillow's (−3 included, 3 excluded).
fn lanczos(x: f64) -> f64 {
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// Fixed-point coefficients of one resampling pass.
struct Coeffs {
    /// Coefficients per output pixel (row stride of `k`).
    ksize: usize,
    /// (first input index, number of taps) per output pixel.
    bounds: Vec<(usize, usize)>,
    k: Vec<i64>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the source interval `in0..in1`
/// (one axis of `Image.resize`'s `box`, a C `float` in Pillow) of an axis of `in_size` pixels.
fn precompute(in_size: usize, (in0, in1): (f32, f32), out_size: usize, filter: Filter) -> Coeffs {
    // Pillow subtracts the two floats in single precision, then widens.
    let scale = (in1 - in0) as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut k = vec![0i64; out_size * ksize];
    let mut w = vec![0f64; ksize];
    let ss = 1.0 / filterscale;
    for xx in 0..out_size {
        let center = in0 as f64 + (xx as f64 + 0.5) * scale;
        // C's (int) casts truncate toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin).min(ksize);
        let mut ww = 0.0;
        for (x, wx) in w.iter_mut().enumerate().take(n) {
            *wx = filter.weight(((x + xmin) as f64 - center + 0.5) * ss);
            ww += *wx;
        }
        for x in 0..n {
            let v = if ww != 0.0 { w[x] / ww } else { w[x] };
            let fixed = v * (1i64 << PRECISION_BITS) as f64;
            // Round half away from zero, as Pillow's `(int)(±0.5 + v)`.
            k[xx * ksize + x] = if v < 0.0 {
                (fixed - 0.5) as i64
            } else {
                (fixed + 0.5) as i64
            };
        }
        bounds.push((xmin, n));
    }
    Coeffs { ksize, bounds, k }
}

/// Round the accumulated fixed-point sum and clip to u8 (Pillow's `clip8`).
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One pass of the convolution over interleaved pixels of `c` channels, along x (`horizontal`)
/// or y. `src` is `w`×`h`; `rows` are the output rows to produce along y for the horizontal
/// pass (`first..last` of the source), or all of them for the vertical one.
fn convolve(
    src: &[u8],
    c: usize,
    w: usize,
    coeffs: &Coeffs,
    horizontal: bool,
    rows: std::ops::Range<usize>,
) -> Vec<u8> {
    let half = 1i64 << (PRECISION_BITS - 1);
    let w_out = if horizontal { coeffs.bounds.len() } else { w };
    let mut out = vec![0u8; rows.len() * w_out * c];
    let mut px = out.chunks_exact_mut(c);
    for y in rows {
        for xx in 0..w_out {
            let (pos, lo) = if horizontal { (xx, y) } else { (y, xx) };
            let (first, n) = coeffs.bounds[pos];
            let k = &coeffs.k[pos * coeffs.ksize..pos * coeffs.ksize + n];
            let Some(o) = px.next() else { return out };
            for (ch, o) in o.iter_mut().enumerate() {
                let mut acc = half;
                for (t, kt) in k.iter().enumerate() {
                    let i = if horizontal {
                        (lo * w + first + t) * c + ch
                    } else {
                        ((first + t) * w + lo) * c + ch
                    };
                    acc += src[i] as i64 * kt;
                }
                *o = clip8(acc);
            }
        }
    }
    out
}

/// Pillow's `_resize` + `ImagingResample` of a `width`×`height` buffer of `c` channels (its
/// length already checked) to `out_width`×`out_height` (both > 0), reading the source region
/// `b` = (left, top, right, bottom), within the image.
fn resample(
    src: &[u8],
    c: usize,
    (width, height): (usize, usize),
    (out_width, out_height): (usize, usize),
    filter: Filter,
    b: [f32; 4],
) -> Vec<u8> {
    // `_resize` crops instead when the box is whole pixels and has the output's size (the
    // plain copy of a same-size resize is this case too).
    if b[0].fract() == 0.0
        && b[1].fract() == 0.0
        && b[2] - b[0] == out_width as f32
        && b[3] - b[1] == out_height as f32
    {
        let (x0, y0) = (b[0] as usize, b[1] as usize);
        let mut out = Vec::with_capacity(out_width * out_height * c);
        for y in y0..y0 + out_height {
            out.extend_from_slice(&src[(y * width + x0) * c..(y * width + x0 + out_width) * c]);
        }
        return out;
    }
    // `ImagingResampleInner`: each pass is skipped when it would be an identity.
    let need_h = out_width != width || b[0] != 0.0 || b[2] != out_width as f32;
    let need_v = out_height != height || b[1] != 0.0 || b[3] != out_height as f32;
    let vert = precompute(height, (b[1], b[3]), out_height, filter);
    let horiz = need_h.then(|| precompute(width, (b[0], b[2]), out_width, filter));
    // Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many
    // pixels as the width does (python-pillow/Pillow#9549, a speed-up; the rule here was
    // measured against Pillow 13.0.0 on thousands of size pairs, and with a box it compares
    // the image's sizes, not the box's). The 8-bit intermediate makes the order visible in the
    // result. Pillow ≤ 12 always ran the horizontal pass first.
    let vertical_first = need_v && out_height < height && {
        let dh = height as i64 - out_height as i64;
        let dw = width as i64 - out_width as i64;
        dh > 2 * dw
    };
    match horiz {
        None => convolve(src, c, width, &vert, false, 0..out_height),
        Some(horiz) if vertical_first => {
            let rows = convolve(src, c, width, &vert, false, 0..out_height);
            convolve(&rows, c, width, &horiz, true, 0..out_height)
        }
        Some(horiz) => {
            // Horizontal pass over the source rows the vertical pass reads only.
            let (first, _) = vert.bounds[0];
            let (lmin, ln) = vert.bounds[out_height - 1];
            let rows = convolve(src, c, width, &horiz, true, first..lmin + ln);
            if !need_v {
                return rows;
            }
            // Vertical pass on the kept rows: shift its bounds to them.
            let shifted = Coeffs {
                ksize: vert.ksize,
                bounds: vert
                    .bounds
                    .iter()
                    .map(|&(b, n)| (b.saturating_sub(first), n))
                    .collect(),
                k: vert.k,
            };
            convolve(&rows, c, out_width, &shifted, false, 0..out_height)
        }
    }
}

/// `width·height·channels`, when it is the length of `src` and `channels` is not 0.
fn check_buffer(src: &[u8], channels: usize, (width, height): (usize, usize)) -> Option<()> {
    let n = width.checked_mul(height)?.checked_mul(channels)?;
    (channels != 0 && n == src.len()).then_some(())
}

/// Resample interleaved 8-bit pixels (`channels` per pixel, `width`×`height`, row-major) to
/// `out_width`×`out_height` with Pillow's 8-bit resampler. Channels are independent, so this is
/// `Image.resize` for every 8-bit mode without premultiplied alpha (`L`, `RGB`, `La`,
/// `RGBa`, ...). Returns `None` when `src.len() != width·height·channels` or `channels` is 0.
pub fn resize(
    src: &[u8],
    channels: usize,
    (width, height): (usize, usize),
    (out_width, out_height): (usize, usize),
    filter: Filter,
) -> Option<Vec<u8>> {
    check_buffer(src, channels, (width, height))?;
    out_width.checked_mul(out_height)?.checked_mul(channels)?;
    Some(resize_checked(
        src,
        channels,
        (width, height),
        (out_width, out_height),
        filter,
        None,
    ))
}

/// `Image.resize(size, filter, reducing_gap=reducing_gap)` of interleaved 8-bit pixels with
/// independent channels (as [`resize`]), bit-exact with Pillow 13.
///
/// With a gap, Pillow first box-averages the image by the integer factors
/// `max(1, ⌊(in / out) / reducing_gap⌋)` per axis ([`reduce`]), then resamples the reduced
/// image over the fractional region the source maps to (`in / factor` pixels; a partial last
/// column or row of the reduction, the mean of the pixels it has, is filtered as a whole
/// pixel). Factors of 1 on both axes, e.g.
/// `1000×700 → 512×512` with a gap of 1, leave it the plain [`resize`]. diffusers'
/// `VaeImageProcessor(reducing_gap=1)` and the Kandinsky inpaint pipelines resize images this
/// way.
///
/// Errors when `src.len() != width·height·channels`, `channels` is 0, or `reducing_gap` is
/// below 1 or NaN (Pillow raises `ValueError`). A zero output size gives an empty buffer.
pub fn resize_with_gap(
    src: &[u8],
    channels: usize,
    (width, height): (usize, usize),
    (out_width, out_height): (usize, usize),
    filter: Filter,
    reducing_gap: Option<f64>,
) -> Result<Vec<u8>> {
    check_gap(reducing_gap)?;
    check_sizes(src, channels, (width, height), (out_width, out_height))?;
    Ok(resize_checked(
        src,
        channels,
        (width, height),
        (out_width, out_height),
        filter,
        reducing_gap,
    ))
}

/// `Image.reduce((x_factor, y_factor))` of interleaved 8-bit pixels with independent channels:
/// each output pixel is the mean of an `x_factor`×`y_factor` box, rounded as Pillow's
/// `ImagingReduce` does; the output is `⌈width / x_factor⌉`×`⌈height / y_factor⌉`, the last
/// column and row averaging the partial boxes at the right and bottom edges.
///
/// Errors when `src.len() != width·height·channels`, `channels` is 0 or a factor is 0.
pub fn reduce(
    src: &[u8],
    channels: usize,
    (width, height): (usize, usize),
    (x_factor, y_factor): (usize, usize),
) -> Result<Vec<u8>> {
    check_sizes(src, channels, (width, height), (0, 0))?;
    if x_factor == 0 || y_factor == 0 {
        return Err(Error::invalid(format!(
            "reduce factors must be at least 1, got {x_factor}×{y_factor}"
        )));
    }
    Ok(reduce_checked(
        src,
        channels,
        (width, height),
        (x_factor, y_factor),
    ))
}

/// Pillow rejects `reducing_gap < 1.0`; NaN fails its integer conversion.
fn check_gap(reducing_gap: Option<f64>) -> Result<()> {
    match reducing_gap {
        Some(g) if g.is_nan() || g < 1.0 => Err(Error::invalid(format!(
            "reducing_gap must be 1.0 or greater, got {g}"
        ))),
        _ => Ok(()),
    }
}

/// The source buffer matches its size, and the output's byte count fits in memory's range.
fn check_sizes(
    src: &[u8],
    channels: usize,
    size: (usize, usize),
    (out_width, out_height): (usize, usize),
) -> Result<()> {
    if check_buffer(src, channels, size).is_none() {
        return Err(Error::invalid(format!(
            "pixel buffer of {} bytes is not {}×{} pixels of {channels} channels",
            src.len(),
            size.0,
            size.1
        )));
    }
    if out_width
        .checked_mul(out_height)
        .and_then(|n| n.checked_mul(channels))
        .is_none()
    {
        return Err(Error::invalid(format!(
            "output size {out_width}×{out_height} is too large"
        )));
    }
    Ok(())
}

/// [`resize_with_gap`] on checked arguments.
fn resize_checked(
    src: &[u8],
    c: usize,
    (width, height): (usize, usize),
    (out_width, out_height): (usize, usize),
    filter: Filter,
    reducing_gap: Option<f64>,
) -> Vec<u8> {
    if out_width == 0 || out_height == 0 {
        return Vec::new();
    }
    // `Image.resize`: `int(in / out / reducing_gap) or 1` per axis, in doubles.
    let factor = |i: usize, o: usize, gap: f64| ((i as f64 / o as f64 / gap) as usize).max(1);
    let (fx, fy) = match reducing_gap {
        Some(g) => (factor(width, out_width, g), factor(height, out_height, g)),
        None => (1, 1),
    };
    if fx == 1 && fy == 1 {
        let full = [0.0, 0.0, width as f32, height as f32];
        let out = (out_width, out_height);
        return resample(src, c, (width, height), out, filter, full);
    }
    // Pillow reduces its "safe box" (the box grown by the filter's support, clipped to the
    // image): the whole image for a whole-image resize. The resample then reads the region
    // the source maps to.
    let reduced = reduce_checked(src, c, (width, height), (fx, fy));
    let size = (width.div_ceil(fx), height.div_ceil(fy));
    let b = [
        0.0,
        0.0,
        (width as f64 / fx as f64) as f32,
        (height as f64 / fy as f64) as f32,
    ];
    resample(&reduced, c, size, (out_width, out_height), filter, b)
}

/// `division_UINT32(n, 8)` of Pillow's `Reduce.c`: ⌊2³² / (256·n)⌋ computed in single
/// precision, so the mean of `n` values is `((sum + n/2) · m) >> 24`.
fn reduce_multiplier(n: usize) -> u64 {
    (4_294_967_296f32 / (256 * n) as f32) as u64
}

/// `ImagingReduce` on a checked buffer, factors ≥ 1. Every specialised kernel of Pillow
/// (1×2, 2×2, 3×3, 4×4, 5×5, N×1, 1×N, N×M and the partial edge boxes) computes
/// `((sum + n/2) · reduce_multiplier(n)) >> 24` over the `n` pixels of its box: the
/// power-of-two kernels' shifts equal it, as their multipliers are exact.
fn reduce_checked(
    src: &[u8],
    c: usize,
    (width, height): (usize, usize),
    (fx, fy): (usize, usize),
) -> Vec<u8> {
    let (ow, oh) = (width.div_ceil(fx), height.div_ceil(fy));
    let mut out = vec![0u8; ow * oh * c];
    let mut sums = vec![0u64; c];
    let mut px = out.chunks_exact_mut(c);
    for y in 0..oh {
        let (y0, y1) = (y * fy, ((y + 1) * fy).min(height));
        for x in 0..ow {
            let (x0, x1) = (x * fx, ((x + 1) * fx).min(width));
            sums.fill(0);
            for yy in y0..y1 {
                let row = &src[(yy * width + x0) * c..(yy * width + x1) * c];
                for p in row.chunks_exact(c) {
                    sums.iter_mut().zip(p).for_each(|(s, &v)| *s += v as u64);
                }
            }
            let n = (x1 - x0) * (y1 - y0);
            let m = reduce_multiplier(n);
            let Some(o) = px.next() else { return out };
            // The C products fit in 32 bits: no wrap-around to mimic.
            for (o, s) in o.iter_mut().zip(&sums) {
                *o = (((s + n as u64 / 2) * m) >> 24) as u8;
            }
        }
    }
    out
}

/// `Image.resize((width, height), filter, reducing_gap=reducing_gap)` of an `L`, `LA`, `RGB`
/// or `RGBA` image (any 8-bit `image` pixel type), bit-exact with Pillow 13: types with alpha
/// are resized premultiplied (`RGBA`→`RGBa`→`RGBA`, the reduction included), as `Image.resize`
/// does; a same-size request is a copy. See [`resize_with_gap`] for the gap.
///
/// Errors when `reducing_gap` is below 1 or NaN.
pub fn resize_image<P: Pixel<Subpixel = u8>>(
    src: &ImageBuffer<P, Vec<u8>>,
    width: u32,
    height: u32,
    filter: Filter,
    reducing_gap: Option<f64>,
) -> Result<ImageBuffer<P, Vec<u8>>> {
    check_gap(reducing_gap)?;
    Ok(resize_image_checked(
        src,
        width,
        height,
        filter,
        reducing_gap,
    ))
}

/// [`resize_image`] with a valid gap.
fn resize_image_checked<P: Pixel<Subpixel = u8>>(
    src: &ImageBuffer<P, Vec<u8>>,
    width: u32,
    height: u32,
    filter: Filter,
    reducing_gap: Option<f64>,
) -> ImageBuffer<P, Vec<u8>> {
    if (src.width(), src.height()) == (width, height) {
        // `Image.resize` copies without converting.
        return src.clone();
    }
    let c = P::CHANNEL_COUNT as usize;
    let size_in = (src.width() as usize, src.height() as usize);
    let size_out = (width as usize, height as usize);
    let raw = if P::HAS_ALPHA {
        // Premultiplied so that transparent colours do not bleed.
        let mut pre = src.as_raw().clone();
        pre.chunks_exact_mut(c).for_each(|p| {
            if let Some((a, colour)) = p.split_last_mut() {
                colour.iter_mut().for_each(|v| *v = mul_div255(*v, *a));
            }
        });
        let mut out = resize_checked(&pre, c, size_in, size_out, filter, reducing_gap);
        out.chunks_exact_mut(c).for_each(|p| {
            if let Some((a, colour)) = p.split_last_mut() {
                colour.iter_mut().for_each(|v| *v = unpremultiply(*v, *a));
            }
        });
        out
    } else {
        resize_checked(src.as_raw(), c, size_in, size_out, filter, reducing_gap)
    };
    // An `image` buffer's length always matches its size.
    ImageBuffer::from_raw(width, height, raw).unwrap_or_else(|| ImageBuffer::new(width, height))
}

/// Resize an `L` image as `Image.resize(size, filter)` does, bit-exact.
pub fn resize_luma(src: &GrayImage, width: u32, height: u32, filter: Filter) -> GrayImage {
    resize_image_checked(src, width, height, filter, None)
}

/// Resize an `RGB` image as `Image.resize(size, filter)` does, bit-exact.
pub fn resize_rgb(src: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    resize_image_checked(src, width, height, filter, None)
}

/// Resize an RGB image with Pillow's `BICUBIC` filter, bit-exact to `Image.resize`.
pub fn resize_bicubic(src: &RgbImage, width: u32, height: u32) -> RgbImage {
    resize_rgb(src, width, height, Filter::Bicubic)
}

/// Pillow's `a·b/255`, rounded (`MULDIV255`).
fn mul_div255(a: u8, b: u8) -> u8 {
    shift_div255(a as u32 * b as u32 + 128) as u8
}

/// Undo [`mul_div255`] as Pillow's `RGBa`→`RGBA` does: truncating division, fully transparent
/// and opaque pixels unchanged.
fn unpremultiply(v: u8, alpha: u8) -> u8 {
    match alpha {
        0 | 255 => v,
        a => (255 * v as u32 / a as u32).min(255) as u8,
    }
}

/// Resize an `RGBA` image as `Image.resize(size, filter)` does (premultiplied), bit-exact.
pub fn resize_rgba(src: &RgbaImage, width: u32, height: u32, filter: Filter) -> RgbaImage {
    resize_image_checked(src, width, height, filter, None)
}

/// Resize an `LA` image as `Image.resize(size, filter)` does (premultiplied), bit-exact.
pub fn resize_luma_alpha(
    src: &GrayAlphaImage,
    width: u32,
    height: u32,
    filter: Filter,
) -> GrayAlphaImage {
    resize_image_checked(src, width, height, filter, None)
}

/// Pillow's luma of one RGB pixel (`convert("L")`): `(19595 R + 38470 G + 7471 B + 2¹⁵) >> 16`,
/// ITU-R 601-2 weights in 16-bit fixed point, rounded.
pub fn rgb_to_luma(r: u8, g: u8, b: u8) -> u8 {
    ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as u8
}

/// `Image.convert("L")` of an `RGB` image, bit-exact.
pub fn rgb_to_l(src: &RgbImage) -> GrayImage {
    GrayImage::from_fn(src.width(), src.height(), |x, y| {
        let [r, g, b] = src.get_pixel(x, y).0;
        image::Luma([rgb_to_luma(r, g, b)])
    })
}

/// `Image.convert("L")` of an `RGBA` image, bit-exact: Pillow ignores alpha here.
pub fn rgba_to_l(src: &RgbaImage) -> GrayImage {
    GrayImage::from_fn(src.width(), src.height(), |x, y| {
        let [r, g, b, _] = src.get_pixel(x, y).0;
        image::Luma([rgb_to_luma(r, g, b)])
    })
}

/// `Image.convert("L")` of an `LA` image: the `L` band (alpha dropped).
pub fn luma_alpha_to_l(src: &GrayAlphaImage) -> GrayImage {
    GrayImage::from_fn(src.width(), src.height(), |x, y| {
        image::Luma([src.get_pixel(x, y).0[0]])
    })
}

/// Pillow's rounded division by 255 of a value with 8 extra bits.
fn shift_div255(a: u32) -> u32 {
    ((a >> 8) + a) >> 8
}

/// Composite an RGBA image over an opaque white background and drop alpha, as transformers'
/// `convert_to_rgb` does with Pillow for images with transparency.
pub fn composite_on_white(src: &RgbaImage) -> RgbImage {
    const BITS: u32 = 7;
    let mut out = RgbImage::new(src.width(), src.height());
    for (o, p) in out.pixels_mut().zip(src.pixels()) {
        let [r, g, b, a] = p.0;
        if a == 0 {
            o.0 = [255, 255, 255];
            continue;
        }
        let a = a as u32;
        let blend = 255 * (255 - a);
        let outa255 = a * 255 + blend;
        let coef1 = a * 255 * 255 * (1 << BITS) / outa255;
        let coef2 = 255 * (1 << BITS) - coef1;
        let mix = |s: u8| {
            let t = s as u32 * coef1 + 255 * coef2;
            (shift_div255(t + (0x80 << BITS)) >> BITS) as u8
        };
        o.0 = [mix(r), mix(g), mix(b)];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coefficients_sum_to_one_and_identity_is_a_copy() {
        for (i, o, f) in [
            (300, 224, Filter::Bicubic),
            (150, 224, Filter::Bicubic),
            (480, 224, Filter::Bicubic),
            (7, 3, Filter::Bicubic),
            (300, 224, Filter::Lanczos),
            (37, 96, Filter::Lanczos),
            (7, 3, Filter::Lanczos),
        ] {
            let c = precompute(i, (0.0, i as f32), o, f);
            for xx in 0..o {
                let (_, n) = c.bounds[xx];
                let s: i64 = c.k[xx * c.ksize..xx * c.ksize + n].iter().sum();
                // Each coefficient is rounded separately: the sum is 1 within the taps.
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= n as i64,
                    "{f:?} {i}->{o} @{xx}: {s}"
                );
            }
        }
        let img = RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8 * 40, y as u8 * 50, 7]));
        assert_eq!(resize_bicubic(&img, 5, 4), img);
    }

    #[test]
    fn constant_images_stay_constant() {
        let img = RgbImage::from_pixel(37, 23, image::Rgb([200, 0, 255]));
        let out = resize_bicubic(&img, 11, 50);
        assert!(out.pixels().all(|p| p.0 == [200, 0, 255]));
        let out = resize_rgb(&img, 90, 7, Filter::Lanczos);
        assert!(out.pixels().all(|p| p.0 == [200, 0, 255]));
    }

    /// A deterministic pattern with hard jumps; the expectations below are this pattern run
    /// through Pillow 13.0.0 (`Image.fromarray(uint8 array, mode).resize((w, h), filter)`).
    fn pattern(w: u32, h: u32, c: u32) -> Vec<u8> {
        let mut v = Vec::new();
        for y in 0..h {
            for x in 0..w {
                for k in 0..c {
                    v.push(((x * x * 31 + y * 57 + k * 101 + x * y * 13) % 256) as u8);
                }
            }
        }
        v
    }

    #[rustfmt::skip]
    const L_7X5_LANCZOS_4X3: [u8; 12] = [37, 119, 123, 112, 145, 129, 152, 185, 181, 133, 126, 179];
    #[rustfmt::skip]
    const L_7X5_LANCZOS_11X8: [u8; 88] = [0, 0, 35, 111, 62, 16, 201, 222, 15, 15, 90, 18, 18, 65, 166, 131, 48, 136, 150, 44, 95, 173, 60, 69, 117, 191, 192, 130, 94, 96, 133, 198, 234, 92, 126, 140, 82, 123, 219, 194, 196, 249, 185, 118, 115, 182, 202, 59, 52, 171, 178, 181, 215, 171, 125, 154, 211, 245, 150, 72, 59, 52, 64, 107, 197, 249, 220, 172, 130, 171, 160, 98, 88, 127, 174, 186, 178, 255, 136, 33, 157, 219, 166, 156, 211, 255, 171, 86];
    #[rustfmt::skip]
    const L_7X5_BICUBIC_4X9: [u8; 36] = [12, 71, 139, 50, 32, 105, 122, 94, 72, 163, 98, 173, 103, 147, 160, 185, 134, 109, 223, 171, 182, 111, 126, 180, 205, 125, 57, 186, 169, 145, 139, 179, 147, 156, 189, 174];
    #[rustfmt::skip]
    const RGB_6X5_LANCZOS_13X3: [u8; 117] = [18, 127, 109, 17, 139, 121, 22, 159, 140, 64, 168, 144, 137, 152, 120, 163, 142, 111, 112, 157, 137, 68, 169, 163, 113, 154, 154, 180, 131, 131, 153, 134, 134, 82, 151, 151, 38, 162, 162, 100, 178, 34, 129, 146, 49, 174, 96, 80, 184, 68, 131, 127, 100, 177, 86, 137, 182, 116, 134, 145, 160, 114, 94, 154, 104, 66, 130, 113, 72, 150, 137, 96, 187, 160, 119, 209, 174, 133, 221, 30, 171, 199, 52, 149, 161, 92, 111, 135, 125, 85, 149, 121, 96, 160, 131, 106, 137, 184, 86, 108, 209, 59, 96, 152, 46, 112, 74, 58, 147, 74, 94, 178, 120, 127, 195, 151, 145];
    #[rustfmt::skip]
    const RGBA_6X5_LANCZOS_4X7: [u8; 112] = [0, 70, 255, 47, 82, 218, 107, 133, 86, 127, 204, 56, 51, 0, 255, 30, 10, 183, 61, 71, 157, 137, 117, 196, 110, 182, 86, 127, 86, 228, 69, 106, 88, 185, 14, 144, 178, 71, 138, 204, 142, 163, 87, 161, 141, 187, 78, 169, 144, 121, 82, 197, 104, 45, 173, 107, 189, 65, 161, 93, 213, 55, 156, 134, 179, 34, 121, 180, 85, 224, 88, 84, 54, 126, 9, 85, 128, 171, 73, 143, 163, 5, 112, 86, 154, 159, 88, 152, 117, 153, 60, 170, 113, 152, 58, 117, 0, 236, 0, 27, 169, 86, 116, 206, 170, 138, 116, 235, 192, 0, 138, 85];
    #[rustfmt::skip]
    const LA_6X5_LANCZOS_9X4: [u8; 72] = [0, 97, 16, 126, 74, 174, 135, 188, 94, 179, 57, 150, 163, 122, 112, 132, 35, 149, 86, 209, 93, 178, 95, 107, 68, 60, 136, 108, 145, 160, 110, 134, 143, 148, 173, 175, 112, 104, 233, 48, 241, 57, 95, 192, 78, 172, 68, 82, 65, 93, 124, 141, 152, 169, 255, 32, 120, 104, 84, 148, 150, 78, 151, 178, 125, 233, 74, 75, 144, 67, 177, 135];

    #[test]
    fn luma_matches_pillow() {
        let l = GrayImage::from_raw(7, 5, pattern(7, 5, 1)).unwrap();
        let out = resize_luma(&l, 4, 3, Filter::Lanczos);
        assert_eq!(out.as_raw().as_slice(), L_7X5_LANCZOS_4X3);
        let out = resize_luma(&l, 11, 8, Filter::Lanczos);
        assert_eq!(out.as_raw().as_slice(), L_7X5_LANCZOS_11X8);
        let out = resize_luma(&l, 4, 9, Filter::Bicubic);
        assert_eq!(out.as_raw().as_slice(), L_7X5_BICUBIC_4X9);
    }

    #[test]
    fn pass_order_follows_pillow_13() {
        // 6×9 → 5×4: the height loses 5 rows, more than twice the 1 column: vertical first.
        // 6×9 → 4×5: 4 rows against 2 columns, not more than twice: horizontal first. Pillow
        // 13.0.0's results; the other order gives different bytes on both.
        let l = GrayImage::from_raw(6, 9, pattern(6, 9, 1)).unwrap();
        let v_first: [u8; 20] = [
            37, 113, 114, 149, 118, 178, 152, 124, 123, 181, 102, 113, 152, 122, 145, 136, 82, 100,
            140, 168,
        ];
        let h_first: [u8; 20] = [
            26, 114, 131, 115, 164, 137, 126, 179, 152, 130, 122, 138, 88, 125, 146, 142, 133, 74,
            119, 172,
        ];
        assert_eq!(
            resize_luma(&l, 5, 4, Filter::Lanczos).as_raw().as_slice(),
            v_first
        );
        assert_eq!(
            resize_luma(&l, 4, 5, Filter::Lanczos).as_raw().as_slice(),
            h_first
        );
        let two_step = |w, h| {
            let x = resize_luma(&l, w, 9, Filter::Lanczos);
            resize_luma(&x, w, h, Filter::Lanczos)
        };
        assert_ne!(two_step(5, 4).as_raw().as_slice(), v_first);
    }

    #[test]
    fn source_boxes_match_pillow() {
        // `Image.resize(size, filter, box=…)` of the 7×5 pattern, Pillow 13.0.0; the reducing
        // gap path resamples over such fractional boxes.
        let l = pattern(7, 5, 1);
        let boxed =
            |out: (usize, usize), f: Filter, b: [f32; 4]| resample(&l, 1, (7, 5), out, f, b);
        let lanczos: [u8; 12] = [100, 161, 155, 178, 193, 87, 128, 169, 160, 155, 102, 171];
        assert_eq!(
            boxed((4, 3), Filter::Lanczos, [0.5, 1.25, 6.1, 4.75]),
            lanczos
        );
        let bicubic: [u8; 30] = [
            56, 113, 34, 241, 13, 96, 173, 72, 150, 68, 134, 189, 132, 99, 147, 135, 81, 212, 186,
            239, 170, 50, 177, 164, 218, 222, 94, 58, 61, 116,
        ];
        assert_eq!(
            boxed((5, 6), Filter::Bicubic, [1.3, 0.2, 5.9, 3.7]),
            bicubic
        );
        // Whole pixels of the output's size: Pillow crops.
        let crop: [u8; 6] = [171, 34, 215, 241, 117, 55];
        assert_eq!(boxed((3, 2), Filter::Bicubic, [1.0, 2.0, 4.0, 4.0]), crop);
        // The box matters: the whole image gives other bytes.
        assert_ne!(
            boxed((4, 3), Filter::Lanczos, [0.0, 0.0, 7.0, 5.0]),
            lanczos
        );
    }

    #[test]
    fn rgb_lanczos_matches_pillow() {
        let img = RgbImage::from_raw(6, 5, pattern(6, 5, 3)).unwrap();
        let out = resize_rgb(&img, 13, 3, Filter::Lanczos);
        assert_eq!(out.as_raw().as_slice(), RGB_6X5_LANCZOS_13X3);
        // The filter matters: bicubic differs on this pattern.
        assert_ne!(
            resize_bicubic(&img, 13, 3).as_raw().as_slice(),
            RGB_6X5_LANCZOS_13X3
        );
    }

    #[test]
    fn alpha_modes_resize_premultiplied_like_pillow() {
        let img = RgbaImage::from_raw(6, 5, pattern(6, 5, 4)).unwrap();
        let out = resize_rgba(&img, 4, 7, Filter::Lanczos);
        assert_eq!(out.as_raw().as_slice(), RGBA_6X5_LANCZOS_4X7);
        let img = GrayAlphaImage::from_raw(6, 5, pattern(6, 5, 2)).unwrap();
        let out = resize_luma_alpha(&img, 9, 4, Filter::Lanczos);
        assert_eq!(out.as_raw().as_slice(), LA_6X5_LANCZOS_9X4);
        // Straight (non-premultiplied) resampling of the same bytes differs.
        let raw = resize(img.as_raw(), 2, (6, 5), (9, 4), Filter::Lanczos).unwrap();
        assert_ne!(raw.as_slice(), LA_6X5_LANCZOS_9X4);
        // Same size: a copy, with no premultiplication round trip.
        assert_eq!(resize_luma_alpha(&img, 6, 5, Filter::Lanczos), img);
    }

    #[test]
    fn luma_conversion_matches_pillow() {
        // Pillow 13.0.0: Image.fromarray([[c...]], "RGB").convert("L").
        for ((r, g, b), l) in [
            ((0, 0, 250), 28),
            ((255, 255, 255), 255),
            ((1, 2, 3), 2),
            ((250, 30, 200), 115),
            ((20, 0, 60), 13),
            ((128, 64, 32), 79),
            ((37, 201, 99), 140),
        ] {
            assert_eq!(rgb_to_luma(r, g, b), l, "{r},{g},{b}");
        }
        // Grey stays grey.
        assert!((0..=255u8).all(|v| rgb_to_luma(v, v, v) == v));
        let img = RgbaImage::from_pixel(2, 1, image::Rgba([0, 0, 250, 3]));
        assert!(rgba_to_l(&img).pixels().all(|p| p.0 == [28]));
        let img = GrayAlphaImage::from_pixel(2, 1, image::LumaA([77, 0]));
        assert!(luma_alpha_to_l(&img).pixels().all(|p| p.0 == [77]));
    }

    #[test]
    fn raw_resize_rejects_inconsistent_buffers() {
        assert!(resize(&[0; 5], 1, (2, 2), (3, 3), Filter::Lanczos).is_none());
        assert!(resize(&[], 0, (0, 0), (3, 3), Filter::Lanczos).is_none());
        assert_eq!(
            resize(&[9; 4], 1, (2, 2), (0, 3), Filter::Lanczos),
            Some(vec![])
        );
        assert_eq!(
            resize(&[], 3, (0, 0), (2, 1), Filter::Lanczos),
            Some(vec![0; 6])
        );
    }

    #[test]
    fn alpha_extremes() {
        let mut img = RgbaImage::new(2, 1);
        img.put_pixel(0, 0, image::Rgba([10, 20, 30, 255]));
        img.put_pixel(1, 0, image::Rgba([10, 20, 30, 0]));
        let out = composite_on_white(&img);
        assert_eq!(out.get_pixel(0, 0).0, [10, 20, 30]);
        assert_eq!(out.get_pixel(1, 0).0, [255, 255, 255]);
    }
}
