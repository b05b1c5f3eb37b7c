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

/// A prepared conditioning is checked when prepared and against every step's latents:
/// another batch, or a preparation of nothing (another prior's default), is a typed error.
#[test]
fn bad_prepared_conditions() -> Result<()> {
    use kandinsky_core::traits::{EmbeddingPrior, PreparedPriorCondition, PriorCondition};
    let model = tiny()?;
    let (e, l) = (32, 77);
    let i = inputs(2, e, l)?;
    let cond = PriorCondition {
        proj_embedding: &i.p,
        encoder_hidden_states: &i.enc,
        attention_mask: &i.mask,
    };
    let wide = Tensor::zeros((2, e + 1), DType::F32, &Device::Cpu)?;
    match model.prepare(&PriorCondition {
        proj_embedding: &wide,
        ..cond
    }) {
        Err(Error::InvalidInput(msg)) => assert!(msg.contains("proj_embedding"), "{msg}"),
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    let short_mask = Tensor::ones((2, l - 1), DType::F32, &Device::Cpu)?;
    match model.prepare(&PriorCondition {
        attention_mask: &short_mask,
        ..cond
    }) {
        Err(Error::InvalidInput(msg)) => assert!(msg.contains("attention_mask"), "{msg}"),
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    let prepared = model.prepare(&cond)?;
    assert!(model.predict_prepared(&i.x, 10.0, &prepared).is_ok());
    expect_invalid(
        model.predict_prepared(&i.x.narrow(0, 0, 1)?, 10.0, &prepared),
        "mask rows [2, 1, 3, 81], expected [1, 1, 3, 81]",
    );
    expect_invalid(
        model.predict_prepared(&i.x, f64::NAN, &prepared),
        "not finite",
    );
    let empty = PreparedPriorCondition::new(&cond, Vec::new());
    expect_invalid(model.predict_prepared(&i.x, 10.0, &empty), "no tensors");
    Ok(())
}
