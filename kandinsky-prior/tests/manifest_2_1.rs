//! The Kandinsky 2.1 prior (`kandinsky-2-1-prior/prior`): the 2.2 structure with
//! `embedding_dim` 768 (OpenAI CLIP ViT-L/14 embeddings); its real checkpoint's manifest.

use anyhow::Result;
use kandinsky_core::manifest::{record_requests, Manifest};
use kandinsky_core::testing::fixtures_dir;
use kandinsky_core::ModelConfig;
use kandinsky_prior::{PriorTransformer, PriorTransformerConfig};

/// The hub's 252-byte `kandinsky-2-1-prior/prior/config.json` (REFERENCE.md §1.4).
const REAL_21: &str = r#"{
  "_class_name": "PriorTransformer",
  "_diffusers_version": "0.17.0.dev0",
  "additional_embeddings": 4,
  "attention_head_dim": 64,
  "dropout": 0.0,
  "embedding_dim": 768,
  "num_attention_heads": 32,
  "num_embeddings": 77,
  "num_layers": 20
}"#;

fn manifest() -> Result<Manifest> {
    Ok(Manifest::read(
        &fixtures_dir().join("manifests/kandinsky-2-1-prior__prior.json"),
    )?)
}

#[test]
fn real_2_1_prior_manifest_is_exact() -> Result<()> {
    let cfg: PriorTransformerConfig = serde_json::from_str(REAL_21)?;
    cfg.validate()?;
    assert_eq!(
        (cfg.inner_dim(), cfg.output_dim(), cfg.seq_len()),
        (2048, 768, 81)
    );
    let requested = record_requests(|vb| PriorTransformer::new(vb, &cfg))?;
    let m = manifest()?;
    assert_eq!(m.len(), 338);
    let report = m.check(&requested);
    assert!(report.is_exact(), "{report}");
    assert_eq!(requested["proj_to_clip_embeddings.weight"], vec![768, 2048]);
    assert_eq!(requested["clip_mean"], vec![1, 768]);
    Ok(())
}

#[test]
fn real_configs_file_equals_the_hub_file() -> Result<()> {
    // fixtures/real-configs holds the effective (re-serialised) config the manifest was built
    // from; the 252-byte hub file must parse to the same values.
    let file = PriorTransformerConfig::from_file(
        &fixtures_dir().join("real-configs/kandinsky-2-1-prior__prior.json"),
    )?;
    let hub: PriorTransformerConfig = serde_json::from_str(REAL_21)?;
    assert_eq!(format!("{file:?}"), format!("{hub:?}"));
    Ok(())
}

#[test]
fn the_2_2_structure_does_not_match_the_2_1_checkpoint() -> Result<()> {
    let cfg_22: PriorTransformerConfig = kandinsky_core::loading::read_json(
        &fixtures_dir().join("real-configs/kandinsky-2-2-prior__prior.json"),
    )?;
    let requested = record_requests(|vb| PriorTransformer::new(vb, &cfg_22))?;
    let report = manifest()?.check(&requested);
    assert!(!report.is_exact());
    assert!(report
        .mismatched
        .iter()
        .any(|(n, _, _)| n == "proj_to_clip_embeddings.weight"));
    Ok(())
}
