//! Config parsing (real `prior/config.json`, diffusers' defaults, rejected values) and the
//! real checkpoint's manifest.

use anyhow::Result;
use kandinsky_core::manifest::{record_requests, Manifest};
use kandinsky_core::testing::fixtures_dir;
use kandinsky_core::Error;
use kandinsky_core::ModelConfig;
use kandinsky_prior::{PriorTransformer, PriorTransformerConfig};

/// The hub's 252-byte `kandinsky-2-2-prior/prior/config.json` (REFERENCE.md §1.4).
const REAL_22: &str = r#"{
  "_class_name": "PriorTransformer",
  "_diffusers_version": "0.17.0.dev0",
  "additional_embeddings": 4,
  "attention_head_dim": 64,
  "dropout": 0.0,
  "embedding_dim": 1280,
  "num_attention_heads": 32,
  "num_embeddings": 77,
  "num_layers": 20
}"#;

fn parse(json: &str) -> Result<PriorTransformerConfig> {
    Ok(serde_json::from_str(json)?)
}

#[test]
fn real_config_gets_diffusers_defaults() -> Result<()> {
    let cfg = parse(REAL_22)?;
    cfg.validate()?;
    assert_eq!(cfg.embedding_dim, 1280);
    assert_eq!(cfg.inner_dim(), 2048);
    assert_eq!(cfg.seq_len(), 81);
    assert_eq!(cfg.time_embed_act_fn, "silu");
    assert_eq!(cfg.encoder_hid_proj_type.as_deref(), Some("linear"));
    assert_eq!(cfg.added_emb_type.as_deref(), Some("prd"));
    assert_eq!(cfg.norm_in_type, None);
    assert_eq!(cfg.embedding_proj_norm_type, None);
    assert_eq!(cfg.output_dim(), 1280);
    assert_eq!(cfg.proj_embedding_dim(), 1280);
    // The re-saved (effective) config with every field spelled out is the same config.
    let effective = r#"{"added_emb_type": "prd", "additional_embeddings": 4, "attention_head_dim": 64,
        "clip_embed_dim": null, "dropout": 0.0, "embedding_dim": 1280, "embedding_proj_dim": null,
        "embedding_proj_norm_type": null, "encoder_hid_proj_type": "linear", "norm_in_type": null,
        "num_attention_heads": 32, "num_embeddings": 77, "num_layers": 20,
        "time_embed_act_fn": "silu", "time_embed_dim": null, "some_future_field": [1, 2]}"#;
    assert_eq!(parse(effective)?, cfg);
    Ok(())
}

/// The real config with `field` set (or replaced) to the JSON `value`.
fn with(field: &str, value: &str) -> Result<PriorTransformerConfig> {
    let mut json: serde_json::Value = serde_json::from_str(REAL_22)?;
    json[field] = serde_json::from_str(value)?;
    Ok(serde_json::from_value(json)?)
}

#[test]
fn unsupported_values_are_rejected_by_name() -> Result<()> {
    for (field, value) in [
        ("added_emb_type", "null"),
        ("added_emb_type", "\"other\""),
        ("encoder_hid_proj_type", "null"),
        ("norm_in_type", "\"group\""),
        ("embedding_proj_norm_type", "\"rms\""),
        ("time_embed_act_fn", "\"mish\""),
        ("additional_embeddings", "3"),
        ("num_attention_heads", "0"),
        ("clip_embed_dim", "0"),
    ] {
        let cfg = with(field, value)?;
        match cfg.validate() {
            Err(Error::UnsupportedConfig { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}={value}: expected UnsupportedConfig, got {other:?}"),
        }
        // The constructor validates too (never a half-built model).
        let err = record_requests(|vb| PriorTransformer::new(vb, &cfg)).unwrap_err();
        assert!(matches!(err, Error::UnsupportedConfig { .. }), "{err}");
    }
    // Supported alternatives pass.
    for (field, value) in [
        ("norm_in_type", "\"layer\""),
        ("embedding_proj_norm_type", "\"layer\""),
        ("time_embed_act_fn", "\"swish\""),
        ("time_embed_act_fn", "\"gelu\""),
    ] {
        with(field, value)?.validate()?;
    }
    Ok(())
}

#[test]
fn config_file_errors_name_the_file() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("kandinsky-prior-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("config.json");
    std::fs::write(
        &path,
        REAL_22.replace(
            "\"num_layers\": 20",
            "\"num_layers\": 20, \"added_emb_type\": null",
        ),
    )?;
    match PriorTransformerConfig::from_file(&path) {
        Err(Error::UnsupportedConfig { file: Some(f), .. }) => assert_eq!(f, path),
        other => panic!("expected UnsupportedConfig with the file, got {other:?}"),
    }
    std::fs::write(&path, "{ not json")?;
    assert!(matches!(
        PriorTransformerConfig::from_file(&path),
        Err(Error::Json { .. })
    ));
    std::fs::remove_file(&path)?;
    assert!(matches!(
        PriorTransformerConfig::from_file(&path),
        Err(Error::MissingFile { .. })
    ));
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn real_checkpoint_manifest_is_exact() -> Result<()> {
    let cfg = parse(REAL_22)?;
    let requested = record_requests(|vb| PriorTransformer::new(vb, &cfg))?;
    let manifest =
        Manifest::read(&fixtures_dir().join("manifests/kandinsky-2-2-prior__prior.json"))?;
    assert_eq!(manifest.len(), 338);
    let report = manifest.check(&requested);
    assert!(report.is_exact(), "{report}");
    Ok(())
}

#[test]
fn tiny_config_manifest_differs_from_real() -> Result<()> {
    // The manifest check can fail: the tiny structure does not match the real checkpoint.
    let tiny: PriorTransformerConfig = kandinsky_core::loading::read_json(
        &fixtures_dir().join("tiny/kandinsky-2-2-prior/prior/config.json"),
    )?;
    let requested = record_requests(|vb| PriorTransformer::new(vb, &tiny))?;
    let manifest =
        Manifest::read(&fixtures_dir().join("manifests/kandinsky-2-2-prior__prior.json"))?;
    let report = manifest.check(&requested);
    assert!(!report.is_exact());
    assert!(report
        .unused
        .iter()
        .any(|n| n.starts_with("transformer_blocks.19.")));
    assert!(!report.mismatched.is_empty());
    Ok(())
}
