//! Checkpoint loading and manifest checks on small files written by the test.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use kandinsky_core::embeddings::TimestepEmbedding;
use kandinsky_core::loading::{load_component, Checkpoint, ComponentDir, WeightVariant};
use kandinsky_core::manifest::{record_requests, Manifest, ManifestEntry};
use kandinsky_core::nn::Activation;
use kandinsky_core::{Error, LoadError, ModelConfig};

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

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("fixtures")
}

fn tiny_prior() -> PathBuf {
    fixtures().join("tiny/kandinsky-2-2-prior/prior")
}

/// A component folder holding only `file` from fixtures/pickle/, under `name`.
fn pickle_component(test: &str, file: &str, name: &str) -> anyhow::Result<PathBuf> {
    let dir = scratch(test);
    std::fs::copy(fixtures().join("pickle").join(file), dir.join(name))?;
    Ok(dir)
}

/// Every tensor of a checkpoint, as f64.
fn all_tensors(ckpt: &Arc<Checkpoint>) -> anyhow::Result<BTreeMap<String, Tensor>> {
    let vb = ckpt.var_builder(DType::F32, &Device::Cpu);
    let mut out = BTreeMap::new();
    for k in ckpt.keys() {
        // f64 holds every f32 / f16 / bf16 / small int value exactly.
        out.insert(k.clone(), vb.get_unchecked_dtype(&k, DType::F64)?);
    }
    Ok(out)
}

fn bits(t: &Tensor) -> anyhow::Result<Vec<u64>> {
    Ok(t.flatten_all()?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?
        .into_iter()
        .map(f64::to_bits)
        .collect())
}

#[test]
fn malformed_pickle_names_the_file() -> anyhow::Result<()> {
    let dir = scratch("pickle");
    let file = dir.join("diffusion_pytorch_model.bin");
    std::fs::write(&file, b"not really a pickle")?;
    let component = ComponentDir::new(&dir)?;
    assert_eq!(
        component.weight_files(WeightVariant::Default)?,
        vec![file.clone()]
    );
    let err = component.checkpoint(WeightVariant::Default).unwrap_err();
    match &err {
        Error::Pickle { path, reason } => {
            assert_eq!(path, &file);
            assert!(reason.contains("not a PyTorch checkpoint"), "{reason}");
        }
        other => panic!("expected a pickle error, got {other:?}"),
    }
    assert!(
        err.to_string().contains("diffusion_pytorch_model.bin"),
        "{err}"
    );
    // A zip archive that is cut short: candle's reader fails, the error still names the file.
    let mut zip = std::fs::read(fixtures().join("pickle/prior.bin"))?;
    zip.truncate(zip.len() / 2);
    std::fs::write(&file, zip)?;
    let err = component.checkpoint(WeightVariant::Default).unwrap_err();
    assert!(
        matches!(&err, Error::Pickle { path, .. } if path == &file),
        "{err:?}"
    );
    Ok(())
}

