//! Checkpoint loading from diffusers-layout folders, unchanged.
//!
//! A pipeline folder holds `model_index.json` and one folder per component; a component
//! folder holds a `config.json` (or `scheduler_config.json`, ...) and its weights as
//! `*.safetensors`, a sharded `*.safetensors.index.json`, or an `fp16` variant. Weights are
//! memory-mapped and converted to the requested dtype tensor by tensor while the model is
//! built, so the peak memory is the model in its target dtype.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;

use crate::error::{Error, LoadError, Result};

/// A model config read from a diffusers/transformers `config.json`: serde does the
/// parsing (with diffusers' defaults on the struct), [`ModelConfig::validate`] rejects what
/// kandinsky-rs does not implement, and every error names the file.
pub trait ModelConfig: DeserializeOwned {
    /// Reject values this implementation does not support, naming the field and the
    /// supported values.
    fn validate(&self) -> Result<()>;

    /// Read and validate a config file.
    fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = read_json(path)?;
        cfg.validate().map_err(|e| e.in_file(path))?;
        Ok(cfg)
    }

    /// Read and validate `config.json` of a component folder.
    fn from_dir(dir: &ComponentDir) -> Result<Self> {
        Self::from_file(&dir.path().join("config.json"))
    }
}

/// Read and parse a JSON file, naming the file in every error.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::MissingFile {
                path: path.to_path_buf(),
                hint: "expected a diffusers-layout folder (see `save_pretrained`)".into(),
            }
        } else {
            Error::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// `model_index.json` of a diffusers pipeline folder.
#[derive(Debug, Clone)]
pub struct ModelIndex {
    /// `_class_name`, e.g. `KandinskyV22Pipeline`.
    pub class_name: String,
    /// Component folder name → (library, class), e.g. `unet` → (`diffusers`, `UNet2DConditionModel`).
    pub components: BTreeMap<String, (String, String)>,
}

impl ModelIndex {
    /// Read `model_index.json` from a pipeline folder.
    pub fn read(pipeline_dir: &Path) -> Result<Self> {
        let path = pipeline_dir.join("model_index.json");
        let raw: BTreeMap<String, serde_json::Value> = read_json(&path)?;
        let class_name = raw
            .get("_class_name")
            .and_then(|v| v.as_str())
            .ok_or_else(|| Error::invalid(format!("{} has no `_class_name`", path.display())))?
            .to_string();
        let mut components = BTreeMap::new();
        for (name, value) in &raw {
            if name.starts_with('_') {
                continue;
            }
            if let Some([lib, class]) = value.as_array().map(|a| a.as_slice()) {
                if let (Some(lib), Some(class)) = (lib.as_str(), class.as_str()) {
                    components.insert(name.clone(), (lib.to_string(), class.to_string()));
                }
            }
        }
        Ok(Self {
            class_name,
            components,
        })
    }
}

/// Which weight file variant to prefer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightVariant {
    /// The plain file (`diffusion_pytorch_model.safetensors`); falls back to `fp16` when only that exists.
    #[default]
    Default,
    /// The `fp16` variant (`diffusion_pytorch_model.fp16.safetensors`) when present.
    Fp16,
}

/// One component folder (`unet/`, `movq/`, `text_encoder/`, ...).
#[derive(Debug, Clone)]
pub struct ComponentDir {
    root: PathBuf,
}

const WEIGHT_STEMS: [&str; 2] = ["diffusion_pytorch_model", "model"];
const PICKLE_EXTS: [&str; 3] = ["bin", "pt", "ckpt"];

