//! # kandinsky-unet
//!
//! The Kandinsky 2.2 decoder UNet (diffusers `UNet2DConditionModel` with SimpleCrossAttn
//! blocks, scale-shift ResNets and image conditioning), with its inpainting (9 input
//! channels) and ControlNet-depth (`image_hint`) variants, and the Kandinsky 2.1 decoder and
//! inpainting UNets (`text_image` / `text_image_proj`: conditioned on the CLIP image
//! embedding, the pooled M-CLIP text embedding and the M-CLIP hidden states; see
//! [`UNet2DConditionModel::forward_text_image`]). Numerically exact to diffusers; loads the
//! real checkpoints key for key.
//!
//! ```no_run
//! # fn main() -> kandinsky_core::Result<()> {
//! use candle_core::{DType, Device};
//! use kandinsky_unet::UNet2DConditionModel;
//! let unet = UNet2DConditionModel::from_dir("kandinsky-2-2-decoder/unet", DType::F16, &Device::Cpu)?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod attention_processor;
pub mod embeddings;
pub mod graph;
pub mod layers;
pub mod resnet;
pub mod unet_2d_blocks;
pub mod unet_2d_condition;

pub use graph::GraphedUNet;
pub use unet_2d_condition::{
    AddEmbedding, AdditionEmbedType, EncoderHidDimType, EncoderHidProj, PerBlock,
    UNet2DConditionConfig, UNet2DConditionModel,
};
