//! Pillow's 8-bit image operations that transformers' PIL image-processing backend runs, with
//! Pillow's integer arithmetic so the results are bit-identical:
//! - [`resize_bicubic`]: `Image.resize(size, BICUBIC)` (`libImaging/Resample.c`): a separable
//!   two-pass convolution (horizontal first), Keys cubic with a = −0.5 whose support grows with
//!   the downscale factor (antialiasing), coefficients normalised then quantised to 22
//!   fractional bits, each pass rounded and clipped to u8;
//! - [`composite_on_white`]: `Image.alpha_composite(white, rgba)` (`AlphaComposite.c`, 7
//!   fractional bits with rounded divisions by 255).

use image::{RgbImage, RgbaImage};

/// Fractional bits of the 8-bit resampling coefficients (32 − 8 − 2 in Pillow).
const PRECISION_BITS: u32 = 32 - 8 - 2;

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

/// Fixed-point coefficients of one resampling pass.
struct Coeffs {
    /// Coefficients per output pixel (row stride of `k`).
    ksize: usize,
    /// (first input index, number of taps) per output pixel.
    bounds: Vec<(usize, usize)>,
    k: Vec<i64>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the full-image box.
fn precompute(in_size: usize, out_size: usize) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut k = vec![0i64; out_size * ksize];
    let mut w = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) casts truncate toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut ww = 0.0;
        for (x, wx) in w.iter_mut().enumerate().take(n) {
            *wx = bicubic(((x + xmin) as f64 - center + 0.5) * ss);
            ww += *wx;
        }
        for x in 0..n {
            let v = if ww != 0.0 { w[x] / ww } else { w[x] };
            let fixed = v * (1i64 << PRECISION_BITS) as f64;
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

/// Resize an RGB image with Pillow's `BICUBIC` filter, bit-exact to `Image.resize`.
pub fn resize_bicubic(src: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (w_in, h_in) = (src.width() as usize, src.height() as usize);
    let (w_out, h_out) = (width as usize, height as usize);
    if w_out == 0 || h_out == 0 {
        return RgbImage::new(width, height);
    }
    let need_h = w_out != w_in;
    let need_v = h_out != h_in;
    if !need_h && !need_v {
        return src.clone();
    }
    let vert = precompute(h_in, h_out);
    let half = 1i64 << (PRECISION_BITS - 1);
    // Horizontal pass over the rows the vertical pass reads.
    let (rows, y_first): (Vec<u8>, usize) = if need_h {
        let (first, _) = vert.bounds[0];
        let (lmin, ln) = vert.bounds[h_out - 1];
        let last = lmin + ln;
        let horiz = precompute(w_in, w_out);
        let raw = src.as_raw();
        let mut out = vec![0u8; (last - first) * w_out * 3];
        for (yy, y) in (first..last).enumerate() {
            let row = &raw[y * w_in * 3..(y + 1) * w_in * 3];
            for xx in 0..w_out {
                let (xmin, n) = horiz.bounds[xx];
                let k = &horiz.k[xx * horiz.ksize..xx * horiz.ksize + n];
                for c in 0..3 {
                    let mut acc = half;
                    for (x, kx) in k.iter().enumerate() {
                        acc += row[(xmin + x) * 3 + c] as i64 * kx;
                    }
                    out[(yy * w_out + xx) * 3 + c] = clip8(acc);
                }
            }
        }
        (out, first)
    } else {
        (src.as_raw().clone(), 0)
    };
    if !need_v {
        return RgbImage::from_raw(width, height, rows)
            .unwrap_or_else(|| RgbImage::new(width, height));
    }
    let mut out = vec![0u8; w_out * h_out * 3];
    for yy in 0..h_out {
        let (ymin, n) = vert.bounds[yy];
        let ymin = ymin - y_first;
        let k = &vert.k[yy * vert.ksize..yy * vert.ksize + n];
        for xx in 0..w_out {
            for c in 0..3 {
                let mut acc = half;
                for (y, ky) in k.iter().enumerate() {
                    acc += rows[((ymin + y) * w_out + xx) * 3 + c] as i64 * ky;
                }
                out[(yy * w_out + xx) * 3 + c] = clip8(acc);
            }
        }
    }
    RgbImage::from_raw(width, height, out).unwrap_or_else(|| RgbImage::new(width, height))
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
