//! Checkpoint loading and manifest checks on small files written by the test.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use kandinsky_core::embeddings::TimestepEmbedding;
use kandinsky_core::loading::{ComponentDir, WeightVariant};
use kandinsky_core::manifest::{record_requests, Manifest, ManifestEntry};
use kandinsky_core::nn::Activation;
use kandinsky_core::{Error, LoadError};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kandinsky-core-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn weights(l2_in: usize) -> HashMap<String, Tensor> {
    let dev = Device::Cpu;
    let mut m = HashMap::new();
    m.insert(
        "linear_1.weight".into(),
        Tensor::ones((6, 4), DType::F32, &dev).unwrap(),
    );
    m.insert(
        "linear_1.bias".into(),
        Tensor::zeros(6, DType::F32, &dev).unwrap(),
    );
    m.insert(
        "linear_2.weight".into(),
        Tensor::ones((3, l2_in), DType::F32, &dev).unwrap(),
    );
    m.insert(
        "linear_2.bias".into(),
        Tensor::zeros(3, DType::F32, &dev).unwrap(),
    );
    m
}

fn build(dir: &ComponentDir) -> kandinsky_core::Result<TimestepEmbedding> {
    let ckpt = dir.checkpoint(WeightVariant::Default)?;
    ckpt.build(DType::F16, &Device::Cpu, |vb| {
        TimestepEmbedding::new(vb, 4, 6, 3, Activation::Silu)
    })
}

#[test]
fn loads_and_converts_dtype() -> anyhow::Result<()> {
    let dir = scratch("ok");
    candle_core::safetensors::save(&weights(6), dir.join("diffusion_pytorch_model.safetensors"))?;
    let model = build(&ComponentDir::new(&dir)?)?;
    let x = Tensor::ones((2, 4), DType::F16, &Device::Cpu)?;
    let y = model.forward(&x)?;
    assert_eq!(y.dtype(), DType::F16);
    // linear_1: 4 ones → 4; silu(4) ≈ 3.928; linear_2 sums 6 of them.
    let v = y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let expected = 6.0 * 4.0 / (1.0 + (-4.0f32).exp());
    assert!(
        v.iter().all(|x| (x - expected).abs() < 0.05),
        "{v:?} vs {expected}"
    );
    Ok(())
}

#[test]
fn missing_key_names_file_and_key() -> anyhow::Result<()> {
    let dir = scratch("missing");
    let mut w = weights(6);
    w.remove("linear_2.bias");
    let file = dir.join("diffusion_pytorch_model.safetensors");
    candle_core::safetensors::save(&w, &file)?;
    match build(&ComponentDir::new(&dir)?) {
        Err(Error::Load(LoadError::MissingTensor { files, key })) => {
            assert_eq!(key, "linear_2.bias");
            assert_eq!(files, vec![file]);
        }
        other => panic!("expected a missing-tensor error, got {other:?}"),
    }
    Ok(())
}

#[test]
fn wrong_shape_names_expected_and_found() -> anyhow::Result<()> {
    let dir = scratch("shape");
    candle_core::safetensors::save(&weights(5), dir.join("model.safetensors"))?;
    let err = build(&ComponentDir::new(&dir)?).unwrap_err();
    match &err {
        Error::Load(LoadError::ShapeMismatch {
            key,
            expected,
            found,
            ..
        }) => {
            assert_eq!(key, "linear_2.weight");
            assert_eq!(expected, &vec![3, 6]);
            assert_eq!(found, &vec![3, 5]);
        }
        other => panic!("expected a shape error, got {other:?}"),
    }
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    Ok(())
}

