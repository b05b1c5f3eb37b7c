//! Image inputs and outputs of the flows (diffusers' pre- and post-processing).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::{
    DynamicImage, GrayAlphaImage, GrayImage, ImageBuffer, LumaA, Pixel, Rgb, RgbImage, Rgba,
    RgbaImage,
};
use kandinsky_clip::pil_resample::{self, resize_bicubic, Filter};
use kandinsky_core::{Error, Result};
use kandinsky_movq::image_processor::{rgb8_to_tensor, tensor_to_rgb8, Rgb8Image};

/// Decode an image file, naming the file on failure.
pub fn open(path: &Path) -> Result<DynamicImage> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    image::load_from_memory(&bytes)
        .map_err(|e| Error::Image(format!("cannot decode {}: {e}", path.display())))
}

/// `reducing_gap` of diffusers' Kandinsky image resizes (`VaeImageProcessor(reducing_gap=1)`
/// for img2img, `prepare_mask_and_masked_image`'s image for inpainting, 2.2 and 2.1 alike).
const IMAGE_REDUCING_GAP: f64 = 1.0;

/// A target side as Pillow's `u32`-sized images take it.
fn side(d: usize, what: &str) -> Result<u32> {
    u32::try_from(d).map_err(|_| Error::invalid(format!("{what} size {d} is too large")))
}

/// An image as the MoVQ encoder takes it: `[1, 3, H, W]` in [-1, 1], resized to
/// `width`×`height` as [`image_rgb`] does.
pub fn image_tensor(
    img: &DynamicImage,
    width: usize,
    height: usize,
    device: &Device,
) -> Result<Tensor> {
    let rgb = image_rgb(img, width, height)?;
    let px = Rgb8Image::new(width, height, rgb.into_raw())?;
    rgb8_to_tensor(&[px], DType::F32, device)
}

/// The image as diffusers' Kandinsky img2img and inpaint pipelines (2.2 and 2.1) see it,
/// bit-exact with Pillow 13: `image.resize((width, height), resample=BICUBIC,
/// reducing_gap=1).convert("RGB")`. With the gap, a downscale by 2× or more is a box
/// reduction by the integer factor first, then the bicubic resample over the rest.
///
/// The image is resized in its own mode (`L`, `LA`, `RGB`, `RGBA`; alpha premultiplied, as
/// `Image.resize` does), then converted to RGB (grey replicated, alpha dropped), as the inpaint
/// pipelines do; diffusers' img2img `VaeImageProcessor` skips the conversion (an `RGBA` image
/// then has 4 channels the MoVQ rejects), here it is converted the same way. Modes are read
/// from the decoder as in [`mask_luma`], with the same 16-bit and palette caveats.
pub fn image_rgb(img: &DynamicImage, width: usize, height: usize) -> Result<RgbImage> {
    let (w, h) = (side(width, "image")?, side(height, "image")?);
    match img {
        DynamicImage::ImageLuma8(m) => gap_rgb(m, w, h),
        DynamicImage::ImageLumaA8(m) => gap_rgb(m, w, h),
        DynamicImage::ImageRgb8(m) => gap_rgb(m, w, h),
        DynamicImage::ImageRgba8(m) => gap_rgb(m, w, h),
        DynamicImage::ImageLumaA16(m) => gap_rgb(&high_byte::<_, LumaA<u8>>(m), w, h),
        DynamicImage::ImageRgb16(m) => gap_rgb(&high_byte::<_, Rgb<u8>>(m), w, h),
        DynamicImage::ImageRgba16(m) => gap_rgb(&high_byte::<_, Rgba<u8>>(m), w, h),
        DynamicImage::ImageLuma16(_) => gap_rgb(&img.to_luma8(), w, h),
        other if other.color().has_alpha() => gap_rgb(&other.to_rgba8(), w, h),
        other => gap_rgb(&other.to_rgb8(), w, h),
    }
}

/// Pillow's `resize(BICUBIC, reducing_gap=1)` in the buffer's mode, then `convert("RGB")`.
fn gap_rgb<P: Pixel<Subpixel = u8>>(
    m: &ImageBuffer<P, Vec<u8>>,
    w: u32,
    h: u32,
) -> Result<RgbImage> {
    let gap = Some(IMAGE_REDUCING_GAP);
    let r = pil_resample::resize_image(m, w, h, Filter::Bicubic, gap)?;
    Ok(RgbImage::from_fn(w, h, |x, y| r.get_pixel(x, y).to_rgb()))
}

/// An inpainting mask `[1, 1, H, W]` in [0, 1] (white = repaint): [`mask_luma`] / 255, as
/// diffusers' `prepare_mask_and_masked_image` before it binarises at 0.5.
pub fn mask_tensor(
    img: &DynamicImage,
    width: usize,
    height: usize,
    device: &Device,
) -> Result<Tensor> {
    let l = mask_luma(img, width, height)?;
    let data: Vec<f32> = l.into_raw().into_iter().map(|v| v as f32 / 255.0).collect();
    Ok(Tensor::from_vec(data, (1, 1, height, width), device)?)
}

