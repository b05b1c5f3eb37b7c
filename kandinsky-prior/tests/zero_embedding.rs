//! The zero-image embedding and its cache file.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use kandinsky_core::traits::ImageEncoder;
use kandinsky_core::{Error, LoadError};
use kandinsky_prior::zero_embedding::CACHE_FORMAT;
use kandinsky_prior::{zero_image_embedding, ZeroImageEmbedding, NEGATIVE_IMAGE_EMBEDS_KEY};

/// A stand-in image encoder: `embeds = bias + w · mean(pixels)`, and it records the input it
/// saw, so the test can check the zeros image is what reaches the encoder.
struct FakeEncoder {
    bias: Tensor,
    seen: std::cell::RefCell<Option<Tensor>>,
}

impl ImageEncoder for FakeEncoder {
    fn encode_image(&self, pixel_values: &Tensor) -> kandinsky_core::Result<Tensor> {
        *self.seen.borrow_mut() = Some(pixel_values.clone());
        let b = pixel_values.dim(0)?;
        let m = pixel_values.flatten_from(1)?.mean_keepdim(1)?; // [B, 1]
        Ok(self
            .bias
            .broadcast_add(&m)?
            .reshape((b, self.bias.dim(1)?))?)
    }
    fn image_size(&self) -> usize {
        14
    }
    fn device(&self) -> &Device {
        self.bias.device()
    }
    fn dtype(&self) -> DType {
        self.bias.dtype()
    }
}

fn fake(dtype: DType) -> Result<FakeEncoder> {
    let bias = Tensor::arange(0f32, 32., &Device::Cpu)?
        .affine(0.25, -3.0)?
        .reshape((1, 32))?
        .to_dtype(dtype)?;
    Ok(FakeEncoder {
        bias,
        seen: Default::default(),
    })
}

/// A per-test scratch path (tests run in parallel).
fn tmp(test: &str, name: &str) -> PathBuf {
    std::env::temp_dir()
        .join(format!(
            "kandinsky-prior-zero-{}-{test}",
            std::process::id()
        ))
        .join(name)
}

