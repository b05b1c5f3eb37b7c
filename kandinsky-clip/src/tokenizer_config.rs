//! `tokenizer_config.json` / `special_tokens_map.json`: the special tokens and
//! `model_max_length` both Kandinsky tokenizers (CLIP BPE, XLM-R SentencePiece) read.

use std::path::Path;

use kandinsky_core::{Error, Result};
use serde::Deserialize;

/// A special token as `tokenizer_config.json` / `special_tokens_map.json` write it: a plain
/// string or an `AddedToken` object.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TokenSpec {
    /// `"<|endoftext|>"`.
    Plain(String),
    /// `{"content": "<|endoftext|>", "normalized": true, ...}`.
    Added {
        /// The token text.
        content: String,
        /// Whether the token is matched in the normalised (lower-cased) text.
        #[serde(default)]
        normalized: Option<bool>,
    },
}

impl TokenSpec {
    /// The token text.
    pub fn content(&self) -> &str {
        match self {
            Self::Plain(s) => s,
            Self::Added { content, .. } => content,
        }
    }

    /// transformers registers a plain-string special token with `normalized = false`.
    pub(crate) fn normalized(&self) -> bool {
        match self {
            Self::Plain(_) => false,
            Self::Added { normalized, .. } => normalized.unwrap_or(false),
        }
    }
}

/// The fields of `tokenizer_config.json` / `special_tokens_map.json` the tokenizers use;
/// absent tokens fall back to each tokenizer's own defaults.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SpecialTokensConfig {
    /// Beginning of sequence (`<|startoftext|>` for CLIP, `<s>` for XLM-R).
    #[serde(default)]
    pub bos_token: Option<TokenSpec>,
    /// End of sequence (`<|endoftext|>`, `</s>`).
    #[serde(default)]
    pub eos_token: Option<TokenSpec>,
    /// Padding (`<|endoftext|>` for Kandinsky 2.2's CLIP, `!` for 2.1's, `<pad>` for XLM-R).
    #[serde(default)]
    pub pad_token: Option<TokenSpec>,
    /// Unknown token (`<|endoftext|>`, `<unk>`).
    #[serde(default)]
    pub unk_token: Option<TokenSpec>,
    /// Mask token (XLM-R's `<mask>`; CLIP has none).
    #[serde(default)]
    pub mask_token: Option<TokenSpec>,
    /// transformers' `model_max_length`.
    #[serde(default)]
    pub model_max_length: Option<f64>,
}

impl SpecialTokensConfig {
    /// Read `tokenizer_config.json` then fill gaps from `special_tokens_map.json` (both
    /// optional; a malformed file is [`Error::Json`] naming it).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let mut cfg = Self::default();
        for name in ["tokenizer_config.json", "special_tokens_map.json"] {
            let path = dir.join(name);
            if !path.is_file() {
                continue;
            }
            let other: Self = kandinsky_core::loading::read_json(&path)?;
            cfg.bos_token = cfg.bos_token.or(other.bos_token);
            cfg.eos_token = cfg.eos_token.or(other.eos_token);
            cfg.pad_token = cfg.pad_token.or(other.pad_token);
            cfg.unk_token = cfg.unk_token.or(other.unk_token);
            cfg.mask_token = cfg.mask_token.or(other.mask_token);
            cfg.model_max_length = cfg.model_max_length.or(other.model_max_length);
        }
        Ok(cfg)
    }

    /// `spec`, or a plain `default` when the files do not name the token.
    pub fn token_or(spec: &Option<TokenSpec>, default: &str) -> TokenSpec {
        spec.clone()
            .unwrap_or_else(|| TokenSpec::Plain(default.to_string()))
    }

    /// `model_max_length` as an integer; transformers' "unbounded" sentinel (≥ 1e29) and an
    /// absent value are `None`.
    pub fn model_max_length(&self) -> Result<Option<usize>> {
        match self.model_max_length {
            None => Ok(None),
            Some(v) if v >= 1e29 => Ok(None),
            Some(v) if v >= 2.0 && v.fract() == 0.0 && v <= 1e6 => Ok(Some(v as usize)),
            Some(v) => Err(Error::unsupported(
                "model_max_length",
                v,
                "an integer >= 2 (start and end tokens)",
            )),
        }
    }
}