#[test]
fn legacy_torch_save_format_is_a_clear_error() -> anyhow::Result<()> {
    let dir = pickle_component("legacy", "legacy.bin", "pytorch_model.bin")?;
    let err = ComponentDir::new(&dir)?
        .checkpoint(WeightVariant::Default)
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Pickle { .. }), "{err:?}");
    assert!(
        msg.contains("pytorch_model.bin") && msg.contains("legacy") && msg.contains("safetensors"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn torch_saved_state_dict_equals_the_safetensors() -> anyhow::Result<()> {
    // fixtures/pickle/prior.bin is torch.save(model.state_dict()) of the tiny prior whose
    // save_pretrained safetensors sit in tiny/kandinsky-2-2-prior/prior.
    let dir = pickle_component("prior-bin", "prior.bin", "diffusion_pytorch_model.bin")?;
    let bin = ComponentDir::new(&dir)?.checkpoint(WeightVariant::Default)?;
    let st = ComponentDir::new(tiny_prior())?.checkpoint(WeightVariant::Default)?;
    assert_eq!(bin.files(), &[dir.join("diffusion_pytorch_model.bin")]);
    assert!(format!("{bin:?}").contains("pickle"), "{bin:?}");
    assert_eq!(bin.keys(), st.keys());
    assert!(bin.keys().len() > 20, "{:?}", bin.keys());
    let (a, b) = (all_tensors(&bin)?, all_tensors(&st)?);
    for (k, t) in &a {
        assert_eq!(t.dims(), b[k].dims(), "{k}");
        assert_eq!(bits(t)?, bits(&b[k])?, "{k}");
    }
    assert!(bin.unused_keys().is_empty());

    // A model built from either file computes the same, and both report the same unused keys.
    let build = |ckpt: &Arc<Checkpoint>| {
        ckpt.build(DType::F32, &Device::Cpu, |vb| {
            TimestepEmbedding::new(vb.pp("time_embedding"), 16, 16, 16, Activation::Silu)
        })
    };
    let (bin, st) = (
        ComponentDir::new(&dir)?.checkpoint(WeightVariant::Default)?,
        ComponentDir::new(tiny_prior())?.checkpoint(WeightVariant::Default)?,
    );
    let x = Tensor::arange(0f32, 32., &Device::Cpu)?.reshape((2, 16))?;
    let (ya, yb) = (build(&bin)?.forward(&x)?, build(&st)?.forward(&x)?);
    assert_eq!(bits(&ya)?, bits(&yb)?);
    assert_eq!(bin.unused_keys(), st.unused_keys());
    assert_eq!(bin.unused_keys().len(), bin.keys().len() - 4);
    Ok(())
}

#[test]
fn pickle_errors_name_file_key_and_shapes() -> anyhow::Result<()> {
    let dir = pickle_component(
        "prior-bin-errors",
        "prior.bin",
        "diffusion_pytorch_model.bin",
    )?;
    let file = dir.join("diffusion_pytorch_model.bin");
    let component = ComponentDir::new(&dir)?;
    let wrong =
        component
            .checkpoint(WeightVariant::Default)?
            .build(DType::F32, &Device::Cpu, |vb| {
                TimestepEmbedding::new(vb.pp("time_embedding"), 16, 24, 16, Activation::Silu)
            });
    match wrong {
        Err(Error::Load(LoadError::ShapeMismatch {
            file: f,
            key,
            expected,
            found,
        })) => {
            assert_eq!(f, file);
            assert_eq!(key, "time_embedding.linear_1.weight");
            assert_eq!((expected, found), (vec![24, 16], vec![16, 16]));
        }
        other => panic!("expected a shape error, got {other:?}"),
    }
    let missing =
        component
            .checkpoint(WeightVariant::Default)?
            .build(DType::F32, &Device::Cpu, |vb| {
                TimestepEmbedding::new(vb.pp("time_embed"), 16, 16, 16, Activation::Silu)
            });
    match missing {
        Err(Error::Load(LoadError::MissingTensor { files, key })) => {
            assert_eq!(files, vec![file]);
            assert_eq!(key, "time_embed.linear_1.weight");
        }
        other => panic!("expected a missing-tensor error, got {other:?}"),
    }
    Ok(())
}

#[test]
fn half_and_long_storages_load_in_their_dtype() -> anyhow::Result<()> {
    // The tiny CLIP vision tower saved in fp16 with transformers' old int64 position_ids
    // buffer, as the real 2.2 prior's image_encoder/pytorch_model.bin (HalfStorage +
    // LongStorage); its safetensors twin is fp16 too.
    let dir = pickle_component("vision-bin", "image_encoder_fp16.bin", "pytorch_model.bin")?;
    let bin = ComponentDir::new(&dir)?.checkpoint(WeightVariant::Default)?;
    let st = ComponentDir::new(fixtures().join("tiny/kandinsky-2-2-prior/image_encoder"))?
        .checkpoint(WeightVariant::Default)?;
    let ids = "vision_model.embeddings.position_ids";
    let mut expected = st.keys();
    expected.push(ids.to_string());
    expected.sort();
    assert_eq!(bin.keys(), expected);
    let vb = bin.var_builder(DType::F32, &Device::Cpu);
    let vs = st.var_builder(DType::F32, &Device::Cpu);
    for k in st.keys() {
        let (a, b) = (
            vb.get_unchecked_dtype(&k, DType::F16)?,
            vs.get_unchecked_dtype(&k, DType::F16)?,
        );
        assert_eq!(a.dims(), b.dims(), "{k}");
        assert_eq!(bits(&a)?, bits(&b)?, "{k}");
    }
    let pos = vb.get_unchecked_dtype(ids, DType::I64)?;
    let n = pos.dims()[1];
    assert_eq!(pos.dims(), &[1, n]);
    assert_eq!(
        pos.flatten_all()?.to_vec1::<i64>()?,
        (0..n as i64).collect::<Vec<_>>()
    );
    Ok(())
}

#[test]
fn nested_state_dict_views_and_unreadable_layouts() -> anyhow::Result<()> {
    // {"state_dict": {...}, "epoch": 3, "lr": 0.5}; w = arange(12) / 4 as 3×4.
    let dir = pickle_component("nested", "nested.pt", "model.pt")?;
    let file = dir.join("model.pt");
    let ckpt = ComponentDir::new(&dir)?.checkpoint(WeightVariant::Default)?;
    assert_eq!(ckpt.keys(), ["b16", "strided", "w", "w_rows", "w_t"]);
    let dev = Device::Cpu;
    let w = (Tensor::arange(0f32, 12., &dev)? / 4.)?.reshape((3, 4))?;
    let vb = ckpt.var_builder(DType::F32, &dev);
    let get = |k: &str| vb.get_unchecked_dtype(k, DType::F32);
    assert_eq!(bits(&get("w")?)?, bits(&w)?);
    // A view starting inside w's storage, and a column-major one.
    assert_eq!(bits(&get("w_rows")?)?, bits(&w.narrow(0, 1, 2)?)?);
    assert_eq!(get("w_t")?.dims(), &[4, 3]);
    assert!(get("w_t")?.is_contiguous());
    assert_eq!(bits(&get("w_t")?)?, bits(&w.t()?.contiguous()?)?);
    let b16 = vb.get_unchecked_dtype("b16", DType::BF16)?;
    assert_eq!(b16.dtype(), DType::BF16);
    assert_eq!(
        bits(&b16)?,
        bits(&(Tensor::arange(0f32, 6., &dev)? / 4.)?.reshape((2, 3))?)?
    );
    // w[:, ::2] cannot be read without copying: asking for it is a typed error naming the
    // file and the key.
    let err = ckpt
        .build(DType::F32, &dev, |vb| Ok(vb.get((3, 2), "strided")?))
        .unwrap_err();
    match &err {
        Error::Pickle { path, reason } => {
            assert_eq!(path, &file);
            assert!(reason.contains("`strided`"), "{reason}");
        }
        other => panic!("expected a pickle error, got {other:?}"),
    }
    Ok(())
}

#[test]
fn safetensors_win_over_pickle_and_names_are_found() -> anyhow::Result<()> {
    let dir = pickle_component("both", "prior.bin", "diffusion_pytorch_model.bin")?;
    std::fs::copy(
        tiny_prior().join("diffusion_pytorch_model.safetensors"),
        dir.join("diffusion_pytorch_model.safetensors"),
    )?;
    let c = ComponentDir::new(&dir)?;
    assert_eq!(
        c.weight_files(WeightVariant::Default)?,
        vec![dir.join("diffusion_pytorch_model.safetensors")]
    );
    // transformers' pickle name is pytorch_model.bin; a lone file of another name is taken.
    for name in ["pytorch_model.bin", "weights.pth", "last.ckpt"] {
        let dir = pickle_component("names", "prior.bin", name)?;
        assert_eq!(
            ComponentDir::new(&dir)?.weight_files(WeightVariant::Default)?,
            vec![dir.join(name)],
            "{name}"
        );
    }
    // No weights at all: the hint lists both formats.
    let empty = scratch("no-weights");
    let err = ComponentDir::new(&empty)?
        .weight_files(WeightVariant::Default)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("diffusion_pytorch_model.safetensors") && err.contains("pytorch_model.bin"),
        "{err}"
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

/// The config of the test's `TimestepEmbedding`, read by [`load_component`].
#[derive(serde::Deserialize)]
struct EmbeddingConfig {
    in_dim: usize,
    hidden: usize,
}

impl ModelConfig for EmbeddingConfig {
    fn validate(&self) -> kandinsky_core::Result<()> {
        if self.hidden == 0 {
            return Err(Error::unsupported("hidden", self.hidden, "at least 1"));
        }
        Ok(())
    }
}

fn load_embedding(dir: &Path) -> kandinsky_core::Result<TimestepEmbedding> {
    let new = |vb, cfg: &EmbeddingConfig| {
        TimestepEmbedding::new(vb, cfg.in_dim, cfg.hidden, 3, Activation::Silu)
    };
    load_component(dir, DType::F16, &Device::Cpu, new)
}

#[test]
fn load_component_reads_validates_and_builds() -> anyhow::Result<()> {
    let dir = scratch("component");
    candle_core::safetensors::save(&weights(6), dir.join("diffusion_pytorch_model.safetensors"))?;
    // No config.json: named.
    let err = load_embedding(&dir).unwrap_err();
    match &err {
        Error::MissingFile { path, .. } => assert!(path.ends_with("config.json"), "{err}"),
        other => panic!("expected MissingFile, got {other:?}"),
    }
    // A config `validate` rejects: the field and the file are named.
    std::fs::write(dir.join("config.json"), r#"{"in_dim": 4, "hidden": 0}"#)?;
    let err = load_embedding(&dir).unwrap_err();
    match &err {
        Error::UnsupportedConfig { field, file, .. } => {
            assert_eq!(field, "hidden");
            assert_eq!(file.as_deref(), Some(dir.join("config.json").as_path()));
        }
        other => panic!("expected UnsupportedConfig, got {other:?}"),
    }
    // The config's sizes reach the constructor: a wrong one is the checkpoint's shape error.
    std::fs::write(dir.join("config.json"), r#"{"in_dim": 5, "hidden": 6}"#)?;
    assert!(matches!(
        load_embedding(&dir),
        Err(Error::Load(LoadError::ShapeMismatch { .. }))
    ));
    std::fs::write(dir.join("config.json"), r#"{"in_dim": 4, "hidden": 6}"#)?;
    let model = load_embedding(&dir)?;
    let y = model.forward(&Tensor::ones((2, 4), DType::F16, &Device::Cpu)?)?;
    assert_eq!((y.dims(), y.dtype()), (&[2, 3][..], DType::F16));
    // Missing folder.
    assert!(matches!(
        load_embedding(&dir.join("absent")),
        Err(Error::MissingFile { .. })
    ));
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
