//! Loading pipelines from diffusers-layout folders (or hub repos, see [`crate::hub`]) and
//! running the flows on them.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::DynamicImage;
use kandinsky_clip::{
    ClipImageProcessor, ClipTextModelWithProjection, ClipTokenizer, ClipVisionModelWithProjection,
    MultilingualClip, XlmRobertaTokenizer,
};
use kandinsky_core::loading::{ComponentDir, ModelIndex};
use kandinsky_core::traits::LatentCodec;
use kandinsky_core::{Error, ModelConfig, Result};
use kandinsky_movq::VQModel;
use kandinsky_prior::{GraphedPrior, PriorTransformer, PriorTransformerConfig, ZeroImageEmbedding};
use kandinsky_schedulers::{AnyScheduler, SchedulerConfig, SchedulerKind};
use kandinsky_unet::{GraphedUNet, UNet2DConditionModel};

use crate::callback::Hooks;
use crate::decoder::{self, DecoderModels, DecoderOptions, DecoderText};
use crate::prior::{
    self, FusionInput, FusionOptions, ImageEmbeds, PriorModels, PriorOptions, PromptTokenizer,
    Tokens,
};

/// Where a component lives and in which dtype.
#[derive(Debug, Clone)]
pub struct Placement {
    /// Device of the weights.
    pub device: Device,
    /// Dtype of the weights.
    pub dtype: DType,
}

impl Placement {
    /// f32 on the CPU.
    pub fn cpu() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
        }
    }
}

impl PromptTokenizer for ClipTokenizer {
    fn tokenize(&self, prompts: &[String]) -> Result<Tokens> {
        let batch = self.encode_batch(prompts)?;
        Ok(Tokens {
            ids: batch.input_ids(&Device::Cpu)?,
            mask: batch.attention_mask(&Device::Cpu)?,
        })
    }
}

impl PromptTokenizer for XlmRobertaTokenizer {
    fn tokenize(&self, prompts: &[String]) -> Result<Tokens> {
        let batch = self.encode_batch(prompts)?;
        Ok(Tokens {
            ids: batch.input_ids(&Device::Cpu)?,
            mask: batch.attention_mask(&Device::Cpu)?,
        })
    }
}

fn expect_class(index: &ModelIndex, dir: &Path, allowed: &[&str]) -> Result<()> {
    if allowed.contains(&index.class_name.as_str()) {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "{} is a `{}` folder; expected one of: {}",
            dir.display(),
            index.class_name,
            allowed.join(", ")
        )))
    }
}

/// What to do with the 1.8B-parameter CLIP image encoder of the prior folder.
#[derive(Debug, Clone)]
pub enum ImageEncoderUse {
    /// Keep it loaded (fusion with images, emb2emb from pictures).
    Load,
    /// Only the zero-image embedding is needed: read it from this cache file when present,
    /// else load the encoder once, compute it, write the cache and drop the encoder.
    ZeroEmbeddingOnly {
        /// Cache file (safetensors).
        cache: Option<PathBuf>,
    },
}

/// Where each network of a prior folder goes.
#[derive(Debug, Clone)]
pub struct PriorPlacements {
    /// The CLIP text tower.
    pub text_encoder: Placement,
    /// The diffusion prior.
    pub prior: Placement,
    /// The CLIP vision tower (the largest network of the 2.2 prior folder: 1.8B parameters).
    pub image_encoder: Placement,
}

/// The prior stage of `kandinsky-2-2-prior` (`KandinskyV22PriorPipeline`) or
/// `kandinsky-2-1-prior` (`KandinskyPriorPipeline`).
pub struct PriorPipeline {
    /// CLIP tokenizer.
    pub tokenizer: ClipTokenizer,
    /// CLIP text tower.
    pub text_encoder: ClipTextModelWithProjection,
    /// The diffusion prior.
    pub prior: PriorTransformer,
    /// UnCLIP scheduler (from `scheduler/scheduler_config.json`).
    pub scheduler: AnyScheduler,
    /// CLIP vision tower, when kept.
    pub image_encoder: Option<ClipVisionModelWithProjection>,
    /// The image processor, when the image encoder is kept.
    pub image_processor: Option<ClipImageProcessor>,
    /// Image encoder applied to an all-zeros image, `[1, E]`.
    pub zero_image_embed: Tensor,
    /// Replay the prior from a CUDA graph in the denoising loop (a CUDA prior only; captured
    /// once per flow call, see [`GraphedPrior`]). Off by default.
    pub cuda_graphs: bool,
}

