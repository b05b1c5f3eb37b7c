//! Helpers shared by the end-to-end parity tests (`e2e.rs`, `e2e21.rs`).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::Tensor;
use kandinsky_core::noise::RecordedNoise;
use kandinsky_core::testing::{assert_close, fixtures_dir, get};
use kandinsky_pipeline::images;

/// ≤ 1e-3 max abs on the final f32 outputs (images in [0, 1], embeddings).
pub const TOL: f32 = 1e-3;

/// A tiny fixture pipeline folder.
pub fn tiny(repo: &str) -> PathBuf {
    fixtures_dir().join("tiny").join(repo)
}

/// The Gaussian tensors diffusers drew (`noise_000`, ... in call order), for replay.
pub fn recorded(f: &HashMap<String, Tensor>) -> RecordedNoise {
    RecordedNoise::with_prefix(f, "noise_")
}

/// Images in [-1, 1] against the fixture's `output` (diffusers' images in [0, 1]).
pub fn check_images(
    name: &str,
    images_pm1: &Tensor,
    f: &HashMap<String, Tensor>,
) -> anyhow::Result<()> {
    let got = images::to_unit_range(images_pm1)?;
    assert_close(name, &got, get(f, "output")?, TOL)?;
    Ok(())
}
