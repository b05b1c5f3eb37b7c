//! PNG output with the generation parameters in text chunks.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// An 8-bit RGB image.
pub struct Rgb8 {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

/// `out.png` for one image, `out-0.png`, `out-1.png`, ... for a batch.
pub fn numbered(out: &Path, index: usize, count: usize) -> PathBuf {
    if count <= 1 {
        return out.to_path_buf();
    }
    let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("out");
    let ext = out.extension().and_then(|s| s.to_str()).unwrap_or("png");
    out.with_file_name(format!("{stem}-{index}.{ext}"))
}

/// Write a PNG with text chunks (keyword, text): `tEXt` when the text is Latin-1, else
/// UTF-8 `iTXt` (a Russian or Chinese prompt cannot be stored in `tEXt`).
pub fn write_png(path: &Path, img: &Rgb8, text: &[(String, String)]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), img.width, img.height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    for (k, v) in text {
        if v.chars().all(|c| (c as u32) < 256) {
            enc.add_text_chunk(k.clone(), v.clone())?;
        } else {
            enc.add_itxt_chunk(k.clone(), v.clone())?;
        }
    }
    let mut w = enc.write_header()?;
    w.write_image_data(&img.data)?;
    w.finish()?;
    Ok(())
}
