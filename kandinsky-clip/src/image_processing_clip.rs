//! The CLIP image processor (transformers `CLIPImageProcessorPil`, the PIL backend that
//! `CLIPImageProcessor` uses when torchvision is absent), configured by
//! `image_processor/preprocessor_config.json`.
//!
//! Steps: RGB conversion (transparency composited on white), resize of the shortest edge with
//! Pillow's bicubic filter on u8 pixels, center crop, rescale by 1/255 (f64, then f32), and
//! normalisation in f32. Every step reproduces Pillow/NumPy's arithmetic, so for 8-bit inputs
//! the pixel values equal transformers' (the parity test demands exact equality).
//!
//! Decoding is the one step that may differ: PNG (8-bit) decodes identically, but JPEG
//! decoders (`image`'s zune-jpeg vs Pillow's libjpeg-turbo) may differ by a level or two in
//! some pixels, and 16-bit images are reduced to 8 bits by rounding here where Pillow may not;
//! such differences pass through the resize unchanged in size (at most a few 1/255 steps).

use std::path::Path;

use candle_core::{Device, Tensor};
use image::{DynamicImage, RgbImage};
use kandinsky_core::{Error, Result};
use serde::Deserialize;

use crate::pil_resample::{composite_on_white, resize_bicubic};

/// transformers' `OPENAI_CLIP_MEAN`.
pub const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// transformers' `OPENAI_CLIP_STD`.
pub const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// PIL's `Image.Resampling.BICUBIC`.
pub const PIL_BICUBIC: u32 = 3;

/// A `size` / `crop_size` entry: an integer or a dict.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SizeSpec {
    /// `224`.
    Int(u32),
    /// `{"shortest_edge": 224}` or `{"height": 224, "width": 224}`.
    Dict {
        /// Resize the shorter side to this.
        #[serde(default)]
        shortest_edge: Option<u32>,
        /// Not supported (transformers caps the longer side with it).
        #[serde(default)]
        longest_edge: Option<u32>,
        /// Exact height.
        #[serde(default)]
        height: Option<u32>,
        /// Exact width.
        #[serde(default)]
        width: Option<u32>,
    },
}

/// How to resize.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTarget {
    /// Shorter side to `n`, the other side `int(n · long / short)`.
    ShortestEdge(u32),
    /// Exactly `(height, width)`.
    Exact(u32, u32),
}

fn default_true() -> bool {
    true
}
fn default_size() -> SizeSpec {
    SizeSpec::Dict {
        shortest_edge: Some(224),
        longest_edge: None,
        height: None,
        width: None,
    }
}
fn default_crop() -> SizeSpec {
    SizeSpec::Int(224)
}
fn default_resample() -> u32 {
    PIL_BICUBIC
}
fn default_rescale() -> f64 {
    1.0 / 255.0
}
fn default_mean() -> Vec<f64> {
    OPENAI_CLIP_MEAN.to_vec()
}
fn default_std() -> Vec<f64> {
    OPENAI_CLIP_STD.to_vec()
}

/// `preprocessor_config.json` (`CLIPImageProcessor` fields and defaults).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipImageProcessorConfig {
    /// Resize first.
    #[serde(default = "default_true")]
    pub do_resize: bool,
    /// Resize target (an int means the shortest edge).
    #[serde(default = "default_size")]
    pub size: SizeSpec,
    /// PIL resampling filter; only bicubic (3) is implemented.
    #[serde(default = "default_resample")]
    pub resample: u32,
    /// Center crop after resizing.
    #[serde(default = "default_true")]
    pub do_center_crop: bool,
    /// Crop size (an int means a square).
    #[serde(default = "default_crop")]
    pub crop_size: SizeSpec,
    /// Multiply by `rescale_factor`.
    #[serde(default = "default_true")]
    pub do_rescale: bool,
    /// 1/255.
    #[serde(default = "default_rescale")]
    pub rescale_factor: f64,
    /// Subtract the mean and divide by the std, per channel.
    #[serde(default = "default_true")]
    pub do_normalize: bool,
    /// Per-channel mean.
    #[serde(default = "default_mean")]
    pub image_mean: Vec<f64>,
    /// Per-channel standard deviation.
    #[serde(default = "default_std")]
    pub image_std: Vec<f64>,
    /// Convert to RGB first (always done here: the encoder takes 3 channels).
    #[serde(default = "default_true")]
    pub do_convert_rgb: bool,
}

