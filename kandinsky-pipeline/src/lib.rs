//! # kandinsky-pipeline
//!
//! Thin composition of the kandinsky-rs networks into diffusers' Kandinsky 2.2 flows:
//! the prior (prompt → CLIP image embedding, with fusion and emb2emb) and the decoder flows
//! (text2img, img2img, inpainting, ControlNet); and Kandinsky 2.1's (the same prior with
//! ViT-L/14 towers; a decoder also conditioned on the prompt through the multilingual
//! M-CLIP encoder, for text2img, img2img and inpainting). Flows depend only on the shared traits of
//! kandinsky-core; the loaders build the concrete models from diffusers-layout folders.
//! The library never prints: progress goes through a step callback, warnings through `tracing`.
#![warn(missing_docs)]

pub mod callback;
pub mod decoder;
pub mod guidance;
pub mod hub;
pub mod images;
pub mod load;
pub mod prior;

pub use callback::{Callback, Control, Hooks, Stage, StepEvent};
pub use decoder::{DecoderModels, DecoderOptions, DecoderText};
pub use load::{
    DecoderPipeline, DecoderPlacements, DecoderTextEncoder, ImageEncoderUse, Placement,
    PriorPipeline, PriorPlacements, SchedulerChoice,
};
pub use prior::{ImageEmbeds, PriorModels, PriorOptions};
