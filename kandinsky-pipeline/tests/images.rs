//! Inpainting mask preprocessing against Pillow 13 (`xtask/fixtures/gen_pil.py`): every mask PNG
//! in `fixtures/pipeline/masks/` resized with `Image.resize((W, H), LANCZOS)` in its own mode
//! and converted to `L`, as diffusers' Kandinsky inpaint pipelines do. Exact, byte for byte.

use candle_core::{Device, Tensor};
use image::{DynamicImage, GrayImage, ImageBuffer, Rgb, RgbImage};
use kandinsky_clip::pil_resample::{self, Filter};
use kandinsky_core::testing::{fixtures_dir, load_fixture};
use kandinsky_pipeline::images;

const FIXTURE: &str = "pipeline/masks/pillow.safetensors";

/// A fixture key `<stem>__<W>x<H>[__resized]`.
struct Case {
    stem: String,
    width: u32,
    height: u32,
    resized: bool,
}

fn parse(key: &str) -> anyhow::Result<Case> {
    let mut parts = key.split("__");
    let stem = parts.next().unwrap_or_default().to_string();
    let size = parts
        .next()
        .ok_or_else(|| anyhow::anyhow!("no size in {key}"))?;
    let (w, h) = size
        .split_once('x')
        .ok_or_else(|| anyhow::anyhow!("bad size in {key}"))?;
    let resized = match parts.next() {
        None => false,
        Some("resized") => true,
        Some(other) => anyhow::bail!("unknown suffix {other} in {key}"),
    };
    Ok(Case {
        stem,
        width: w.parse()?,
        height: h.parse()?,
        resized,
    })
}

fn mask(stem: &str) -> anyhow::Result<DynamicImage> {
    let path = fixtures_dir()
        .join("pipeline/masks")
        .join(format!("{stem}.png"));
    Ok(images::open(&path)?)
}

fn bytes(t: &Tensor) -> anyhow::Result<Vec<u8>> {
    Ok(t.flatten_all()?.to_vec1::<u8>()?)
}

/// Every case of the fixture, sorted, split into the `L` results and the in-mode resizes.
fn cases() -> anyhow::Result<Vec<(Case, Vec<u8>)>> {
    let f = load_fixture(FIXTURE)?;
    let mut keys: Vec<&String> = f.keys().collect();
    keys.sort();
    keys.into_iter()
        .map(|k| Ok((parse(k)?, bytes(&f[k])?)))
        .collect()
}

#[test]
fn masks_decode_in_pillows_modes() -> anyhow::Result<()> {
    // Pillow opens these PNGs as L, LA, RGB and RGBA; the image crate must agree, or the
    // per-mode paths below would not be the ones Pillow ran.
    for (stem, expected) in [
        ("l_gradient_50x37", image::ColorType::L8),
        ("l_sharp_96x80", image::ColorType::L8),
        ("la_50x37", image::ColorType::La8),
        ("rgb_sharp_50x37", image::ColorType::Rgb8),
        ("rgb_gradient_96x80", image::ColorType::Rgb8),
        ("rgba_96x80", image::ColorType::Rgba8),
    ] {
        assert_eq!(mask(stem)?.color(), expected, "{stem}");
    }
    Ok(())
}

#[test]
fn mask_luma_matches_pillow_byte_for_byte() -> anyhow::Result<()> {
    let mut n = 0;
    for (case, expected) in cases()?.into_iter().filter(|(c, _)| !c.resized) {
        let img = mask(&case.stem)?;
        let (w, h) = (case.width as usize, case.height as usize);
        let got = images::mask_luma(&img, w, h)?;
        assert_eq!(got.dimensions(), (case.width, case.height));
        let bad = got
            .as_raw()
            .iter()
            .zip(&expected)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            bad,
            0,
            "{}→{w}×{h}: {bad} of {} bytes differ from Pillow",
            case.stem,
            expected.len()
        );
        // The tensor is exactly those bytes / 255.
        let t = images::mask_tensor(&img, w, h, &Device::Cpu)?;
        assert_eq!(t.dims(), [1, 1, h, w]);
        let want: Vec<f32> = expected.iter().map(|&v| v as f32 / 255.0).collect();
        assert_eq!(t.flatten_all()?.to_vec1::<f32>()?, want, "{}", case.stem);
        n += 1;
    }
    // 3 small masks × 5 targets + 3 larger × 2.
    assert_eq!(n, 21, "fixture cases");
    Ok(())
}

