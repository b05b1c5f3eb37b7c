//! `Image.resize(size, filter, reducing_gap=…)` against Pillow 13 (`xtask/fixtures/gen_pil.py`,
//! `fixtures/clip/pil_resize_gap.safetensors`): synthetic L, LA, RGB and RGBA images, BICUBIC
//! and LANCZOS, downscales by factors from 2 to 12 with partial edge boxes, one axis up and
//! the other down, gaps of 1, 1.5, 2 and 3. Each case is checked with the gap and without it,
//! byte for byte (whole images, or a hash per row for the large ones).

use std::collections::{BTreeMap, HashMap};

use candle_core::Tensor;
use image::{GrayAlphaImage, GrayImage, ImageBuffer, Pixel, RgbImage, RgbaImage};
use kandinsky_clip::pil_resample::{self, Filter};
use kandinsky_core::testing::load_fixture;

const FIXTURE: &str = "clip/pil_resize_gap.safetensors";

/// `synth` of gen_pil.py: a gradient with inverted blocks, noise and salt-and-pepper pixels;
/// with alpha the last channel is 0, 255, noise and a ramp in four vertical bands.
fn synth(w: usize, h: usize, c: usize, seed: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(w * h * c);
    for y in 0..h {
        for x in 0..w {
            for k in 0..c {
                let mut u = (x as u32).wrapping_mul(0x9E37_79B1)
                    ^ (y as u32).wrapping_mul(0x85EB_CA77)
                    ^ (k as u32).wrapping_mul(0xC2B2_AE3D)
                    ^ seed;
                u ^= u >> 15;
                u = u.wrapping_mul(0x2C1B_3C6D);
                u ^= u >> 12;
                u = u.wrapping_mul(0x297A_2D39);
                u ^= u >> 15;
                let (x, y, k, u) = (x as i64, y as i64, k as i64, u as i64);
                let (w1, h1) = ((w as i64 - 1).max(1), (h as i64 - 1).max(1));
                let mut grad = ((x * 255 / w1 + y * 255 / h1) / 2 + k * 85) % 256;
                if (x * 8 / w as i64 + y * 6 / h as i64) % 2 == 1 {
                    grad = 255 - grad;
                }
                let mut val = (grad + (u & 63) - 32).clamp(0, 255);
                if (u >> 8) & 15 == 0 {
                    val = if (u >> 12) & 1 == 1 { 255 } else { 0 };
                }
                if (c == 2 || c == 4) && k == c as i64 - 1 {
                    val = match x * 4 / w as i64 {
                        0 => 0,
                        1 => 255,
                        2 => (u >> 16) & 255,
                        _ => y * 255 / h1,
                    };
                }
                v.push(val as u8);
            }
        }
    }
    v
}

/// FNV-1a, 64 bits (the fixture's hash).
fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xCBF2_9CE4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01B3)
    })
}

/// Pillow's result as stored: the image, or one hash per row.
enum Expected {
    Bytes(Vec<u8>),
    Rows(Vec<u64>),
}

struct Case {
    name: String,
    channels: usize,
    size: (usize, usize),
    out: (usize, usize),
    filter: Filter,
    gap: Option<f64>,
    seed: u32,
    input_hash: u64,
    with_gap: Expected,
    plain: Expected,
}

fn i64s(t: &Tensor) -> anyhow::Result<Vec<i64>> {
    Ok(t.flatten_all()?.to_vec1::<i64>()?)
}

fn expected(f: &HashMap<String, Tensor>, prefix: &str) -> anyhow::Result<Expected> {
    if let Some(t) = f.get(&format!("{prefix}out")) {
        return Ok(Expected::Bytes(t.flatten_all()?.to_vec1::<u8>()?));
    }
    let t = f
        .get(&format!("{prefix}rows"))
        .ok_or_else(|| anyhow::anyhow!("no {prefix}out or {prefix}rows"))?;
    Ok(Expected::Rows(
        i64s(t)?.into_iter().map(|v| v as u64).collect(),
    ))
}

fn cases() -> anyhow::Result<Vec<Case>> {
    let f = load_fixture(FIXTURE)?;
    let mut names = BTreeMap::new();
    for key in f.keys() {
        if let Some(name) = key.strip_suffix("__params") {
            names.insert(name.to_string(), ());
        }
    }
    names
        .into_keys()
        .map(|name| {
            let p = i64s(&f[&format!("{name}__params")])?;
            let [c, w, h, ow, oh, filter, gap, seed] = p[..] else {
                anyhow::bail!("{name}: bad params {p:?}");
            };
            let filter = match filter {
                0 => Filter::Bicubic,
                1 => Filter::Lanczos,
                other => anyhow::bail!("{name}: unknown filter {other}"),
            };
            let input_hash = i64s(&f[&format!("{name}__input")])?[0] as u64;
            Ok(Case {
                with_gap: expected(&f, &format!("{name}__"))?,
                plain: expected(&f, &format!("{name}__plain_"))?,
                name,
                channels: c as usize,
                size: (w as usize, h as usize),
                out: (ow as usize, oh as usize),
                filter,
                gap: (gap != 0).then_some(gap as f64 / 1000.0),
                seed: seed as u32,
                input_hash,
            })
        })
        .collect()
}

