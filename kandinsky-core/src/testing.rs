//! Helpers for parity tests against the committed diffusers fixtures.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// The `fixtures/` folder of the workspace (or `$KANDINSKY_FIXTURES`).
pub fn fixtures_dir() -> PathBuf {
    if let Ok(p) = std::env::var("KANDINSKY_FIXTURES") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|p| p.join("fixtures"))
        .unwrap_or_else(|| PathBuf::from("fixtures"))
}

/// Load every tensor of a fixture safetensors file (relative to [`fixtures_dir`]) on the CPU.
pub fn load_fixture(relative: &str) -> Result<HashMap<String, Tensor>> {
    let path = fixtures_dir().join(relative);
    if !path.is_file() {
        return Err(Error::MissingFile {
            path,
            hint: "run `cargo xtask fixtures` to regenerate the fixtures".into(),
        });
    }
    Ok(candle_core::safetensors::load(&path, &Device::Cpu)?)
}

/// Fetch one tensor of a loaded fixture, with a clear error.
pub fn get<'a>(fixture: &'a HashMap<String, Tensor>, key: &str) -> Result<&'a Tensor> {
    fixture
        .get(key)
        .ok_or_else(|| Error::invalid(format!("fixture has no tensor `{key}`")))
}

/// Max absolute and max relative (to the reference's max magnitude) difference.
#[derive(Debug, Clone, Copy)]
pub struct Diff {
    /// max |a − b|.
    pub max_abs: f32,
    /// max |a − b| / max |b|.
    pub rel: f32,
}

/// Compare `actual` against `reference` (shapes must agree).
pub fn diff(actual: &Tensor, reference: &Tensor) -> Result<Diff> {
    if actual.dims() != reference.dims() {
        return Err(Error::invalid(format!(
            "shape {:?} differs from the reference {:?}",
            actual.dims(),
            reference.dims()
        )));
    }
    let a = actual.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let r = reference.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let max_abs = (&a - &r)?.abs()?.max_all()?.to_scalar::<f32>()?;
    if max_abs.is_nan() || a.sum_all()?.to_scalar::<f32>()?.is_nan() {
        return Ok(Diff {
            max_abs: f32::NAN,
            rel: f32::NAN,
        });
    }
    let scale = r
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?
        .max(f32::MIN_POSITIVE);
    Ok(Diff {
        max_abs,
        rel: max_abs / scale,
    })
}

/// Assert `actual` is within `tol` (max abs) of `reference`, printing both errors.
pub fn assert_close(what: &str, actual: &Tensor, reference: &Tensor, tol: f32) -> Result<Diff> {
    let d = diff(actual, reference)?;
    eprintln!(
        "{what}: max abs {:.3e}, rel {:.3e} (tolerance {tol:.0e})",
        d.max_abs, d.rel
    );
    if d.max_abs.is_nan() || d.max_abs > tol {
        return Err(Error::invalid(format!(
            "{what}: max abs difference {} exceeds {tol} (rel {})",
            d.max_abs, d.rel
        )));
    }
    Ok(d)
}
