//! The subcommands.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use kandinsky_core::device::{parse_device, parse_dtype};
use kandinsky_pipeline::decoder::{rounded_size, DecoderOptions};
use kandinsky_pipeline::hub::{component_files, resolve, RepoFile};
use kandinsky_pipeline::prior::{FusionInput, FusionOptions, ImageEmbeds, PriorOptions};
use kandinsky_pipeline::{
    images, DecoderPipeline, Hooks, ImageEncoderUse, Placement, PriorPipeline, SchedulerChoice,
};
use kandinsky_schedulers::SchedulerKind;

use crate::args::{Cli, Command, Common, Generation, PriorArgs, SchedulerArg};
use crate::output::{numbered, write_png, Rgb8};
use crate::progress::{spinner, Steps};

/// The decoder repository a flow uses by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DecoderRepo {
    Decoder,
    Inpaint,
    Controlnet,
}

impl DecoderRepo {
    fn default_source(self, generation: Generation) -> Result<&'static str> {
        Ok(match (generation, self) {
            (Generation::V22, Self::Decoder) => "kandinsky-community/kandinsky-2-2-decoder",
            (Generation::V22, Self::Inpaint) => "kandinsky-community/kandinsky-2-2-decoder-inpaint",
            (Generation::V22, Self::Controlnet) => {
                "kandinsky-community/kandinsky-2-2-controlnet-depth"
            }
            (Generation::V21, Self::Decoder) => "kandinsky-community/kandinsky-2-1",
            (Generation::V21, Self::Inpaint) => "kandinsky-community/kandinsky-2-1-inpaint",
            (Generation::V21, Self::Controlnet) => {
                bail!("ControlNet exists only for Kandinsky 2.2: drop --kandinsky 2.1")
            }
        })
    }
}

fn prior_source(args: &PriorArgs) -> String {
    args.prior.clone().unwrap_or_else(|| {
        match args.kandinsky {
            Generation::V22 => "kandinsky-community/kandinsky-2-2-prior",
            Generation::V21 => "kandinsky-community/kandinsky-2-1-prior",
        }
        .to_string()
    })
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Text2img(a) => decode_flow(&a.common, DecoderRepo::Decoder, Flow::Text2Img),
        Command::Img2img(a) => decode_flow(
            &a.common,
            DecoderRepo::Decoder,
            Flow::Img2Img {
                image: a.image,
                strength: a.strength,
            },
        ),
        Command::Inpaint(a) => decode_flow(
            &a.common,
            DecoderRepo::Inpaint,
            Flow::Inpaint {
                image: a.image,
                mask: a.mask,
            },
        ),
        Command::Controlnet(a) => decode_flow(
            &a.common,
            DecoderRepo::Controlnet,
            Flow::Controlnet {
                hint: a.hint,
                image: a.image,
                strength: a.strength,
            },
        ),
        Command::Mix(a) => {
            let mut inputs: Vec<MixItem> = Vec::new();
            let mut texts: Vec<String> = a.common.prior.prompt.iter().cloned().collect();
            texts.extend(a.prompts.iter().cloned());
            if texts.len() != a.text_weights.len()
                && !(texts.is_empty() && a.text_weights.is_empty())
            {
                bail!(
                    "{} texts but {} --text-weight values: give one weight per text",
                    texts.len(),
                    a.text_weights.len()
                );
            }
            if a.images.len() != a.image_weights.len() {
                bail!(
                    "{} --mix-image but {} --image-weight values: give one weight per image",
                    a.images.len(),
                    a.image_weights.len()
                );
            }
            for (t, w) in texts.into_iter().zip(&a.text_weights) {
                inputs.push(MixItem::Text(t, *w));
            }
            for (p, w) in a.images.iter().zip(&a.image_weights) {
                inputs.push(MixItem::Image(p.clone(), *w));
            }
            if inputs.is_empty() {
                bail!("nothing to mix: give --prompt/--mix-prompt with --text-weight and/or --mix-image with --image-weight");
            }
            decode_flow(&a.common, DecoderRepo::Decoder, Flow::Mix(inputs))
        }
        Command::Prior(a) => {
            let device = parse_device(&a.device)?;
            let dtype = parse_dtype(&a.dtype)?;
            let mut steps = Steps::new();
            let embeds = run_prior(
                &a.prior,
                &device,
                dtype,
                a.num_images,
                a.seed,
                &mut steps,
                None,
            )?;
            save_embeds(&a.out, &embeds)?;
            steps.mark("save");
            eprintln!("wrote {} ({})", a.out.display(), steps.summary());
            Ok(())
        }
    }
}

