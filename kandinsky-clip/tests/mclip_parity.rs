//! Parity of Kandinsky 2.1's `MultilingualCLIP` with diffusers 0.42.1 / transformers 5.24 on
//! the tiny fixture (f16-stored weights, references computed in f32 from the rounded weights).

use candle_core::{DType, Device, IndexOp, Tensor};
use kandinsky_clip::{MultilingualClip, XlmRobertaTokenizer};
use kandinsky_core::testing::{diff, get, load_fixture};
use kandinsky_core::traits::TextEncoder;

mod common;

use common::{check_encoding, check_prompts_end_to_end, k21_dir, u32s};

#[test]
fn mclip_matches_diffusers_in_f32() -> anyhow::Result<()> {
    let fx = load_fixture("clip/mclip.safetensors")?;
    let model = MultilingualClip::load(k21_dir("text_encoder"), DType::F32, &Device::Cpu)?;
    // i64 ids and mask straight from the fixture.
    let out = model.encode_text(get(&fx, "input_ids")?, Some(get(&fx, "attention_mask")?))?;
    assert_eq!(out.last_hidden_state.dims(), &[4, 77, 48]);
    assert_eq!(out.text_embeds.dims(), &[4, 32]);
    // f32 vs torch f32 on the same weights: only summation order differs.
    check_encoding(&out, &fx, "", 1e-4)
}

#[test]
fn prompts_to_embeddings_end_to_end() -> anyhow::Result<()> {
    // The prompts gen_mclip.py tokenized with transformers and fed to diffusers.
    let fx = load_fixture("clip/mclip.safetensors")?;
    let tok = XlmRobertaTokenizer::from_dir(k21_dir("tokenizer"))?;
    let long = "portrait of a young woman, oil painting by Rembrandt ".repeat(8);
    let batch = tok.encode_batch(&[
        "a red cat, 4k photo",
        "",
        "красный кот 🐱 一只红色的猫",
        long.as_str(),
    ])?;
    assert_eq!(batch.truncated, vec![false, false, false, true]);
    let model = MultilingualClip::load(k21_dir("text_encoder"), DType::F32, &Device::Cpu)?;
    check_prompts_end_to_end(&batch, &model, &fx)
}

#[test]
fn the_mask_matters_and_rows_are_independent() -> anyhow::Result<()> {
    let fx = load_fixture("clip/mclip.safetensors")?;
    let model = MultilingualClip::load(k21_dir("text_encoder"), DType::F32, &Device::Cpu)?;
    let ids = u32s(get(&fx, "input_ids")?)?;
    let mask = u32s(get(&fx, "attention_mask")?)?;
    // Attending to and averaging over the padding too gives other numbers: the comparison
    // above would catch an ignored mask.
    let ones = Tensor::ones(ids.dims(), DType::U32, &Device::Cpu)?;
    let unmasked = model.forward(&ids, &ones)?;
    let d = diff(&unmasked.text_embeds, get(&fx, "text_embeds")?)?;
    assert!(d.max_abs > 1e-2, "an all-ones mask changed nothing: {d:?}");
    // A row alone equals the row inside the padded batch.
    let full = model.forward(&ids, &mask)?;
    for i in 0..4 {
        let one = model.forward(&ids.i(i..i + 1)?, &mask.i(i..i + 1)?)?;
        let d = diff(&one.text_embeds, &full.text_embeds.i(i..i + 1)?)?;
        assert!(d.max_abs < 1e-5, "row {i}: {d:?}");
    }
    // Only the first tokens (no padding): the shorter input must equal the padded one at
    // the real positions, since padding is masked out in attention.
    let n = mask.i(0)?.to_vec1::<u32>()?.iter().sum::<u32>() as usize;
    let short = model.forward(&ids.i((0..1, 0..n))?, &mask.i((0..1, 0..n))?)?;
    let d = diff(
        &short.last_hidden_state,
        &full.last_hidden_state.i((0..1, 0..n))?,
    )?;
    assert!(d.max_abs < 1e-5, "unpadded row differs: {d:?}");
    let d = diff(&short.text_embeds, &full.text_embeds.i(0..1)?)?;
    assert!(d.max_abs < 1e-5, "unpadded pooled row differs: {d:?}");
    Ok(())
}

#[test]
fn half_precision_is_close() -> anyhow::Result<()> {
    let fx = load_fixture("clip/mclip.safetensors")?;
    let ids = get(&fx, "input_ids")?;
    let mask = get(&fx, "attention_mask")?;
    for dtype in [DType::F16, DType::BF16] {
        let model = MultilingualClip::load(k21_dir("text_encoder"), dtype, &Device::Cpu)?;
        let out = model.encode_text(ids, Some(mask))?;
        assert_eq!(out.text_embeds.dtype(), dtype);
        assert_eq!(out.last_hidden_state.dtype(), dtype);
        // Half-precision activations: loose bounds, only to catch broken paths (NaN, overflow).
        let tol = if dtype == DType::F16 { 2e-2 } else { 1.5e-1 };
        check_encoding(&out, &fx, "", tol)?;
    }
    Ok(())
}
