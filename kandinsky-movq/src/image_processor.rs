//! Pixel conversions exactly as the Kandinsky 2.2 pipelines do them (diffusers'
//! `VaeImageProcessor` / the pipelines' post-processing).

use candle_core::{DType, Device, Tensor};

use kandinsky_core::{Error, Result};

/// An 8-bit RGB image, rows of `width` pixels of 3 bytes (HWC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rgb8Image {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `height · width · 3` bytes.
    pub data: Vec<u8>,
}

impl Rgb8Image {
    /// Wrap bytes, checking their count.
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self> {
        if data.len() != width * height * 3 {
            return Err(Error::invalid(format!(
                "an RGB8 image of {width}×{height} needs {} bytes, got {}",
                width * height * 3,
                data.len()
            )));
        }
        Ok(Self {
            width,
            height,
            data,
        })
    }
}

/// Images (all of one size) → `[B, 3, H, W]` in [-1, 1]: `2·(v/255) − 1`, computed in f32 as
/// `VaeImageProcessor` does (`np.float32(v) / 255`, then `2x − 1`), then cast to `dtype`.
pub fn rgb8_to_tensor(images: &[Rgb8Image], dtype: DType, device: &Device) -> Result<Tensor> {
    let first = images
        .first()
        .ok_or_else(|| Error::invalid("no image to convert"))?;
    let (w, h) = (first.width, first.height);
    let mut out = Vec::with_capacity(images.len() * 3 * h * w);
    for img in images {
        if (img.width, img.height) != (w, h) || img.data.len() != w * h * 3 {
            return Err(Error::invalid(format!(
                "images of one batch must all be {w}×{h} RGB8, got {}×{} with {} bytes",
                img.width,
                img.height,
                img.data.len()
            )));
        }
        for c in 0..3 {
            out.extend(
                img.data[c..]
                    .iter()
                    .step_by(3)
                    .map(|&v| 2.0f32 * (v as f32 / 255.0) - 1.0),
            );
        }
    }
    Ok(Tensor::from_vec(out, (images.len(), 3, h, w), device)?.to_dtype(dtype)?)
}

/// Decoded `[B, 3, H, W]` → 8-bit images: `x·0.5 + 0.5`, clamp to [0, 1], `×255`, round half to
/// even (numpy's `round`), all in f32 (a half-precision decode is widened first).
pub fn tensor_to_rgb8(images: &Tensor) -> Result<Vec<Rgb8Image>> {
    let (b, c, h, w) = images.dims4()?;
    if c != 3 {
        return Err(Error::invalid(format!(
            "decoded images must be [batch, 3, height, width], got shape {:?}",
            images.dims()
        )));
    }
    let hwc = images
        .to_dtype(DType::F32)?
        .permute((0, 2, 3, 1))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(hwc
        .chunks(h * w * 3)
        .take(b)
        .map(|px| Rgb8Image {
            width: w,
            height: h,
            data: px
                .iter()
                .map(|&x| {
                    let v = (x * 0.5 + 0.5).clamp(0.0, 1.0);
                    (v * 255.0).round_ties_even() as u8
                })
                .collect(),
        })
        .collect())
}
