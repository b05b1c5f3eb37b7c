//! The `config.json` of transformers' `CLIPTextModelWithProjection` and
//! `CLIPVisionModelWithProjection` (transformers `configuration_clip.py`).
//!
//! Absent fields take transformers' defaults; unknown fields are ignored; values this crate
//! does not implement are rejected by [`ClipTextConfig::validate`] /
//! [`ClipVisionConfig::validate`] with [`Error::UnsupportedConfig`].

use kandinsky_core::nn::Activation;
use kandinsky_core::ModelConfig;
use kandinsky_core::{Error, Result};
use serde::Deserialize;

fn default_vocab_size() -> usize {
    49408
}
fn default_text_hidden() -> usize {
    512
}
fn default_text_intermediate() -> usize {
    2048
}
fn default_projection_dim() -> usize {
    512
}
fn default_layers() -> usize {
    12
}
fn default_text_heads() -> usize {
    8
}
fn default_max_positions() -> usize {
    77
}
fn default_hidden_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_eos() -> serde_json::Value {
    serde_json::Value::from(49407)
}
fn default_vision_hidden() -> usize {
    768
}
fn default_vision_intermediate() -> usize {
    3072
}
fn default_vision_heads() -> usize {
    12
}
fn default_channels() -> usize {
    3
}
fn default_image_size() -> usize {
    224
}
fn default_patch_size() -> usize {
    32
}

/// How the pooled text feature is located (transformers `CLIPTextTransformer.forward`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EosPooling {
    /// `eos_token_id == 2` (configs saved before transformers PR #24773, e.g. Kandinsky 2.2):
    /// the first position of the highest token id of each row.
    ArgmaxId,
    /// Any other `eos_token_id`: the first position holding that id.
    FirstEos(u32),
}

/// `text_encoder/config.json` (`CLIPTextConfig`).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    /// Vocabulary size (49408 for CLIP).
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    /// Width of the transformer.
    #[serde(default = "default_text_hidden")]
    pub hidden_size: usize,
    /// Width of the MLP.
    #[serde(default = "default_text_intermediate")]
    pub intermediate_size: usize,
    /// Width of `text_projection`'s output (`text_embeds`).
    #[serde(default = "default_projection_dim")]
    pub projection_dim: usize,
    /// Number of encoder layers.
    #[serde(default = "default_layers")]
    pub num_hidden_layers: usize,
    /// Number of attention heads.
    #[serde(default = "default_text_heads")]
    pub num_attention_heads: usize,
    /// Number of positions (77).
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// `gelu` (bigG, Kandinsky 2.2) or `quick_gelu` (OpenAI ViT-L, Kandinsky 2.1).
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// `eos_token_id`: selects the pooling rule (see [`EosPooling`]).
    #[serde(default = "default_eos")]
    pub eos_token_id: serde_json::Value,
}

/// `image_encoder/config.json` (`CLIPVisionConfig`).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipVisionConfig {
    /// Width of the transformer.
    #[serde(default = "default_vision_hidden")]
    pub hidden_size: usize,
    /// Width of the MLP.
    #[serde(default = "default_vision_intermediate")]
    pub intermediate_size: usize,
    /// Width of `visual_projection`'s output (`image_embeds`).
    #[serde(default = "default_projection_dim")]
    pub projection_dim: usize,
    /// Number of encoder layers.
    #[serde(default = "default_layers")]
    pub num_hidden_layers: usize,
    /// Number of attention heads.
    #[serde(default = "default_vision_heads")]
    pub num_attention_heads: usize,
    /// Input channels (3).
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    /// Square input size in pixels.
    #[serde(default = "default_image_size")]
    pub image_size: usize,
    /// Square patch size in pixels.
    #[serde(default = "default_patch_size")]
    pub patch_size: usize,
    /// `gelu` or `quick_gelu`.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

fn check_heads(hidden: usize, heads: usize) -> Result<()> {
    if heads == 0 || hidden % heads != 0 {
        return Err(Error::unsupported(
            "num_attention_heads",
            heads,
            format!("a divisor of hidden_size {hidden}"),
        ));
    }
    Ok(())
}

