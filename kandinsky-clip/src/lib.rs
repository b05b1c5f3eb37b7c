//! # kandinsky-clip
//!
//! The CLIP pieces of the Kandinsky 2.2 prior, numerically equal to transformers:
//! - [`ClipTextModelWithProjection`] (OpenCLIP ViT-bigG/14 text tower; also OpenAI's ViT-L
//!   with `quick_gelu` for Kandinsky 2.1) implementing [`kandinsky_core::traits::TextEncoder`];
//! - [`ClipVisionModelWithProjection`] implementing [`kandinsky_core::traits::ImageEncoder`];
//! - [`ClipTokenizer`]: the CLIP BPE built from `vocab.json` + `merges.txt` (or a
//!   `tokenizer.json`);
//! - [`ClipImageProcessor`]: `preprocessor_config.json` with Pillow's bicubic resampling.
//!
//! Kandinsky 2.1's multilingual XLM-Roberta text encoder (M-CLIP) will live beside these as
//! another [`kandinsky_core::traits::TextEncoder`].
#![warn(missing_docs)]

pub mod configuration_clip;
pub mod image_processing_clip;
pub mod modeling_clip;
pub mod pil_resample;
pub mod tokenization_clip;

pub use configuration_clip::{ClipTextConfig, ClipVisionConfig, EosPooling};
pub use image_processing_clip::{ClipImageProcessor, ClipImageProcessorConfig};
pub use modeling_clip::{ClipTextModelWithProjection, ClipVisionModelWithProjection};
pub use tokenization_clip::{ClipTokenizer, ClipTokenizerConfig, TokenizedBatch};