enum MixItem {
    Text(String, f64),
    Image(PathBuf, f64),
}

enum Flow {
    Text2Img,
    Img2Img {
        image: PathBuf,
        strength: f64,
    },
    Inpaint {
        image: PathBuf,
        mask: PathBuf,
    },
    Controlnet {
        hint: PathBuf,
        image: Option<PathBuf>,
        strength: f64,
    },
    Mix(Vec<MixItem>),
}

fn save_embeds(path: &Path, e: &ImageEmbeds) -> Result<()> {
    let map = std::collections::HashMap::from([
        (
            "image_embeds".to_string(),
            e.image_embeds
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?,
        ),
        (
            "negative_image_embeds".to_string(),
            e.negative_image_embeds
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?,
        ),
    ]);
    candle_core::safetensors::save(&map, path)
        .with_context(|| format!("cannot write {}", path.display()))
}

fn load_embeds(path: &Path) -> Result<ImageEmbeds> {
    let map = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("cannot read embeddings from {}", path.display()))?;
    let get = |k: &str| {
        map.get(k).cloned().with_context(|| {
            format!(
                "{} has no `{k}` tensor (expected image_embeds and negative_image_embeds)",
                path.display()
            )
        })
    };
    Ok(ImageEmbeds {
        image_embeds: get("image_embeds")?,
        negative_image_embeds: get("negative_image_embeds")?,
    })
}

fn zero_cache(prior_dir: &Path) -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    let canon = prior_dir
        .canonicalize()
        .unwrap_or_else(|_| prior_dir.to_path_buf());
    let key: String = canon
        .display()
        .to_string()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    Some(
        base.join("kandinsky-rs")
            .join("zero-image-embeds")
            .join(format!("{key}.safetensors")),
    )
}

fn prior_files(keep_image_encoder: bool) -> Vec<RepoFile> {
    let mut files = Vec::new();
    for (c, class) in [
        ("tokenizer", "CLIPTokenizer"),
        ("text_encoder", "CLIPTextModelWithProjection"),
        ("prior", "PriorTransformer"),
        ("scheduler", "UnCLIPScheduler"),
        ("image_encoder", "CLIPVisionModelWithProjection"),
    ] {
        files.extend(component_files(c, class));
    }
    if keep_image_encoder {
        files.extend(component_files("image_processor", "CLIPImageProcessor"));
    }
    files
}

fn load_prior(
    args: &PriorArgs,
    device: &Device,
    dtype: DType,
    keep_image_encoder: bool,
) -> Result<PriorPipeline> {
    let pb = spinner("loading the prior");
    let dir = resolve(&prior_source(args), &prior_files(keep_image_encoder))?;
    let placement = Placement {
        device: device.clone(),
        dtype,
    };
    let use_ = if keep_image_encoder {
        ImageEncoderUse::Load
    } else {
        ImageEncoderUse::ZeroEmbeddingOnly {
            cache: zero_cache(&dir),
        }
    };
    let mut p = PriorPipeline::load(&dir, &placement, &placement, use_)
        .with_context(|| format!("loading the prior from {}", dir.display()))?;
    p.cuda_graphs = args.cuda_graphs;
    pb.finish_and_clear();
    Ok(p)
}

