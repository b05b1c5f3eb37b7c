//! The zero-image negative embedding and its file cache.
//!
//! diffusers' prior pipeline uses `image_encoder(zeros(1, 3, 224, 224)).image_embeds` as the
//! negative image embedding when no negative prompt is given (`get_zero_embed`). It is a
//! constant of the image encoder, so it is computed once and cached in a small safetensors
//! file: a text-to-image run then never loads the 1.8B-parameter vision tower.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use kandinsky_core::traits::ImageEncoder;
use kandinsky_core::{Error, LoadError, Result};

/// The tensor key in a cache file.
pub const NEGATIVE_IMAGE_EMBEDS_KEY: &str = "negative_image_embeds";
/// The `format` metadata value of a cache file.
pub const CACHE_FORMAT: &str = "kandinsky-rs/zero-image-embedding/v1";

const META_FORMAT: &str = "format";
const META_ENCODER: &str = "image_encoder";
const META_IMAGE_SIZE: &str = "image_size";

/// `encoder(zeros(1, 3, S, S))`: the raw all-zeros input (no CLIP normalisation), as
/// diffusers' `get_zero_embed`. Returns `[1, E]` in the encoder's dtype.
pub fn zero_image_embedding(encoder: &dyn ImageEncoder) -> Result<Tensor> {
    let s = encoder.image_size();
    let zeros = Tensor::zeros((1, 3, s, s), encoder.dtype(), encoder.device())?;
    let embeds = encoder.encode_image(&zeros)?;
    match embeds.dims() {
        [1, _] => Ok(embeds),
        other => Err(Error::invalid(format!(
            "the image encoder returned {other:?} for one image, expected [1, E]"
        ))),
    }
}

/// A zero-image embedding together with the name of the image encoder it came from.
#[derive(Debug, Clone)]
pub struct ZeroImageEmbedding {
    /// `[1, E]`.
    pub embeds: Tensor,
    /// Identifies the image encoder (e.g. `kandinsky-community/kandinsky-2-2-prior/image_encoder`
    /// or a path); checked on load so a cache is never used with another encoder.
    pub image_encoder: String,
    /// The square input size the zeros had.
    pub image_size: usize,
}

impl ZeroImageEmbedding {
    /// Run `encoder` on the zeros image and label the result with `image_encoder`.
    pub fn compute(encoder: &dyn ImageEncoder, image_encoder: impl Into<String>) -> Result<Self> {
        Ok(Self {
            embeds: zero_image_embedding(encoder)?,
            image_encoder: image_encoder.into(),
            image_size: encoder.image_size(),
        })
    }

    /// Write the cache file (safetensors, key [`NEGATIVE_IMAGE_EMBEDS_KEY`], metadata naming
    /// the encoder). The file is written next to `path` and renamed, so a crash never leaves a
    /// half-written cache.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let embeds = self.embeds.to_device(&Device::Cpu)?.contiguous()?;
        let metadata = HashMap::from([
            (META_FORMAT.to_string(), CACHE_FORMAT.to_string()),
            (META_ENCODER.to_string(), self.image_encoder.clone()),
            (META_IMAGE_SIZE.to_string(), self.image_size.to_string()),
        ]);
        let bytes = safetensors::serialize([(NEGATIVE_IMAGE_EMBEDS_KEY, &embeds)], Some(metadata))
            .map_err(|e| {
                Error::invalid(format!("cannot serialise the zero-image embedding: {e}"))
            })?;
        let io_err = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io_err)?;
        }
        // A temporary name unique to this process and call: two runs (or threads) filling
        // the same cache at once must not rename each other's file away; the rename itself
        // is atomic, so readers see the old file or the new one, never a partial one.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{}-{n}.tmp", std::process::id()));
        std::fs::write(&tmp, bytes).map_err(io_err)?;
        std::fs::rename(&tmp, path).map_err(io_err)
    }

    /// Read a cache file onto `device` (in its stored dtype).
    ///
    /// Errors: [`Error::MissingFile`] if absent, [`Error::InvalidInput`] if it is not a valid
    /// cache (corrupt, another format, a bad shape), [`Error::Load`] if the tensor is missing.
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                Error::MissingFile {
                    path: path.to_path_buf(),
                    hint: "compute it with `ZeroImageEmbedding::compute` and `save` it".into(),
                }
            } else {
                Error::Io {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        let invalid = |why: String| {
            Error::invalid(format!(
                "{} is not a zero-image embedding cache: {why}",
                path.display()
            ))
        };
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| invalid(format!("unreadable safetensors header ({e})")))?;
        let meta = header.metadata().clone().unwrap_or_default();
        match meta.get(META_FORMAT) {
            Some(f) if f == CACHE_FORMAT => {}
            other => {
                return Err(invalid(format!(
                    "metadata `{META_FORMAT}` is {other:?}, expected {CACHE_FORMAT:?}"
                )))
            }
        }
        let image_encoder = meta
            .get(META_ENCODER)
            .cloned()
            .ok_or_else(|| invalid(format!("metadata `{META_ENCODER}` is missing")))?;
        let image_size = meta
            .get(META_IMAGE_SIZE)
            .and_then(|s| s.parse::<usize>().ok())
            .ok_or_else(|| invalid(format!("metadata `{META_IMAGE_SIZE}` is missing or bad")))?;
        let mut tensors = candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(|e| invalid(format!("unreadable tensor data ({e})")))?;
        let embeds = tensors.remove(NEGATIVE_IMAGE_EMBEDS_KEY).ok_or_else(|| {
            Error::Load(LoadError::MissingTensor {
                files: vec![path.to_path_buf()],
                key: NEGATIVE_IMAGE_EMBEDS_KEY.into(),
            })
        })?;
        if embeds.rank() != 2 || embeds.dim(0)? != 1 || !is_float(embeds.dtype()) {
            return Err(invalid(format!(
                "`{NEGATIVE_IMAGE_EMBEDS_KEY}` is {:?} {:?}, expected a float [1, E]",
                embeds.dtype(),
                embeds.dims()
            )));
        }
        Ok(Self {
            embeds,
            image_encoder,
            image_size,
        })
    }

    /// [`load`](Self::load), then check the cache was made by `image_encoder` and has width
    /// `embedding_dim`; returns the `[1, E]` embedding.
    pub fn load_checked(
        path: impl AsRef<Path>,
        image_encoder: &str,
        embedding_dim: usize,
        device: &Device,
    ) -> Result<Tensor> {
        let path = path.as_ref();
        let c = Self::load(path, device)?;
        if c.image_encoder != image_encoder {
            return Err(Error::invalid(format!(
                "{} was computed with image encoder {:?}, not {image_encoder:?}",
                path.display(),
                c.image_encoder
            )));
        }
        let width = c.embeds.dim(1)?;
        if width != embedding_dim {
            return Err(Error::invalid(format!(
                "{} holds an embedding of width {width}, the prior expects {embedding_dim}",
                path.display()
            )));
        }
        Ok(c.embeds)
    }
}

fn is_float(dt: DType) -> bool {
    matches!(dt, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
}
