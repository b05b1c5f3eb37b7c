//! The CLIP BPE tokenizer (transformers `tokenization_clip.py`, `CLIPTokenizer`).
//!
//! Kandinsky's prior repositories ship `vocab.json` + `merges.txt` (no `tokenizer.json`), so
//! the tokenizer is assembled here with the `tokenizers` crate exactly as transformers 5
//! assembles it: NFC + whitespace-run → " " + lowercase normaliser; CLIP's regex split then
//! byte-level pre-tokenizer; BPE with the `</w>` end-of-word suffix; `<|startoftext|>` …
//! `<|endoftext|>` around the tokens; padding and truncation to `model_max_length` (77).
//! A `tokenizer.json`, when present, is used as is.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use kandinsky_core::{Error, Result};

use crate::tokenizer_config::SpecialTokensConfig;
pub use crate::tokenizer_config::TokenSpec;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSeq, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, SplitDelimiterBehavior,
    Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

/// CLIP's pre-tokenizer pattern (special tokens, English contractions, letter runs, single
/// digits, other non-space runs).
pub const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// CLIP's context length, used when `tokenizer_config.json` gives no `model_max_length`.
pub const DEFAULT_MAX_LENGTH: usize = 77;

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

/// The CLIP tokenizer's view of `tokenizer_config.json` (special tokens, padded length).
pub type ClipTokenizerConfig = SpecialTokensConfig;

/// CLIP's defaults for tokens the files do not name.
fn bos(cfg: &ClipTokenizerConfig) -> TokenSpec {
    SpecialTokensConfig::token_or(&cfg.bos_token, "<|startoftext|>")
}
fn eos(cfg: &ClipTokenizerConfig) -> TokenSpec {
    SpecialTokensConfig::token_or(&cfg.eos_token, "<|endoftext|>")
}
fn pad(cfg: &ClipTokenizerConfig) -> TokenSpec {
    SpecialTokensConfig::token_or(&cfg.pad_token, "<|endoftext|>")
}
fn unk(cfg: &ClipTokenizerConfig) -> TokenSpec {
    SpecialTokensConfig::token_or(&cfg.unk_token, "<|endoftext|>")
}

/// The padded length: `model_max_length`, or [`DEFAULT_MAX_LENGTH`] when it is absent or
/// transformers' "unbounded" sentinel.
fn max_length(cfg: &ClipTokenizerConfig) -> Result<usize> {
    Ok(cfg.model_max_length()?.unwrap_or(DEFAULT_MAX_LENGTH))
}

/// Token ids and masks of a batch of prompts, padded to the same length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedBatch {
    /// `[B][L]` token ids.
    pub input_ids: Vec<Vec<u32>>,
    /// `[B][L]`: 1 on BOS..EOS, 0 on padding.
    pub attention_mask: Vec<Vec<u32>>,
    /// Whether each prompt was cut to fit.
    pub truncated: Vec<bool>,
}

impl TokenizedBatch {
    fn tensor(rows: &[Vec<u32>], device: &Device) -> Result<Tensor> {
        let l = rows.first().map_or(0, |r| r.len());
        let flat: Vec<u32> = rows.iter().flatten().copied().collect();
        Ok(Tensor::from_vec(flat, (rows.len(), l), device)?)
    }

    /// `input_ids` as a `[B, L]` u32 tensor.
    pub fn input_ids(&self, device: &Device) -> Result<Tensor> {
        Self::tensor(&self.input_ids, device)
    }

    /// `attention_mask` as a `[B, L]` u32 tensor.
    pub fn attention_mask(&self, device: &Device) -> Result<Tensor> {
        Self::tensor(&self.attention_mask, device)
    }
}

/// The CLIP tokenizer, padding and truncating to `max_length` like transformers'
/// `tokenizer(prompts, padding="max_length", max_length=77, truncation=True)`.
#[derive(Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    max_length: usize,
    pad_id: u32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("max_length", &self.max_length)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

fn need(dir: &Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::MissingFile {
            path,
            hint: "a CLIP tokenizer folder needs `tokenizer.json`, or `vocab.json` and \
                   `merges.txt`"
                .into(),
        })
    }
}