fn run_prior(
    args: &PriorArgs,
    device: &Device,
    dtype: DType,
    n: usize,
    seed: u64,
    steps: &mut Steps,
    mix: Option<&[MixItem]>,
) -> Result<ImageEmbeds> {
    if mix.is_none() {
        if let Some(path) = &args.image_embeds {
            return load_embeds(path);
        }
    }
    let keep = mix.is_some_and(|m| m.iter().any(|i| matches!(i, MixItem::Image(..))));
    let mut prior = load_prior(args, device, dtype, keep)?;
    steps.mark("load prior");
    let opts = PriorOptions {
        steps: args.prior_steps,
        guidance_scale: args.prior_guidance,
        num_images_per_prompt: n,
        seed,
        latents: None,
    };
    let mut cb = |ev: &kandinsky_pipeline::StepEvent<'_>| steps.on_step(ev);
    let mut hooks = Hooks {
        callback: Some(&mut cb),
        noise: None,
    };
    let out = match mix {
        Some(items) => {
            let mut inputs = Vec::new();
            for item in items {
                inputs.push(match item {
                    MixItem::Text(t, w) => (FusionInput::Text(t.clone()), *w),
                    MixItem::Image(p, w) => {
                        let img = images::open(p)?;
                        (FusionInput::Pixels(prior.pixels(&img)?), *w)
                    }
                });
            }
            let fo = FusionOptions {
                prior: opts,
                negative_prior_prompt: None,
                negative_prompt: args.negative_prompt.clone().unwrap_or_default(),
            };
            prior.interpolate(&inputs, &fo, &mut hooks)?
        }
        None => {
            let prompt = args.prompt.clone().unwrap_or_default();
            let neg = args.negative_prompt.clone().map(|n| vec![n]);
            prior.generate(&[prompt], neg.as_deref(), &opts, &mut hooks)?
        }
    };
    steps.mark("prior");
    Ok(out)
}

/// The text a Kandinsky 2.1 decoder reads (2.2 decoders ignore it): --prompt, or for `mix`
/// the first text mixed.
fn decoder_prompt(c: &Common, flow: &Flow) -> Vec<String> {
    let text = c.prior.prompt.clone().or_else(|| match flow {
        Flow::Mix(items) => items.iter().find_map(|i| match i {
            MixItem::Text(t, _) => Some(t.clone()),
            MixItem::Image(..) => None,
        }),
        _ => None,
    });
    vec![text.unwrap_or_default()]
}

fn scheduler_choice(s: SchedulerArg) -> SchedulerChoice {
    match s {
        SchedulerArg::Default => SchedulerChoice::Default,
        SchedulerArg::Ddpm => SchedulerChoice::Kind(SchedulerKind::Ddpm),
        SchedulerArg::Ddim => SchedulerChoice::Kind(SchedulerKind::Ddim),
        SchedulerArg::DpmSolver => SchedulerChoice::Kind(SchedulerKind::DpmSolverMultistep),
        SchedulerArg::ShippedDdpm => SchedulerChoice::Folder("ddpm_scheduler"),
    }
}

fn decoder_files(generation: Generation, scheduler: SchedulerArg) -> Vec<RepoFile> {
    let mut f = component_files("unet", "UNet2DConditionModel");
    f.extend(component_files("movq", "VQModel"));
    f.extend(component_files("scheduler", "DDPMScheduler"));
    if generation == Generation::V21 {
        f.extend(component_files("text_encoder", "MultilingualCLIP"));
        f.extend(component_files("tokenizer", "XLMRobertaTokenizerFast"));
    }
    if scheduler == SchedulerArg::ShippedDdpm {
        f.extend(component_files("ddpm_scheduler", "DDPMScheduler"));
    }
    f
}