impl PriorPipeline {
    /// Load from a prior folder; the text encoder and the prior each on their placement, the
    /// image encoder beside the text encoder.
    pub fn load(
        dir: &Path,
        text: &Placement,
        prior: &Placement,
        image_encoder: ImageEncoderUse,
    ) -> Result<Self> {
        let places = PriorPlacements {
            text_encoder: text.clone(),
            prior: prior.clone(),
            image_encoder: text.clone(),
        };
        Self::load_with(dir, &places, image_encoder)
    }

    /// Load from a prior folder with every network on its own placement.
    pub fn load_with(
        dir: &Path,
        places: &PriorPlacements,
        image_encoder: ImageEncoderUse,
    ) -> Result<Self> {
        let (text, prior, vision) = (&places.text_encoder, &places.prior, &places.image_encoder);
        let index = ModelIndex::read(dir)?;
        expect_class(
            &index,
            dir,
            &["KandinskyV22PriorPipeline", "KandinskyPriorPipeline"],
        )?;
        // The image encoder goes first when it is only needed for the zero-image embedding:
        // loaded, used and dropped before the text encoder and the prior arrive, the peak is
        // the largest network rather than all three (`cargo xtask pipeline-full` measures the
        // CLI's peak on the full-size 2.2 folder).
        let (image_encoder, image_processor, zero) = match image_encoder {
            ImageEncoderUse::Load => {
                let enc = ClipVisionModelWithProjection::load(
                    dir.join("image_encoder"),
                    vision.dtype,
                    &vision.device,
                )?;
                let proc_ = ClipImageProcessor::from_dir(dir.join("image_processor"))?;
                let zero = kandinsky_prior::zero_image_embedding(&enc)?;
                (Some(enc), Some(proc_), zero)
            }
            ImageEncoderUse::ZeroEmbeddingOnly { cache } => {
                let zero = zero_embedding_only(dir, vision, &prior.device, cache.as_deref())?;
                (None, None, zero)
            }
        };
        let tokenizer = ClipTokenizer::from_dir(dir.join("tokenizer"))?;
        let text_encoder =
            ClipTextModelWithProjection::load(dir.join("text_encoder"), text.dtype, &text.device)?;
        let prior_model = PriorTransformer::load(dir.join("prior"), prior.dtype, &prior.device)?;
        let scheduler = AnyScheduler::from_file(dir.join("scheduler/scheduler_config.json"))?;
        Ok(Self {
            tokenizer,
            text_encoder,
            prior: prior_model,
            scheduler,
            image_encoder,
            image_processor,
            zero_image_embed: zero,
            cuda_graphs: false,
        })
    }

    /// Prompt (+ negative prompt) → embeddings (diffusers' `__call__`).
    pub fn generate(
        &mut self,
        prompts: &[String],
        negative_prompts: Option<&[String]>,
        opts: &PriorOptions,
        hooks: &mut Hooks<'_>,
    ) -> Result<ImageEmbeds> {
        self.run_flow(|models, scheduler, zero, _| {
            prior::prior(
                models,
                scheduler,
                prompts,
                negative_prompts,
                zero,
                opts,
                hooks,
            )
        })
    }

