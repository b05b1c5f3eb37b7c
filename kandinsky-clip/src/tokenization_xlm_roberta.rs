//! Kandinsky 2.1's XLM-RoBERTa SentencePiece tokenizer (transformers
//! `tokenization_xlm_roberta.py`, `XLMRobertaTokenizer` / `XLMRobertaTokenizerFast`).
//!
//! The repository ships a `tokenizer.json` (a Unigram model). transformers 5 does not run that
//! file's pipeline as is: it keeps the Unigram vocabulary and the SentencePiece `Precompiled`
//! normaliser and rebuilds the rest — `WhitespaceSplit` then `Metaspace("▁", always)` as
//! pre-tokenizer (runs of whitespace collapse, leading/trailing whitespace vanish, as in
//! SentencePiece), `<s> $A </s>` as post-processor. This module rebuilds the same pipeline
//! with the `tokenizers` crate, so old (`Metaspace` only) and new (`Strip` + `Replace`)
//! serialisations of the file tokenize alike, and like transformers. Padding and truncation
//! follow the Kandinsky 2.1 pipeline: `padding="max_length", max_length=77, truncation=True`.

use std::path::Path;

use kandinsky_core::{Error, Result};
use serde_json::{json, Value};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

use crate::tokenization_clip::TokenizedBatch;
use crate::tokenizer_config::{SpecialTokensConfig, TokenSpec};

/// The padded length the Kandinsky 2.1 pipeline asks for (`max_length=77`).
pub const MCLIP_MAX_LENGTH: usize = 77;

/// The XLM-R tokenizer's view of `tokenizer_config.json` (`model_max_length` is only
/// informational: the 2.1 pipeline passes 77 explicitly).
pub type XlmRobertaTokenizerConfig = SpecialTokensConfig;

fn content(spec: &Option<TokenSpec>, default: &str) -> String {
    SpecialTokensConfig::token_or(spec, default)
        .content()
        .to_string()
}

/// Kandinsky 2.1's tokenizer, padding and truncating like transformers'
/// `tokenizer(prompts, padding="max_length", max_length=77, truncation=True)`.
#[derive(Clone)]
pub struct XlmRobertaTokenizer {
    tokenizer: Tokenizer,
    max_length: usize,
    model_max_length: Option<usize>,
    pad_id: u32,
    bos_id: u32,
    eos_id: u32,
}

impl std::fmt::Debug for XlmRobertaTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XlmRobertaTokenizer")
            .field("vocab_size", &self.tokenizer.get_vocab_size(true))
            .field("max_length", &self.max_length)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("{}: {e}", path.display()))
}

/// The SentencePiece charsmap of a `Precompiled` normaliser, alone or inside a `Sequence`.
fn precompiled_normalizer(normalizer: &Value) -> Option<Value> {
    match normalizer.get("type").and_then(Value::as_str) {
        Some("Precompiled") => Some(normalizer.clone()),
        Some("Sequence") => normalizer
            .get("normalizers")?
            .as_array()?
            .iter()
            .find_map(precompiled_normalizer),
        _ => None,
    }
}

