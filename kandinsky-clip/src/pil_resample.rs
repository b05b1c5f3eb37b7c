//! Pillow's 8-bit image operations that transformers' and diffusers' PIL code paths run, with
//! Pillow's integer arithmetic so the results are bit-identical:
//! - [`resize`] and the per-mode wrappers ([`resize_luma`], [`resize_luma_alpha`],
//!   [`resize_rgb`], [`resize_rgba`], [`resize_bicubic`]): `Image.resize(size, filter)` without
//!   `reducing_gap` (`libImaging/Resample.c`): a separable two-pass convolution (horizontal
//!   first, each pass skipped when its size is unchanged) whose support grows with the
//!   downscale factor (antialiasing), coefficients normalised then quantised to 22 fractional
//!   bits, each pass rounded and clipped to u8, every channel independently. Modes with alpha
//!   are resized premultiplied, as `Image.resize` does (`RGBA`→`RGBa`→`RGBA`);
//! - [`rgb_to_luma`], [`rgb_to_l`], [`rgba_to_l`], [`luma_alpha_to_l`]: `convert("L")`
//!   (`Convert.c`, ITU-R 601-2 luma in 16-bit fixed point);
//! - [`composite_on_white`]: `Image.alpha_composite(white, rgba)` (`AlphaComposite.c`, 7
//!   fractional bits with rounded divisions by 255).

use image::{GrayAlphaImage, GrayImage, ImageBuffer, Pixel, RgbImage, RgbaImage};

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

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the full-image box.
fn precompute(in_size: usize, out_size: usize, filter: Filter) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut k = vec![0i64; out_size * ksize];
    let mut w = vec![0f64; ksize];
    let ss = 1.0 / filterscale;
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
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
    let c = channels;
    if c == 0 || width.checked_mul(height)?.checked_mul(c)? != src.len() {
        return None;
    }
    if out_width == 0 || out_height == 0 {
        return Some(Vec::new());
    }
    let need_h = out_width != width;
    let need_v = out_height != height;
    if !need_h && !need_v {
        return Some(src.to_vec());
    }
    let vert = precompute(height, out_height, filter);
    // Horizontal pass over the source rows the vertical pass reads (all of them if none).
    let (rows, y_first) = if need_h {
        let (first, _) = vert.bounds[0];
        let (lmin, ln) = vert.bounds[out_height - 1];
        let horiz = precompute(width, out_width, filter);
        (
            convolve(src, c, width, &horiz, true, first..lmin + ln),
            first,
        )
    } else {
        (src.to_vec(), 0)
    };
    if !need_v {
        return Some(rows);
    }
    // Vertical pass on the kept rows: shift its bounds to them.
    let shifted = Coeffs {
        ksize: vert.ksize,
        bounds: vert
            .bounds
            .iter()
            .map(|&(first, n)| (first - y_first, n))
            .collect(),
        k: vert.k,
    };
    Some(convolve(
        &rows,
        c,
        out_width,
        &shifted,
        false,
        0..out_height,
    ))
}

/// [`resize`] on an `image` buffer (the buffer's length always matches its size).
fn resize_buffer<P: Pixel<Subpixel = u8>>(
    src: &ImageBuffer<P, Vec<u8>>,
    width: u32,
    height: u32,
    filter: Filter,
) -> ImageBuffer<P, Vec<u8>> {
    let c = P::CHANNEL_COUNT as usize;
    let size_in = (src.width() as usize, src.height() as usize);
    resize(
        src.as_raw(),
        c,
        size_in,
        (width as usize, height as usize),
        filter,
    )
    .and_then(|raw| ImageBuffer::from_raw(width, height, raw))
    .unwrap_or_else(|| ImageBuffer::new(width, height))
}

/// Resize an `L` image as `Image.resize(size, filter)` does, bit-exact.
pub fn resize_luma(src: &GrayImage, width: u32, height: u32, filter: Filter) -> GrayImage {
    resize_buffer(src, width, height, filter)
}

/// Resize an `RGB` image as `Image.resize(size, filter)` does, bit-exact.
pub fn resize_rgb(src: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    resize_buffer(src, width, height, filter)
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

/// Resize premultiplied: Pillow's `Image.resize` converts `RGBA`/`LA` to `RGBa`/`La` first so
/// transparent colours do not bleed, and back after.
fn resize_premultiplied<P: Pixel<Subpixel = u8>>(
    src: &ImageBuffer<P, Vec<u8>>,
    width: u32,
    height: u32,
    filter: Filter,
) -> ImageBuffer<P, Vec<u8>> {
    if (src.width(), src.height()) == (width, height) {
        // `Image.resize` copies without converting.
        return src.clone();
    }
    let mut pre = src.clone();
    for p in pre.pixels_mut() {
        let ch = p.channels_mut();
        if let Some((a, colour)) = ch.split_last_mut() {
            colour.iter_mut().for_each(|v| *v = mul_div255(*v, *a));
        }
    }
    let mut out = resize_buffer(&pre, width, height, filter);
    for p in out.pixels_mut() {
        let ch = p.channels_mut();
        if let Some((a, colour)) = ch.split_last_mut() {
            colour.iter_mut().for_each(|v| *v = unpremultiply(*v, *a));
        }
    }
    out
}

/// Resize an `RGBA` image as `Image.resize(size, filter)` does (premultiplied), bit-exact.
pub fn resize_rgba(src: &RgbaImage, width: u32, height: u32, filter: Filter) -> RgbaImage {
    resize_premultiplied(src, width, height, filter)
}

/// Resize an `LA` image as `Image.resize(size, filter)` does (premultiplied), bit-exact.
pub fn resize_luma_alpha(
    src: &GrayAlphaImage,
    width: u32,
    height: u32,
    filter: Filter,
) -> GrayAlphaImage {
    resize_premultiplied(src, width, height, filter)
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
        for (i, o) in [(300, 224), (150, 224), (480, 224), (7, 3)] {
            let c = precompute(i, o);
            for xx in 0..o {
                let (_, n) = c.bounds[xx];
                let s: i64 = c.k[xx * c.ksize..xx * c.ksize + n].iter().sum();
                // Each coefficient is rounded separately: the sum is 1 within the taps.
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= n as i64,
                    "{i}->{o} @{xx}: {s}"
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
