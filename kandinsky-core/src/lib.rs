//! # kandinsky-core
//!
//! What every kandinsky-rs model crate needs:
//! - [`traits`]: the shared tensor traits the pipeline composes (text/image encoders,
//!   embedding prior, denoiser, latent codec, scheduler);
//! - [`loading`]: diffusers-layout folders, memory-mapped safetensors (sharded, `fp16`
//!   variants), typed errors naming file, key and shapes;
//! - [`manifest`]: proving a model requests exactly a real checkpoint's tensors;
//! - [`attention`]: the single attention entry point;
//! - [`nn`], [`embeddings`]: layers shared by several networks;
//! - [`noise`]: seeded host-side noise (same seed, same image on every device);
//! - [`device`]: dtype / device choice; [`error`]: the typed errors.
#![warn(missing_docs)]

/// Whether the environment variable `$name` is `1`, read once per call site: the on/off
/// runtime switches (README's table). Expands to a `bool` expression. With `default on`
/// the switch is on unless the variable is `0` (the switches a GPU run made the default,
/// kept as opt-outs).
macro_rules! env_switch {
    ($name:literal) => {{
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| std::env::var($name).as_deref() == Ok("1"))
    }};
    ($name:literal, default on) => {{
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| std::env::var($name).as_deref() != Ok("0"))
    }};
}

pub mod attention;
mod cpu_act;
mod cpu_attention;
pub mod cpu_conv;
pub mod cpu_gemm;
mod cpu_norm;
mod cpu_winograd;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod embeddings;
pub mod error;
pub mod gpu_conv;
pub mod graph;
pub mod loading;
pub mod manifest;
pub mod nn;
pub mod noise;
pub mod testing;
pub mod traits;

pub use error::{Error, LoadError, Result};
pub use loading::ModelConfig;