impl ClipTokenizer {
    /// Load a `tokenizer/` folder: `tokenizer.json` when present, else `vocab.json` +
    /// `merges.txt`; special tokens and length from `tokenizer_config.json` /
    /// `special_tokens_map.json`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::MissingFile {
                path: dir.to_path_buf(),
                hint: "expected a tokenizer folder".into(),
            });
        }
        let cfg = ClipTokenizerConfig::from_dir(dir)?;
        let json = dir.join("tokenizer.json");
        let tokenizer = if json.is_file() {
            Tokenizer::from_file(&json)
                .map_err(|e| Error::Tokenizer(format!("{}: {e}", json.display())))?
        } else {
            let vocab = need(dir, "vocab.json")?;
            let merges = need(dir, "merges.txt")?;
            Self::build_bpe(&vocab, &merges, &cfg)?
        };
        Self::from_tokenizer(tokenizer, &cfg)
    }

    /// Assemble the CLIP pipeline around the BPE of `vocab.json` + `merges.txt`.
    pub fn build_bpe(vocab: &Path, merges: &Path, cfg: &ClipTokenizerConfig) -> Result<Tokenizer> {
        let path_str = |p: &Path| {
            p.to_str()
                .map(str::to_string)
                .ok_or_else(|| Error::invalid(format!("non-UTF-8 path {}", p.display())))
        };
        let bpe = BPE::from_file(&path_str(vocab)?, &path_str(merges)?)
            .unk_token(unk(cfg).content().to_string())
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .build()
            .map_err(|e| {
                Error::Tokenizer(format!("{} / {}: {e}", vocab.display(), merges.display()))
            })?;
        let mut tokenizer = Tokenizer::new(bpe);
        let normalizer = NormSeq::new(vec![
            NFC.into(),
            Replace::new(
                tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
                " ",
            )
            .map_err(tok_err)?
            .into(),
            Lowercase.into(),
        ]);
        let pre = PreSeq::new(vec![
            Split::new(
                SplitPattern::Regex(CLIP_PATTERN.into()),
                SplitDelimiterBehavior::Removed,
                true,
            )
            .map_err(tok_err)?
            .into(),
            ByteLevel::new(false, true, true).into(),
        ]);
        tokenizer
            .with_normalizer(Some(normalizer))
            .with_pre_tokenizer(Some(pre))
            .with_decoder(Some(ByteLevel::default()));
        // Each special token once; as in transformers, any plain-string declaration of a
        // content (2.2's `pad_token`) makes it match only the raw, un-normalised text.
        let mut specials: BTreeMap<String, bool> = BTreeMap::new();
        for spec in [pad(cfg), bos(cfg), eos(cfg), unk(cfg)] {
            let e = specials.entry(spec.content().to_string()).or_insert(true);
            *e &= spec.normalized();
        }
        let added: Vec<AddedToken> = specials
            .into_iter()
            .map(|(content, normalized)| AddedToken::from(content, true).normalized(normalized))
            .collect();
        tokenizer.add_special_tokens(&added);
        let id = |t: &TokenSpec| {
            tokenizer.token_to_id(t.content()).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "special token {:?} is not in the vocabulary",
                    t.content()
                ))
            })
        };
        let post = RobertaProcessing::new(
            (eos(cfg).content().to_string(), id(&eos(cfg))?),
            (bos(cfg).content().to_string(), id(&bos(cfg))?),
        )
        .trim_offsets(false)
        .add_prefix_space(false);
        tokenizer.with_post_processor(Some(post));
        Ok(tokenizer)
    }

    /// Wrap an assembled tokenizer: fixed padding to and truncation at `max_length`.
    pub fn from_tokenizer(mut tokenizer: Tokenizer, cfg: &ClipTokenizerConfig) -> Result<Self> {
        let max_length = max_length(cfg)?;
        let pad = pad(cfg);
        let pad_id = tokenizer.token_to_id(pad.content()).ok_or_else(|| {
            Error::Tokenizer(format!(
                "pad token {:?} is not in the vocabulary",
                pad.content()
            ))
        })?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(tok_err)?
            .with_padding(Some(PaddingParams {
                strategy: PaddingStrategy::Fixed(max_length),
                direction: PaddingDirection::Right,
                pad_to_multiple_of: None,
                pad_id,
                pad_type_id: 0,
                pad_token: pad.content().to_string(),
            }));
        Ok(Self {
            tokenizer,
            max_length,
            pad_id,
        })
    }

    /// The padded length (77).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The padding id (49407 for Kandinsky 2.2).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The underlying `tokenizers` tokenizer (e.g. to save a `tokenizer.json`).
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Tokenize prompts: `[BOS, ≤ max_length − 2 tokens, EOS, pad…]`. Empty prompts are
    /// allowed; over-long ones are truncated with a `tracing` warning.
    pub fn encode_batch<S: AsRef<str>>(&self, prompts: &[S]) -> Result<TokenizedBatch> {
        let inputs: Vec<&str> = prompts.iter().map(|p| p.as_ref()).collect();
        let encodings = self.tokenizer.encode_batch(inputs, true).map_err(tok_err)?;
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
                    "prompt is longer than {} tokens and was truncated (as CLIP's \
                     tokenizer does); the end of the prompt is ignored",
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