#[test]
fn sharded_checkpoints_load() -> anyhow::Result<()> {
    let dir = scratch("sharded");
    let w = weights(6);
    let (a, b): (Vec<_>, Vec<_>) = w.into_iter().partition(|(k, _)| k.starts_with("linear_1"));
    let a: HashMap<_, _> = a.into_iter().collect();
    let b: HashMap<_, _> = b.into_iter().collect();
    candle_core::safetensors::save(&a, dir.join("model-00001-of-00002.safetensors"))?;
    candle_core::safetensors::save(&b, dir.join("model-00002-of-00002.safetensors"))?;
    let mut map = serde_json::Map::new();
    for k in a.keys() {
        map.insert(k.clone(), "model-00001-of-00002.safetensors".into());
    }
    for k in b.keys() {
        map.insert(k.clone(), "model-00002-of-00002.safetensors".into());
    }
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )?;
    let component = ComponentDir::new(&dir)?;
    assert_eq!(component.weight_files(WeightVariant::Default)?.len(), 2);
    build(&component)?;
    Ok(())
}

#[test]
fn fp16_variant_is_preferred_on_request() -> anyhow::Result<()> {
    let dir = scratch("variant");
    candle_core::safetensors::save(&weights(6), dir.join("diffusion_pytorch_model.safetensors"))?;
    candle_core::safetensors::save(
        &weights(6),
        dir.join("diffusion_pytorch_model.fp16.safetensors"),
    )?;
    let c = ComponentDir::new(&dir)?;
    assert!(c.weight_files(WeightVariant::Fp16)?[0]
        .to_string_lossy()
        .ends_with(".fp16.safetensors"));
    assert!(!c.weight_files(WeightVariant::Default)?[0]
        .to_string_lossy()
        .contains("fp16"));
    Ok(())
}

#[test]
fn pickle_only_component_says_how_to_convert() -> anyhow::Result<()> {
    let dir = scratch("pickle");
    std::fs::write(
        dir.join("diffusion_pytorch_model.bin"),
        b"not really a pickle",
    )?;
    let err = ComponentDir::new(&dir)?
        .weight_files(WeightVariant::Default)
        .unwrap_err();
    assert!(matches!(err, Error::PickleOnly { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("diffusion_pytorch_model.safetensors") && msg.contains("safetensors"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn missing_folder_and_malformed_config_are_clear() -> anyhow::Result<()> {
    assert!(matches!(
        ComponentDir::new("/nonexistent/unet"),
        Err(Error::MissingFile { .. })
    ));
    let dir = scratch("config");
    std::fs::write(dir.join("config.json"), b"{ not json")?;
    let err = ComponentDir::new(&dir)?
        .read_config::<serde_json::Value>("config.json")
        .unwrap_err();
    assert!(
        matches!(err, Error::Json { .. }) && err.to_string().contains("config.json"),
        "{err}"
    );
    Ok(())
}

fn manifest(entries: &[(&str, &[usize])]) -> Manifest {
    Manifest {
        component: "test/time_embedding".into(),
        class: "TimestepEmbedding".into(),
        tensors: entries
            .iter()
            .map(|(n, s)| ManifestEntry {
                name: n.to_string(),
                shape: s.to_vec(),
                dtype: "F32".into(),
            })
            .collect(),
    }
}

#[test]
fn manifest_check_reports_exact_unused_missing_and_mismatched() -> anyhow::Result<()> {
    let requested = record_requests(|vb| TimestepEmbedding::new(vb, 4, 6, 3, Activation::Silu))?;
    let exact = manifest(&[
        ("linear_1.weight", &[6, 4]),
        ("linear_1.bias", &[6]),
        ("linear_2.weight", &[3, 6]),
        ("linear_2.bias", &[3]),
    ]);
    assert!(
        exact.check(&requested).is_exact(),
        "{}",
        exact.check(&requested)
    );

    let off = manifest(&[
        ("linear_1.weight", &[6, 4]),
        ("linear_1.bias", &[6]),
        ("linear_2.weight", &[3, 7]),
        ("extra.weight", &[1]),
    ]);
    let report = off.check(&requested);
    assert!(!report.is_exact());
    assert_eq!(report.unused, vec!["extra.weight".to_string()]);
    assert_eq!(report.missing, vec!["linear_2.bias".to_string()]);
    assert_eq!(
        report.mismatched,
        vec![("linear_2.weight".to_string(), vec![3, 7], vec![3, 6])]
    );
    Ok(())
}