impl Default for ClipImageProcessorConfig {
    fn default() -> Self {
        Self {
            do_resize: true,
            size: default_size(),
            resample: PIL_BICUBIC,
            do_center_crop: true,
            crop_size: default_crop(),
            do_rescale: true,
            rescale_factor: default_rescale(),
            do_normalize: true,
            image_mean: default_mean(),
            image_std: default_std(),
            do_convert_rgb: true,
        }
    }
}

impl ClipImageProcessorConfig {
    /// The resize target, or an unsupported-config error.
    pub fn resize_target(&self) -> Result<ResizeTarget> {
        match &self.size {
            SizeSpec::Int(n) if *n > 0 => Ok(ResizeTarget::ShortestEdge(*n)),
            SizeSpec::Dict {
                shortest_edge: Some(n),
                longest_edge: None,
                ..
            } if *n > 0 => Ok(ResizeTarget::ShortestEdge(*n)),
            SizeSpec::Dict {
                shortest_edge: None,
                longest_edge: None,
                height: Some(h),
                width: Some(w),
            } if *h > 0 && *w > 0 => Ok(ResizeTarget::Exact(*h, *w)),
            other => Err(Error::unsupported(
                "size",
                other,
                "an int, {\"shortest_edge\": n} or {\"height\": h, \"width\": w}",
            )),
        }
    }

    /// The crop `(height, width)`.
    pub fn crop(&self) -> Result<(u32, u32)> {
        match &self.crop_size {
            SizeSpec::Int(n) if *n > 0 => Ok((*n, *n)),
            SizeSpec::Dict {
                height: Some(h),
                width: Some(w),
                ..
            } if *h > 0 && *w > 0 => Ok((*h, *w)),
            other => Err(Error::unsupported(
                "crop_size",
                other,
                "an int or {\"height\": h, \"width\": w}",
            )),
        }
    }

    /// Reject what is not implemented.
    pub fn validate(&self) -> Result<()> {
        if self.do_resize {
            self.resize_target()?;
            if self.resample != PIL_BICUBIC {
                return Err(Error::unsupported("resample", self.resample, "3 (bicubic)"));
            }
        }
        if self.do_center_crop {
            self.crop()?;
        }
        if self.do_normalize {
            for (field, v) in [
                ("image_mean", &self.image_mean),
                ("image_std", &self.image_std),
            ] {
                if v.len() != 3 {
                    return Err(Error::unsupported(field, v, "3 values (RGB)"));
                }
            }
            if self.image_std.contains(&0.0) {
                return Err(Error::unsupported(
                    "image_std",
                    &self.image_std,
                    "non-zero values",
                ));
            }
        }
        if !self.do_convert_rgb {
            return Err(Error::unsupported("do_convert_rgb", false, "true"));
        }
        Ok(())
    }
}

/// The CLIP image processor.
#[derive(Debug, Clone)]
pub struct ClipImageProcessor {
    cfg: ClipImageProcessorConfig,
}

