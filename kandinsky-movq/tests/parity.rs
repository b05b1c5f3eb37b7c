//! Parity with diffusers' `VQModel` on the tiny fixture (`xtask/fixtures/gen_movq.py`).

use candle_core::{DType, Device, Tensor};
use kandinsky_core::testing::{assert_close, fixtures_dir, get, load_fixture};
use kandinsky_movq::{rgb8_to_tensor, tensor_to_rgb8, Rgb8Image, VQModel};

fn tiny(dtype: DType) -> anyhow::Result<VQModel> {
    let dir = fixtures_dir().join("tiny/kandinsky-2-2-decoder/movq");
    Ok(VQModel::load(dir, dtype, &Device::Cpu)?)
}

// Models in f32: max abs ≤ 1e-4 (outputs are of order 1).
const TOL: f32 = 1e-4;

#[test]
fn encode_matches_diffusers() -> anyhow::Result<()> {
    let fx = load_fixture("movq/parity.safetensors")?;
    let model = tiny(DType::F32)?;
    let latents = model.encode(get(&fx, "image")?)?;
    assert_close("encode", &latents, get(&fx, "latents")?, TOL)?;
    Ok(())
}

#[test]
fn decode_matches_diffusers() -> anyhow::Result<()> {
    let fx = load_fixture("movq/parity.safetensors")?;
    let model = tiny(DType::F32)?;
    let latents = get(&fx, "latents")?;
    let dec = model.decode(latents, true)?;
    assert_close("decode (not quantized)", &dec, get(&fx, "decoded")?, TOL)?;
    let noise = model.decode(get(&fx, "noise_latents")?, true)?;
    assert_close(
        "decode (noise latents)",
        &noise,
        get(&fx, "decoded_noise")?,
        TOL,
    )?;
    let dec_q = model.decode(latents, false)?;
    assert_close(
        "decode (quantized)",
        &dec_q,
        get(&fx, "decoded_quantized")?,
        TOL,
    )?;
    Ok(())
}

#[test]
fn quantizer_matches_diffusers() -> anyhow::Result<()> {
    let fx = load_fixture("movq/parity.safetensors")?;
    let model = tiny(DType::F32)?;
    let (quant, indices) = model.quantize(get(&fx, "latents")?)?;
    // Codebook rows copied: only the rounding of z + (z_q − z) differs.
    assert_close("quantized", &quant, get(&fx, "quantized")?, 1e-6)?;
    let ours: Vec<i64> = indices.flatten_all()?.to_dtype(DType::I64)?.to_vec1()?;
    let theirs: Vec<i64> = get(&fx, "indices")?.to_vec1()?;
    assert_eq!(ours, theirs, "codebook indices");
    Ok(())
}

#[test]
fn pixel_conversions_match_the_pipelines() -> anyhow::Result<()> {
    let fx = load_fixture("movq/image.safetensors")?;
    let pixels = get(&fx, "pixels")?; // [B, H, W, 3] u8
    let (b, h, w, _) = pixels.dims4()?;
    let images: Vec<Rgb8Image> = (0..b)
        .map(|i| -> anyhow::Result<Rgb8Image> {
            let data = pixels.get(i)?.flatten_all()?.to_vec1::<u8>()?;
            Ok(Rgb8Image::new(w, h, data)?)
        })
        .collect::<anyhow::Result<_>>()?;
    let t = rgb8_to_tensor(&images, DType::F32, &Device::Cpu)?;
    // Same f32 formula: bit-identical.
    assert_close("rgb8 → tensor", &t, get(&fx, "pixels_normalized")?, 0.0)?;

    let back = tensor_to_rgb8(get(&fx, "decoded")?)?;
    let reference = get(&fx, "decoded_pixels")?;
    for (i, img) in back.iter().enumerate() {
        assert_eq!((img.width, img.height), (w, h));
        let want = reference.get(i)?.flatten_all()?.to_vec1::<u8>()?;
        assert_eq!(
            img.data, want,
            "image {i}: pixels differ (half-to-even rounding?)"
        );
    }
    Ok(())
}

#[test]
fn half_precision_decode_256_tracks_f32() -> anyhow::Result<()> {
    // A 256×256 decode (32×32 latents) of the tiny model in f16 and bf16 against f32.
    let f32_model = tiny(DType::F32)?;
    let latents = Tensor::randn(0f32, 1.0, (1, 4, 32, 32), &Device::Cpu)?;
    let reference = f32_model.decode(&latents, true)?;
    let scale = reference.abs()?.max_all()?.to_scalar::<f32>()?;
    for (dtype, rel_tol) in [(DType::F16, 1e-2f32), (DType::BF16, 6e-2)] {
        let out = tiny(dtype)?.decode(&latents, true)?;
        assert_eq!(out.dtype(), dtype);
        let d = kandinsky_core::testing::diff(&out, &reference)?;
        eprintln!(
            "{dtype:?} vs f32 at 256²: max abs {:.3e}, rel {:.3e}",
            d.max_abs, d.rel
        );
        assert!(d.max_abs.is_finite(), "{dtype:?} decode overflowed");
        // Relative to the output's largest magnitude ({scale}).
        assert!(
            d.rel <= rel_tol,
            "{dtype:?}: rel {} > {rel_tol} (scale {scale})",
            d.rel
        );
    }
    Ok(())
}

#[test]
fn legacy_attention_names_load_identically() -> anyhow::Result<()> {
    // Old MoVQ checkpoints name the attention projections query/key/value/proj_attn and
    // store them as 1×1 convolution weights [C, C, 1, 1].
    let src = fixtures_dir().join("tiny/kandinsky-2-2-decoder/movq");
    let tensors = candle_core::safetensors::load(
        src.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )?;
    let mut legacy = std::collections::HashMap::new();
    let mut renamed = 0;
    for (name, t) in tensors {
        let mut new = name.clone();
        for (from, to) in [
            (".to_q.", ".query."),
            (".to_k.", ".key."),
            (".to_v.", ".value."),
            (".to_out.0.", ".proj_attn."),
        ] {
            new = new.replace(from, to);
        }
        let t = if new != name && t.rank() == 2 {
            let (o, i) = t.dims2()?;
            t.reshape((o, i, 1, 1))?
        } else {
            t
        };
        renamed += usize::from(new != name);
        legacy.insert(new, t);
    }
    assert!(renamed >= 4 * 2 * 4, "renamed only {renamed} tensors");
    let dir = std::env::temp_dir().join(format!("kandinsky-movq-legacy-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::copy(src.join("config.json"), dir.join("config.json"))?;
    candle_core::safetensors::save(&legacy, dir.join("diffusion_pytorch_model.safetensors"))?;
    let model = VQModel::load(&dir, DType::F32, &Device::Cpu)?;
    std::fs::remove_dir_all(&dir)?;

    let fx = load_fixture("movq/parity.safetensors")?;
    let dec = model.decode(get(&fx, "latents")?, true)?;
    assert_close("decode (legacy names)", &dec, get(&fx, "decoded")?, TOL)?;
    let latents = model.encode(get(&fx, "image")?)?;
    assert_close("encode (legacy names)", &latents, get(&fx, "latents")?, TOL)?;
    Ok(())
}
