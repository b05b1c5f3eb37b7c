//! Kandinsky 2.1: the real checkpoints' names and shapes (M-CLIP text encoder, the 2.1 prior's
//! OpenAI CLIP ViT-L/14 towers), config parsing, and typed errors on bad input.

use candle_core::{DType, Device, Tensor};
use kandinsky_clip::modeling_mclip::UNUSED_CHECKPOINT_KEYS;
use kandinsky_clip::{
    ClipTextConfig, ClipTextModelWithProjection, ClipVisionConfig, ClipVisionModelWithProjection,
    EosPooling, MClipConfig, MultilingualClip,
};
use kandinsky_core::loading::{ComponentDir, WeightVariant};
use kandinsky_core::manifest::{record_requests, Manifest};
use kandinsky_core::nn::Activation;
use kandinsky_core::testing::fixtures_dir;
use kandinsky_core::traits::TextEncoder;
use kandinsky_core::Error;
use kandinsky_core::ModelConfig;

fn real_config(name: &str) -> std::path::PathBuf {
    fixtures_dir().join("real-configs").join(name)
}

fn real_mclip() -> anyhow::Result<MClipConfig> {
    Ok(MClipConfig::from_file(&real_config(
        "kandinsky-2-1__text_encoder.json",
    ))?)
}

fn tiny_dir() -> std::path::PathBuf {
    fixtures_dir().join("tiny/kandinsky-2-1/text_encoder")
}

fn manifest(component: &str) -> anyhow::Result<Manifest> {
    Ok(Manifest::read(
        &fixtures_dir().join(format!("manifests/{component}.json")),
    )?)
}

#[test]
fn real_text_encoder_manifest_is_exact_except_the_unused_pooler() -> anyhow::Result<()> {
    let cfg = real_mclip()?;
    assert_eq!(
        (cfg.hidden_size, cfg.num_dims, cfg.head_dim()),
        (1024, 768, 64)
    );
    assert_eq!(cfg.max_positions(), 512);
    let req = record_requests(|vb| MultilingualClip::new(vb, &cfg))?;
    let m = manifest("kandinsky-2-1__text_encoder")?;
    // 5 embedding tensors + 24 × 16 per layer + pooler (2) + LinearTransformation (2).
    assert_eq!(m.len(), 393);
    let report = m.check(&req);
    assert!(report.missing.is_empty(), "{report}");
    assert!(report.mismatched.is_empty(), "{report}");
    // Every checkpoint tensor is requested except the documented pooler.
    assert_eq!(report.unused, UNUSED_CHECKPOINT_KEYS.to_vec(), "{report}");
    assert!(req.contains_key("transformer.encoder.layer.23.attention.self.query.weight"));
    assert_eq!(req["LinearTransformation.weight"], vec![768, 1024]);
    assert_eq!(
        req["transformer.embeddings.word_embeddings.weight"],
        vec![250002, 1024]
    );
    Ok(())
}

#[test]
fn tiny_checkpoint_loads_and_leaves_only_the_pooler_unused() -> anyhow::Result<()> {
    let dir = ComponentDir::new(tiny_dir())?;
    let cfg = MClipConfig::from_dir(&dir)?;
    assert_eq!(
        (cfg.hidden_size, cfg.transformer_dimensions, cfg.num_dims),
        (48, 48, 32)
    );
    let ckpt = dir.checkpoint(WeightVariant::Default)?;
    assert!(UNUSED_CHECKPOINT_KEYS
        .iter()
        .all(|k| ckpt.keys().contains(&k.to_string())));
    let _model = ckpt.build(DType::F32, &Device::Cpu, |vb| {
        MultilingualClip::new(vb, &cfg)
    })?;
    assert_eq!(ckpt.unused_keys(), UNUSED_CHECKPOINT_KEYS.to_vec());
    Ok(())
}

#[test]
fn builtin_config_equals_the_real_file() -> anyhow::Result<()> {
    let a = MClipConfig::kandinsky_2_1();
    let b = real_mclip()?;
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
    assert_eq!(b.activation()?, Activation::Gelu);
    Ok(())
}

