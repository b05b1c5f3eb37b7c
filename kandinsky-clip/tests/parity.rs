//! Parity of the CLIP towers and the image processor with transformers 5.24 on the tiny
//! fixtures (f16-stored weights, references computed in f32 from the rounded weights).

use candle_core::{DType, Device, Tensor};
use kandinsky_clip::modeling_clip::{ClipTextModelWithProjection, ClipVisionModelWithProjection};
use kandinsky_clip::{ClipImageProcessor, ClipTextConfig};
use kandinsky_core::loading::{ComponentDir, WeightVariant};
use kandinsky_core::testing::{assert_close, fixtures_dir, get, load_fixture};
use kandinsky_core::traits::{ImageEncoder, TextEncoder};
use kandinsky_core::ModelConfig;

mod common;

use common::{check_encoding, check_prompts_end_to_end, prior_dir, u32s};

const IMAGES: [&str; 3] = ["landscape_rgb", "portrait_gray", "wide_rgba"];

#[test]
fn text_encoder_matches_transformers() -> anyhow::Result<()> {
    let fx = load_fixture("clip/text_encoder.safetensors")?;
    let model =
        ClipTextModelWithProjection::load(prior_dir("text_encoder"), DType::F32, &Device::Cpu)?;
    // i64 ids straight from the fixture are accepted too.
    let out = model.encode_text(get(&fx, "input_ids")?, None)?;
    // f32 vs torch f32 on the same (f16-rounded) weights.
    check_encoding(&out, &fx, "", 1e-4)?;
    let out_u32 = model.forward(&u32s(get(&fx, "input_ids")?)?)?;
    assert_close(
        "text_embeds (u32 ids)",
        &out_u32.text_embeds,
        get(&fx, "text_embeds")?,
        1e-4,
    )?;
    Ok(())
}

#[test]
fn prompt_to_text_embeds_end_to_end() -> anyhow::Result<()> {
    // The prompts gen_clip.py fed to transformers' tokenizer, then to the text encoder.
    let fx = load_fixture("clip/text_encoder.safetensors")?;
    let tok = kandinsky_clip::ClipTokenizer::from_dir(prior_dir("tokenizer"))?;
    let long = format!("it's a 😀 {}long prompt", "very ".repeat(90));
    let batch = tok.encode_batch(&["a red cat, 4k photo", "", long.as_str()])?;
    let model =
        ClipTextModelWithProjection::load(prior_dir("text_encoder"), DType::F32, &Device::Cpu)?;
    check_prompts_end_to_end(&batch, &model, &fx)
}

#[test]
fn text_encoder_first_eos_rule_and_quick_gelu() -> anyhow::Result<()> {
    let fx = load_fixture("clip/text_encoder.safetensors")?;
    let dir = ComponentDir::new(prior_dir("text_encoder"))?;
    let mut cfg = ClipTextConfig::from_dir(&dir)?;
    let eos = get(&fx, "alt_eos_token_id")?.to_vec1::<i64>()?[0];
    cfg.hidden_act = "quick_gelu".into();
    cfg.eos_token_id = serde_json::json!(eos);
    cfg.validate()?;
    let model = dir
        .checkpoint(WeightVariant::Default)?
        .build(DType::F32, &Device::Cpu, |vb| {
            ClipTextModelWithProjection::new(vb, &cfg)
        })?;
    let out = model.forward(&u32s(get(&fx, "alt_input_ids")?)?)?;
    check_encoding(&out, &fx, "alt_", 1e-4)
}

#[test]
fn text_encoder_half_precision_is_close() -> anyhow::Result<()> {
    let fx = load_fixture("clip/text_encoder.safetensors")?;
    for dtype in [DType::F16, DType::BF16] {
        let model =
            ClipTextModelWithProjection::load(prior_dir("text_encoder"), dtype, &Device::Cpu)?;
        let out = model.forward(&u32s(get(&fx, "input_ids")?)?)?;
        assert_eq!(out.text_embeds.dtype(), dtype);
        // Half-precision activations: loose bound, only to catch broken paths (NaN, overflow).
        let tol = if dtype == DType::F16 { 2e-2 } else { 1.5e-1 };
        assert_close(
            &format!("text_embeds {dtype:?}"),
            &out.text_embeds,
            get(&fx, "text_embeds")?,
            tol,
        )?;
    }
    Ok(())
}

fn processed_images() -> anyhow::Result<Tensor> {
    let proc = ClipImageProcessor::from_dir(prior_dir("image_processor"))?;
    let images = IMAGES
        .iter()
        .map(|n| ClipImageProcessor::open(fixtures_dir().join(format!("clip/{n}.png"))))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(proc.preprocess_batch(&images, &Device::Cpu)?)
}

#[test]
fn image_processor_matches_transformers_exactly() -> anyhow::Result<()> {
    let fx = load_fixture("clip/image_processor.safetensors")?;
    let lut = get(&fx, "normalize_lut")?.to_vec2::<f32>()?;
    let proc = ClipImageProcessor::from_dir(prior_dir("image_processor"))?;
    for name in IMAGES {
        let img = ClipImageProcessor::open(fixtures_dir().join(format!("clip/{name}.png")))?;
        // The u8 image after Pillow's bicubic resize + crop: bit-exact.
        let ours = proc.resize_and_crop(&img)?;
        let theirs =
            ClipImageProcessor::open(fixtures_dir().join(format!("clip/{name}.crop.png")))?
                .to_rgb8();
        let mismatched = ours
            .pixels()
            .zip(theirs.pixels())
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!((ours.width(), ours.height()), (224, 224));
        assert_eq!(
            mismatched, 0,
            "{name}: {mismatched} pixels differ from Pillow"
        );
        // transformers' pixel_values == lut[crop] (asserted by the generator); ours must equal it.
        let pv = proc.normalize(&ours);
        let mut max = 0f32;
        for (i, p) in theirs.pixels().enumerate() {
            for c in 0..3 {
                max = max.max((pv[c * 224 * 224 + i] - lut[c][p.0[c] as usize]).abs());
            }
        }
        // Same f64-rescale / f32-normalise arithmetic as NumPy: exact.
        assert_eq!(max, 0.0, "{name}: normalised values differ by {max}");
    }
    Ok(())
}

#[test]
fn image_encoder_matches_transformers_on_processed_images_and_zero_image() -> anyhow::Result<()> {
    let fx = load_fixture("clip/image_encoder.safetensors")?;
    let model =
        ClipVisionModelWithProjection::load(prior_dir("image_encoder"), DType::F32, &Device::Cpu)?;
    assert_eq!(model.image_size(), 224);
    let pixels = Tensor::cat(
        &[
            processed_images()?,
            Tensor::zeros((1, 3, 224, 224), DType::F32, &Device::Cpu)?,
        ],
        0,
    )?;
    let embeds = model.encode_image(&pixels)?;
    assert_close("image_embeds", &embeds, get(&fx, "image_embeds")?, 1e-4)?;
    for dtype in [DType::F16, DType::BF16] {
        let m =
            ClipVisionModelWithProjection::load(prior_dir("image_encoder"), dtype, &Device::Cpu)?;
        let e = m.encode_image(&pixels)?;
        assert_eq!(e.dtype(), dtype);
        let tol = if dtype == DType::F16 { 2e-2 } else { 1.5e-1 };
        assert_close(
            &format!("image_embeds {dtype:?}"),
            &e,
            get(&fx, "image_embeds")?,
            tol,
        )?;
    }
    Ok(())
}
