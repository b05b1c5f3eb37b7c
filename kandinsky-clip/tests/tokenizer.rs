//! Tokenizer parity with transformers' `CLIPTokenizer` (5.24) on the real CLIP vocabulary.

use kandinsky_clip::ClipTokenizer;
use kandinsky_core::testing::fixtures_dir;
use kandinsky_core::Error;

#[derive(serde::Deserialize)]
struct Case {
    prompt: String,
    input_ids: Vec<u32>,
    attention_mask: Vec<u32>,
    untruncated_len: usize,
}

#[derive(serde::Deserialize)]
struct Cases {
    max_length: usize,
    cases: Vec<Case>,
}

fn tokenizer_dir() -> std::path::PathBuf {
    fixtures_dir().join("tiny/kandinsky-2-2-prior/tokenizer")
}

fn cases() -> anyhow::Result<Cases> {
    let path = fixtures_dir().join("clip/tokenizer_cases.json");
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}

fn check_all(tok: &ClipTokenizer, cases: &Cases) -> anyhow::Result<()> {
    assert_eq!(tok.max_length(), cases.max_length);
    let prompts: Vec<&str> = cases.cases.iter().map(|c| c.prompt.as_str()).collect();
    let batch = tok.encode_batch(&prompts)?;
    let mut failures = Vec::new();
    for (i, c) in cases.cases.iter().enumerate() {
        if batch.input_ids[i] != c.input_ids || batch.attention_mask[i] != c.attention_mask {
            failures.push(format!(
                "{:?}\n  ours   {:?}\n  theirs {:?}",
                c.prompt, batch.input_ids[i], c.input_ids
            ));
        }
        // transformers' untruncated length counts BOS and EOS.
        assert_eq!(
            batch.truncated[i],
            c.untruncated_len > cases.max_length,
            "{:?}",
            c.prompt
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {} prompts differ:\n{}",
        failures.len(),
        cases.cases.len(),
        failures.join("\n")
    );
    Ok(())
}

#[test]
fn ids_and_masks_match_transformers_on_all_prompts() -> anyhow::Result<()> {
    let cases = cases()?;
    assert!(cases.cases.len() >= 200);
    assert!(
        cases
            .cases
            .iter()
            .filter(|c| c.untruncated_len > 77)
            .count()
            >= 8
    );
    let tok = ClipTokenizer::from_dir(tokenizer_dir())?;
    assert_eq!(tok.pad_id(), 49407);
    check_all(&tok, &cases)
}

#[test]
fn a_saved_tokenizer_json_is_used_and_equivalent() -> anyhow::Result<()> {
    let tok = ClipTokenizer::from_dir(tokenizer_dir())?;
    let dir = std::env::temp_dir().join(format!("kandinsky-clip-tokjson-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
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
    let dir =
        std::env::temp_dir().join(format!("kandinsky-clip-tokmissing-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
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