    /// Run a prior flow (`f`, given the models, the scheduler, the zero image embedding and
    /// the image encoder; the prior through a [`GraphedPrior`] with [`Self::cuda_graphs`]).
    fn run_flow<R>(
        &mut self,
        f: impl FnOnce(
            &PriorModels<'_>,
            &mut AnyScheduler,
            &Tensor,
            Option<&dyn kandinsky_core::traits::ImageEncoder>,
        ) -> Result<R>,
    ) -> Result<R> {
        let graphed = GraphedPrior::new(&self.prior);
        let models = PriorModels {
            tokenizer: &self.tokenizer,
            text_encoder: &self.text_encoder,
            prior: if self.cuda_graphs {
                &graphed
            } else {
                &self.prior
            },
        };
        let enc = self
            .image_encoder
            .as_ref()
            .map(|e| e as &dyn kandinsky_core::traits::ImageEncoder);
        f(&models, &mut self.scheduler, &self.zero_image_embed, enc)
    }

    /// Preprocess a picture for the image encoder.
    pub fn pixels(&self, image: &DynamicImage) -> Result<Tensor> {
        let p = self.image_processor.as_ref().ok_or_else(|| {
            Error::invalid(
                "image inputs need the image encoder: load the prior with ImageEncoderUse::Load",
            )
        })?;
        let device = match &self.image_encoder {
            Some(enc) => kandinsky_core::traits::ImageEncoder::device(enc).clone(),
            None => kandinsky_core::traits::TextEncoder::device(&self.text_encoder).clone(),
        };
        p.preprocess(image, &device)
    }

    /// Fusion of texts and images with weights (diffusers' `interpolate`).
    pub fn interpolate(
        &mut self,
        inputs: &[(FusionInput, f64)],
        opts: &FusionOptions,
        hooks: &mut Hooks<'_>,
    ) -> Result<ImageEmbeds> {
        self.run_flow(|models, scheduler, zero, enc| {
            prior::interpolate(models, enc, scheduler, inputs, zero, opts, hooks)
        })
    }

    /// Image-guided prior (diffusers' `KandinskyV22PriorEmb2EmbPipeline`) from CLIP image
    /// embeddings `[N, E]` (use [`PriorPipeline::embed_image`] for a picture).
    pub fn emb2emb(
        &mut self,
        prompts: &[String],
        image_embeds: &Tensor,
        strength: f64,
        negative_prompts: Option<&[String]>,
        opts: &PriorOptions,
        hooks: &mut Hooks<'_>,
    ) -> Result<ImageEmbeds> {
        self.run_flow(|models, scheduler, zero, _| {
            prior::emb2emb(
                models,
                scheduler,
                prompts,
                image_embeds,
                strength,
                negative_prompts,
                zero,
                opts,
                hooks,
            )
        })
    }

    /// CLIP image embedding of a picture `[1, E]`.
    pub fn embed_image(&self, image: &DynamicImage) -> Result<Tensor> {
        let enc = self.image_encoder.as_ref().ok_or_else(|| {
            Error::invalid(
                "image inputs need the image encoder: load the prior with ImageEncoderUse::Load",
            )
        })?;
        let px = self.pixels(image)?;
        use kandinsky_core::traits::ImageEncoder;
        enc.encode_image(&px.to_dtype(ImageEncoder::dtype(enc))?)
    }
}

/// The zero-image embedding of a prior folder: from `cache` when it holds one for this
/// folder, else computed with the image encoder (loaded here and dropped on return) and
/// written to `cache`.
fn zero_embedding_only(
    dir: &Path,
    vision: &Placement,
    device: &Device,
    cache: Option<&Path>,
) -> Result<Tensor> {
    let source = dir.join("image_encoder").display().to_string();
    // The prior's width from its config alone: the weights are not loaded yet.
    let prior_dir = ComponentDir::new(dir.join("prior"))?;
    let dim = PriorTransformerConfig::from_dir(&prior_dir)?.embedding_dim;
    if let Some(path) = cache.filter(|p| p.is_file()) {
        return ZeroImageEmbedding::load_checked(path, &source, dim, device);
    }
    let enc = ClipVisionModelWithProjection::load(
        dir.join("image_encoder"),
        vision.dtype,
        &vision.device,
    )?;
    let z = ZeroImageEmbedding::compute(&enc, source)?;
    if let Some(path) = cache {
        // The cache only saves time: a run that cannot write it (read-only cache, a full
        // disk) still has the embedding.
        if let Err(e) = z.save(path) {
            tracing::warn!("zero-image embedding not cached: {e}");
        }
    }
    z.embeds.to_device(device).map_err(Into::into)
}

