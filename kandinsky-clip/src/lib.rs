//! # kandinsky-clip
//!
//! The text and image encoders of Kandinsky 2.2 and 2.1, numerically equal to transformers /
//! diffusers:
//! - [`ClipTextModelWithProjection`] (OpenCLIP ViT-bigG/14 text tower; also OpenAI's ViT-L
//!   with `quick_gelu` for the Kandinsky 2.1 prior) implementing
//!   [`kandinsky_core::traits::TextEncoder`];
//! - [`ClipVisionModelWithProjection`] implementing [`kandinsky_core::traits::ImageEncoder`];
//! - [`ClipTokenizer`]: the CLIP BPE built from `vocab.json` + `merges.txt` (or a
//!   `tokenizer.json`);
//! - [`ClipImageProcessor`]: `preprocessor_config.json` with Pillow's bicubic resampling;
//! - [`MultilingualClip`]: Kandinsky 2.1's multilingual text encoder (diffusers'
//!   `MultilingualCLIP`: XLM-RoBERTa large + `LinearTransformation` of the masked mean), another
//!   [`kandinsky_core::traits::TextEncoder`], with its [`XlmRobertaTokenizer`].
#![warn(missing_docs)]

pub mod configuration_clip;
pub mod configuration_xlm_roberta;
pub mod image_processing_clip;
pub mod modeling_clip;
pub mod modeling_mclip;
pub mod pil_resample;
pub mod tokenization_clip;
pub mod tokenization_xlm_roberta;
pub mod tokenizer_config;

pub use configuration_clip::{ClipTextConfig, ClipVisionConfig, EosPooling};
pub use configuration_xlm_roberta::MClipConfig;
pub use image_processing_clip::{ClipImageProcessor, ClipImageProcessorConfig};
pub use modeling_clip::{ClipTextModelWithProjection, ClipVisionModelWithProjection};
pub use modeling_mclip::MultilingualClip;
pub use tokenization_clip::{ClipTokenizer, ClipTokenizerConfig, TokenizedBatch};
pub use tokenization_xlm_roberta::{XlmRobertaTokenizer, XlmRobertaTokenizerConfig};
pub use tokenizer_config::{SpecialTokensConfig, TokenSpec};