impl ComponentDir {
    /// Open a component folder; errors if it does not exist.
    pub fn new(path: impl AsRef<Path>) -> Result<Self> {
        let root = path.as_ref().to_path_buf();
        if !root.is_dir() {
            return Err(Error::MissingFile {
                path: root,
                hint: "expected a component folder of a diffusers pipeline".into(),
            });
        }
        Ok(Self { root })
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Parse a JSON config file of this component (`config.json`, `scheduler_config.json`, ...).
    pub fn read_config<T: DeserializeOwned>(&self, file: &str) -> Result<T> {
        read_json(&self.root.join(file))
    }

    /// The safetensors files holding this component's weights.
    pub fn weight_files(&self, variant: WeightVariant) -> Result<Vec<PathBuf>> {
        let mut names: Vec<String> = Vec::new();
        let variants: &[&str] = match variant {
            WeightVariant::Default => &["", ".fp16"],
            WeightVariant::Fp16 => &[".fp16", ""],
        };
        for v in variants {
            for stem in WEIGHT_STEMS {
                names.push(format!("{stem}{v}.safetensors"));
                names.push(format!("{stem}{v}.safetensors.index.json"));
            }
        }
        for name in &names {
            let path = self.root.join(name);
            if !path.is_file() {
                continue;
            }
            if name.ends_with(".index.json") {
                return self.shards(&path);
            }
            return Ok(vec![path]);
        }
        // Any other single safetensors file.
        let mut found: Vec<PathBuf> = Vec::new();
        let mut pickles: Vec<String> = Vec::new();
        let entries = std::fs::read_dir(&self.root).map_err(|source| Error::Io {
            path: self.root.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let p = entry.path();
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
            if ext == "safetensors" {
                found.push(p);
            } else if PICKLE_EXTS.contains(&ext) {
                pickles.push(p.file_name().unwrap_or_default().to_string_lossy().into());
            }
        }
        found.sort();
        if found.len() == 1 {
            return Ok(found);
        }
        if let Some(file) = pickles.into_iter().next() {
            let target = file
                .rsplit_once('.')
                .map(|(stem, _)| format!("{stem}.safetensors"))
                .unwrap_or_else(|| "model.safetensors".into());
            return Err(Error::PickleOnly {
                dir: self.root.clone(),
                file,
                target,
            });
        }
        Err(Error::MissingFile {
            path: self.root.join("diffusion_pytorch_model.safetensors"),
            hint: format!(
                "no safetensors weights in {} (looked for {})",
                self.root.display(),
                names.join(", ")
            ),
        })
    }

    fn shards(&self, index: &Path) -> Result<Vec<PathBuf>> {
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let idx: Index = read_json(index)?;
        let mut files: Vec<String> = idx.weight_map.into_values().collect();
        files.sort();
        files.dedup();
        let mut out = Vec::new();
        for f in files {
            let p = self.root.join(&f);
            if !p.is_file() {
                return Err(Error::MissingFile {
                    path: p,
                    hint: format!("listed as a shard in {}", index.display()),
                });
            }
            out.push(p);
        }
        Ok(out)
    }

    /// Memory-map this component's weights.
    pub fn checkpoint(&self, variant: WeightVariant) -> Result<Arc<Checkpoint>> {
        Checkpoint::open(&self.weight_files(variant)?)
    }
}

/// Memory-mapped safetensors files with error reporting by file, key and shape.
pub struct Checkpoint {
    files: Vec<PathBuf>,
    st: candle_core::safetensors::MmapedSafetensors,
    /// key → index into `files`.
    owner: BTreeMap<String, usize>,
    used: Mutex<HashSet<String>>,
    last_error: Mutex<Option<LoadError>>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("files", &self.files)
            .finish()
    }
}

/// Legacy names diffusers still accepts at load time (`query` for `to_q`, ...): tried when
/// the modern name is missing.
fn legacy_names(key: &str) -> Vec<String> {
    const RENAMES: [(&str, &str); 4] = [
        (".to_q.", ".query."),
        (".to_k.", ".key."),
        (".to_v.", ".value."),
        (".to_out.0.", ".proj_attn."),
    ];
    RENAMES
        .iter()
        .filter(|(new, _)| key.contains(new))
        .map(|(new, old)| key.replace(new, old))
        .collect()
}

impl Checkpoint {
    /// Memory-map the given safetensors files (one, or the shards of one checkpoint).
    pub fn open(files: &[PathBuf]) -> Result<Arc<Self>> {
        for f in files {
            if !f.is_file() {
                return Err(Error::MissingFile {
                    path: f.clone(),
                    hint: "weight file listed but absent".into(),
                });
            }
        }
        // SAFETY: the files are mapped read-only; modifying them while the model is loaded is
        // the caller's responsibility, as with every mmap-based loader.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(files) }?;
        let mut owner = BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            let single = unsafe { candle_core::safetensors::MmapedSafetensors::new(f) }?;
            for (k, _) in single.tensors() {
                owner.insert(k, i);
            }
        }
        Ok(Arc::new(Self {
            files: files.to_vec(),
            st,
            owner,
            used: Mutex::new(HashSet::new()),
            last_error: Mutex::new(None),
        }))
    }

