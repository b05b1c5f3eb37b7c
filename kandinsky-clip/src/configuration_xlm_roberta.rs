//! The `config.json` of Kandinsky 2.1's text encoder: transformers' `XLMRobertaConfig` plus the
//! two fields diffusers' `MCLIPConfig` adds (`transformerDimensions`, `numDims`).
//!
//! Absent fields take transformers' / diffusers' defaults; unknown fields (`architectures`,
//! dropout rates, `use_cache`, ...) are ignored; values this crate does not implement are
//! rejected by [`MClipConfig::validate`] with [`Error::UnsupportedConfig`].

use kandinsky_core::nn::Activation;
use kandinsky_core::ModelConfig;
use kandinsky_core::{Error, Result};
use serde::Deserialize;

fn default_vocab_size() -> usize {
    30522
}
fn default_hidden() -> usize {
    768
}
fn default_layers() -> usize {
    12
}
fn default_heads() -> usize {
    12
}
fn default_intermediate() -> usize {
    3072
}
fn default_hidden_act() -> String {
    "gelu".into()
}
fn default_max_positions() -> usize {
    512
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_pad() -> u32 {
    1
}
fn default_position_type() -> String {
    "absolute".into()
}
fn default_transformer_dims() -> usize {
    1024
}
fn default_num_dims() -> usize {
    768
}

/// `text_encoder/config.json` of kandinsky-2-1 (`MCLIPConfig`, an `XLMRobertaConfig`).
#[derive(Debug, Clone, Deserialize)]
pub struct MClipConfig {
    /// Vocabulary size (250002 for XLM-R large).
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    /// Width of the transformer (1024).
    #[serde(default = "default_hidden")]
    pub hidden_size: usize,
    /// Number of encoder layers (24).
    #[serde(default = "default_layers")]
    pub num_hidden_layers: usize,
    /// Number of attention heads (16).
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    /// Width of the feed-forward block (4096).
    #[serde(default = "default_intermediate")]
    pub intermediate_size: usize,
    /// Feed-forward activation (`gelu`, the exact erf form).
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// LayerNorm epsilon (1e-5 in the real config).
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Rows of the position table (514 = 512 positions after the `pad_token_id + 1` offset).
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// The padding id (1): RoBERTa numbers positions from `pad_token_id + 1` and gives padding
    /// tokens the position `pad_token_id`.
    #[serde(default = "default_pad")]
    pub pad_token_id: u32,
    /// Rows of the token-type table (1); every token uses type 0.
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// Only `"absolute"` is implemented (the Kandinsky checkpoint's value).
    #[serde(default = "default_position_type")]
    pub position_embedding_type: String,
    /// Output width of `LinearTransformation` (768: the 2.1 UNet's `text_embeds`).
    #[serde(rename = "numDims", default = "default_num_dims")]
    pub num_dims: usize,
    /// Input width of `LinearTransformation`; must equal `hidden_size`.
    #[serde(rename = "transformerDimensions", default = "default_transformer_dims")]
    pub transformer_dimensions: usize,
}

impl Default for MClipConfig {
    /// The effective config of kandinsky-2-1's `text_encoder` (XLM-R large + 1024→768).
    fn default() -> Self {
        Self::kandinsky_2_1()
    }
}

impl MClipConfig {
    /// The effective config of kandinsky-2-1's `text_encoder` (REFERENCE.md §1.4).
    pub fn kandinsky_2_1() -> Self {
        Self {
            vocab_size: 250002,
            hidden_size: 1024,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            intermediate_size: 4096,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-5,
            max_position_embeddings: 514,
            pad_token_id: 1,
            type_vocab_size: 1,
            position_embedding_type: "absolute".into(),
            num_dims: 768,
            transformer_dimensions: 1024,
        }
    }

    /// The feed-forward activation (`hidden_act`).
    pub fn activation(&self) -> Result<Activation> {
        Activation::from_name(&self.hidden_act).map_err(|_| {
            Error::unsupported(
                "hidden_act",
                &self.hidden_act,
                "gelu, gelu_new, gelu_pytorch_tanh, quick_gelu, silu",
            )
        })
    }

    /// The longest input: positions run from `pad_token_id + 1` to
    /// `max_position_embeddings − 1` (512 tokens for the real model).
    pub fn max_positions(&self) -> usize {
        self.max_position_embeddings
            .saturating_sub(self.pad_token_id as usize + 1)
    }

    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

impl ModelConfig for MClipConfig {
    /// Reject values this implementation does not support.
    fn validate(&self) -> Result<()> {
        if self.position_embedding_type != "absolute" {
            // transformers 5 implements only absolute positions for XLM-R, as does this crate.
            return Err(Error::unsupported(
                "position_embedding_type",
                &self.position_embedding_type,
                "absolute",
            ));
        }
        self.activation()?;
        for (f, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("type_vocab_size", self.type_vocab_size),
            ("numDims", self.num_dims),
        ] {
            if v == 0 {
                return Err(Error::unsupported(f, v, "a positive integer"));
            }
        }
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            return Err(Error::unsupported(
                "num_attention_heads",
                self.num_attention_heads,
                format!("a divisor of hidden_size {}", self.hidden_size),
            ));
        }
        if self.transformer_dimensions != self.hidden_size {
            // LinearTransformation reads the transformer's hidden states.
            return Err(Error::unsupported(
                "transformerDimensions",
                self.transformer_dimensions,
                format!("hidden_size {}", self.hidden_size),
            ));
        }
        if self.pad_token_id as usize >= self.vocab_size {
            return Err(Error::unsupported(
                "pad_token_id",
                self.pad_token_id,
                format!("an id below vocab_size {}", self.vocab_size),
            ));
        }
        if self.max_positions() < 2 {
            return Err(Error::unsupported(
                "max_position_embeddings",
                self.max_position_embeddings,
                format!("at least pad_token_id + 3 = {}", self.pad_token_id + 3),
            ));
        }
        Ok(())
    }
}
