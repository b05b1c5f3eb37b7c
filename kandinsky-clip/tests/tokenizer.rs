//! Tokenizer parity with transformers' `CLIPTokenizer` (5.24) on the real CLIP vocabulary.

use kandinsky_clip::ClipTokenizer;
use kandinsky_core::testing::fixtures_dir;
use kandinsky_core::Error;

mod common;

use common::{prior_dir, scratch, Cases};

fn tokenizer_dir() -> std::path::PathBuf {
    prior_dir("tokenizer")
}

fn cases() -> anyhow::Result<Cases> {
    Cases::read("tokenizer_cases.json")
}

fn check_all(tok: &ClipTokenizer, cases: &Cases) -> anyhow::Result<()> {
    assert_eq!(tok.max_length(), cases.max_length);
    cases.assert_all_match(&tok.encode_batch(&cases.prompts())?);
    Ok(())
}

#[test]
fn ids_and_masks_match_transformers_on_all_prompts() -> anyhow::Result<()> {
    let cases = cases()?;
    assert!(cases.cases.len() >= 200);
    assert!(cases.truncated() >= 8);
    let tok = ClipTokenizer::from_dir(tokenizer_dir())?;
    assert_eq!(tok.pad_id(), 49407);
    check_all(&tok, &cases)
}

#[test]
fn a_saved_tokenizer_json_is_used_and_equivalent() -> anyhow::Result<()> {
    let tok = ClipTokenizer::from_dir(tokenizer_dir())?;
    let dir = scratch("tokjson")?;
    tok.inner()
        .save(dir.join("tokenizer.json"), false)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for f in ["tokenizer_config.json", "special_tokens_map.json"] {
        std::fs::copy(tokenizer_dir().join(f), dir.join(f))?;
    }
    // No vocab.json / merges.txt: only tokenizer.json can serve.
    let from_json = ClipTokenizer::from_dir(&dir)?;
    let result = check_all(&from_json, &cases()?);
    std::fs::remove_dir_all(&dir)?;
    result
}

#[test]
fn empty_and_long_prompts() -> anyhow::Result<()> {
    let tok = ClipTokenizer::from_dir(tokenizer_dir())?;
    let long = "word ".repeat(200);
    let b = tok.encode_batch(&["", long.as_str()])?;
    assert_eq!(b.input_ids[0][..3], [49406, 49407, 49407]);
    assert_eq!(b.attention_mask[0].iter().sum::<u32>(), 2);
    assert_eq!(b.truncated, vec![false, true]);
    assert_eq!(b.input_ids[1].len(), 77);
    assert_eq!(b.input_ids[1][76], 49407);
    let t = b.input_ids(&candle_core::Device::Cpu)?;
    assert_eq!(t.dims(), &[2, 77]);
    Ok(())
}

#[test]
fn missing_files_are_typed_errors() -> anyhow::Result<()> {
    let dir = scratch("tokmissing")?;
    std::fs::copy(tokenizer_dir().join("vocab.json"), dir.join("vocab.json"))?;
    let err = ClipTokenizer::from_dir(&dir).unwrap_err();
    std::fs::remove_dir_all(&dir)?;
    match &err {
        Error::MissingFile { path, .. } => assert!(path.ends_with("merges.txt"), "{err}"),
        other => panic!("expected MissingFile, got {other:?}"),
    }
    let err = ClipTokenizer::from_dir("/definitely/not/here").unwrap_err();
    assert!(matches!(err, Error::MissingFile { .. }), "{err}");
    Ok(())
}

#[test]
fn kandinsky_2_1_pad_token_matches_transformers() -> anyhow::Result<()> {
    // Same vocabulary, `pad_token` "!" (id 0), which transformers registers as a special token.
    let dir = scratch("tok21")?;
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(tokenizer_dir().join(f), dir.join(f))?;
    }
    for f in ["tokenizer_config.json", "special_tokens_map.json"] {
        std::fs::copy(
            fixtures_dir().join("clip/tokenizer_2_1").join(f),
            dir.join(f),
        )?;
    }
    let tok = ClipTokenizer::from_dir(&dir)?;
    std::fs::remove_dir_all(&dir)?;
    assert_eq!(tok.pad_id(), 0);
    check_all(&tok, &Cases::read("tokenizer_2_1_cases.json")?)
}

/// Counts WARN events (a minimal subscriber: the crate only needs `tracing`).
struct WarnCounter(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl tracing::Subscriber for WarnCounter {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        if *event.metadata().level() == tracing::Level::WARN {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[test]
fn truncation_warns_through_tracing() -> anyhow::Result<()> {
    let tok = ClipTokenizer::from_dir(tokenizer_dir())?;
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let long = "cat ".repeat(100);
    tracing::subscriber::with_default(WarnCounter(count.clone()), || {
        tok.encode_batch(&["a short prompt", ""]).map(|_| ())
    })?;
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 0);
    tracing::subscriber::with_default(WarnCounter(count.clone()), || {
        tok.encode_batch(&[long.as_str(), "short", long.as_str()])
            .map(|_| ())
    })?;
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 2);
    Ok(())
}
