//! Command-line arguments (names follow diffusers' parameters).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Kandinsky 2.2 (and 2.1) text-to-image on candle.
#[derive(Debug, Parser)]
#[command(name = "kandinsky", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Write a Chrome trace (per-module spans) to this file.
    #[arg(long, global = true)]
    pub tracing: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate images from a prompt.
    Text2img(Text2Img),
    /// Transform an image guided by a prompt.
    Img2img(Img2Img),
    /// Repaint the white part of a mask.
    Inpaint(Inpaint),
    /// Mix texts and images with weights (fusion).
    Mix(Mix),
    /// Depth-guided generation (a hint image), optionally from an init image.
    Controlnet(Controlnet),
    /// Run only the prior and save the embeddings as safetensors.
    Prior(PriorOnly),
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum SchedulerArg {
    /// The scheduler the checkpoint names (DDPM for the 2.2 decoder, DDIM for 2.1).
    Default,
    Ddpm,
    Ddim,
    DpmSolver,
    /// Kandinsky 2.1's shipped `ddpm_scheduler` (learned-range variance, dynamic thresholding).
    ShippedDdpm,
}

/// Which Kandinsky: picks the default hub repositories of every flow.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq, Default)]
pub enum Generation {
    /// Kandinsky 2.2 (CLIP ViT-bigG prior; image-conditioned decoder).
    #[default]
    #[value(name = "2.2")]
    V22,
    /// Kandinsky 2.1 (CLIP ViT-L prior; decoder also reads the prompt, in any language).
    #[value(name = "2.1")]
    V21,
}

/// Prior options and sources.
#[derive(Debug, Clone, Args)]
pub struct PriorArgs {
    /// The prompt.
    #[arg(long, short = 'p')]
    pub prompt: Option<String>,
    /// What the image should not show.
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Prior denoising steps.
    #[arg(long, default_value_t = 25)]
    pub prior_steps: usize,
    /// Prior guidance scale.
    #[arg(long, default_value_t = 4.0)]
    pub prior_guidance: f64,
    /// Prior source: a local diffusers folder or a hub repo id (default: the prior repo of
    /// --kandinsky).
    #[arg(long)]
    pub prior: Option<String>,
    /// Model generation, for the default repositories: 2.2 or 2.1.
    #[arg(long, value_enum, default_value_t = Generation::V22)]
    pub kandinsky: Generation,
    /// Use these embeddings (safetensors with `image_embeds`, `negative_image_embeds`) instead of running the prior.
    #[arg(long)]
    pub image_embeds: Option<PathBuf>,
    /// Replay the prior and the decoder UNet from CUDA graphs at each denoising step (CUDA
    /// only; ignored elsewhere).
    #[arg(long)]
    pub cuda_graphs: bool,
}

/// Options of every flow.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Output width in pixels.
    #[arg(long, default_value_t = 512)]
    pub width: usize,
    /// Output height in pixels.
    #[arg(long, default_value_t = 512)]
    pub height: usize,
    /// Decoder denoising steps.
    #[arg(long, default_value_t = 100)]
    pub steps: usize,
    /// Decoder guidance scale.
    #[arg(long, default_value_t = 4.0)]
    pub guidance: f64,
    /// Decoder scheduler.
    #[arg(long, value_enum, default_value_t = SchedulerArg::Default)]
    pub scheduler: SchedulerArg,
    /// Seed (image i of a batch uses seed + i).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Images per prompt.
    #[arg(long, default_value_t = 1)]
    pub num_images: usize,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Output PNG (a batch gets -0, -1, ... suffixes).
    #[arg(long, short = 'o', default_value = "out.png")]
    pub out: PathBuf,
    /// Decoder source: a local diffusers folder or a hub repo id (default: the flow's repo).
    #[arg(long)]
    pub decoder: Option<String>,
    /// The decoder's initial Gaussian noise: safetensors with `noise` [N, 4, H/8, W/8].
    #[arg(long)]
    pub noise: Option<PathBuf>,
    #[command(flatten)]
    pub prior: PriorArgs,
}

#[derive(Debug, Args)]
pub struct Text2Img {
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Args)]
pub struct Img2Img {
    #[command(flatten)]
    pub common: Common,
    /// The init image.
    #[arg(long)]
    pub image: PathBuf,
    /// How much to change it (0..1).
    #[arg(long, default_value_t = 0.3)]
    pub strength: f64,
}

#[derive(Debug, Args)]
pub struct Inpaint {
    #[command(flatten)]
    pub common: Common,
    /// The image to edit.
    #[arg(long)]
    pub image: PathBuf,
    /// The mask: white = repaint, black = keep.
    #[arg(long)]
    pub mask: PathBuf,
}

#[derive(Debug, Args)]
pub struct Controlnet {
    #[command(flatten)]
    pub common: Common,
    /// The hint (e.g. a depth map) at the output size.
    #[arg(long)]
    pub hint: PathBuf,
    /// An init image (ControlNet img2img).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// img2img strength (with --image).
    #[arg(long, default_value_t = 0.3)]
    pub strength: f64,
}

#[derive(Debug, Args)]
pub struct Mix {
    #[command(flatten)]
    pub common: Common,
    /// Images to mix (each with a --image-weight).
    #[arg(long = "mix-image")]
    pub images: Vec<PathBuf>,
    /// Weights of the images, in order.
    #[arg(long = "image-weight")]
    pub image_weights: Vec<f64>,
    /// Extra prompts to mix (each with a --text-weight); --prompt counts as one too.
    #[arg(long = "mix-prompt")]
    pub prompts: Vec<String>,
    /// Weights of --prompt then the --mix-prompt texts, in order.
    #[arg(long = "text-weight")]
    pub text_weights: Vec<f64>,
}

#[derive(Debug, Args)]
pub struct PriorOnly {
    #[command(flatten)]
    pub prior: PriorArgs,
    /// Images per prompt.
    #[arg(long, default_value_t = 1)]
    pub num_images: usize,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Output safetensors file.
    #[arg(long, short = 'o', default_value = "embeds.safetensors")]
    pub out: PathBuf,
}