impl XlmRobertaTokenizer {
    /// Load a `tokenizer/` folder: `tokenizer.json` (required) and the optional
    /// `tokenizer_config.json` / `special_tokens_map.json`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::MissingFile {
                path: dir.to_path_buf(),
                hint: "expected Kandinsky 2.1's tokenizer folder".into(),
            });
        }
        let json = dir.join("tokenizer.json");
        if !json.is_file() {
            return Err(Error::MissingFile {
                path: json,
                hint: "Kandinsky 2.1's XLM-RoBERTa tokenizer is read from `tokenizer.json` \
                       (`sentencepiece.bpe.model` alone is not supported)"
                    .into(),
            });
        }
        let cfg = XlmRobertaTokenizerConfig::from_dir(dir)?;
        Self::from_file(&json, &cfg)
    }

    /// Build from a `tokenizer.json` path and the special tokens of `cfg`.
    pub fn from_file(json: &Path, cfg: &XlmRobertaTokenizerConfig) -> Result<Self> {
        let mut doc: Value = kandinsky_core::loading::read_json(json)?;
        let model_type = doc
            .pointer("/model/type")
            .and_then(Value::as_str)
            .unwrap_or("<none>");
        if model_type != "Unigram" {
            return Err(Error::Tokenizer(format!(
                "{}: expected a SentencePiece Unigram model (XLM-RoBERTa), found model type \
                 {model_type:?}",
                json.display()
            )));
        }
        // transformers 5's XLMRobertaTokenizer pipeline around the file's vocabulary.
        let normalizer = doc
            .get("normalizer")
            .and_then(precompiled_normalizer)
            .unwrap_or(Value::Null);
        let metaspace = json!({"type": "Metaspace", "replacement": "▁",
                               "prepend_scheme": "always", "split": true});
        let obj = doc
            .as_object_mut()
            .ok_or_else(|| Error::Tokenizer(format!("{}: not a JSON object", json.display())))?;
        obj.insert("normalizer".into(), normalizer);
        obj.insert(
            "pre_tokenizer".into(),
            json!({"type": "Sequence",
                   "pretokenizers": [{"type": "WhitespaceSplit"}, metaspace.clone()]}),
        );
        obj.insert("decoder".into(), metaspace);
        obj.insert("post_processor".into(), Value::Null);
        obj.insert("truncation".into(), Value::Null);
        obj.insert("padding".into(), Value::Null);
        let text = serde_json::to_string(&doc).map_err(|e| tok_err(json, e))?;
        let tokenizer: Tokenizer = text.parse().map_err(|e| tok_err(json, e))?;
        Self::from_tokenizer(tokenizer, cfg).map_err(|e| match e {
            Error::Tokenizer(m) => tok_err(json, m),
            e => e,
        })
    }

    /// Wrap a tokenizer whose model and pre-tokenizer are set: registers the special tokens,
    /// the `<s> $A </s>` post-processor, padding and truncation to 77.
    pub fn from_tokenizer(
        mut tokenizer: Tokenizer,
        cfg: &XlmRobertaTokenizerConfig,
    ) -> Result<Self> {
        let bos = content(&cfg.bos_token, "<s>");
        let eos = content(&cfg.eos_token, "</s>");
        let pad = content(&cfg.pad_token, "<pad>");
        let unk = content(&cfg.unk_token, "<unk>");
        let mask = content(&cfg.mask_token, "<mask>");
        // Special tokens are matched whole in the raw text; `<mask>` also eats the space
        // before it (transformers' `lstrip=True`). Already-registered ones are kept as is.
        let mut specials: Vec<AddedToken> = [&bos, &pad, &eos, &unk]
            .iter()
            .map(|t| AddedToken::from(t.to_string(), true).normalized(false))
            .collect();
        specials.push(AddedToken::from(mask, true).normalized(false).lstrip(true));
        let present = tokenizer.get_added_tokens_decoder();
        specials.retain(|t| !present.values().any(|p| p.content == t.content));
        tokenizer.add_special_tokens(&specials);
        let id = |t: &str| {
            tokenizer.token_to_id(t).ok_or_else(|| {
                Error::Tokenizer(format!("special token {t:?} is not in the vocabulary"))
            })
        };
        let (bos_id, eos_id, pad_id) = (id(&bos)?, id(&eos)?, id(&pad)?);
        let mut post = TemplateProcessing::builder();
        post.try_single(format!("{bos} $A {eos}"))
            .map_err(Error::Tokenizer)?
            .try_pair(format!("{bos} $A {eos} {eos} $B {eos}"))
            .map_err(Error::Tokenizer)?
            .special_tokens(vec![(bos.clone(), bos_id), (eos.clone(), eos_id)]);
        let post = post.build().map_err(|e| Error::Tokenizer(e.to_string()))?;
        tokenizer.with_post_processor(Some(post));
        let mut this = Self {
            tokenizer,
            max_length: MCLIP_MAX_LENGTH,
            model_max_length: cfg.model_max_length()?,
            pad_id,
            bos_id,
            eos_id,
        };
        this.set_max_length(MCLIP_MAX_LENGTH)?;
        Ok(this)
    }

    fn set_max_length(&mut self, max_length: usize) -> Result<()> {
        if max_length < 2 {
            return Err(Error::invalid(format!(
                "max_length {max_length}: need room for <s> and </s>"
            )));
        }
        let pad_token = self
            .tokenizer
            .id_to_token(self.pad_id)
            .unwrap_or_else(|| "<pad>".into());
        self.tokenizer
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .with_padding(Some(PaddingParams {
                strategy: PaddingStrategy::Fixed(max_length),
                direction: PaddingDirection::Right,
                pad_to_multiple_of: None,
                pad_id: self.pad_id,
                pad_type_id: 0,
                pad_token,
            }));
        self.max_length = max_length;
        Ok(())
    }

    /// Pad and truncate to `max_length` instead of 77 (at least 2).
    pub fn with_max_length(mut self, max_length: usize) -> Result<Self> {
        self.set_max_length(max_length)?;
        Ok(self)
    }

    /// The padded length (77 unless changed with [`Self::with_max_length`]).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// `model_max_length` from `tokenizer_config.json`, when it gives a bounded one.
    pub fn model_max_length(&self) -> Option<usize> {
        self.model_max_length
    }

    /// The padding id (`<pad>`, 1).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The ids of `<s>` and `</s>` (0 and 2).
    pub fn bos_eos_ids(&self) -> (u32, u32) {
        (self.bos_id, self.eos_id)
    }

    /// Number of ids, special tokens included (250002 for the real tokenizer).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The underlying `tokenizers` tokenizer (with the rebuilt pipeline).
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Tokenize prompts: `[<s>, ≤ max_length − 2 pieces, </s>, <pad>…]` and the attention
    /// mask (1 on `<s>`..`</s>`). Over-long prompts are truncated with a `tracing` warning.
    pub fn encode_batch<S: AsRef<str>>(&self, prompts: &[S]) -> Result<TokenizedBatch> {
        let inputs: Vec<&str> = prompts.iter().map(|p| p.as_ref()).collect();
        let encodings = self
            .tokenizer
            .encode_batch(inputs, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut out = TokenizedBatch {
            input_ids: Vec::with_capacity(encodings.len()),
            attention_mask: Vec::with_capacity(encodings.len()),
            truncated: Vec::with_capacity(encodings.len()),
        };
        for (i, enc) in encodings.iter().enumerate() {
            let truncated = !enc.get_overflowing().is_empty();
            if truncated {
                tracing::warn!(
                    prompt_index = i,
                    max_length = self.max_length,
                    "prompt is longer than {} tokens and was truncated (as Kandinsky 2.1's \
                     pipeline does); the end of the prompt is ignored",
                    self.max_length
                );
            }
            out.input_ids.push(enc.get_ids().to_vec());
            out.attention_mask.push(enc.get_attention_mask().to_vec());
            out.truncated.push(truncated);
        }
        Ok(out)
    }
}
