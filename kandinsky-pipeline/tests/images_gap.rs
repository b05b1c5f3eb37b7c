//! Image preprocessing against Pillow 13 (`xtask/fixtures/gen_pil.py`): the PNGs of
//! `fixtures/pipeline/masks/` (L, LA, RGB, RGBA) through
//! `Image.resize((W, H), BICUBIC, reducing_gap=1).convert("RGB")`, as diffusers' Kandinsky
//! img2img and inpaint pipelines resize a PIL `image`. Exact, byte for byte.

use candle_core::{Device, Tensor};
use image::{DynamicImage, RgbImage};
use kandinsky_clip::pil_resample::{self, Filter};
use kandinsky_core::testing::{fixtures_dir, load_fixture};
use kandinsky_pipeline::images;

const FIXTURE: &str = "pipeline/masks/pillow_images.safetensors";

/// `(stem, width, height, Pillow's RGB bytes)`.
type Case = (String, usize, usize, Vec<u8>);

/// Every key `<stem>__<W>x<H>` of the fixture, sorted.
fn cases() -> anyhow::Result<Vec<Case>> {
    let f = load_fixture(FIXTURE)?;
    let mut keys: Vec<&String> = f.keys().collect();
    keys.sort();
    keys.into_iter()
        .map(|k| {
            let (stem, size) = k
                .split_once("__")
                .ok_or_else(|| anyhow::anyhow!("bad key {k}"))?;
            let (w, h) = size
                .split_once('x')
                .ok_or_else(|| anyhow::anyhow!("bad size in {k}"))?;
            let bytes = f[k].flatten_all()?.to_vec1::<u8>()?;
            Ok((stem.to_string(), w.parse()?, h.parse()?, bytes))
        })
        .collect()
}

fn png(stem: &str) -> anyhow::Result<DynamicImage> {
    let path = fixtures_dir()
        .join("pipeline/masks")
        .join(format!("{stem}.png"));
    Ok(images::open(&path)?)
}

#[test]
fn image_rgb_matches_pillow_with_reducing_gap() -> anyhow::Result<()> {
    let cases = cases()?;
    assert_eq!(cases.len(), 21, "cases in {FIXTURE}");
    let mut failures = Vec::new();
    for (stem, w, h, want) in &cases {
        let got = images::image_rgb(&png(stem)?, *w, *h)?;
        assert_eq!((got.width() as usize, got.height() as usize), (*w, *h));
        if got.as_raw() != want {
            let n = got
                .as_raw()
                .iter()
                .zip(want)
                .filter(|(a, b)| a != b)
                .count();
            failures.push(format!("{stem} → {w}×{h}: {n} bytes differ"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

#[test]
fn the_gap_and_the_mode_change_the_bytes() -> anyhow::Result<()> {
    // What the exact path fixes: converting to RGB first and resizing without the gap (the
    // previous behaviour) differs from Pillow on downscales by 2× or more, RGBA images also by
    // the premultiplied alpha.
    let cases = cases()?;
    let mut differ = Vec::new();
    for (stem, w, h, want) in &cases {
        let old =
            pil_resample::resize_rgb(&png(stem)?.to_rgb8(), *w as u32, *h as u32, Filter::Bicubic);
        if old.as_raw() != want {
            differ.push(format!("{stem}__{w}x{h}"));
        }
    }
    for key in [
        "rgb_gradient_96x80__40x33",
        "l_gradient_50x37__16x12",
        "rgb_sharp_50x37__23x17",
        "rgba_96x80__24x20",
        "rgba_96x80__100x13",
    ] {
        assert!(differ.iter().any(|d| d == key), "{key}: {differ:?}");
    }
    // Factors of 1×1 without alpha: the gap changes nothing.
    for key in ["rgb_sharp_50x37__55x20", "l_gradient_50x37__55x20"] {
        assert!(!differ.iter().any(|d| d == key), "{key}");
    }
    Ok(())
}

#[test]
fn image_tensor_is_image_rgb_in_minus_one_one() -> anyhow::Result<()> {
    let img = png("rgba_96x80")?;
    let rgb = images::image_rgb(&img, 40, 33)?;
    let t = images::image_tensor(&img, 40, 33, &Device::Cpu)?;
    assert_eq!(t.dims(), [1, 3, 33, 40]);
    let back: Vec<u8> = ((t.permute((0, 2, 3, 1))?.flatten_all()? + 1.0)? * 127.5)?
        .round()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|v| v as u8)
        .collect();
    assert_eq!(back, rgb.into_raw());
    Ok(())
}

#[test]
fn hints_are_not_resized_with_the_gap() -> anyhow::Result<()> {
    // diffusers never resizes a hint; ours keeps the plain bicubic resize of the RGB image.
    let img = png("rgb_gradient_96x80")?;
    let t = images::hint_tensor(&img, 40, 33, &Device::Cpu)?;
    let plain = pil_resample::resize_bicubic(&img.to_rgb8(), 40, 33);
    let want: Vec<f32> = plain.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
    let want = Tensor::from_vec(want, (33, 40, 3), &Device::Cpu)?.permute((2, 0, 1))?;
    let d = (t.squeeze(0)? - want)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    assert_eq!(d, 0.0);
    assert_ne!(plain, images::image_rgb(&img, 40, 33)?);
    Ok(())
}

#[test]
fn oversized_targets_are_errors() {
    let img = DynamicImage::ImageRgb8(RgbImage::new(4, 4));
    assert!(images::image_rgb(&img, usize::MAX, 2).is_err());
    assert!(images::hint_tensor(&img, 2, usize::MAX, &Device::Cpu).is_err());
}
