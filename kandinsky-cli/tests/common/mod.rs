//! Helpers shared by the CLI tests (`cli.rs`, `hub.rs`).
#![allow(dead_code)] // each test binary uses a subset

use std::path::{Path, PathBuf};
use std::process::Output;

/// The committed fixtures.
pub fn fixtures() -> PathBuf {
    kandinsky_core::testing::fixtures_dir()
}

/// A tiny fixture pipeline folder.
pub fn tiny(repo: &str) -> PathBuf {
    fixtures().join("tiny").join(repo)
}

/// A fresh scratch folder for one test of this process.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kandinsky-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Assert the run succeeded, showing its stderr otherwise.
pub fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Write an 8-bit RGB PNG whose pixel (x, y) is `f(x, y)`.
pub fn write_png(path: &Path, w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) {
    let mut data = Vec::new();
    for y in 0..h {
        for x in 0..w {
            data.extend(f(x, y));
        }
    }
    let file = std::fs::File::create(path).unwrap();
    let mut enc = png::Encoder::new(file, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header().unwrap().write_image_data(&data).unwrap();
}

/// Decoded pixel bytes of a PNG (its text chunks name the models and the scheduler, which
/// differ between runs that must give the same image).
pub fn pixels(path: &Path) -> Vec<u8> {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = dec.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    buf
}
