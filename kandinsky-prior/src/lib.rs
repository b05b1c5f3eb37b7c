//! # kandinsky-prior
//!
//! diffusers' `PriorTransformer` (the Kandinsky 2.1/2.2 diffusion prior) on candle: a causal
//! transformer that predicts a CLIP image embedding from a noisy one, the timestep and the CLIP
//! text encoding. It implements [`kandinsky_core::traits::EmbeddingPrior`]; the sampling loop
//! (UnCLIP scheduler, guidance) lives in kandinsky-pipeline.
//!
//! - [`prior_transformer`]: the model and its config;
//! - [`attention`], [`attention_processor`]: its transformer blocks;
//! - [`zero_embedding`]: the zero-image negative embedding and its file cache.
#![warn(missing_docs)]

pub mod attention;
pub mod attention_processor;
pub mod graph;
pub mod prior_transformer;
pub mod zero_embedding;

pub use graph::GraphedPrior;
pub use prior_transformer::{PriorTransformer, PriorTransformerConfig};
pub use zero_embedding::{zero_image_embedding, ZeroImageEmbedding, NEGATIVE_IMAGE_EMBEDS_KEY};