/// Which scheduler the decoder uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SchedulerChoice {
    /// The one `scheduler/scheduler_config.json` names (DDPM for the 2.2 decoder).
    #[default]
    Default,
    /// Another class built from the same config (diffusers' `from_config`).
    Kind(SchedulerKind),
    /// The scheduler of another folder of the checkpoint, e.g. `ddpm_scheduler` (Kandinsky
    /// 2.1 ships a DDPM with learned-range variance and dynamic thresholding there).
    Folder(&'static str),
}

/// Where each network of a decoder folder goes.
#[derive(Debug, Clone)]
pub struct DecoderPlacements {
    /// The UNet.
    pub unet: Placement,
    /// The MoVQ codec.
    pub movq: Placement,
    /// Kandinsky 2.1's M-CLIP text encoder (unused by 2.2 decoders).
    pub text_encoder: Placement,
}

/// Kandinsky 2.1's decoder text side: the XLM-Roberta tokenizer and the M-CLIP encoder.
pub struct DecoderTextEncoder {
    /// `tokenizer/` (XLM-Roberta SentencePiece).
    pub tokenizer: XlmRobertaTokenizer,
    /// `text_encoder/` (`MultilingualCLIP`).
    pub text_encoder: MultilingualClip,
}

const DECODER_CLASSES_22: &[&str] = &[
    "KandinskyV22Pipeline",
    "KandinskyV22Img2ImgPipeline",
    "KandinskyV22InpaintPipeline",
    "KandinskyV22ControlnetPipeline",
    "KandinskyV22ControlnetImg2ImgPipeline",
    "KandinskyV22CombinedPipeline",
];

const DECODER_CLASSES_21: &[&str] = &[
    "KandinskyPipeline",
    "KandinskyImg2ImgPipeline",
    "KandinskyInpaintPipeline",
    "KandinskyCombinedPipeline",
];

/// The decoder stage: `kandinsky-2-2-decoder`, `-decoder-inpaint`, `-controlnet-depth`, or
/// Kandinsky 2.1's `kandinsky-2-1` / `kandinsky-2-1-inpaint` (which add a text encoder).
pub struct DecoderPipeline {
    /// The UNet.
    pub unet: UNet2DConditionModel,
    /// The MoVQ codec.
    pub movq: VQModel,
    /// The scheduler.
    pub scheduler: AnyScheduler,
    /// `model_index.json`'s `_class_name`.
    pub class_name: String,
    /// Kandinsky 2.1 only: the text side of the decoder.
    pub text: Option<DecoderTextEncoder>,
    /// Replay the UNet from a CUDA graph in the denoising loop (a CUDA UNet only; captured
    /// once per flow call, see [`GraphedUNet`]). Off by default.
    pub cuda_graphs: bool,
}

impl DecoderPipeline {
    /// Load a decoder folder; UNet and MoVQ each on their placement (a 2.1 text encoder goes
    /// beside the UNet).
    pub fn load(
        dir: &Path,
        unet: &Placement,
        movq: &Placement,
        scheduler: SchedulerChoice,
    ) -> Result<Self> {
        let places = DecoderPlacements {
            unet: unet.clone(),
            movq: movq.clone(),
            text_encoder: unet.clone(),
        };
        Self::load_with(dir, &places, scheduler)
    }

