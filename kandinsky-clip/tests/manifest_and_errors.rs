//! The real checkpoints' names and shapes, config parsing, and typed errors on bad input.

use candle_core::{DType, Device, Tensor};
use kandinsky_clip::modeling_clip::{ClipTextModelWithProjection, ClipVisionModelWithProjection};
use kandinsky_clip::{ClipImageProcessor, ClipTextConfig, ClipVisionConfig, EosPooling};
use kandinsky_core::manifest::{record_requests, Manifest};
use kandinsky_core::testing::fixtures_dir;
use kandinsky_core::Error;
use kandinsky_core::ModelConfig;

fn real_text() -> anyhow::Result<ClipTextConfig> {
    Ok(ClipTextConfig::from_file(
        &fixtures_dir().join("clip/real_text_config.json"),
    )?)
}

fn real_vision() -> anyhow::Result<ClipVisionConfig> {
    Ok(ClipVisionConfig::from_file(
        &fixtures_dir().join("clip/real_vision_config.json"),
    )?)
}

#[test]
fn real_text_encoder_manifest_is_exact() -> anyhow::Result<()> {
    let cfg = real_text()?;
    assert_eq!(cfg.pooling()?, EosPooling::ArgmaxId);
    assert_eq!(cfg.head_dim(), 64);
    let req = record_requests(|vb| ClipTextModelWithProjection::new(vb, &cfg))?;
    let m =
        Manifest::read(&fixtures_dir().join("manifests/kandinsky-2-2-prior__text_encoder.json"))?;
    assert_eq!(m.len(), 517);
    let report = m.check(&req);
    assert!(report.is_exact(), "{report}");
    Ok(())
}

#[test]
fn real_image_encoder_manifest_is_exact() -> anyhow::Result<()> {
    let cfg = real_vision()?;
    assert_eq!((cfg.num_positions(), cfg.head_dim()), (257, 104));
    let req = record_requests(|vb| ClipVisionModelWithProjection::new(vb, &cfg))?;
    let m =
        Manifest::read(&fixtures_dir().join("manifests/kandinsky-2-2-prior__image_encoder.json"))?;
    assert!(m.tensors.iter().all(|t| t.dtype == "F16"));
    let report = m.check(&req);
    assert!(report.is_exact(), "{report}");
    Ok(())
}

#[test]
fn unsupported_config_values_are_named() -> anyhow::Result<()> {
    let mut cfg = real_text()?;
    cfg.hidden_act = "relu".into();
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("hidden_act") && e.contains("quick_gelu"), "{e}");
    let mut cfg = real_text()?;
    cfg.eos_token_id = serde_json::json!([2, 3]);
    assert!(matches!(
        cfg.validate(),
        Err(Error::UnsupportedConfig { .. })
    ));
    let mut cfg = real_text()?;
    cfg.num_attention_heads = 7;
    assert!(matches!(
        cfg.validate(),
        Err(Error::UnsupportedConfig { .. })
    ));
    let mut v = real_vision()?;
    v.image_size = 225;
    let e = v.validate().unwrap_err().to_string();
    assert!(e.contains("image_size"), "{e}");
    Ok(())
}

#[test]
fn bad_model_inputs_are_typed_errors() -> anyhow::Result<()> {
    let dir = fixtures_dir().join("tiny/kandinsky-2-2-prior");
    let text =
        ClipTextModelWithProjection::load(dir.join("text_encoder"), DType::F32, &Device::Cpu)?;
    let too_long = Tensor::zeros((1, 78), DType::U32, &Device::Cpu)?;
    assert!(matches!(
        text.forward(&too_long),
        Err(Error::InvalidInput(_))
    ));
    let bad_id = Tensor::new(&[[49406u32, 49408, 49407]], &Device::Cpu)?;
    assert!(matches!(text.forward(&bad_id), Err(Error::InvalidInput(_))));
    let rank1 = Tensor::new(&[1u32, 2], &Device::Cpu)?;
    assert!(matches!(text.forward(&rank1), Err(Error::InvalidInput(_))));
    let vision =
        ClipVisionModelWithProjection::load(dir.join("image_encoder"), DType::F32, &Device::Cpu)?;
    let wrong = Tensor::zeros((1, 3, 200, 224), DType::F32, &Device::Cpu)?;
    assert!(matches!(
        vision.forward(&wrong),
        Err(Error::InvalidInput(_))
    ));
    Ok(())
}

#[test]
fn undecodable_image_is_a_typed_error() -> anyhow::Result<()> {
    let proc = ClipImageProcessor::from_dir(
        fixtures_dir().join("tiny/kandinsky-2-2-prior/image_processor"),
    )?;
    let e = proc
        .preprocess_bytes(b"definitely not a png", &Device::Cpu)
        .unwrap_err();
    assert!(matches!(e, Error::Image(_)), "{e}");
    let truncated = std::fs::read(fixtures_dir().join("clip/landscape_rgb.png"))?;
    let e = proc
        .preprocess_bytes(&truncated[..200], &Device::Cpu)
        .unwrap_err();
    assert!(matches!(e, Error::Image(_)), "{e}");
    let missing = ClipImageProcessor::open("/no/such/image.png").unwrap_err();
    assert!(matches!(missing, Error::Io { .. }), "{missing}");
    Ok(())
}

#[test]
fn processor_config_rejects_unsupported_resampling() -> anyhow::Result<()> {
    let mut cfg = ClipImageProcessor::from_dir(
        fixtures_dir().join("tiny/kandinsky-2-2-prior/image_processor"),
    )?
    .config()
    .clone();
    cfg.resample = 2;
    let e = ClipImageProcessor::new(cfg).unwrap_err().to_string();
    assert!(e.contains("resample") && e.contains("bicubic"), "{e}");
    Ok(())
}

#[test]
fn builtin_bigg_config_equals_the_real_file() -> anyhow::Result<()> {
    let a = ClipTextConfig::kandinsky_2_2_prior();
    let b = real_text()?;
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
    Ok(())
}