fn activation(name: &str) -> Result<Activation> {
    match name {
        "gelu" | "quick_gelu" => Activation::from_name(name),
        other => Err(Error::unsupported("hidden_act", other, "gelu, quick_gelu")),
    }
}

fn nonzero(field: &str, v: usize) -> Result<()> {
    if v == 0 {
        return Err(Error::unsupported(field, v, "a positive integer"));
    }
    Ok(())
}

impl Default for ClipTextConfig {
    /// transformers' `CLIPTextConfig()` defaults (OpenAI ViT-B/32's text tower).
    fn default() -> Self {
        Self {
            vocab_size: default_vocab_size(),
            hidden_size: default_text_hidden(),
            intermediate_size: default_text_intermediate(),
            projection_dim: default_projection_dim(),
            num_hidden_layers: default_layers(),
            num_attention_heads: default_text_heads(),
            max_position_embeddings: default_max_positions(),
            hidden_act: default_hidden_act(),
            layer_norm_eps: default_eps(),
            eos_token_id: default_eos(),
        }
    }
}

impl ClipTextConfig {
    /// The effective config of kandinsky-2-2-prior's `text_encoder` (OpenCLIP ViT-bigG/14
    /// text tower, legacy `eos_token_id` 2).
    pub fn kandinsky_2_2_prior() -> Self {
        Self {
            hidden_size: 1280,
            intermediate_size: 5120,
            projection_dim: 1280,
            num_hidden_layers: 32,
            num_attention_heads: 20,
            hidden_act: "gelu".into(),
            eos_token_id: serde_json::Value::from(2),
            ..Self::default()
        }
    }

    /// The activation of the MLPs.
    pub fn activation(&self) -> Result<Activation> {
        activation(&self.hidden_act)
    }

    /// The pooling rule implied by `eos_token_id`.
    pub fn pooling(&self) -> Result<EosPooling> {
        match self.eos_token_id.as_u64() {
            Some(2) => Ok(EosPooling::ArgmaxId),
            Some(id) if id < self.vocab_size as u64 => Ok(EosPooling::FirstEos(id as u32)),
            _ => Err(Error::unsupported(
                "eos_token_id",
                &self.eos_token_id,
                "one token id below vocab_size",
            )),
        }
    }

    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

impl ModelConfig for ClipTextConfig {
    /// Reject values this implementation does not support.
    fn validate(&self) -> Result<()> {
        check_heads(self.hidden_size, self.num_attention_heads)?;
        activation(&self.hidden_act)?;
        self.pooling()?;
        for (f, v) in [
            ("vocab_size", self.vocab_size),
            ("intermediate_size", self.intermediate_size),
            ("projection_dim", self.projection_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            nonzero(f, v)?;
        }
        Ok(())
    }
}

impl ClipVisionConfig {
    /// The activation of the MLPs.
    pub fn activation(&self) -> Result<Activation> {
        activation(&self.hidden_act)
    }

    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Number of positions: patches + the class token.
    pub fn num_positions(&self) -> usize {
        self.grid() * self.grid() + 1
    }

    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

impl ModelConfig for ClipVisionConfig {
    /// Reject values this implementation does not support.
    fn validate(&self) -> Result<()> {
        check_heads(self.hidden_size, self.num_attention_heads)?;
        activation(&self.hidden_act)?;
        nonzero("patch_size", self.patch_size)?;
        if self.image_size % self.patch_size != 0 {
            // transformers floors the grid; the checkpoints we load never need that.
            return Err(Error::unsupported(
                "image_size",
                self.image_size,
                format!("a multiple of patch_size {}", self.patch_size),
            ));
        }
        if self.num_channels != 3 {
            return Err(Error::unsupported("num_channels", self.num_channels, "3"));
        }
        for (f, v) in [
            ("image_size", self.image_size),
            ("intermediate_size", self.intermediate_size),
            ("projection_dim", self.projection_dim),
        ] {
            nonzero(f, v)?;
        }
        Ok(())
    }
}