#[test]
fn prior_2_1_text_encoder_manifest_is_exact() -> anyhow::Result<()> {
    let cfg = ClipTextConfig::from_file(&real_config("kandinsky-2-1-prior__text_encoder.json"))?;
    assert_eq!(cfg.activation()?, Activation::QuickGelu);
    assert_eq!(cfg.pooling()?, EosPooling::ArgmaxId);
    assert_eq!((cfg.vocab_size, cfg.max_position_embeddings), (49408, 77));
    let req = record_requests(|vb| ClipTextModelWithProjection::new(vb, &cfg))?;
    let m = manifest("kandinsky-2-1-prior__text_encoder")?;
    assert_eq!(m.len(), 197);
    let report = m.check(&req);
    assert!(report.is_exact(), "{report}");
    Ok(())
}

#[test]
fn prior_2_1_image_encoder_manifest_is_exact() -> anyhow::Result<()> {
    let cfg = ClipVisionConfig::from_file(&real_config("kandinsky-2-1-prior__image_encoder.json"))?;
    assert_eq!(cfg.activation()?, Activation::QuickGelu);
    assert_eq!((cfg.num_positions(), cfg.head_dim()), (257, 64));
    let req = record_requests(|vb| ClipVisionModelWithProjection::new(vb, &cfg))?;
    let m = manifest("kandinsky-2-1-prior__image_encoder")?;
    let report = m.check(&req);
    assert!(report.is_exact(), "{report}");
    Ok(())
}

#[test]
fn the_manifest_check_can_fail() -> anyhow::Result<()> {
    // The tiny config against the real manifest: layers 2..23 unused, shapes mismatched.
    let tiny = MClipConfig::from_dir(&ComponentDir::new(tiny_dir())?)?;
    let req = record_requests(|vb| MultilingualClip::new(vb, &tiny))?;
    let report = manifest("kandinsky-2-1__text_encoder")?.check(&req);
    assert!(!report.is_exact());
    assert!(report
        .unused
        .iter()
        .any(|n| n.starts_with("transformer.encoder.layer.23.")));
    assert!(!report.mismatched.is_empty());
    Ok(())
}