/// The mask as diffusers' Kandinsky inpaint pipelines see it, bit-exact with Pillow 13:
/// `mask.resize((width, height), resample=LANCZOS).convert("L")`.
///
/// The mask is resized in its own mode, only when its size differs: `L` and `RGB` directly,
/// `LA` and `RGBA` premultiplied by alpha (as `Image.resize` does), then converted to `L` with
/// Pillow's integer luma (alpha ignored). What the decoder hands over decides the mode: the
/// `image` crate yields `L`, `LA`, `RGB` or `RGBA` for 8-bit PNG/JPEG/WebP masks, as Pillow
/// does, except for palette, 1-bit and `tRNS` PNGs, which it expands to `RGB(A)`/`L(A)` where
/// Pillow keeps `P`/`1` (resized nearest-neighbour) or ignores the transparency. 16-bit
/// `RGB(A)`/`LA` keep their high byte, as Pillow's PNG decoder does (its 16-bit `LA` opens as
/// a grey `RGBA`, which gives the same `L`); 16-bit grey (Pillow's `I;16`, resampled in 16
/// bits and clipped to 255 by `convert("L")`) and float images are reduced to 8-bit
/// `L`/`RGB(A)` by the `image` crate first, an approximation.
pub fn mask_luma(img: &DynamicImage, width: usize, height: usize) -> Result<GrayImage> {
    let (w, h) = (side(width, "mask")?, side(height, "mask")?);
    // `Image.resize` returns a copy when the size is unchanged; the wrappers do too.
    let l = match img {
        DynamicImage::ImageLuma8(m) => pil_resample::resize_luma(m, w, h, Filter::Lanczos),
        DynamicImage::ImageLumaA8(m) => luma_alpha_l(m, w, h),
        DynamicImage::ImageRgb8(m) => rgb_l(m, w, h),
        DynamicImage::ImageRgba8(m) => rgba_l(m, w, h),
        DynamicImage::ImageLumaA16(m) => luma_alpha_l(&high_byte(m), w, h),
        DynamicImage::ImageRgb16(m) => rgb_l(&high_byte(m), w, h),
        DynamicImage::ImageRgba16(m) => rgba_l(&high_byte(m), w, h),
        DynamicImage::ImageLuma16(_) => {
            pil_resample::resize_luma(&img.to_luma8(), w, h, Filter::Lanczos)
        }
        other if other.color().has_alpha() => rgba_l(&other.to_rgba8(), w, h),
        other => rgb_l(&other.to_rgb8(), w, h),
    };
    Ok(l)
}

fn luma_alpha_l(m: &GrayAlphaImage, w: u32, h: u32) -> GrayImage {
    pil_resample::luma_alpha_to_l(&pil_resample::resize_luma_alpha(m, w, h, Filter::Lanczos))
}

fn rgb_l(m: &RgbImage, w: u32, h: u32) -> GrayImage {
    pil_resample::rgb_to_l(&pil_resample::resize_rgb(m, w, h, Filter::Lanczos))
}

fn rgba_l(m: &RgbaImage, w: u32, h: u32) -> GrayImage {
    pil_resample::rgba_to_l(&pil_resample::resize_rgba(m, w, h, Filter::Lanczos))
}

/// 16 → 8 bits by the high byte, as Pillow unpacks 16-bit PNG `RGB`/`RGBA`/`LA` (`;16B`).
fn high_byte<P, Q>(m: &ImageBuffer<P, Vec<u16>>) -> ImageBuffer<Q, Vec<u8>>
where
    P: Pixel<Subpixel = u16>,
    Q: Pixel<Subpixel = u8>,
{
    let raw = m.as_raw().iter().map(|&v| (v >> 8) as u8).collect();
    ImageBuffer::from_raw(m.width(), m.height(), raw)
        .unwrap_or_else(|| ImageBuffer::new(m.width(), m.height()))
}

/// A ControlNet hint `[1, 3, H, W]` in [0, 1], from an image converted to RGB and resized
/// (when its size differs) with Pillow's plain bicubic, no `reducing_gap`: diffusers takes the
/// hint as a tensor already at the output size and never resizes it, so there is no Pillow
/// call to match.
pub fn hint_tensor(
    img: &DynamicImage,
    width: usize,
    height: usize,
    device: &Device,
) -> Result<Tensor> {
    let (w, h) = (side(width, "hint")?, side(height, "hint")?);
    let mut rgb = img.to_rgb8();
    if (rgb.width(), rgb.height()) != (w, h) {
        rgb = resize_bicubic(&rgb, w, h);
    }
    let data: Vec<f32> = rgb
        .into_raw()
        .into_iter()
        .map(|v| v as f32 / 255.0)
        .collect();
    Ok(Tensor::from_vec(data, (height, width, 3), device)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .contiguous()?)
}

/// Decoded images in [-1, 1] → 8-bit RGB images, as diffusers' `"pil"` output.
pub fn to_rgb8(images: &Tensor) -> Result<Vec<RgbImage>> {
    tensor_to_rgb8(images)?
        .into_iter()
        .map(|im| {
            RgbImage::from_raw(im.width as u32, im.height as u32, im.data)
                .ok_or_else(|| Error::Image("decoded image has an inconsistent size".into()))
        })
        .collect()
}

/// Decoded images in [-1, 1] → [0, 1] (diffusers' `x·0.5 + 0.5`, clamped), NCHW f32.
pub fn to_unit_range(images: &Tensor) -> Result<Tensor> {
    Ok(((images.to_dtype(DType::F32)? * 0.5)? + 0.5)?.clamp(0f32, 1f32)?)
}
