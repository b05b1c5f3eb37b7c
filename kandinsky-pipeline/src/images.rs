//! Image inputs and outputs of the flows (diffusers' pre- and post-processing).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::{DynamicImage, RgbImage};
use kandinsky_clip::pil_resample::resize_bicubic;
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

fn rgb_at(img: &DynamicImage, width: usize, height: usize) -> RgbImage {
    let rgb = img.to_rgb8();
    if rgb.width() as usize == width && rgb.height() as usize == height {
        rgb
    } else {
        // PIL bicubic, as diffusers' image processors resize.
        resize_bicubic(&rgb, width as u32, height as u32)
    }
}

/// An image as the MoVQ encoder takes it: `[1, 3, H, W]` in [-1, 1], resized (bicubic) to
/// `width`×`height` when needed.
pub fn image_tensor(
    img: &DynamicImage,
    width: usize,
    height: usize,
    device: &Device,
) -> Result<Tensor> {
    let rgb = rgb_at(img, width, height);
    let px = Rgb8Image::new(width, height, rgb.into_raw())?;
    rgb8_to_tensor(&[px], DType::F32, device)
}

/// An inpainting mask `[1, 1, H, W]` in [0, 1] (white = repaint), from its luminance.
pub fn mask_tensor(
    img: &DynamicImage,
    width: usize,
    height: usize,
    device: &Device,
) -> Result<Tensor> {
    let rgb = rgb_at(img, width, height);
    // PIL "L": (299 R + 587 G + 114 B) / 1000, rounded.
    let l: Vec<f32> = rgb
        .pixels()
        .map(|p| {
            let [r, g, b] = p.0;
            let v = (r as u32 * 299 + g as u32 * 587 + b as u32 * 114 + 500) / 1000;
            v as f32 / 255.0
        })
        .collect();
    Ok(Tensor::from_vec(l, (1, 1, height, width), device)?)
}

/// A ControlNet hint `[1, 3, H, W]` in [0, 1].
pub fn hint_tensor(
    img: &DynamicImage,
    width: usize,
    height: usize,
    device: &Device,
) -> Result<Tensor> {
    let rgb = rgb_at(img, width, height);
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
