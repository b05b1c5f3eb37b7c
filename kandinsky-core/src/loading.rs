//! Checkpoint loading from diffusers-layout folders, unchanged.
//!
//! A pipeline folder holds `model_index.json` and one folder per component; a component
//! folder holds a `config.json` (or `scheduler_config.json`, ...) and its weights as
//! `*.safetensors`, a sharded `*.safetensors.index.json`, or an `fp16` variant. Weights are
//! memory-mapped and converted to the requested dtype tensor by tensor while the model is
//! built, so the peak memory is the model in its target dtype.
//!
//! Components that ship only PyTorch pickle weights (`diffusion_pytorch_model.bin`,
//! `pytorch_model.bin`, `*.pt`, `*.pth`, `*.ckpt`; e.g. the ControlNet repo's UNet) are read
//! by candle's pickle reader, which interprets the pickle opcodes as data and never imports or
//! executes Python code. It reads `torch.save`'s zip format (torch ≥ 1.6) holding a dict of
//! tensors, at the top level or under a `state_dict` / `model` / `module` key; each tensor is
//! read from the archive when the model asks for it. Safetensors win when both exist.

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

/// Load a model from its component folder (`unet/`, `text_encoder/`, ...): read and validate
/// its `config.json` as `C`, open its weights ([`WeightVariant::Default`]) and build the model
/// with `build(vb, &cfg)` in `dtype` on `device` through [`Checkpoint::build`] (typed load
/// errors, a warning for unused tensors).
///
/// The model crates' `load` functions are this with their constructor:
/// `load_component(dir, dtype, device, Self::new)`.
pub fn load_component<C: ModelConfig, M>(
    dir: impl AsRef<Path>,
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder<'static>, &C) -> Result<M>,
) -> Result<M> {
    let dir = ComponentDir::new(dir)?;
    let cfg = C::from_dir(&dir)?;
    dir.checkpoint(WeightVariant::Default)?
        .build(dtype, device, |vb| build(vb, &cfg))
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

/// Safetensors names of diffusers (`diffusion_pytorch_model`) and transformers (`model`).
const WEIGHT_STEMS: [&str; 2] = ["diffusion_pytorch_model", "model"];
/// Pickle names of diffusers and transformers (`pytorch_model.bin`, not `model.bin`).
const PICKLE_STEMS: [&str; 2] = ["diffusion_pytorch_model", "pytorch_model"];
const PICKLE_EXTS: [&str; 4] = ["bin", "pt", "pth", "ckpt"];
/// Keys a training checkpoint nests its state dict under (Lightning: `state_dict`).
const NESTED_STATE_DICT_KEYS: [&str; 3] = ["state_dict", "model", "module"];

fn is_pickle(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| PICKLE_EXTS.contains(&e))
}

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

    /// The files holding this component's weights: safetensors when there are any, else
    /// PyTorch pickle files (read by [`Checkpoint::open`] without executing them).
    ///
    /// Order: the diffusers/transformers names (in `variant` order, single file or sharded
    /// index), then any single other `*.safetensors`, then the same for pickle files.
    pub fn weight_files(&self, variant: WeightVariant) -> Result<Vec<PathBuf>> {
        let variants: &[&str] = match variant {
            WeightVariant::Default => &["", ".fp16"],
            WeightVariant::Fp16 => &[".fp16", ""],
        };
        let named = |stems: &[&str], ext: &str| -> Vec<String> {
            let mut names = Vec::new();
            for v in variants {
                for stem in stems {
                    names.push(format!("{stem}{v}.{ext}"));
                    names.push(format!("{stem}{v}.{ext}.index.json"));
                }
            }
            names
        };
        let safetensors = named(&WEIGHT_STEMS, "safetensors");
        let pickles = named(&PICKLE_STEMS, "bin");
        let mut others: Vec<PathBuf> = Vec::new();
        let mut other_pickles: Vec<PathBuf> = Vec::new();
        let entries = std::fs::read_dir(&self.root).map_err(|source| Error::Io {
            path: self.root.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let p = entry.path();
            if p.extension().and_then(|e| e.to_str()) == Some("safetensors") {
                others.push(p);
            } else if is_pickle(&p) {
                other_pickles.push(p);
            }
        }
        for (names, any) in [(&safetensors, others), (&pickles, other_pickles)] {
            if let Some(found) = self.named_weights(names)? {
                return Ok(found);
            }
            // Any other single file of the format; several would be ambiguous.
            if any.len() == 1 {
                return Ok(any);
            }
        }
        Err(Error::MissingFile {
            path: self.root.join("diffusion_pytorch_model.safetensors"),
            hint: format!(
                "no weights in {} (looked for {}, {}, then a single *.safetensors / *.{} file)",
                self.root.display(),
                safetensors.join(", "),
                pickles.join(", "),
                PICKLE_EXTS.join(" / *.")
            ),
        })
    }

    /// The first of `names` present: the file itself, or the shards an index lists.
    fn named_weights(&self, names: &[String]) -> Result<Option<Vec<PathBuf>>> {
        for name in names {
            let path = self.root.join(name);
            if !path.is_file() {
                continue;
            }
            if name.ends_with(".index.json") {
                return self.shards(&path).map(Some);
            }
            return Ok(Some(vec![path]));
        }
        Ok(None)
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

    /// Open this component's weights (see [`ComponentDir::weight_files`]).
    pub fn checkpoint(&self, variant: WeightVariant) -> Result<Arc<Checkpoint>> {
        Checkpoint::open(&self.weight_files(variant)?)
    }
}

/// Where a checkpoint's tensors come from.
enum Store {
    /// Memory-mapped safetensors (one file or the shards of one checkpoint).
    Safetensors(candle_core::safetensors::MmapedSafetensors),
    /// `torch.save` zip archives, one reader per file (indexed like `Checkpoint::files`); a
    /// tensor is read from its archive entry when the model asks for it.
    Pickle(Vec<candle_core::pickle::PthTensors>),
}

/// A component's weights (memory-mapped safetensors, or PyTorch pickle files read without
/// executing them) with error reporting by file, key and shape.
pub struct Checkpoint {
    files: Vec<PathBuf>,
    store: Store,
    /// key → index into `files`.
    owner: BTreeMap<String, usize>,
    used: Mutex<HashSet<String>>,
    /// The typed error behind the last `candle_core::Error` handed to the model.
    last_error: Mutex<Option<Error>>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let format = match self.store {
            Store::Safetensors(_) => "safetensors",
            Store::Pickle(_) => "pickle",
        };
        f.debug_struct("Checkpoint")
            .field("files", &self.files)
            .field("format", &format)
            .finish()
    }
}

