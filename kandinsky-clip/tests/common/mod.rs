//! Helpers shared by the CLIP and M-CLIP parity and tokenizer tests (`parity.rs`,
//! `mclip_parity.rs`, `tokenizer.rs`, `mclip_tokenizer.rs`).

// Each test binary uses its own subset.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use kandinsky_clip::TokenizedBatch;
use kandinsky_core::testing::{assert_close, fixtures_dir, get};
use kandinsky_core::traits::{TextEncoder, TextEncoding};

/// A component folder of the tiny Kandinsky 2.2 prior fixture (`text_encoder`, `tokenizer`, ...).
pub fn prior_dir(component: &str) -> PathBuf {
    fixtures_dir()
        .join("tiny/kandinsky-2-2-prior")
        .join(component)
}

/// A component folder of the tiny Kandinsky 2.1 fixture.
pub fn k21_dir(component: &str) -> PathBuf {
    fixtures_dir().join("tiny/kandinsky-2-1").join(component)
}

/// A fresh scratch folder `kandinsky-clip-{tag}-{pid}` in the temp dir.
pub fn scratch(tag: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("kandinsky-clip-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Token ids or an attention mask stored by the fixture (i64) as u32.
pub fn u32s(t: &Tensor) -> anyhow::Result<Tensor> {
    Ok(t.to_dtype(DType::U32)?)
}

/// `out` against the fixture's `{prefix}last_hidden_state` and `{prefix}text_embeds`, both
/// within `tol`.
pub fn check_encoding(
    out: &TextEncoding,
    fx: &HashMap<String, Tensor>,
    prefix: &str,
    tol: f32,
) -> anyhow::Result<()> {
    for (key, got) in [
        ("last_hidden_state", &out.last_hidden_state),
        ("text_embeds", &out.text_embeds),
    ] {
        let key = format!("{prefix}{key}");
        let what = format!("{key} {:?}", got.dtype());
        assert_close(&what, got, get(fx, &key)?, tol)?;
    }
    Ok(())
}

/// The tokenizer's `batch` of the generator's prompts equals the fixture's `input_ids` and
/// `attention_mask`, and `encoder` turns it into the fixture's `text_embeds` (≤ 1e-4).
pub fn check_prompts_end_to_end(
    batch: &TokenizedBatch,
    encoder: &dyn TextEncoder,
    fx: &HashMap<String, Tensor>,
) -> anyhow::Result<()> {
    let ids = batch.input_ids(&Device::Cpu)?;
    let mask = batch.attention_mask(&Device::Cpu)?;
    assert_eq!(
        ids.to_vec2::<u32>()?,
        u32s(get(fx, "input_ids")?)?.to_vec2::<u32>()?
    );
    assert_eq!(
        mask.to_vec2::<u32>()?,
        u32s(get(fx, "attention_mask")?)?.to_vec2::<u32>()?
    );
    let out = encoder.encode_text(&ids, Some(&mask))?;
    assert_close(
        "text_embeds from prompts",
        &out.text_embeds,
        get(fx, "text_embeds")?,
        1e-4,
    )?;
    Ok(())
}

/// One prompt and transformers' tokenization of it.
#[derive(serde::Deserialize)]
pub struct Case {
    /// The prompt.
    pub prompt: String,
    /// Padded to `max_length`.
    pub input_ids: Vec<u32>,
    /// 1 for the real tokens.
    pub attention_mask: Vec<u32>,
    /// The length without truncation, BOS and EOS included.
    pub untruncated_len: usize,
}

/// A `fixtures/clip/*_cases.json` file written by the fixture generators.
#[derive(serde::Deserialize)]
pub struct Cases {
    /// The tokenizer's vocabulary size (M-CLIP's files only).
    pub vocab_size: Option<usize>,
    /// The padded length.
    pub max_length: usize,
    /// The prompts.
    pub cases: Vec<Case>,
}

impl Cases {
    /// Read `fixtures/clip/{name}`.
    pub fn read(name: &str) -> anyhow::Result<Self> {
        let path = fixtures_dir().join("clip").join(name);
        Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
    }

    /// The prompts, in order.
    pub fn prompts(&self) -> Vec<&str> {
        self.cases.iter().map(|c| c.prompt.as_str()).collect()
    }

    /// The prompts whose ids or mask in `batch` (the tokenization of [`Cases::prompts`])
    /// differ from transformers'; asserts the truncation flags on the way.
    pub fn mismatches(&self, batch: &TokenizedBatch) -> Vec<String> {
        let mut failures = Vec::new();
        for (i, c) in self.cases.iter().enumerate() {
            if batch.input_ids[i] != c.input_ids || batch.attention_mask[i] != c.attention_mask {
                failures.push(format!(
                    "{:?}\n  ours   {:?}\n  theirs {:?}",
                    c.prompt, batch.input_ids[i], c.input_ids
                ));
            }
            // transformers' untruncated length counts BOS and EOS (`<s>` and `</s>` in XLM-R).
            assert_eq!(
                batch.truncated[i],
                c.untruncated_len > self.max_length,
                "{:?}",
                c.prompt
            );
        }
        failures
    }

    /// `batch` equals transformers' tokenization on every prompt.
    pub fn assert_all_match(&self, batch: &TokenizedBatch) {
        let failures = self.mismatches(batch);
        assert!(
            failures.is_empty(),
            "{} of {} prompts differ:\n{}",
            failures.len(),
            self.cases.len(),
            failures.join("\n")
        );
    }

    /// How many prompts transformers truncates.
    pub fn truncated(&self) -> usize {
        self.cases
            .iter()
            .filter(|c| c.untruncated_len > self.max_length)
            .count()
    }
}
