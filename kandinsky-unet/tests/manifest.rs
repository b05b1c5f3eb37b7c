//! The real Kandinsky 2.2 and 2.1 UNet layouts: built at the real configs
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

/// Kandinsky 2.1: `encoder_hid_proj.{image_embeds,text_proj}` and
/// `add_embedding.{text_proj,text_norm,image_proj}` replace 2.2's image projection / norms.
#[test]
fn kandinsky21_layout() -> anyhow::Result<()> {
    check("kandinsky-2-1__unet", 726)
}

#[test]
fn kandinsky21_inpaint_layout() -> anyhow::Result<()> {
    check("kandinsky-2-1-inpaint__unet", 726)
}

/// The 2.1-specific tensors have diffusers' shapes (image tokens from the 768-d image
/// embedding, text tokens from the 1024-d M-CLIP hidden states, pooled text 768-d).
#[test]
fn kandinsky21_conditioning_shapes() -> anyhow::Result<()> {
    let cfg = real_config("kandinsky-2-1__unet")?;
    let requested = record_requests(|vb| UNet2DConditionModel::new(vb, &cfg))?;
    for (name, shape) in [
        ("encoder_hid_proj.image_embeds.weight", vec![7680usize, 768]),
        ("encoder_hid_proj.text_proj.weight", vec![768, 1024]),
        ("add_embedding.text_proj.weight", vec![1536, 768]),
        ("add_embedding.text_norm.weight", vec![1536]),
        ("add_embedding.image_proj.weight", vec![1536, 768]),
    ] {
        assert_eq!(requested.get(name), Some(&shape), "{name}");
    }
    assert!(!requested.contains_key("encoder_hid_proj.norm.weight"));
    assert!(!requested.contains_key("add_embedding.image_norm.weight"));
    Ok(())
}

/// The parameter counts of REFERENCE.md §1.3 (which match the hub file sizes).
#[test]
fn real_parameter_counts() -> anyhow::Result<()> {
    for (component, params) in [
        ("kandinsky-2-2-decoder__unet", 1_253_057_288usize),
        ("kandinsky-2-2-decoder-inpaint__unet", 1_253_074_568),
        ("kandinsky-2-2-controlnet-depth__unet", 1_253_429_212),
        ("kandinsky-2-1__unet", 1_228_661_768),
        // 2.1 + 384·5·3·3 conv_in weights for the five extra input channels.
        ("kandinsky-2-1-inpaint__unet", 1_228_679_048),
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