/// `Ok` when `got` is Pillow's result; else the first differing row.
fn check(what: &str, got: &[u8], expected: &Expected, row_bytes: usize) -> Result<(), String> {
    let rows: Vec<&[u8]> = got.chunks(row_bytes.max(1)).collect();
    match expected {
        Expected::Bytes(want) if got == want.as_slice() => Ok(()),
        Expected::Bytes(want) => {
            let at = got.iter().zip(want).position(|(a, b)| a != b);
            Err(format!(
                "{what}: {} bytes vs Pillow's {}, first difference at byte {at:?}",
                got.len(),
                want.len()
            ))
        }
        Expected::Rows(want) => {
            let hashes: Vec<u64> = rows.iter().map(|r| fnv1a64(r)).collect();
            if &hashes == want {
                return Ok(());
            }
            let at = hashes.iter().zip(want).position(|(a, b)| a != b);
            Err(format!(
                "{what}: {} rows vs Pillow's {}, first differing row {at:?}",
                hashes.len(),
                want.len()
            ))
        }
    }
}

/// The typed API on the same bytes, for the mode the channel count names.
fn typed(case: &Case, src: Vec<u8>, gap: Option<f64>) -> anyhow::Result<Vec<u8>> {
    fn run<P: Pixel<Subpixel = u8>>(
        case: &Case,
        src: Vec<u8>,
        gap: Option<f64>,
    ) -> anyhow::Result<Vec<u8>> {
        let (w, h) = (case.size.0 as u32, case.size.1 as u32);
        let img: ImageBuffer<P, Vec<u8>> = ImageBuffer::from_raw(w, h, src)
            .ok_or_else(|| anyhow::anyhow!("{}: bad input size", case.name))?;
        let (ow, oh) = (case.out.0 as u32, case.out.1 as u32);
        Ok(pil_resample::resize_image(&img, ow, oh, case.filter, gap)?.into_raw())
    }
    match case.channels {
        1 => run::<image::Luma<u8>>(case, src, gap),
        2 => run::<image::LumaA<u8>>(case, src, gap),
        3 => run::<image::Rgb<u8>>(case, src, gap),
        4 => run::<image::Rgba<u8>>(case, src, gap),
        c => anyhow::bail!("{}: {c} channels", case.name),
    }
}

