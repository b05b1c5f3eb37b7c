//! A pipeline folder whose components ship only PyTorch pickle weights (as the hub's
//! ControlNet repo ships its UNet) runs like its safetensors twin.
//!
//! The copy of `tiny/kandinsky-2-2-prior` gets `fixtures/pickle/prior.bin` (`torch.save` of
//! the same tiny prior) as `prior/diffusion_pytorch_model.bin` and the fp16 vision tower as
//! `image_encoder/pytorch_model.bin`, with their safetensors removed.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use kandinsky_core::noise::RecordedNoise;
use kandinsky_core::testing::{assert_close, fixtures_dir, get, load_fixture};
use kandinsky_pipeline::prior::{ImageEmbeds, PriorOptions};
use kandinsky_pipeline::{Hooks, ImageEncoderUse, Placement, PriorPipeline};

/// Copy a folder, following the fixtures' symlinks.
fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let p = entry?.path();
        let dst = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &dst)?;
        } else {
            std::fs::copy(&p, &dst)?;
        }
    }
    Ok(())
}

fn pickle_only_prior_folder() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("kandinsky-pickle-prior-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy_dir(&fixtures_dir().join("tiny/kandinsky-2-2-prior"), &dir)?;
    let pickles = fixtures_dir().join("pickle");
    for (component, st, bin, fixture) in [
        (
            "prior",
            "diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.bin",
            "prior.bin",
        ),
        (
            "image_encoder",
            "model.safetensors",
            "pytorch_model.bin",
            "image_encoder_fp16.bin",
        ),
    ] {
        std::fs::remove_file(dir.join(component).join(st))?;
        std::fs::copy(pickles.join(fixture), dir.join(component).join(bin))?;
    }
    Ok(dir)
}

/// diffusers' prior flow on the fixture's prompt, replaying its recorded noise.
fn run_prior(dir: &Path) -> anyhow::Result<ImageEmbeds> {
    let f = load_fixture("pipeline/prior.safetensors")?;
    let mut noise = RecordedNoise::with_prefix(&f, "noise_");
    let cpu = Placement::cpu();
    let mut p = PriorPipeline::load(dir, &cpu, &cpu, ImageEncoderUse::Load)?;
    let out = p.generate(
        &["a red cat on a sofa".to_string()],
        None,
        &PriorOptions {
            steps: 5,
            guidance_scale: 4.0,
            num_images_per_prompt: 1,
            ..Default::default()
        },
        &mut Hooks {
            noise: Some(&mut noise),
            ..Default::default()
        },
    )?;
    assert_eq!(noise.remaining(), 0);
    assert_close(
        "image_embeds",
        &out.image_embeds,
        get(&f, "image_embeds")?,
        1e-3,
    )?;
    Ok(out)
}

fn values(t: &Tensor) -> anyhow::Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

#[test]
fn pickle_only_components_give_the_same_embeddings() -> anyhow::Result<()> {
    let pickled = pickle_only_prior_folder()?;
    assert!(!pickled
        .join("prior/diffusion_pytorch_model.safetensors")
        .exists());
    let from_pickle = run_prior(&pickled)?;
    let from_safetensors = run_prior(&fixtures_dir().join("tiny/kandinsky-2-2-prior"))?;
    // Same weights, same arithmetic: bit-identical, not merely close.
    assert_eq!(
        values(&from_pickle.image_embeds)?,
        values(&from_safetensors.image_embeds)?
    );
    assert_eq!(
        values(&from_pickle.negative_image_embeds)?,
        values(&from_safetensors.negative_image_embeds)?
    );
    Ok(())
}
