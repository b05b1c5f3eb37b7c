//! Parity with diffusers' `UNet2DConditionModel` on the tiny fixtures
//! (`xtask/fixtures/gen_unet.py`, `gen_unet21.py`): Kandinsky 2.2 decoder, inpainting and
//! ControlNet variants, Kandinsky 2.1 decoder and inpainting variants, batch 2, distinct
//! timesteps, two latent sizes (one non-square).

use candle_core::{DType, Device, Tensor};
use kandinsky_core::testing::{assert_close, diff, fixtures_dir, get, load_fixture};
use kandinsky_core::traits::{Denoiser, DenoiserCondition};
use kandinsky_unet::UNet2DConditionModel;

/// f32 parity tolerance (max abs) against diffusers; outputs are O(5).
const TOL_F32: f32 = 1e-4;

fn tiny(repo: &str, dtype: DType) -> anyhow::Result<UNet2DConditionModel> {
    let dir = fixtures_dir().join("tiny").join(repo).join("unet");
    Ok(UNet2DConditionModel::from_dir(dir, dtype, &Device::Cpu)?)
}

fn timesteps(t: &Tensor) -> anyhow::Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

fn run_case(
    unet: &UNet2DConditionModel,
    fx: &std::collections::HashMap<String, Tensor>,
    k: usize,
) -> anyhow::Result<Tensor> {
    let sample = get(fx, &format!("sample_{k}"))?;
    let ts = timesteps(get(fx, &format!("timesteps_{k}"))?)?;
    let emb = get(fx, &format!("image_embeds_{k}"))?;
    let hint = fx.get(&format!("hint_{k}"));
    Ok(unet.forward(sample, &ts, emb, hint)?)
}

fn parity(variant: &str, repo: &str) -> anyhow::Result<()> {
    let unet = tiny(repo, DType::F32)?;
    let fx = load_fixture(&format!("unet/{variant}.safetensors"))?;
    for k in 0..2 {
        let out = run_case(&unet, &fx, k)?;
        let reference = get(&fx, &format!("output_{k}"))?;
        assert_close(
            &format!("{variant} {:?}", reference.dims()),
            &out,
            reference,
            TOL_F32,
        )?;
    }
    Ok(())
}

#[test]
fn decoder_matches_diffusers() -> anyhow::Result<()> {
    parity("decoder", "kandinsky-2-2-decoder")
}

#[test]
fn inpaint_matches_diffusers() -> anyhow::Result<()> {
    parity("inpaint", "kandinsky-2-2-decoder-inpaint")
}

#[test]
fn controlnet_matches_diffusers() -> anyhow::Result<()> {
    parity("controlnet", "kandinsky-2-2-controlnet-depth")
}

/// Kandinsky 2.1 case `k`: image, pooled text and text hidden states.
fn run_case_21(
    unet: &UNet2DConditionModel,
    fx: &std::collections::HashMap<String, Tensor>,
    k: usize,
) -> anyhow::Result<Tensor> {
    let sample = get(fx, &format!("sample_{k}"))?;
    let ts = timesteps(get(fx, &format!("timesteps_{k}"))?)?;
    Ok(unet.forward_text_image(
        sample,
        &ts,
        get(fx, &format!("image_embeds_{k}"))?,
        get(fx, &format!("text_embeds_{k}"))?,
        get(fx, &format!("text_hidden_states_{k}"))?,
    )?)
}

fn parity_21(variant: &str, repo: &str) -> anyhow::Result<()> {
    let unet = tiny(repo, DType::F32)?;
    assert!(unet.takes_text());
    let fx = load_fixture(&format!("unet/{variant}.safetensors"))?;
    for k in 0..2 {
        let out = run_case_21(&unet, &fx, k)?;
        let reference = get(&fx, &format!("output_{k}"))?;
        // Same tolerance as the 2.2 variants: 1e-4 max abs (outputs are O(5)).
        assert_close(
            &format!("{variant} {:?}", reference.dims()),
            &out,
            reference,
            TOL_F32,
        )?;
    }
    Ok(())
}

#[test]
fn kandinsky21_decoder_matches_diffusers() -> anyhow::Result<()> {
    parity_21("decoder21", "kandinsky-2-1")
}

#[test]
fn kandinsky21_inpaint_matches_diffusers() -> anyhow::Result<()> {
    parity_21("inpaint21", "kandinsky-2-1-inpaint")
}

