//! Typed errors: unsupported config values name the field and the supported values; bad
//! inputs say what was expected. Nothing panics.

use candle_core::{DType, Device, Tensor};
use kandinsky_core::loading::read_json;
use kandinsky_core::testing::fixtures_dir;
use kandinsky_core::traits::{Denoiser, DenoiserCondition, PreparedCondition};
use kandinsky_core::Error;
use kandinsky_core::ModelConfig;
use kandinsky_unet::{
    AdditionEmbedType, EncoderHidDimType, UNet2DConditionConfig, UNet2DConditionModel,
};
use serde_json::{json, Value};

fn real_json() -> Value {
    read_json(&fixtures_dir().join("real-configs/kandinsky-2-2-decoder__unet.json")).unwrap()
}

fn with(field: &str, value: Value) -> UNet2DConditionConfig {
    let mut v = real_json();
    v[field] = value;
    serde_json::from_value(v).unwrap()
}

fn unsupported_field(cfg: &UNet2DConditionConfig) -> String {
    match cfg.validate() {
        Err(Error::UnsupportedConfig { field, .. }) => field,
        other => panic!("expected UnsupportedConfig, got {other:?} for {cfg:?}"),
    }
}

#[test]
fn real_configs_validate() {
    let cfg: UNet2DConditionConfig = serde_json::from_value(real_json()).unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.addition_embed_type().unwrap(), AdditionEmbedType::Image);
    assert_eq!(cfg.num_upsamplers(), 3);
    // Unknown extra fields are ignored.
    let mut v = real_json();
    v["some_future_field"] = json!([1, 2]);
    serde_json::from_value::<UNet2DConditionConfig>(v)
        .unwrap()
        .validate()
        .unwrap();
}

#[test]
fn unsupported_values_name_their_field() {
    let cases = [
        (
            "down_block_types",
            json!([
                "CrossAttnDownBlock2D",
                "SimpleCrossAttnDownBlock2D",
                "SimpleCrossAttnDownBlock2D",
                "SimpleCrossAttnDownBlock2D"
            ]),
        ),
        (
            "up_block_types",
            json!([
                "SimpleCrossAttnUpBlock2D",
                "SimpleCrossAttnUpBlock2D",
                "SimpleCrossAttnUpBlock2D",
                "UpBlock2D"
            ]),
        ),
        ("mid_block_type", json!("UNetMidBlock2DCrossAttn")),
        ("mid_block_type", Value::Null),
        ("resnet_time_scale_shift", json!("default")),
        ("addition_embed_type", json!("text")),
        ("addition_embed_type", Value::Null),
        ("encoder_hid_dim_type", json!("text_proj")),
        ("class_embed_type", json!("timestep")),
        ("only_cross_attention", json!(true)),
        ("time_embedding_type", json!("fourier")),
        ("time_embedding_act_fn", json!("silu")),
        ("center_input_sample", json!(true)),
        ("norm_num_groups", Value::Null),
        ("attention_type", json!("gated")),
        ("num_attention_heads", json!(8)),
        ("layers_per_block", json!([3, 3])),
        ("cross_attention_norm", json!("group_norm")),
        ("act_fn", json!("relu6")),
        ("conv_in_kernel", json!(4)),
    ];
    for (field, value) in cases {
        let got = unsupported_field(&with(field, value.clone()));
        assert_eq!(got, field, "{field} = {value}");
    }
    // 100 does not divide 768: heads would not tile the channels.
    assert_eq!(
        unsupported_field(&with("attention_head_dim", json!(100))),
        "attention_head_dim"
    );
    // 384 channels cannot be split into 256 groups.
    assert_eq!(
        unsupported_field(&with("norm_num_groups", json!(256))),
        "norm_num_groups"
    );
}

#[test]
fn kandinsky_21_configs_validate() {
    for name in ["kandinsky-2-1__unet", "kandinsky-2-1-inpaint__unet"] {
        let path = fixtures_dir().join(format!("real-configs/{name}.json"));
        let cfg: UNet2DConditionConfig = read_json(&path).unwrap();
        cfg.validate().unwrap();
        assert_eq!(
            cfg.addition_embed_type().unwrap(),
            AdditionEmbedType::TextImage
        );
        assert_eq!(
            cfg.encoder_hid_dim_type().unwrap(),
            EncoderHidDimType::TextImageProj
        );
    }
}

