//! Bad inputs and mismatched checkpoints give typed errors, never panics.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use kandinsky_core::loading::{ComponentDir, WeightVariant};
use kandinsky_core::testing::fixtures_dir;
use kandinsky_core::{Error, LoadError};
use kandinsky_prior::{PriorTransformer, PriorTransformerConfig};

fn tiny() -> Result<PriorTransformer> {
    Ok(PriorTransformer::load(
        fixtures_dir().join("tiny/kandinsky-2-2-prior/prior"),
        DType::F32,
        &Device::Cpu,
    )?)
}

struct Inputs {
    x: Tensor,
    p: Tensor,
    enc: Tensor,
    mask: Tensor,
}

fn inputs(b: usize, e: usize, l: usize) -> Result<Inputs> {
    let dev = Device::Cpu;
    Ok(Inputs {
        x: Tensor::randn(0f32, 1.0, (b, e), &dev)?,
        p: Tensor::randn(0f32, 1.0, (b, e), &dev)?,
        enc: Tensor::randn(0f32, 1.0, (b, l, e), &dev)?,
        mask: Tensor::ones((b, l), DType::F32, &dev)?,
    })
}

fn expect_invalid(r: kandinsky_core::Result<Tensor>, needle: &str) {
    match r {
        Err(Error::InvalidInput(msg)) => {
            assert!(msg.contains(needle), "message {msg:?} lacks {needle:?}")
        }
        other => panic!("expected InvalidInput mentioning {needle:?}, got {other:?}"),
    }
}

#[test]
fn wrong_shapes_are_typed_errors() -> Result<()> {
    let m = tiny()?;
    let ok = inputs(2, 32, 77)?;
    // Sanity: the well-formed call works.
    m.forward(&ok.x, &[10.0], &ok.p, &ok.enc, Some(&ok.mask))?;

    let wide = inputs(2, 48, 77)?;
    expect_invalid(
        m.forward(&wide.x, &[1.0], &ok.p, &ok.enc, Some(&ok.mask)),
        "embedding_dim",
    );
    expect_invalid(
        m.forward(&ok.x, &[1.0], &wide.p, &ok.enc, Some(&ok.mask)),
        "proj_embedding",
    );
    expect_invalid(
        m.forward(&ok.x, &[1.0], &ok.p, &wide.enc, Some(&ok.mask)),
        "encoder_hidden_states",
    );
    expect_invalid(
        m.forward(&ok.x.unsqueeze(1)?, &[1.0], &ok.p, &ok.enc, None),
        "hidden_states",
    );

    // Mask / hidden-state length mismatch.
    let short = inputs(2, 32, 64)?;
    expect_invalid(
        m.forward(&ok.x, &[1.0], &ok.p, &ok.enc, Some(&short.mask)),
        "attention_mask",
    );
    expect_invalid(
        m.forward(&ok.x, &[1.0], &ok.p, &short.enc, Some(&short.mask)),
        "encoder_hidden_states",
    );

    // Batch mismatches.
    let three = inputs(3, 32, 77)?;
    expect_invalid(
        m.forward(&three.x, &[1.0], &ok.p, &ok.enc, Some(&ok.mask)),
        "proj_embedding",
    );
    expect_invalid(
        m.forward(&ok.x, &[1.0], &ok.p, &three.enc, Some(&ok.mask)),
        "encoder_hidden_states",
    );
    expect_invalid(
        m.forward(&ok.x, &[1.0], &ok.p, &ok.enc, Some(&three.mask)),
        "attention_mask",
    );
    expect_invalid(
        m.forward(&ok.x, &[1.0, 2.0, 3.0], &ok.p, &ok.enc, Some(&ok.mask)),
        "timesteps",
    );
    expect_invalid(
        m.forward(&ok.x, &[], &ok.p, &ok.enc, Some(&ok.mask)),
        "timesteps",
    );
    expect_invalid(
        m.forward(&ok.x, &[f64::NAN], &ok.p, &ok.enc, Some(&ok.mask)),
        "finite",
    );
    let empty = inputs(0, 32, 77)?;
    expect_invalid(
        m.forward(&empty.x, &[1.0], &empty.p, &empty.enc, Some(&empty.mask)),
        "empty",
    );

    expect_invalid(m.post_process_latents(&wide.x), "post_process_latents");
    expect_invalid(m.post_process_latents(&ok.enc), "post_process_latents");
    Ok(())
}

#[test]
fn checkpoint_config_mismatch_is_a_load_error() -> Result<()> {
    let dir = ComponentDir::new(fixtures_dir().join("tiny/kandinsky-2-2-prior/prior"))?;
    let mut cfg: PriorTransformerConfig = dir.read_config("config.json")?;
    cfg.num_layers = 3;
    let err = dir
        .checkpoint(WeightVariant::Default)?
        .build(DType::F32, &Device::Cpu, |vb| {
            PriorTransformer::new(vb, &cfg)
        })
        .unwrap_err();
    match err {
        Error::Load(LoadError::MissingTensor { key, .. }) => {
            assert!(key.starts_with("transformer_blocks.2."), "{key}")
        }
        other => panic!("expected a missing tensor, got {other:?}"),
    }
    let mut cfg: PriorTransformerConfig = dir.read_config("config.json")?;
    cfg.embedding_dim = 40;
    let err = dir
        .checkpoint(WeightVariant::Default)?
        .build(DType::F32, &Device::Cpu, |vb| {
            PriorTransformer::new(vb, &cfg)
        })
        .unwrap_err();
    assert!(
        matches!(err, Error::Load(LoadError::ShapeMismatch { .. })),
        "{err}"
    );
    Ok(())
}