/// The text conditioning reaches the output through both paths (the time-embedding term and
/// the cross-attention tokens): changing either input changes the prediction.
#[test]
fn kandinsky21_text_inputs_matter() -> anyhow::Result<()> {
    let unet = tiny("kandinsky-2-1", DType::F32)?;
    let fx = load_fixture("unet/decoder21.safetensors")?;
    let sample = get(&fx, "sample_0")?;
    let ts = timesteps(get(&fx, "timesteps_0")?)?;
    let image = get(&fx, "image_embeds_0")?;
    let pooled = get(&fx, "text_embeds_0")?;
    let hidden = get(&fx, "text_hidden_states_0")?;
    let base = unet.forward_text_image(sample, &ts, image, pooled, hidden)?;
    let changed_pooled = unet.forward_text_image(sample, &ts, image, &pooled.neg()?, hidden)?;
    let changed_hidden = unet.forward_text_image(sample, &ts, image, pooled, &hidden.neg()?)?;
    for (what, out) in [
        ("text_embeds", changed_pooled),
        ("text_hidden_states", changed_hidden),
    ] {
        let d = diff(&out, &base)?;
        assert!(
            d.max_abs > 1e-2,
            "{what} does not change the output ({d:?})"
        );
    }
    Ok(())
}

/// The `Denoiser` trait path of Kandinsky 2.1 is the same computation as
/// `forward_text_image` (inpainting variant: 9 sample channels).
#[test]
fn kandinsky21_denoiser_trait_matches() -> anyhow::Result<()> {
    let unet = tiny("kandinsky-2-1-inpaint", DType::F32)?;
    let fx = load_fixture("unet/inpaint21.safetensors")?;
    let cond = DenoiserCondition {
        image_embeds: Some(get(&fx, "image_embeds_1")?.clone()),
        text_embeds: Some(get(&fx, "text_embeds_1")?.clone()),
        text_hidden_states: Some(get(&fx, "text_hidden_states_1")?.clone()),
        hint: None,
    };
    let ts = timesteps(get(&fx, "timesteps_1")?)?;
    let out = unet.predict(get(&fx, "sample_1")?, &ts, &cond)?;
    assert_close("2.1 trait", &out, get(&fx, "output_1")?, TOL_F32)?;
    assert_eq!(Denoiser::sample_channels(&unet), 9);
    assert_eq!(unet.image_embed_dim(), 32);
    assert_eq!(unet.text_dims(), Some((32, 48)));
    Ok(())
}

/// A loaded fixture: tensors by name.
type Fixture = std::collections::HashMap<String, Tensor>;

/// The ControlNet UNet and its fixture's second case as `Denoiser` inputs: (model, fixture,
/// conditioning, timesteps).
fn controlnet_case_1(
) -> anyhow::Result<(UNet2DConditionModel, Fixture, DenoiserCondition, Vec<f64>)> {
    let unet = tiny("kandinsky-2-2-controlnet-depth", DType::F32)?;
    let fx = load_fixture("unet/controlnet.safetensors")?;
    let cond = DenoiserCondition {
        image_embeds: Some(get(&fx, "image_embeds_1")?.clone()),
        hint: Some(get(&fx, "hint_1")?.clone()),
        ..Default::default()
    };
    let ts = timesteps(get(&fx, "timesteps_1")?)?;
    Ok((unet, fx, cond, ts))
}

/// The `Denoiser` trait path is the same computation as `forward`.
#[test]
fn denoiser_trait_matches_forward() -> anyhow::Result<()> {
    let (unet, fx, cond, ts) = controlnet_case_1()?;
    let out = unet.predict(get(&fx, "sample_1")?, &ts, &cond)?;
    assert_close("trait", &out, get(&fx, "output_1")?, TOL_F32)?;
    assert_eq!(Denoiser::sample_channels(&unet), 4);
    assert_eq!(unet.out_channels(), 8);
    Ok(())
}

/// The timesteps given as their sinusoid (the form a CUDA graph replays) and the graph
/// wrapper (which calls the UNet directly off CUDA) match diffusers like `predict`; a
/// sinusoid of the wrong width is refused with the expected shape.
#[test]
fn sinusoid_input_and_graph_wrapper_match_diffusers() -> anyhow::Result<()> {
    let (unet, fx, cond, ts) = controlnet_case_1()?;
    let sample = get(&fx, "sample_1")?;
    let reference = get(&fx, "output_1")?;
    let prepared = unet.prepare(&cond)?;
    let t_sin = unet.time_sinusoid(&ts)?;
    let out = unet.predict_prepared_with_sinusoid(sample, &t_sin, &prepared)?;
    assert_close("sinusoid input", &out, reference, TOL_F32)?;
    // Other timesteps give another output: the sinusoid is used.
    let other = unet.time_sinusoid(&ts.iter().map(|t| t + 100.0).collect::<Vec<_>>())?;
    let moved = diff(
        &unet.predict_prepared_with_sinusoid(sample, &other, &prepared)?,
        reference,
    )?;
    assert!(
        moved.max_abs > 1e-3,
        "the sinusoid changed nothing: {moved:?}"
    );
    let graphed = kandinsky_unet::GraphedUNet::new(&unet);
    let graphed_prepared = graphed.prepare(&cond)?;
    for _ in 0..2 {
        assert_close(
            "graph wrapper",
            &graphed.predict(sample, &ts, &cond)?,
            reference,
            TOL_F32,
        )?;
        assert_close(
            "graph wrapper, prepared",
            &graphed.predict_prepared(sample, &ts, &graphed_prepared)?,
            reference,
            TOL_F32,
        )?;
    }
    assert!(!graphed.is_captured(), "no graph off CUDA");
    assert_eq!(Denoiser::out_channels(&graphed), 8);
    let wide = Tensor::zeros((t_sin.dim(0)?, t_sin.dim(1)? + 2), DType::F32, &Device::Cpu)?;
    let err = unet
        .predict_prepared_with_sinusoid(sample, &wide, &prepared)
        .expect_err("a sinusoid of the wrong width");
    assert!(err.to_string().contains("time sinusoid"), "{err}");
    Ok(())
}