    /// The files of this checkpoint.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Every tensor name in the checkpoint.
    pub fn keys(&self) -> Vec<String> {
        self.owner.keys().cloned().collect()
    }

    /// Tensor names present in the files that the model never asked for.
    pub fn unused_keys(&self) -> Vec<String> {
        let used = self.used.lock().expect("poisoned");
        self.owner
            .keys()
            .filter(|k| !used.contains(*k))
            .cloned()
            .collect()
    }

    /// A candle `VarBuilder` reading from this checkpoint, converting to `dtype` on `device`.
    pub fn var_builder(self: &Arc<Self>, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(
            Box::new(CheckedBackend(self.clone())),
            dtype,
            device.clone(),
        )
    }

    /// Build a model with this checkpoint, turning a checkpoint failure into a typed
    /// [`LoadError`] (file, key, expected and found shape), and warning about unused tensors.
    pub fn build<M>(
        self: &Arc<Self>,
        dtype: DType,
        device: &Device,
        f: impl FnOnce(VarBuilder<'static>) -> Result<M>,
    ) -> Result<M> {
        let out = f(self.var_builder(dtype, device));
        match out {
            Ok(m) => {
                let unused = self.unused_keys();
                if !unused.is_empty() {
                    tracing::warn!(
                        count = unused.len(),
                        first = %unused[0],
                        "checkpoint tensors not used by the model"
                    );
                }
                Ok(m)
            }
            Err(e) => match self.last_error.lock().expect("poisoned").take() {
                Some(load) => Err(Error::Load(load)),
                None => Err(e),
            },
        }
    }

    fn fail(&self, e: LoadError) -> candle_core::Error {
        let msg = e.to_string();
        *self.last_error.lock().expect("poisoned") = Some(e);
        candle_core::Error::Msg(msg)
    }

    fn fetch(
        &self,
        shape: Option<&Shape>,
        name: &str,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut candidates = vec![name.to_string()];
        candidates.extend(legacy_names(name));
        let Some(key) = candidates.into_iter().find(|k| self.owner.contains_key(k)) else {
            return Err(self.fail(LoadError::MissingTensor {
                files: self.files.clone(),
                key: name.to_string(),
            }));
        };
        let mut t = self.st.load(&key, dev)?;
        if let Some(s) = shape {
            if t.shape() != s {
                // 1×1 convolution weights stored where a linear weight is expected (old
                // checkpoints) differ only by trailing unit dimensions.
                let squeeze = |d: &[usize]| {
                    let mut d = d.to_vec();
                    while d.len() > 1 && d.last() == Some(&1) {
                        d.pop();
                    }
                    d
                };
                if squeeze(t.dims()) == squeeze(s.dims()) {
                    t = t.reshape(s)?;
                } else {
                    return Err(self.fail(LoadError::ShapeMismatch {
                        file: self.files[self.owner[&key]].clone(),
                        key: key.clone(),
                        expected: s.dims().to_vec(),
                        found: t.dims().to_vec(),
                    }));
                }
            }
        }
        self.used.lock().expect("poisoned").insert(key);
        t.to_dtype(dtype)
    }
}

struct CheckedBackend(Arc<Checkpoint>);

impl SimpleBackend for CheckedBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.fetch(Some(&s), name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.fetch(None, name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.owner.contains_key(name)
            || legacy_names(name)
                .iter()
                .any(|k| self.0.owner.contains_key(k))
    }
}