fn decode_flow(c: &Common, repo: DecoderRepo, flow: Flow) -> Result<()> {
    let generation = c.prior.kandinsky;
    let default_decoder = repo.default_source(generation)?;
    let device = parse_device(&c.device)?;
    let dtype = parse_dtype(&c.dtype)?;
    if c.num_images == 0 {
        bail!("--num-images must be at least 1");
    }
    let mut steps = Steps::new();
    let mix = match &flow {
        Flow::Mix(items) => Some(items.as_slice()),
        _ => None,
    };
    if mix.is_none() && c.prior.prompt.is_none() && c.prior.image_embeds.is_none() {
        bail!("give --prompt (or --image-embeds FILE from `kandinsky prior`)");
    }
    let embeds = run_prior(&c.prior, &device, dtype, 1, c.seed, &mut steps, mix)?;
    let (height, width) = match &flow {
        Flow::Text2Img | Flow::Mix(_) => rounded_size(c.height, c.width),
        _ => (c.height, c.width),
    };
    if (height, width) != (c.height, c.width) {
        eprintln!(
            "note: {}×{} is not a multiple of 64; generating {width}×{height}",
            c.width, c.height
        );
    }
    let source = c
        .decoder
        .clone()
        .unwrap_or_else(|| default_decoder.to_string());
    let pb = spinner("loading the decoder");
    let dir = resolve(&source, &decoder_files(generation, c.scheduler))?;
    let placement = Placement {
        device: device.clone(),
        dtype,
    };
    let mut dec =
        DecoderPipeline::load(&dir, &placement, &placement, scheduler_choice(c.scheduler))
            .with_context(|| format!("loading the decoder from {}", dir.display()))?;
    dec.cuda_graphs = c.prior.cuda_graphs;
    pb.finish_and_clear();
    steps.mark("load decoder");
    let noise = match &c.noise {
        Some(p) => {
            let m = candle_core::safetensors::load(p, &Device::Cpu)
                .with_context(|| format!("cannot read {}", p.display()))?;
            Some(
                m.get("noise")
                    .cloned()
                    .with_context(|| format!("{} has no `noise` tensor", p.display()))?,
            )
        }
        None => None,
    };
    let opts = DecoderOptions {
        height,
        width,
        steps: c.steps,
        guidance_scale: c.guidance,
        num_images_per_prompt: c.num_images,
        seed: c.seed,
        noise,
        prompt: decoder_prompt(c, &flow),
        negative_prompt: c.prior.negative_prompt.clone().map(|n| vec![n]),
    };
    let mut cb = |ev: &kandinsky_pipeline::StepEvent<'_>| steps.on_step(ev);
    let mut hooks = Hooks {
        callback: Some(&mut cb),
        noise: None,
    };
    let load_rgb = |p: &Path| -> Result<Tensor> {
        Ok(images::image_tensor(
            &images::open(p)?,
            width,
            height,
            &Device::Cpu,
        )?)
    };
    let out = match &flow {
        Flow::Text2Img | Flow::Mix(_) => dec.text2img(&embeds, &opts, None, &mut hooks)?,
        Flow::Img2Img { image, strength } => dec.img2img(
            &embeds,
            &load_rgb(image)?,
            *strength,
            &opts,
            None,
            &mut hooks,
        )?,
        Flow::Inpaint { image, mask } => {
            let m = images::open(mask)?;
            let (mw, mh) = (m.width() as usize, m.height() as usize);
            let img = images::open(image)?;
            if (img.width() as usize, img.height() as usize) != (mw, mh) {
                bail!(
                    "the mask is {mw}×{mh} but the image is {}×{}: they must be the same size",
                    img.width(),
                    img.height()
                );
            }
            let mask_t = images::mask_tensor(&m, width, height, &Device::Cpu)?;
            dec.inpaint(&embeds, &load_rgb(image)?, &mask_t, &opts, &mut hooks)?
        }
        Flow::Controlnet {
            hint,
            image,
            strength,
        } => {
            let h = images::hint_tensor(&images::open(hint)?, width, height, &Device::Cpu)?;
            match image {
                Some(i) => dec.img2img(
                    &embeds,
                    &load_rgb(i)?,
                    *strength,
                    &opts,
                    Some(&h),
                    &mut hooks,
                )?,
                None => dec.text2img(&embeds, &opts, Some(&h), &mut hooks)?,
            }
        }
    };
    steps.mark("decoder+decode");
    let rgb = images::to_rgb8(&out)?;
    let text = vec![
        (
            "prompt".to_string(),
            c.prior.prompt.clone().unwrap_or_default(),
        ),
        (
            "negative_prompt".to_string(),
            c.prior.negative_prompt.clone().unwrap_or_default(),
        ),
        ("seed".to_string(), c.seed.to_string()),
        ("steps".to_string(), c.steps.to_string()),
        ("prior_steps".to_string(), c.prior.prior_steps.to_string()),
        ("guidance".to_string(), c.guidance.to_string()),
        (
            "prior_guidance".to_string(),
            c.prior.prior_guidance.to_string(),
        ),
        (
            "scheduler".to_string(),
            format!("{:?}", c.scheduler).to_lowercase(),
        ),
        ("size".to_string(), format!("{width}x{height}")),
        (
            "models".to_string(),
            format!("prior={} decoder={source}", prior_source(&c.prior)),
        ),
        (
            "software".to_string(),
            format!("kandinsky-rs {}", env!("CARGO_PKG_VERSION")),
        ),
    ];
    for (i, im) in rgb.iter().enumerate() {
        let path = numbered(&c.out, i, rgb.len());
        let img = Rgb8 {
            width: im.width(),
            height: im.height(),
            data: im.as_raw().clone(),
        };
        write_png(&path, &img, &text)?;
        eprintln!("wrote {}", path.display());
    }
    eprintln!("{}", steps.summary());
    Ok(())
}
