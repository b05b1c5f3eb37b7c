//! # kandinsky-movq
//!
//! The MoVQ image codec of Kandinsky 2.1/2.2: diffusers' `VQModel` with a spatially
//! conditioned decoder (`norm_type: "spatial"`). [`VQModel::encode`] turns an image in
//! [-1, 1] into latents (img2img, inpainting), [`VQModel::decode`] turns latents back into
//! an image; [`image_processor`] converts between 8-bit RGB and those tensors exactly as the
//! diffusers pipelines do. Loads the real `movq/` checkpoint unchanged (see
//! [`VQModel::load`]); f32, f16 and bf16, with norm statistics and softmax in f32.
//!
//! Large decodes run their convolutions and norms in bands of rows ([`conv`],
//! [`normalization`]) so a 1024² decode stays within a few GB on the CPU.
#![warn(missing_docs)]

pub mod attention_processor;
pub mod conv;
pub mod downsampling;
pub mod image_processor;
pub mod normalization;
pub mod random;
pub mod resnet;
pub mod unet_2d_blocks;
pub mod upsampling;
pub mod vae;
pub mod vq_model;

pub use image_processor::{rgb8_to_tensor, tensor_to_rgb8, Rgb8Image};
pub use vq_model::{VQModel, VQModelConfig};