#[test]
fn resize_with_reducing_gap_matches_pillow_byte_for_byte() -> anyhow::Result<()> {
    let cases = cases()?;
    assert_eq!(cases.len(), 30, "cases in {FIXTURE}");
    let mut failures = Vec::new();
    let (mut exact, mut reduced) = (0, 0);
    for case in &cases {
        let src = synth(case.size.0, case.size.1, case.channels, case.seed);
        // The inputs are regenerated here: both sides must have produced the same bytes.
        assert_eq!(
            fnv1a64(&src),
            case.input_hash,
            "{}: synth differs from gen_pil.py",
            case.name
        );
        let row = case.out.0 * case.channels;
        for (gap, want, label) in [
            (case.gap, &case.with_gap, "reducing_gap"),
            (None, &case.plain, "plain"),
        ] {
            let got = typed(case, src.clone(), gap)?;
            match check(&format!("{} ({label})", case.name), &got, want, row) {
                Ok(()) => exact += 1,
                Err(e) => failures.push(e),
            }
        }
        if let (Expected::Rows(a), Expected::Rows(b)) = (&case.with_gap, &case.plain) {
            reduced += usize::from(a != b);
        }
        if let (Expected::Bytes(a), Expected::Bytes(b)) = (&case.with_gap, &case.plain) {
            reduced += usize::from(a != b);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(exact, 2 * cases.len());
    // The fixture does exercise the reduction: Pillow's two results differ for most cases.
    assert!(reduced >= 20, "only {reduced} cases differ with the gap");
    Ok(())
}

#[test]
fn raw_buffers_match_the_typed_api_for_modes_without_alpha() -> anyhow::Result<()> {
    // `resize_with_gap` on raw bytes is the channel-independent path: it equals the typed API
    // for L and RGB, and (not premultiplying) differs from it for an RGBA image.
    for case in cases()?.iter().filter(|c| c.size.0 * c.size.1 <= 300 * 300) {
        let src = synth(case.size.0, case.size.1, case.channels, case.seed);
        let raw = pil_resample::resize_with_gap(
            &src,
            case.channels,
            case.size,
            case.out,
            case.filter,
            case.gap,
        )?;
        let row = case.out.0 * case.channels;
        let res = check(&case.name, &raw, &case.with_gap, row);
        match case.channels {
            1 | 3 => assert!(res.is_ok(), "{res:?}"),
            _ => assert!(
                res.is_err(),
                "{}: premultiplication had no effect",
                case.name
            ),
        }
    }
    Ok(())
}

#[test]
fn reduce_is_a_rounded_box_mean() -> anyhow::Result<()> {
    // 5×3 `L` reduced 2×2: boxes of 4, then the partial column (2 pixels), the partial row (2)
    // and the 1-pixel corner. Pillow 13.0.0:
    // Image.fromarray(np.array([[10, 11, 12, 13, 200], [0, 0, 1, 1, 7], [255, 254, 3, 3, 9]],
    //     np.uint8)).reduce(2) -> [[5, 7, 104], [255, 3, 9]].
    let src = [10, 11, 12, 13, 200, 0, 0, 1, 1, 7, 255, 254, 3, 3, 9];
    let out = pil_resample::reduce(&src, 1, (5, 3), (2, 2))?;
    assert_eq!(out, [5, 7, 104, 255, 3, 9]);
    // Boxes of 3: Pillow multiplies by ⌊2³²/768⌋ in f32 (5592405, just under 2²⁴/3), so a sum
    // of 3k − 1 gives k − 1: a mean of x.67 rounds down. Pillow 13.0.0:
    // Image.fromarray(np.array([[a, b, c]], np.uint8)).reduce((3, 1)) -> 1, 0, 0, 1.
    assert_eq!(pil_resample::reduce(&[1, 1, 1], 1, (3, 1), (3, 1))?, [1]);
    assert_eq!(pil_resample::reduce(&[0, 1, 1], 1, (3, 1), (3, 1))?, [0]);
    assert_eq!(pil_resample::reduce(&[0, 0, 1], 1, (3, 1), (3, 1))?, [0]);
    assert_eq!(pil_resample::reduce(&[2, 2, 1], 1, (3, 1), (3, 1))?, [1]);
    // Channels are independent (no premultiplication on raw bytes): L 0+2+4, alpha 2·255.
    let out = pil_resample::reduce(&[0, 255, 2, 255, 4, 0], 2, (3, 1), (3, 1))?;
    assert_eq!(out, [2, 170]);
    Ok(())
}

#[test]
fn invalid_arguments_are_errors() {
    let l = GrayImage::from_pixel(8, 8, image::Luma([9]));
    for gap in [0.5, 0.999, -1.0, f64::NAN] {
        assert!(pil_resample::resize_image(&l, 2, 2, Filter::Bicubic, Some(gap)).is_err());
        assert!(pil_resample::resize_with_gap(
            &[0; 4],
            1,
            (2, 2),
            (1, 1),
            Filter::Lanczos,
            Some(gap)
        )
        .is_err());
    }
    // An infinite gap gives factors of 1: the plain resize.
    let rgb = RgbImage::from_fn(9, 7, |x, y| image::Rgb([x as u8 * 20, y as u8 * 30, 99]));
    let inf = pil_resample::resize_image(&rgb, 3, 2, Filter::Bicubic, Some(f64::INFINITY));
    assert_eq!(
        inf.ok(),
        Some(pil_resample::resize_rgb(&rgb, 3, 2, Filter::Bicubic))
    );
    assert!(
        pil_resample::resize_with_gap(&[0; 5], 1, (2, 2), (1, 1), Filter::Bicubic, None).is_err()
    );
    assert!(pil_resample::resize_with_gap(&[], 0, (0, 0), (1, 1), Filter::Bicubic, None).is_err());
    assert!(pil_resample::reduce(&[0; 4], 1, (2, 2), (0, 2)).is_err());
    assert!(pil_resample::reduce(&[0; 3], 1, (2, 2), (2, 2)).is_err());
    // Degenerate sizes do not panic: empty outputs, empty inputs.
    assert_eq!(
        pil_resample::resize_with_gap(&[7; 4], 1, (2, 2), (0, 1), Filter::Bicubic, Some(1.0)).ok(),
        Some(vec![])
    );
    assert_eq!(
        pil_resample::resize_with_gap(&[], 1, (0, 9), (1, 2), Filter::Bicubic, Some(1.0)).ok(),
        Some(vec![0, 0])
    );
    let la = GrayAlphaImage::from_pixel(4, 4, image::LumaA([200, 0]));
    let out = pil_resample::resize_image(&la, 4, 4, Filter::Lanczos, Some(1.0));
    assert_eq!(out.ok(), Some(la), "same size: a copy");
    let rgba = RgbaImage::from_pixel(6, 6, image::Rgba([10, 20, 30, 255]));
    let out = pil_resample::resize_image(&rgba, 2, 2, Filter::Lanczos, Some(1.0));
    assert_eq!(
        out.ok(),
        Some(RgbaImage::from_pixel(2, 2, image::Rgba([10, 20, 30, 255])))
    );
}
