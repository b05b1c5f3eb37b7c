//! Checkpoint manifests: every tensor name, shape and stored dtype of a real checkpoint.
//!
//! The fixture generator writes one manifest per real component (`fixtures/manifests/`),
//! obtained by instantiating the diffusers/transformers class from the real config on the
//! meta device. A model built with a [`RecordingBackend`] reports the names and shapes it
//! asks for without allocating them, and [`Manifest::check`] compares both: this proves that
//! the real checkpoint loads, key for key, without downloading gigabytes.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::error::Result;

/// One tensor of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ManifestEntry {
    /// State-dict key.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Stored dtype as safetensors names it (`F32`, `F16`, ...).
    pub dtype: String,
}

/// Every tensor of one real checkpoint component.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// E.g. `kandinsky-2-2-decoder/unet`.
    pub component: String,
    /// The Python class that was instantiated.
    pub class: String,
    /// The tensors, sorted by name.
    pub tensors: Vec<ManifestEntry>,
}

/// Differences between a manifest and what a model asked for.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ManifestReport {
    /// In the checkpoint, never requested (would be left unused).
    pub unused: Vec<String>,
    /// Requested, absent from the checkpoint (loading would fail).
    pub missing: Vec<String>,
    /// Requested with another shape: (name, manifest shape, requested shape).
    pub mismatched: Vec<(String, Vec<usize>, Vec<usize>)>,
}

impl ManifestReport {
    /// True when the model requests exactly the manifest's names and shapes.
    pub fn is_exact(&self) -> bool {
        self.unused.is_empty() && self.missing.is_empty() && self.mismatched.is_empty()
    }
}

impl std::fmt::Display for ManifestReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} unused, {} missing, {} mismatched",
            self.unused.len(),
            self.missing.len(),
            self.mismatched.len()
        )?;
        for n in self.unused.iter().take(20) {
            writeln!(f, "  unused:   {n}")?;
        }
        for n in self.missing.iter().take(20) {
            writeln!(f, "  missing:  {n}")?;
        }
        for (n, a, b) in self.mismatched.iter().take(20) {
            writeln!(f, "  mismatch: {n} checkpoint {a:?} model {b:?}")?;
        }
        Ok(())
    }
}

impl Manifest {
    /// Read a manifest JSON file.
    pub fn read(path: &Path) -> Result<Self> {
        crate::loading::read_json(path)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// True if the manifest lists no tensor.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Compare with the names and shapes a model requested.
    pub fn check(&self, requested: &BTreeMap<String, Vec<usize>>) -> ManifestReport {
        let mut report = ManifestReport::default();
        let known: BTreeMap<&str, &Vec<usize>> = self
            .tensors
            .iter()
            .map(|e| (e.name.as_str(), &e.shape))
            .collect();
        for (name, shape) in &known {
            match requested.get(*name) {
                None => report.unused.push(name.to_string()),
                Some(s) if s != *shape => {
                    report
                        .mismatched
                        .push((name.to_string(), (*shape).clone(), s.clone()))
                }
                Some(_) => {}
            }
        }
        for name in requested.keys() {
            if !known.contains_key(name.as_str()) {
                report.missing.push(name.clone());
            }
        }
        report
    }
}

/// A `VarBuilder` backend that records every requested name and shape and hands out
/// zero-stride views of a single zero, so even a 1.2B-parameter model is "built" in kilobytes.
#[derive(Debug, Clone, Default)]
pub struct RecordingBackend {
    requested: Arc<Mutex<BTreeMap<String, Vec<usize>>>>,
}

impl RecordingBackend {
    /// A fresh recorder.
    pub fn new() -> Self {
        Self::default()
    }

    /// A `VarBuilder` that records into this backend.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// What was requested so far.
    pub fn requested(&self) -> BTreeMap<String, Vec<usize>> {
        self.requested.lock().expect("poisoned").clone()
    }
}

impl SimpleBackend for RecordingBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.requested
            .lock()
            .expect("poisoned")
            .insert(name.to_string(), s.dims().to_vec());
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("the recording backend needs a shape for `{name}`")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// Build a model with a [`RecordingBackend`] and return what it requested.
pub fn record_requests<M>(
    f: impl FnOnce(VarBuilder<'static>) -> Result<M>,
) -> Result<BTreeMap<String, Vec<usize>>> {
    let rec = RecordingBackend::new();
    let _model = f(rec.var_builder(DType::F32, &Device::Cpu))?;
    Ok(rec.requested())
}