impl ClipImageProcessor {
    /// From a validated config.
    pub fn new(cfg: ClipImageProcessorConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self { cfg })
    }

    /// Read `preprocessor_config.json` from an `image_processor/` folder.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let path = dir.as_ref().join("preprocessor_config.json");
        let cfg: ClipImageProcessorConfig = kandinsky_core::loading::read_json(&path)?;
        cfg.validate().map_err(|e| e.in_file(&path))?;
        Ok(Self { cfg })
    }

    /// The configuration.
    pub fn config(&self) -> &ClipImageProcessorConfig {
        &self.cfg
    }

    /// Decode an encoded image (PNG, JPEG, WebP).
    pub fn decode(bytes: &[u8]) -> Result<DynamicImage> {
        image::load_from_memory(bytes)
            .map_err(|e| Error::Image(format!("cannot decode image: {e}")))
    }

    /// Open and decode an image file.
    pub fn open(path: impl AsRef<Path>) -> Result<DynamicImage> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        image::load_from_memory(&bytes)
            .map_err(|e| Error::Image(format!("cannot decode {}: {e}", path.display())))
    }

    /// RGB conversion as transformers does it with Pillow: transparency composited on white.
    pub fn to_rgb(image: &DynamicImage) -> RgbImage {
        if image.color().has_alpha() {
            composite_on_white(&image.to_rgba8())
        } else {
            image.to_rgb8()
        }
    }

    /// Output `(height, width)` of the resize for an input of `(height, width)`.
    pub fn resized_size(&self, height: u32, width: u32) -> Result<(u32, u32)> {
        Ok(match self.cfg.resize_target()? {
            ResizeTarget::Exact(h, w) => (h, w),
            ResizeTarget::ShortestEdge(n) => {
                // transformers: int(size * long / short) in Python floats.
                let (short, long) = if width <= height {
                    (width, height)
                } else {
                    (height, width)
                };
                let new_long = (n as f64 * long as f64 / short as f64) as u32;
                if width <= height {
                    (new_long, n)
                } else {
                    (n, new_long)
                }
            }
        })
    }

    /// The u8 image after conversion, resize and center crop (before rescale / normalise).
    pub fn resize_and_crop(&self, image: &DynamicImage) -> Result<RgbImage> {
        if image.width() == 0 || image.height() == 0 {
            return Err(Error::invalid("the image is empty (0 pixels)"));
        }
        let mut rgb = Self::to_rgb(image);
        if self.cfg.do_resize {
            let (h, w) = self.resized_size(rgb.height(), rgb.width())?;
            if h == 0 || w == 0 {
                return Err(Error::invalid(format!(
                    "image {}x{} is too thin to resize to a {w}x{h} image",
                    rgb.width(),
                    rgb.height()
                )));
            }
            rgb = resize_bicubic(&rgb, w, h);
        }
        if self.cfg.do_center_crop {
            let (ch, cw) = self.cfg.crop()?;
            rgb = center_crop(&rgb, ch, cw);
        }
        Ok(rgb)
    }

    /// Rescale and normalise a u8 image into a `[3, H, W]` f32 buffer (channel-first).
    pub fn normalize(&self, rgb: &RgbImage) -> Vec<f32> {
        let (w, h) = (rgb.width() as usize, rgb.height() as usize);
        let mut out = vec![0f32; 3 * h * w];
        for c in 0..3 {
            // transformers: (u8 as f64 · factor) → f32, then (x − mean) / std in f32.
            let lut: Vec<f32> = (0..=255u32)
                .map(|v| {
                    let x = if self.cfg.do_rescale {
                        (v as f64 * self.cfg.rescale_factor) as f32
                    } else {
                        v as f32
                    };
                    if self.cfg.do_normalize {
                        (x - self.cfg.image_mean[c] as f32) / self.cfg.image_std[c] as f32
                    } else {
                        x
                    }
                })
                .collect();
            let plane = &mut out[c * h * w..(c + 1) * h * w];
            for (dst, p) in plane.iter_mut().zip(rgb.pixels()) {
                *dst = lut[p.0[c] as usize];
            }
        }
        out
    }

    /// One image → `pixel_values` `[1, 3, H, W]` f32 on `device`.
    pub fn preprocess(&self, image: &DynamicImage, device: &Device) -> Result<Tensor> {
        self.preprocess_batch(std::slice::from_ref(image), device)
    }

    /// Images → `pixel_values` `[B, 3, H, W]` f32 on `device` (all outputs must share a size,
    /// which the center crop guarantees).
    pub fn preprocess_batch(&self, images: &[DynamicImage], device: &Device) -> Result<Tensor> {
        if images.is_empty() {
            return Err(Error::invalid("no images to preprocess"));
        }
        let mut data = Vec::new();
        let mut size = None;
        for img in images {
            let rgb = self.resize_and_crop(img)?;
            let hw = (rgb.height() as usize, rgb.width() as usize);
            if *size.get_or_insert(hw) != hw {
                return Err(Error::invalid(format!(
                    "preprocessed images differ in size ({:?} vs {hw:?}); enable do_center_crop",
                    size
                )));
            }
            data.extend(self.normalize(&rgb));
        }
        let (h, w) = size.unwrap_or((0, 0));
        Ok(Tensor::from_vec(data, (images.len(), 3, h, w), device)?)
    }

    /// Decode encoded bytes and preprocess them.
    pub fn preprocess_bytes(&self, bytes: &[u8], device: &Device) -> Result<Tensor> {
        self.preprocess(&Self::decode(bytes)?, device)
    }
}

/// transformers' `center_crop`: the crop starts at `((H − h) // 2, (W − w) // 2)` (floor
/// division); where the image is smaller than the crop, the missing pixels are zeros (which
/// is what transformers' centered zero padding amounts to).
pub fn center_crop(img: &RgbImage, crop_h: u32, crop_w: u32) -> RgbImage {
    let (h, w) = (img.height() as i64, img.width() as i64);
    let top = (h - crop_h as i64).div_euclid(2);
    let left = (w - crop_w as i64).div_euclid(2);
    RgbImage::from_fn(crop_w, crop_h, |x, y| {
        let (sy, sx) = (top + y as i64, left + x as i64);
        if (0..h).contains(&sy) && (0..w).contains(&sx) {
            *img.get_pixel(sx as u32, sy as u32)
        } else {
            image::Rgb([0, 0, 0])
        }
    })
}
