//! The real checkpoint's layout, configuration checks and bad-input errors.

use candle_core::{DType, Device, Tensor};
use kandinsky_core::manifest::{record_requests, Manifest};
use kandinsky_core::testing::fixtures_dir;
use kandinsky_core::Error;
use kandinsky_core::ModelConfig;
use kandinsky_movq::{rgb8_to_tensor, tensor_to_rgb8, Rgb8Image, VQModel, VQModelConfig};

fn real_config() -> anyhow::Result<VQModelConfig> {
    // The real movq/config.json (REFERENCE.md §1.4), as the hub file spells it.
    let json = r#"{
      "_class_name": "VQModel", "_diffusers_version": "0.17.0.dev0",
      "act_fn": "silu", "block_out_channels": [128, 256, 256, 512],
      "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D",
                           "AttnDownEncoderBlock2D"],
      "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
      "norm_type": "spatial", "num_vq_embeddings": 16384, "out_channels": 3, "sample_size": 32,
      "scaling_factor": 0.18215,
      "up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D",
                         "UpDecoderBlock2D"],
      "vq_embed_dim": 4
    }"#;
    Ok(serde_json::from_str(json)?)
}

#[test]
fn real_config_requests_exactly_the_checkpoint_tensors() -> anyhow::Result<()> {
    let cfg = real_config()?;
    // Absent newer keys take diffusers' defaults.
    assert!(cfg.mid_block_add_attention && !cfg.lookup_from_codebook && !cfg.force_upcast);
    let req = record_requests(|vb| VQModel::new(vb, &cfg))?;
    let manifest =
        Manifest::read(&fixtures_dir().join("manifests/kandinsky-2-2-decoder__movq.json"))?;
    assert_eq!(manifest.len(), 431);
    let report = manifest.check(&req);
    assert!(report.is_exact(), "{report}");
    // The built-in constant is the same configuration.
    let builtin = record_requests(|vb| VQModel::new(vb, &VQModelConfig::kandinsky_2_2()))?;
    assert_eq!(builtin, req);
    Ok(())
}

fn tiny() -> anyhow::Result<VQModel> {
    Ok(VQModel::load(
        fixtures_dir().join("tiny/kandinsky-2-2-decoder/movq"),
        DType::F32,
        &Device::Cpu,
    )?)
}

fn invalid_message(e: Error) -> String {
    match e {
        Error::InvalidInput(m) => m,
        other => panic!("expected InvalidInput, got {other:?}"),
    }
}

#[test]
fn encode_rejects_sides_not_multiple_of_8() -> anyhow::Result<()> {
    let model = tiny()?;
    let img = Tensor::zeros((1, 3, 20, 32), DType::F32, &Device::Cpu)?;
    let msg = invalid_message(model.encode(&img).unwrap_err());
    assert!(
        msg.contains("multiples of 8") && msg.contains("[1, 3, 20, 32]"),
        "{msg}"
    );
    let img = Tensor::zeros((1, 4, 16, 16), DType::F32, &Device::Cpu)?;
    let msg = invalid_message(model.encode(&img).unwrap_err());
    assert!(msg.contains("[batch, 3, height, width]"), "{msg}");
    Ok(())
}

#[test]
fn decode_rejects_wrong_latent_channels() -> anyhow::Result<()> {
    let model = tiny()?;
    for shape in [vec![1, 3, 4, 4], vec![4, 4, 4]] {
        let z = Tensor::zeros(shape.as_slice(), DType::F32, &Device::Cpu)?;
        let msg = invalid_message(model.decode(&z, true).unwrap_err());
        assert!(
            msg.contains("[batch, 4, height, width]") && msg.contains(&format!("{shape:?}")),
            "{msg}"
        );
    }
    let z = Tensor::zeros((1, 5, 4, 4), DType::F32, &Device::Cpu)?;
    assert!(matches!(model.quantize(&z), Err(Error::InvalidInput(_))));
    Ok(())
}

fn unsupported_field(cfg: &VQModelConfig) -> String {
    match cfg.validate() {
        Err(Error::UnsupportedConfig { field, .. }) => field,
        other => panic!("expected UnsupportedConfig, got {other:?}"),
    }
}

#[test]
fn unsupported_configs_are_rejected_by_name() -> anyhow::Result<()> {
    let base = real_config()?;
    base.validate()?;
    let mut c = base.clone();
    c.norm_type = "ada_group".into();
    assert_eq!(unsupported_field(&c), "norm_type");
    let mut c = base.clone();
    c.down_block_types[0] = "CrossAttnDownBlock2D".into();
    assert_eq!(unsupported_field(&c), "down_block_types");
    let mut c = base.clone();
    c.up_block_types.pop();
    assert_eq!(unsupported_field(&c), "up_block_types");
    let mut c = base.clone();
    c.lookup_from_codebook = true;
    assert_eq!(unsupported_field(&c), "lookup_from_codebook");
    let mut c = base.clone();
    c.act_fn = "mish".into();
    assert_eq!(unsupported_field(&c), "act_fn");
    let mut c = base.clone();
    c.block_out_channels = vec![48, 96, 96, 192]; // SpatialNorm needs multiples of 32
    c.norm_num_groups = 16;
    assert_eq!(unsupported_field(&c), "block_out_channels");
    let mut c = base.clone();
    c.vq_embed_dim = Some(8);
    assert_eq!(unsupported_field(&c), "vq_embed_dim");
    // And through `VQModel::new`, before any weight is requested.
    let err = record_requests(|vb| VQModel::new(vb, &c)).unwrap_err();
    assert!(matches!(err, Error::UnsupportedConfig { .. }), "{err:?}");
    Ok(())
}

#[test]
fn pixel_helpers_reject_bad_buffers() -> anyhow::Result<()> {
    assert!(matches!(
        Rgb8Image::new(2, 2, vec![0; 11]),
        Err(Error::InvalidInput(_))
    ));
    let a = Rgb8Image::new(2, 2, vec![0; 12])?;
    let b = Rgb8Image::new(1, 4, vec![0; 12])?;
    assert!(matches!(
        rgb8_to_tensor(&[a, b], DType::F32, &Device::Cpu),
        Err(Error::InvalidInput(_))
    ));
    let four = Tensor::zeros((1, 4, 2, 2), DType::F32, &Device::Cpu)?;
    assert!(matches!(tensor_to_rgb8(&four), Err(Error::InvalidInput(_))));
    Ok(())
}