#[test]
fn zero_embedding_feeds_raw_zeros() -> Result<()> {
    let enc = fake(DType::F16)?;
    let e = zero_image_embedding(&enc)?;
    let seen = enc.seen.borrow().clone().expect("encoder was called");
    assert_eq!(seen.dims(), &[1, 3, 14, 14]);
    assert_eq!(seen.dtype(), DType::F16);
    assert_eq!(
        seen.abs()?
            .to_dtype(DType::F32)?
            .max_all()?
            .to_scalar::<f32>()?,
        0.0
    );
    assert_eq!(e.dims(), &[1, 32]);
    // mean(zeros) = 0, so the embedding is the bias.
    let d = (e.to_dtype(DType::F32)? - enc.bias.to_dtype(DType::F32)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    assert_eq!(d, 0.0);
    Ok(())
}

#[test]
fn cache_round_trip_is_bit_exact() -> Result<()> {
    for dt in [DType::F32, DType::F16, DType::BF16] {
        let enc = fake(dt)?;
        let z = ZeroImageEmbedding::compute(&enc, "tiny/image_encoder")?;
        let path = tmp("round", &format!("{dt:?}/zero.safetensors"));
        z.save(&path)?;
        let back = ZeroImageEmbedding::load(&path, &Device::Cpu)?;
        assert_eq!(back.image_encoder, "tiny/image_encoder");
        assert_eq!(back.image_size, 14);
        assert_eq!(back.embeds.dtype(), dt);
        assert_eq!(back.embeds.dims(), &[1, 32]);
        let a = z.embeds.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let b = back.embeds.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        assert_eq!(a, b);
        let checked =
            ZeroImageEmbedding::load_checked(&path, "tiny/image_encoder", 32, &Device::Cpu)?;
        assert_eq!(checked.dims(), &[1, 32]);
        // Another encoder or another width is refused.
        assert!(matches!(
            ZeroImageEmbedding::load_checked(&path, "other/image_encoder", 32, &Device::Cpu),
            Err(Error::InvalidInput(_))
        ));
        assert!(matches!(
            ZeroImageEmbedding::load_checked(&path, "tiny/image_encoder", 1280, &Device::Cpu),
            Err(Error::InvalidInput(_))
        ));
        std::fs::remove_dir_all(path.parent().and_then(|p| p.parent()).expect("tmp dir"))?;
    }
    Ok(())
}

#[test]
fn missing_or_corrupt_cache_is_a_typed_error() -> Result<()> {
    let missing = tmp("corrupt", "does-not-exist.safetensors");
    assert!(matches!(
        ZeroImageEmbedding::load(&missing, &Device::Cpu),
        Err(Error::MissingFile { .. })
    ));

    let z = ZeroImageEmbedding::compute(&fake(DType::F32)?, "tiny/image_encoder")?;
    let good = tmp("corrupt", "good.safetensors");
    z.save(&good)?;
    let bytes = std::fs::read(&good)?;

    // Truncated file, garbage, empty file.
    for (name, data) in [
        ("truncated", bytes[..bytes.len() - 7].to_vec()),
        ("garbage", b"this is not a safetensors file at all".to_vec()),
        ("empty", Vec::new()),
    ] {
        let p = tmp("corrupt", &format!("{name}.safetensors"));
        std::fs::write(&p, data)?;
        match ZeroImageEmbedding::load(&p, &Device::Cpu) {
            Err(Error::InvalidInput(msg)) => {
                assert!(msg.contains("not a zero-image embedding cache"), "{msg}")
            }
            other => panic!("{name}: expected InvalidInput, got {other:?}"),
        }
    }

    // A valid safetensors file without the cache metadata (e.g. some other tensor file).
    let plain = tmp("corrupt", "plain.safetensors");
    candle_core::safetensors::save(
        &HashMap::from([(NEGATIVE_IMAGE_EMBEDS_KEY, z.embeds.clone())]),
        &plain,
    )?;
    assert!(matches!(
        ZeroImageEmbedding::load(&plain, &Device::Cpu),
        Err(Error::InvalidInput(_))
    ));

    // Right metadata, wrong key.
    let wrong_key = tmp("corrupt", "wrong-key.safetensors");
    let meta = HashMap::from([
        ("format".to_string(), CACHE_FORMAT.to_string()),
        (
            "image_encoder".to_string(),
            "tiny/image_encoder".to_string(),
        ),
        ("image_size".to_string(), "14".to_string()),
    ]);
    safetensors::serialize_to_file(
        [("image_embeds", &z.embeds)],
        Some(meta.clone()),
        &wrong_key,
    )?;
    assert!(matches!(
        ZeroImageEmbedding::load(&wrong_key, &Device::Cpu),
        Err(Error::Load(LoadError::MissingTensor { .. }))
    ));

    // Right key, wrong shape.
    let wrong_shape = tmp("corrupt", "wrong-shape.safetensors");
    let e3 = z.embeds.reshape((1, 1, 32))?;
    safetensors::serialize_to_file([(NEGATIVE_IMAGE_EMBEDS_KEY, &e3)], Some(meta), &wrong_shape)?;
    assert!(matches!(
        ZeroImageEmbedding::load(&wrong_shape, &Device::Cpu),
        Err(Error::InvalidInput(_))
    ));

    std::fs::remove_dir_all(good.parent().expect("tmp dir"))?;
    Ok(())
}

#[test]
fn concurrent_saves_to_one_cache_all_succeed() -> Result<()> {
    // Two CLI runs filling the same cache at once once failed: both wrote `<cache>.tmp` and
    // the second rename found it gone. Every writer must succeed and leave a valid file.
    let enc = fake(DType::F32)?;
    let z = ZeroImageEmbedding::compute(&enc, "tiny/image_encoder")?;
    let path = tmp("concurrent", "zero.safetensors");
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| s.spawn(|| (0..5).try_for_each(|_| z.save(&path))))
            .collect();
        for h in handles {
            h.join().expect("no panic")?;
        }
        Ok::<_, Error>(())
    })?;
    let back = ZeroImageEmbedding::load_checked(&path, "tiny/image_encoder", 32, &Device::Cpu)?;
    assert_eq!(back.dims(), &[1, 32]);
    let left: Vec<_> = std::fs::read_dir(path.parent().expect("dir"))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "temporary files left behind: {left:?}");
    std::fs::remove_dir_all(path.parent().expect("dir"))?;
    Ok(())
}
