//! The real Kandinsky 2.2 UNet layouts: built at the real configs
//! (`fixtures/real-configs/`), the model requests exactly the checkpoint's tensor names and shapes. The recording
//! backend hands out zero-stride views, so this needs no real memory.

use kandinsky_core::loading::read_json;
use kandinsky_core::manifest::{record_requests, Manifest};
use kandinsky_core::testing::fixtures_dir;
use kandinsky_unet::{UNet2DConditionConfig, UNet2DConditionModel};

fn real_config(component: &str) -> anyhow::Result<UNet2DConditionConfig> {
    let path = fixtures_dir().join(format!("real-configs/{component}.json"));
    Ok(read_json(&path)?)
}

fn check(component: &str, expected: usize) -> anyhow::Result<()> {
    let fixtures = fixtures_dir();
    let cfg = real_config(component)?;
    let manifest = Manifest::read(&fixtures.join(format!("manifests/{component}.json")))?;
    assert_eq!(manifest.len(), expected, "{component} manifest size");
    let requested = record_requests(|vb| UNet2DConditionModel::new(vb, &cfg))?;
    let report = manifest.check(&requested);
    assert!(report.is_exact(), "{component}: {report}");
    assert_eq!(requested.len(), expected);
    Ok(())
}

#[test]
fn decoder_layout() -> anyhow::Result<()> {
    check("kandinsky-2-2-decoder__unet", 724)
}

#[test]
fn inpaint_layout() -> anyhow::Result<()> {
    check("kandinsky-2-2-decoder-inpaint__unet", 724)
}

#[test]
fn controlnet_layout() -> anyhow::Result<()> {
    check("kandinsky-2-2-controlnet-depth__unet", 740)
}

/// The parameter counts of REFERENCE.md §1.3 (which match the hub file sizes).
#[test]
fn real_parameter_counts() -> anyhow::Result<()> {
    for (component, params) in [
        ("kandinsky-2-2-decoder__unet", 1_253_057_288usize),
        ("kandinsky-2-2-decoder-inpaint__unet", 1_253_074_568),
        ("kandinsky-2-2-controlnet-depth__unet", 1_253_429_212),
    ] {
        let cfg = real_config(component)?;
        let requested = record_requests(|vb| UNet2DConditionModel::new(vb, &cfg))?;
        let n: usize = requested
            .values()
            .map(|s| s.iter().product::<usize>())
            .sum();
        assert_eq!(n, params, "{component}");
    }
    Ok(())
}