#[test]
fn in_mode_resizes_match_pillow() -> anyhow::Result<()> {
    let mut n = 0;
    for (case, expected) in cases()?.into_iter().filter(|(c, _)| c.resized) {
        let (w, h) = (case.width, case.height);
        let got = match mask(&case.stem)? {
            DynamicImage::ImageLuma8(m) => {
                pil_resample::resize_luma(&m, w, h, Filter::Lanczos).into_raw()
            }
            DynamicImage::ImageLumaA8(m) => {
                pil_resample::resize_luma_alpha(&m, w, h, Filter::Lanczos).into_raw()
            }
            DynamicImage::ImageRgb8(m) => {
                pil_resample::resize_rgb(&m, w, h, Filter::Lanczos).into_raw()
            }
            DynamicImage::ImageRgba8(m) => {
                pil_resample::resize_rgba(&m, w, h, Filter::Lanczos).into_raw()
            }
            other => anyhow::bail!("{}: unexpected {:?}", case.stem, other.color()),
        };
        assert!(got == expected, "{}→{w}×{h} differs from Pillow", case.stem);
        n += 1;
    }
    assert_eq!(n, 6, "fixture cases");
    Ok(())
}

#[test]
fn same_size_grey_masks_are_unchanged() -> anyhow::Result<()> {
    // Same size: no resampling, the value is the grey level / 255, as before.
    let l = GrayImage::from_fn(9, 4, |x, y| image::Luma([(x * 29 + y * 61) as u8]));
    let rgb = RgbImage::from_fn(9, 4, |x, y| {
        let v = (x * 29 + y * 61) as u8;
        Rgb([v, v, v])
    });
    for img in [
        DynamicImage::ImageLuma8(l.clone()),
        DynamicImage::ImageRgb8(rgb),
    ] {
        let t = images::mask_tensor(&img, 9, 4, &Device::Cpu)?;
        let want: Vec<f32> = l.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
        assert_eq!(t.flatten_all()?.to_vec1::<f32>()?, want);
    }
    Ok(())
}

#[test]
fn same_size_colour_masks_use_pillows_luma() -> anyhow::Result<()> {
    // Pillow: L(0, 0, 250) = 28; the former (299 R + 587 G + 114 B + 500) / 1000 gave 29.
    let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(3, 2, Rgb([0, 0, 250])));
    let l = images::mask_luma(&img, 3, 2)?;
    assert!(l.pixels().all(|p| p.0 == [28]));
    Ok(())
}

#[test]
fn sixteen_bit_masks_use_the_high_byte() -> anyhow::Result<()> {
    // Pillow unpacks 16-bit RGB PNGs to 8 bits by their high byte (`RGB;16B`).
    let raw16: Vec<u16> = (0..5 * 3 * 3).map(|i| (i * 1511 + 200) as u16).collect();
    let raw8: Vec<u8> = raw16.iter().map(|&v| (v >> 8) as u8).collect();
    let img16: ImageBuffer<Rgb<u16>, Vec<u16>> =
        ImageBuffer::from_raw(5, 3, raw16).ok_or_else(|| anyhow::anyhow!("size"))?;
    let img8 = RgbImage::from_raw(5, 3, raw8).ok_or_else(|| anyhow::anyhow!("size"))?;
    let a = images::mask_luma(&DynamicImage::ImageRgb16(img16), 7, 2)?;
    let b = images::mask_luma(&DynamicImage::ImageRgb8(img8), 7, 2)?;
    assert_eq!(a, b);
    Ok(())
}