    /// Load a decoder folder with every network on its own placement.
    pub fn load_with(
        dir: &Path,
        places: &DecoderPlacements,
        scheduler: SchedulerChoice,
    ) -> Result<Self> {
        let index = ModelIndex::read(dir)?;
        let all: Vec<&str> = DECODER_CLASSES_22
            .iter()
            .chain(DECODER_CLASSES_21)
            .copied()
            .collect();
        expect_class(&index, dir, &all)?;
        let is_21 = DECODER_CLASSES_21.contains(&index.class_name.as_str());
        let cfg = SchedulerConfig::from_file(dir.join("scheduler/scheduler_config.json"))?;
        let scheduler = match scheduler {
            SchedulerChoice::Default => AnyScheduler::from_config(&cfg)?,
            SchedulerChoice::Kind(k) => AnyScheduler::from_config_as(&cfg, k)?,
            SchedulerChoice::Folder(name) => {
                AnyScheduler::from_file(dir.join(name).join("scheduler_config.json"))?
            }
        };
        let text = if is_21 {
            let t = &places.text_encoder;
            Some(DecoderTextEncoder {
                tokenizer: XlmRobertaTokenizer::from_dir(dir.join("tokenizer"))?,
                text_encoder: MultilingualClip::load(dir.join("text_encoder"), t.dtype, &t.device)?,
            })
        } else {
            None
        };
        let (unet, movq) = (&places.unet, &places.movq);
        Ok(Self {
            unet: UNet2DConditionModel::from_dir(dir.join("unet"), unet.dtype, &unet.device)?,
            movq: VQModel::load(dir.join("movq"), movq.dtype, &movq.device)?,
            scheduler,
            class_name: index.class_name,
            text,
            cuda_graphs: false,
        })
    }

    /// True for a Kandinsky 2.1 decoder (its UNet reads the prompt too).
    pub fn is_kandinsky_2_1(&self) -> bool {
        self.text.is_some()
    }

    /// text2img (with `hint`: ControlNet) → images in [-1, 1].
    pub fn text2img(
        &mut self,
        embeds: &ImageEmbeds,
        opts: &DecoderOptions,
        hint: Option<&Tensor>,
        hooks: &mut Hooks<'_>,
    ) -> Result<Tensor> {
        self.run_flow(|models, scheduler| {
            decoder::text2img(
                models,
                scheduler,
                &embeds.image_embeds,
                &embeds.negative_image_embeds,
                opts,
                hint,
                hooks,
            )
        })
    }

    /// img2img (with `hint`: ControlNet img2img) → images in [-1, 1].
    pub fn img2img(
        &mut self,
        embeds: &ImageEmbeds,
        image: &Tensor,
        strength: f64,
        opts: &DecoderOptions,
        hint: Option<&Tensor>,
        hooks: &mut Hooks<'_>,
    ) -> Result<Tensor> {
        self.run_flow(|models, scheduler| {
            decoder::img2img(
                models,
                scheduler,
                &embeds.image_embeds,
                &embeds.negative_image_embeds,
                image,
                strength,
                opts,
                hint,
                hooks,
            )
        })
    }

    /// Inpainting → images in [-1, 1].
    pub fn inpaint(
        &mut self,
        embeds: &ImageEmbeds,
        image: &Tensor,
        mask: &Tensor,
        opts: &DecoderOptions,
        hooks: &mut Hooks<'_>,
    ) -> Result<Tensor> {
        self.run_flow(|models, scheduler| {
            decoder::inpaint(
                models,
                scheduler,
                &embeds.image_embeds,
                &embeds.negative_image_embeds,
                image,
                mask,
                opts,
                hooks,
            )
        })
    }

    /// Run a decoder flow (`f`, given the models and the scheduler; the UNet through a
    /// [`GraphedUNet`] with [`Self::cuda_graphs`]) and decode its latents.
    fn run_flow(
        &mut self,
        f: impl FnOnce(&DecoderModels<'_>, &mut AnyScheduler) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let graphed = GraphedUNet::new(&self.unet);
        let models = DecoderModels {
            unet: if self.cuda_graphs {
                &graphed
            } else {
                &self.unet
            },
            movq: &self.movq,
            text: self.text.as_ref().map(|t| DecoderText {
                tokenizer: &t.tokenizer,
                text_encoder: &t.text_encoder,
            }),
        };
        let latents = f(&models, &mut self.scheduler)?;
        decoder::decode(&self.movq, &latents)
    }

    /// The MoVQ codec as the shared trait.
    pub fn codec(&self) -> &dyn LatentCodec {
        &self.movq
    }
}