/// A conditioning prepared once ([`Denoiser::prepare`]) serves every step: each variant's
/// prepared prediction equals the unprepared one bit for bit (the same operations, only
/// hoisted) at two timestep sets, and matches diffusers at the fixture's.
#[test]
fn prepared_condition_serves_every_step() -> anyhow::Result<()> {
    for (variant, repo) in [
        ("decoder", "kandinsky-2-2-decoder"),
        ("inpaint", "kandinsky-2-2-decoder-inpaint"),
        ("controlnet", "kandinsky-2-2-controlnet-depth"),
        ("decoder21", "kandinsky-2-1"),
        ("inpaint21", "kandinsky-2-1-inpaint"),
    ] {
        let unet = tiny(repo, DType::F32)?;
        let fx = load_fixture(&format!("unet/{variant}.safetensors"))?;
        let opt = |name: &str| fx.get(&format!("{name}_1")).cloned();
        let cond = DenoiserCondition {
            image_embeds: opt("image_embeds"),
            hint: opt("hint"),
            text_embeds: opt("text_embeds"),
            text_hidden_states: opt("text_hidden_states"),
        };
        let prepared = unet.prepare(&cond)?;
        // Additive term, two tensors per attention layer, and the ControlNet's hint.
        assert!(prepared.tensors().len() >= 3, "{variant}: nothing prepared");
        let sample = get(&fx, "sample_1")?;
        let ts = timesteps(get(&fx, "timesteps_1")?)?;
        let later: Vec<f64> = ts.iter().map(|t| t * 0.5).collect();
        for t in [&ts, &later] {
            let d = diff(
                &unet.predict_prepared(sample, t, &prepared)?,
                &unet.predict(sample, t, &cond)?,
            )?;
            assert_eq!(d.max_abs, 0.0, "{variant} at {t:?}: prepared ≠ unprepared");
        }
        assert_close(
            &format!("{variant} prepared"),
            &unet.predict_prepared(sample, &ts, &prepared)?,
            get(&fx, "output_1")?,
            TOL_F32,
        )?;
    }
    Ok(())
}

/// f16 / bf16 forward against diffusers' f32 output (weights are f16-exact in the fixture,
/// so only activation rounding differs). Tolerances relative to the output's max magnitude
/// (≈ 4.4): f16 has an 11-bit mantissa, bf16 8 bits.
#[test]
fn half_precision_close_to_f32() -> anyhow::Result<()> {
    let fx = load_fixture("unet/decoder.safetensors")?;
    let reference = get(&fx, "output_1")?;
    for (dtype, tol_rel) in [(DType::F16, 1e-2f32), (DType::BF16, 6e-2)] {
        let unet = tiny("kandinsky-2-2-decoder", dtype)?;
        let out = run_case(&unet, &fx, 1)?;
        assert_eq!(out.dtype(), dtype);
        let d = diff(&out, reference)?;
        eprintln!(
            "{dtype:?} vs diffusers f32: max abs {:.3e}, rel {:.3e} (tolerance rel {tol_rel:.0e})",
            d.max_abs, d.rel
        );
        assert!(d.rel <= tol_rel, "{dtype:?}: rel {} > {tol_rel}", d.rel);
    }
    Ok(())
}

/// Kandinsky 2.1 in f16 / bf16 against diffusers' f32 output, same tolerances as 2.2 (the
/// text path adds two Linear layers and a LayerNorm, all rounded like the rest).
#[test]
fn kandinsky21_half_precision_close_to_f32() -> anyhow::Result<()> {
    let fx = load_fixture("unet/decoder21.safetensors")?;
    let reference = get(&fx, "output_1")?;
    for (dtype, tol_rel) in [(DType::F16, 1e-2f32), (DType::BF16, 6e-2)] {
        let unet = tiny("kandinsky-2-1", dtype)?;
        let out = run_case_21(&unet, &fx, 1)?;
        assert_eq!(out.dtype(), dtype);
        let d = diff(&out, reference)?;
        eprintln!(
            "2.1 {dtype:?} vs diffusers f32: max abs {:.3e}, rel {:.3e} (tolerance rel {tol_rel:.0e})",
            d.max_abs, d.rel
        );
        assert!(d.rel <= tol_rel, "{dtype:?}: rel {} > {tol_rel}", d.rel);
    }
    Ok(())
}