/// 2.1's text projection with 2.2's image-only time term (or the reverse) is no real
/// checkpoint; it is rejected naming encoder_hid_dim_type and the valid pairings.
#[test]
fn mixed_21_22_conditioning_is_rejected() {
    for (addition, hid) in [("text_image", "image_proj"), ("image", "text_image_proj")] {
        let mut v = real_json();
        v["addition_embed_type"] = json!(addition);
        v["encoder_hid_dim_type"] = json!(hid);
        let cfg: UNet2DConditionConfig = serde_json::from_value(v).unwrap();
        assert_eq!(unsupported_field(&cfg), "encoder_hid_dim_type");
        let msg = cfg.validate().unwrap_err().to_string();
        assert!(
            msg.contains("\"text_image_proj\" with \"text_image\""),
            "{msg}"
        );
    }
}

#[test]
fn diffusers_defaults_apply_to_absent_fields() {
    // An (almost) empty config gets diffusers' defaults, i.e. SD-style CrossAttn blocks.
    let cfg: UNet2DConditionConfig = serde_json::from_value(json!({})).unwrap();
    assert_eq!(cfg.block_out_channels, vec![320, 640, 1280, 1280]);
    assert_eq!(cfg.in_channels, 4);
    assert_eq!(cfg.norm_eps, 1e-5);
    assert!(cfg.flip_sin_to_cos);
    assert_eq!(unsupported_field(&cfg), "resnet_time_scale_shift");
}