/// Open one `torch.save` file with candle's non-executing pickle reader.
fn open_pickle(path: &Path) -> Result<candle_core::pickle::PthTensors> {
    use std::io::Read;
    let bad = |reason: String| Error::Pickle {
        path: path.to_path_buf(),
        reason,
    };
    let mut magic = [0u8; 4];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut magic))
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
    if magic[..n] != *b"PK\x03\x04" {
        // A bare pickle stream (opcode PROTO first) is torch.save's legacy format: the
        // tensors' bytes follow the pickles unframed, which candle's reader does not parse.
        let reason = if n > 0 && magic[0] == 0x80 {
            "legacy (non-zip) torch.save format, written by torch < 1.6 or with \
             `_use_new_zipfile_serialization=False`, which the reader does not support; \
             re-save it with torch.save on torch >= 1.6 or convert it to safetensors"
        } else {
            "not a PyTorch checkpoint (expected the zip archive torch.save writes)"
        };
        return Err(bad(reason.into()));
    }
    let mut pth =
        candle_core::pickle::PthTensors::new(path, None).map_err(|e| bad(e.to_string()))?;
    for key in NESTED_STATE_DICT_KEYS {
        if !pth.tensor_infos().is_empty() {
            break;
        }
        // Absent keys are errors; the next key is tried.
        if let Ok(nested) = candle_core::pickle::PthTensors::new(path, Some(key)) {
            pth = nested;
        }
    }
    if pth.tensor_infos().is_empty() {
        return Err(bad(format!(
            "no tensors found: expected a state dict (a dict of tensors), at the top level or \
             under `{}`",
            NESTED_STATE_DICT_KEYS.join("` / `")
        )));
    }
    Ok(pth)
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
    /// Open the given weight files: one file or the shards of one checkpoint, all
    /// safetensors (memory-mapped) or all PyTorch pickle files (`.bin`, `.pt`, `.pth`,
    /// `.ckpt`; parsed without executing anything).
    pub fn open(files: &[PathBuf]) -> Result<Arc<Self>> {
        for f in files {
            if !f.is_file() {
                return Err(Error::MissingFile {
                    path: f.clone(),
                    hint: "weight file listed but absent".into(),
                });
            }
        }
        let pickles = files.iter().filter(|f| is_pickle(f)).count();
        let mut owner = BTreeMap::new();
        let store = if pickles == 0 {
            // SAFETY: the files are mapped read-only; modifying them while the model is loaded
            // is the caller's responsibility, as with every mmap-based loader.
            let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(files) }?;
            for (i, f) in files.iter().enumerate() {
                let single = unsafe { candle_core::safetensors::MmapedSafetensors::new(f) }?;
                for (k, _) in single.tensors() {
                    owner.insert(k, i);
                }
            }
            Store::Safetensors(st)
        } else if pickles == files.len() {
            let mut readers = Vec::with_capacity(files.len());
            for (i, f) in files.iter().enumerate() {
                let pth = open_pickle(f)?;
                for k in pth.tensor_infos().keys() {
                    owner.insert(k.clone(), i);
                }
                readers.push(pth);
            }
            Store::Pickle(readers)
        } else {
            return Err(Error::invalid(format!(
                "one checkpoint cannot mix safetensors and pickle files: {}",
                files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        Ok(Arc::new(Self {
            files: files.to_vec(),
            store,
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
                Some(typed) => Err(typed),
                None => Err(e),
            },
        }
    }

    fn fail(&self, e: impl Into<Error>) -> candle_core::Error {
        let e = e.into();
        let msg = e.to_string();
        *self.last_error.lock().expect("poisoned") = Some(e);
        candle_core::Error::Msg(msg)
    }

    /// Read one tensor (`key` is in `owner`) onto `dev`, in its stored dtype.
    fn load(&self, key: &str, dev: &Device) -> candle_core::Result<Tensor> {
        match &self.store {
            Store::Safetensors(st) => st.load(key, dev),
            Store::Pickle(readers) => {
                let file = self.owner[key];
                match readers[file].get(key) {
                    // A column-major tensor comes back as a transposed view; the layers (and
                    // the packed CPU convolution) expect row-major weights like safetensors'.
                    Ok(Some(t)) => t.contiguous()?.to_device(dev),
                    // Listed when the file was opened, so only a file changed since can miss it.
                    Ok(None) => Err(self.fail(LoadError::MissingTensor {
                        files: vec![self.files[file].clone()],
                        key: key.to_string(),
                    })),
                    Err(e) => Err(self.fail(Error::Pickle {
                        path: self.files[file].clone(),
                        reason: format!("tensor `{key}`: {e}"),
                    })),
                }
            }
        }
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
        let mut t = self.load(&key, dev)?;
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
        half_to_f32_parallel(&t, dtype).map_or_else(|| t.to_dtype(dtype), Ok)
    }
}

/// f16 / bf16 → f32 of a large contiguous CPU tensor in parallel chunks (`half`'s slice
/// conversion), the same values as candle's single-threaded `to_dtype`; `None` for every
/// other case. Loading a half-precision checkpoint as f32 on the CPU spent most of its time
/// there (3.3 s of a 1.2B-parameter UNet).
pub(crate) fn half_to_f32_parallel(t: &Tensor, dtype: DType) -> Option<Tensor> {
    use candle_core::{CpuStorage, Storage};
    use half::slice::HalfFloatSliceExt;
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    if dtype != DType::F32 || !t.device().is_cpu() || t.elem_count() < 4 * CHUNK {
        return None;
    }
    let (guard, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    fn convert<T: Sync>(src: &[T]) -> Vec<f32>
    where
        [T]: HalfFloatSliceExt,
    {
        let mut out = vec![0f32; src.len()];
        out.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(d, s)| s.convert_to_f32_slice(d));
        out
    }
    let out = match &*guard {
        Storage::Cpu(CpuStorage::F16(v)) => convert(v.get(start..end)?),
        Storage::Cpu(CpuStorage::BF16(v)) => convert(v.get(start..end)?),
        _ => return None,
    };
    Tensor::from_vec(out, t.shape(), &Device::Cpu).ok()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The parallel conversion gives candle's values exactly (f16 and bf16, several chunks
    /// and a short last one, a view that starts inside its storage) and leaves other cases
    /// to candle.
    #[test]
    fn half_to_f32_parallel_equals_candle() -> anyhow::Result<()> {
        let n = 5 * (1 << 16) + 123;
        let x = Tensor::randn(0f32, 3.0, n + 7, &Device::Cpu)?;
        for dt in [DType::F16, DType::BF16] {
            let h = x.to_dtype(dt)?;
            for t in [h.clone(), h.narrow(0, 7, n)?] {
                let got = half_to_f32_parallel(&t, DType::F32).expect("taken");
                let want = t.to_dtype(DType::F32)?;
                assert_eq!(got.to_vec1::<f32>()?, want.to_vec1::<f32>()?, "{dt:?}");
            }
            assert!(half_to_f32_parallel(&h, DType::F16).is_none());
            assert!(half_to_f32_parallel(&h.narrow(0, 0, 10)?, DType::F32).is_none());
        }
        assert!(half_to_f32_parallel(&x, DType::F32).is_none());
        Ok(())
    }
}