fn write_config(
    tag: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> anyhow::Result<std::path::PathBuf> {
    let dir =
        std::env::temp_dir().join(format!("kandinsky-mclip-cfg-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny_dir().join("config.json"))?)?;
    edit(&mut cfg);
    std::fs::write(dir.join("config.json"), serde_json::to_string(&cfg)?)?;
    std::fs::copy(
        tiny_dir().join("model.safetensors"),
        dir.join("model.safetensors"),
    )?;
    Ok(dir)
}

fn load_err(tag: &str, edit: impl FnOnce(&mut serde_json::Value)) -> anyhow::Result<Error> {
    let dir = write_config(tag, edit)?;
    let r = MultilingualClip::load(&dir, DType::F32, &Device::Cpu);
    std::fs::remove_dir_all(&dir)?;
    match r {
        Ok(_) => anyhow::bail!("{tag}: loading succeeded"),
        Err(e) => Ok(e),
    }
}

#[test]
fn unsupported_config_values_are_named() -> anyhow::Result<()> {
    let e = load_err("pos", |c| {
        c["position_embedding_type"] = "relative_key".into()
    })?;
    match &e {
        Error::UnsupportedConfig {
            field,
            supported,
            file,
            ..
        } => {
            assert_eq!(field, "position_embedding_type");
            assert_eq!(supported, "absolute");
            assert!(
                file.as_ref().is_some_and(|f| f.ends_with("config.json")),
                "{e}"
            );
        }
        other => panic!("expected UnsupportedConfig, got {other:?}"),
    }
    let e = load_err("act", |c| c["hidden_act"] = "relu".into())?.to_string();
    assert!(e.contains("hidden_act") && e.contains("gelu"), "{e}");
    let e = load_err("dims", |c| c["transformerDimensions"] = 64.into())?.to_string();
    assert!(
        e.contains("transformerDimensions") && e.contains("48"),
        "{e}"
    );
    let e = load_err("heads", |c| c["num_attention_heads"] = 5.into())?;
    assert!(matches!(e, Error::UnsupportedConfig { .. }), "{e}");
    let e = load_err("pad", |c| c["pad_token_id"] = 100000.into())?;
    assert!(matches!(e, Error::UnsupportedConfig { .. }), "{e}");
    // A config whose shapes disagree with the weights: a typed load error naming the key.
    let e = load_err("shape", |c| c["numDims"] = 16.into())?;
    assert!(e.to_string().contains("LinearTransformation.weight"), "{e}");
    Ok(())
}

#[test]
fn malformed_or_missing_config_is_a_typed_error() -> anyhow::Result<()> {
    let dir = write_config("malformed", |_| {})?;
    std::fs::write(dir.join("config.json"), "{\"hidden_size\": 48,")?;
    let malformed = MultilingualClip::load(&dir, DType::F32, &Device::Cpu).unwrap_err();
    std::fs::write(dir.join("config.json"), "{\"hidden_size\": \"wide\"}")?;
    let wrong_type = MultilingualClip::load(&dir, DType::F32, &Device::Cpu).unwrap_err();
    std::fs::remove_file(dir.join("config.json"))?;
    let missing = MultilingualClip::load(&dir, DType::F32, &Device::Cpu).unwrap_err();
    std::fs::remove_dir_all(&dir)?;
    for e in [&malformed, &wrong_type] {
        match e {
            Error::Json { path, .. } => assert!(path.ends_with("config.json"), "{e}"),
            other => panic!("expected Json, got {other:?}"),
        }
    }
    assert!(missing.to_string().contains("config.json"), "{missing}");
    Ok(())
}

#[test]
fn bad_model_inputs_are_typed_errors() -> anyhow::Result<()> {
    let model = MultilingualClip::load(tiny_dir(), DType::F32, &Device::Cpu)?;
    let dev = Device::Cpu;
    let ids = Tensor::new(&[[0u32, 10, 20, 2, 1]], &dev)?;
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 0]], &dev)?;
    assert!(model.encode_text(&ids, Some(&mask)).is_ok());
    // The attention mask is required for this encoder.
    match model.encode_text(&ids, None) {
        Err(Error::InvalidInput(m)) => assert!(m.contains("attention_mask"), "{m}"),
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    let invalid = |ids: &Tensor, mask: &Tensor| {
        matches!(model.forward(ids, mask), Err(Error::InvalidInput(_)))
    };
    // Wrong mask shape, mask values, an all-padding row.
    assert!(invalid(&ids, &Tensor::new(&[[1u32, 1, 1, 1]], &dev)?));
    assert!(invalid(&ids, &Tensor::new(&[[1u32, 1, 2, 1, 0]], &dev)?));
    assert!(invalid(&ids, &Tensor::zeros((1, 5), DType::U32, &dev)?));
    assert!(invalid(
        &ids,
        &Tensor::new(&[[1f32, 1., 0.5, 1., 0.]], &dev)?
    ));
    // Ids outside the vocabulary, negative ids, rank 1, empty, too long (> 512 positions
    // after RoBERTa's offset: 514 − 2).
    let vocab = 1333u32;
    assert!(invalid(
        &Tensor::new(&[[0u32, vocab, 2, 1, 1]], &dev)?,
        &mask
    ));
    assert!(invalid(&Tensor::new(&[[0i64, -5, 2, 1, 1]], &dev)?, &mask));
    assert!(invalid(
        &Tensor::new(&[0u32, 2], &dev)?,
        &Tensor::new(&[1u32, 1], &dev)?
    ));
    let empty = Tensor::zeros((1, 0), DType::U32, &dev)?;
    assert!(invalid(&empty, &empty));
    let long = Tensor::zeros((1, 513), DType::U32, &dev)?;
    assert!(invalid(&long, &Tensor::ones((1, 513), DType::U32, &dev)?));
    let longest = Tensor::zeros((1, 512), DType::U32, &dev)?;
    assert!(model
        .forward(&longest, &Tensor::ones((1, 512), DType::U32, &dev)?)
        .is_ok());
    Ok(())
}