#[test]
fn config_errors_name_the_file() {
    let dir = std::env::temp_dir().join(format!("kandinsky-unet-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut v = real_json();
    v["mid_block_type"] = json!("UNetMidBlock2DCrossAttn");
    std::fs::write(dir.join("config.json"), v.to_string()).unwrap();
    let err = UNet2DConditionModel::from_dir(&dir, DType::F32, &Device::Cpu).unwrap_err();
    let _ = std::fs::remove_dir_all(&dir);
    match &err {
        Error::UnsupportedConfig { field, file, .. } => {
            assert_eq!(field, "mid_block_type");
            assert!(file.as_ref().unwrap().ends_with("config.json"));
        }
        other => panic!("expected UnsupportedConfig, got {other:?}"),
    }
    assert!(err.to_string().contains("UNetMidBlock2DSimpleCrossAttn"));
}

fn tiny(repo: &str) -> UNet2DConditionModel {
    let dir = fixtures_dir().join("tiny").join(repo).join("unet");
    UNet2DConditionModel::from_dir(dir, DType::F32, &Device::Cpu).unwrap()
}

fn zeros(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap()
}

fn invalid(r: kandinsky_core::Result<Tensor>) -> String {
    match r {
        Err(Error::InvalidInput(msg)) => msg,
        other => panic!("expected InvalidInput, got {other:?}"),
    }
}

#[test]
fn bad_inputs_to_the_decoder() {
    let unet = tiny("kandinsky-2-2-decoder");
    let emb = zeros(&[2, 32]);
    let t = [10.0, 20.0];
    // Sides not multiples of 8.
    let msg = invalid(unet.forward(&zeros(&[2, 4, 12, 16]), &t, &emb, None));
    assert!(
        msg.contains("multiples of 8") && msg.contains("12x16"),
        "{msg}"
    );
    // Wrong channel count.
    let msg = invalid(unet.forward(&zeros(&[2, 9, 16, 16]), &t, &emb, None));
    assert!(
        msg.contains("9 channels") && msg.contains("expects 4"),
        "{msg}"
    );
    // Not an image batch.
    let msg = invalid(unet.forward(&zeros(&[4, 16, 16]), &t, &emb, None));
    assert!(msg.contains("[batch, 4, height, width]"), "{msg}");
    // One timestep for two latents.
    let msg = invalid(unet.forward(&zeros(&[2, 4, 16, 16]), &[10.0], &emb, None));
    assert!(msg.contains("one timestep per batch element (2)"), "{msg}");
    // Embedding batch / width mismatch.
    let msg = invalid(unet.forward(&zeros(&[2, 4, 16, 16]), &t, &zeros(&[1, 32]), None));
    assert!(msg.contains("[2, 32]"), "{msg}");
    let msg = invalid(unet.forward(&zeros(&[2, 4, 16, 16]), &t, &zeros(&[2, 31]), None));
    assert!(msg.contains("[2, 32]"), "{msg}");
    // A hint for a model that takes none.
    let hint = zeros(&[2, 3, 128, 128]);
    let msg = invalid(unet.forward(&zeros(&[2, 4, 16, 16]), &t, &emb, Some(&hint)));
    assert!(msg.contains("takes no hint"), "{msg}");
}

#[test]
fn bad_inputs_to_the_controlnet() {
    let unet = tiny("kandinsky-2-2-controlnet-depth");
    assert!(unet.takes_hint());
    assert_eq!(unet.sample_channels(), 4);
    let emb = zeros(&[2, 32]);
    let t = [10.0, 20.0];
    let x = zeros(&[2, 4, 8, 8]);
    let msg = invalid(unet.forward(&x, &t, &emb, None));
    assert!(msg.contains("needs a hint"), "{msg}");
    let msg = invalid(unet.forward(&x, &t, &emb, Some(&zeros(&[2, 3, 32, 32]))));
    assert!(msg.contains("[2, 3, 64, 64]"), "{msg}");
    let msg = invalid(unet.forward(&x, &t, &emb, Some(&zeros(&[1, 3, 64, 64]))));
    assert!(msg.contains("[2, 3, 64, 64]"), "{msg}");
    // Latents + encoded hint (8 channels) passed as the sample.
    let msg = invalid(unet.forward(&zeros(&[2, 8, 8, 8]), &t, &emb, None));
    assert!(msg.contains("hint is passed separately"), "{msg}");
}

#[test]
fn denoiser_condition_mismatches() {
    let unet = tiny("kandinsky-2-2-decoder-inpaint");
    let x = zeros(&[1, 9, 8, 8]);
    let msg = invalid(unet.predict(&x, &[1.0], &DenoiserCondition::default()));
    assert!(msg.contains("needs image_embeds"), "{msg}");
    let cond = DenoiserCondition {
        image_embeds: Some(zeros(&[1, 32])),
        text_embeds: Some(zeros(&[1, 768])),
        ..Default::default()
    };
    let msg = invalid(unet.predict(&x, &[1.0], &cond));
    assert!(msg.contains("2.1"), "{msg}");
    let msg = invalid(unet.forward(&zeros(&[1, 4, 8, 8]), &[1.0], &zeros(&[1, 32]), None));
    assert!(msg.contains("masked-image latents"), "{msg}");
}

/// Kandinsky 2.1 (tiny: image / pooled text width 32, text hidden width 48): missing text
/// conditioning and wrong widths are typed errors naming what is missing or expected.
#[test]
fn bad_inputs_to_kandinsky_21() {
    let unet = tiny("kandinsky-2-1");
    assert!(unet.takes_text());
    assert_eq!(unet.image_embed_dim(), 32);
    assert_eq!(unet.text_dims(), Some((32, 48)));
    let x = zeros(&[2, 4, 16, 16]);
    let t = [10.0, 20.0];
    let image = zeros(&[2, 32]);
    let pooled = zeros(&[2, 32]);
    let hidden = zeros(&[2, 77, 48]);

    // The 2.2 entry point cannot carry text.
    let msg = invalid(unet.forward(&x, &t, &image, None));
    assert!(
        msg.contains("text_embeds [2, 32]") && msg.contains("text_hidden_states [2, L, 48]"),
        "{msg}"
    );
    // Through the trait: each missing input is named (and only it).
    let cond = |image: bool, pooled_: bool, hidden_: bool| DenoiserCondition {
        image_embeds: image.then(|| zeros(&[2, 32])),
        text_embeds: pooled_.then(|| zeros(&[2, 32])),
        text_hidden_states: hidden_.then(|| zeros(&[2, 77, 48])),
        hint: None,
    };
    let msg = invalid(unet.predict(&x, &t, &cond(true, false, true)));
    assert!(
        msg.contains("needs text_embeds [2, 32]") && !msg.contains("text_hidden_states"),
        "{msg}"
    );
    let msg = invalid(unet.predict(&x, &t, &cond(true, true, false)));
    assert!(
        msg.contains("needs text_hidden_states [2, L, 48]") && !msg.contains("text_embeds"),
        "{msg}"
    );
    let msg = invalid(unet.predict(&x, &t, &cond(false, true, true)));
    assert!(msg.contains("2.1 UNet needs image_embeds [2, 32]"), "{msg}");

    // Wrong widths / batches: expected vs got.
    let msg = invalid(unet.forward_text_image(&x, &t, &zeros(&[2, 1280]), &pooled, &hidden));
    assert!(
        msg.contains("[2, 32]") && msg.contains("[2, 1280]"),
        "{msg}"
    );
    let msg = invalid(unet.forward_text_image(&x, &t, &image, &zeros(&[2, 48]), &hidden));
    assert!(
        msg.contains("text_embeds must be [2, 32]") && msg.contains("[2, 48]"),
        "{msg}"
    );
    let msg = invalid(unet.forward_text_image(&x, &t, &image, &zeros(&[1, 32]), &hidden));
    assert!(msg.contains("text_embeds must be [2, 32]"), "{msg}");
    let msg = invalid(unet.forward_text_image(&x, &t, &image, &pooled, &zeros(&[2, 77, 32])));
    assert!(
        msg.contains("text_hidden_states must be [2, L, 48]") && msg.contains("[2, 77, 32]"),
        "{msg}"
    );
    let msg = invalid(unet.forward_text_image(&x, &t, &image, &pooled, &zeros(&[2, 48])));
    assert!(
        msg.contains("[2, L, 48]") && msg.contains("[2, 48]"),
        "{msg}"
    );
    let msg = invalid(unet.forward_text_image(&x, &t, &image, &pooled, &zeros(&[1, 77, 48])));
    assert!(
        msg.contains("[2, L, 48]") && msg.contains("[1, 77, 48]"),
        "{msg}"
    );
    // A hint is ControlNet's only.
    let with_hint = DenoiserCondition {
        hint: Some(zeros(&[2, 3, 128, 128])),
        ..cond(true, true, true)
    };
    let msg = invalid(unet.predict(&x, &t, &with_hint));
    assert!(msg.contains("takes no hint"), "{msg}");
    // Any token count works (diffusers applies no mask and no fixed length).
    let out = unet
        .forward_text_image(&x, &t, &image, &pooled, &zeros(&[2, 5, 48]))
        .unwrap();
    assert_eq!(out.dims(), &[2, 8, 16, 16]);
}

/// The 9-channel 2.1 inpainting UNet: sample channels and text conditioning both checked.
#[test]
fn bad_inputs_to_kandinsky_21_inpaint() {
    let unet = tiny("kandinsky-2-1-inpaint");
    assert_eq!(unet.sample_channels(), 9);
    let t = [10.0];
    let (image, pooled, hidden) = (zeros(&[1, 32]), zeros(&[1, 32]), zeros(&[1, 77, 48]));
    let msg = invalid(unet.forward_text_image(&zeros(&[1, 4, 8, 8]), &t, &image, &pooled, &hidden));
    assert!(msg.contains("masked-image latents"), "{msg}");
    let msg = invalid(unet.predict(
        &zeros(&[1, 9, 8, 8]),
        &t,
        &DenoiserCondition {
            image_embeds: Some(image),
            ..Default::default()
        },
    ));
    assert!(
        msg.contains("text_embeds [1, 32]") && msg.contains("text_hidden_states [1, L, 48]"),
        "{msg}"
    );
}

/// A 2.2 UNet refuses the 2.1 entry point with the same message as the trait path.
#[test]
fn kandinsky_22_refuses_text() {
    let unet = tiny("kandinsky-2-2-decoder");
    assert!(!unet.takes_text());
    assert_eq!(unet.text_dims(), None);
    let msg = invalid(unet.forward_text_image(
        &zeros(&[1, 4, 8, 8]),
        &[1.0],
        &zeros(&[1, 32]),
        &zeros(&[1, 16]),
        &zeros(&[1, 77, 32]),
    ));
    assert!(
        msg.contains("image embeddings only") && msg.contains("2.1"),
        "{msg}"
    );
}

fn invalid_prepared(r: kandinsky_core::Result<PreparedCondition>) -> String {
    match r {
        Err(Error::InvalidInput(msg)) => msg,
        other => panic!("expected InvalidInput, got {other:?}"),
    }
}

/// A prepared conditioning is checked when prepared (without latents: the hint only for a
/// usable size) and again against each sample: another batch, another latent size, another
/// UNet's preparation or a preparation of nothing are typed errors, never a wrong image.
#[test]
fn bad_prepared_conditions() {
    let controlnet = tiny("kandinsky-2-2-controlnet-depth");
    let decoder = tiny("kandinsky-2-2-decoder");
    let cond = |b: usize, hint: Option<&[usize]>| DenoiserCondition {
        image_embeds: Some(zeros(&[b, 32])),
        hint: hint.map(zeros),
        ..Default::default()
    };
    let msg = invalid_prepared(controlnet.prepare(&DenoiserCondition::default()));
    assert!(msg.contains("needs image_embeds [B, 32]"), "{msg}");
    let msg = invalid_prepared(controlnet.prepare(&cond(2, None)));
    assert!(msg.contains("needs a hint"), "{msg}");
    // 60 px is no multiple of 64 (8x the tiny UNet's latent down-scaling of 8).
    let msg = invalid_prepared(controlnet.prepare(&cond(2, Some(&[2, 3, 60, 64]))));
    assert!(msg.contains("multiples of 64"), "{msg}");
    let msg = invalid_prepared(controlnet.prepare(&cond(2, Some(&[1, 3, 64, 64]))));
    assert!(msg.contains("[2, 3, H, W]"), "{msg}");

    let prepared = controlnet.prepare(&cond(2, Some(&[2, 3, 64, 64]))).unwrap();
    let t = [10.0, 20.0];
    assert!(controlnet
        .predict_prepared(&zeros(&[2, 4, 8, 8]), &t, &prepared)
        .is_ok());
    let msg = invalid(controlnet.predict_prepared(&zeros(&[1, 4, 8, 8]), &[1.0], &prepared));
    assert!(msg.contains("batch 2, the sample has batch 1"), "{msg}");
    let msg = invalid(controlnet.predict_prepared(&zeros(&[2, 4, 16, 8]), &t, &prepared));
    assert!(msg.contains("8x8 latents, the sample is 16x8"), "{msg}");
    // The sample's own checks come first.
    let msg = invalid(controlnet.predict_prepared(&zeros(&[2, 4, 8, 8]), &[1.0], &prepared));
    assert!(msg.contains("one timestep per batch element"), "{msg}");

    // The decoder prepares no hint: its preparation does not fit the ControlNet, nor the
    // reverse, nor a preparation holding nothing (another Denoiser's default).
    let plain = decoder.prepare(&cond(2, None)).unwrap();
    let msg = invalid(controlnet.predict_prepared(&zeros(&[2, 4, 8, 8]), &t, &plain));
    assert!(msg.contains("does not fit this UNet"), "{msg}");
    let msg = invalid(decoder.predict_prepared(&zeros(&[2, 4, 8, 8]), &t, &prepared));
    assert!(msg.contains("does not fit this UNet"), "{msg}");
    let empty = PreparedCondition::new(cond(2, None), Vec::new());
    let msg = invalid(decoder.predict_prepared(&zeros(&[2, 4, 8, 8]), &t, &empty));
    assert!(msg.contains("no tensors"), "{msg}");
}
