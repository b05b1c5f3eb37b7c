//! `UNet2DConditionModel` (diffusers `models/unets/unet_2d_condition.py`) as configured by
//! the Kandinsky 2.2 decoder, inpainting and ControlNet-depth checkpoints and the Kandinsky
//! 2.1 decoder and inpainting checkpoints (text + image conditioning).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Module, VarBuilder};
use kandinsky_core::embeddings::{timestep_embedding, TimestepEmbedding};
use kandinsky_core::loading::load_component;
use kandinsky_core::nn::{group_norm, Activation, Conv2dConfig, GroupNorm};
use kandinsky_core::traits::{Denoiser, DenoiserCondition, PreparedCondition};
use kandinsky_core::ModelConfig;
use kandinsky_core::{Error, Result};
use serde::Deserialize;

use crate::attention_processor::{Attention, ImageKv};
use crate::embeddings::{
    ImageHintTimeEmbedding, ImageProjection, ImageTimeEmbedding, TextImageProjection,
    TextImageTimeEmbedding,
};
use crate::layers::{conv2d, Conv2d};
use crate::resnet::ResnetSettings;
use crate::unet_2d_blocks::{
    AttentionSettings, BlockChannels, DownBlock, ResnetDownsampleBlock2D, ResnetUpsampleBlock2D,
    SimpleCrossAttnDownBlock2D, SimpleCrossAttnUpBlock2D, UNetMidBlock2DSimpleCrossAttn, UpBlock,
};

/// A config value given either once for every block or once per block (diffusers accepts
/// both for `layers_per_block`, `attention_head_dim`, `cross_attention_dim`,
/// `only_cross_attention`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    /// One value for every block.
    One(T),
    /// One value per down block.
    Many(Vec<T>),
}

impl<T: Clone + std::fmt::Debug> PerBlock<T> {
    fn expand(&self, n: usize, field: &str) -> Result<Vec<T>> {
        match self {
            Self::One(v) => Ok(vec![v.clone(); n]),
            Self::Many(v) if v.len() == n => Ok(v.clone()),
            Self::Many(v) => Err(Error::unsupported(
                field,
                v,
                format!("one value, or one per down block ({n})"),
            )),
        }
    }
}

/// `config.json` of a diffusers `UNet2DConditionModel`, with diffusers' defaults for absent
/// fields. Fields that do not change the Kandinsky 2.2 / 2.1 networks (`sample_size`,
/// `transformer_layers_per_block`, `use_linear_projection`, `upcast_attention`,
/// `addition_embed_type_num_heads`, ...) are ignored, as diffusers ignores them for these
/// block types.
#[derive(Debug, Clone, Deserialize)]
pub struct UNet2DConditionConfig {
    /// Channels of `conv_in`'s input (4; 9 inpainting; 8 = latents + hint for ControlNet).
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    /// Output channels (8: ε and the learned variance).
    #[serde(default = "default_in_channels")]
    pub out_channels: usize,
    /// `center_input_sample` (must be false).
    #[serde(default)]
    pub center_input_sample: bool,
    /// Sinusoid order: `[cos, sin]` when true.
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    /// `downscale_freq_shift` of the sinusoid.
    #[serde(default)]
    pub freq_shift: f64,
    /// Down block types.
    #[serde(default = "default_down_block_types")]
    pub down_block_types: Vec<String>,
    /// Mid block type.
    #[serde(default = "default_mid_block_type")]
    pub mid_block_type: Option<String>,
    /// Up block types.
    #[serde(default = "default_up_block_types")]
    pub up_block_types: Vec<String>,
    /// `only_cross_attention` (must be false).
    #[serde(default = "default_false_per_block")]
    pub only_cross_attention: PerBlock<bool>,
    /// `mid_block_only_cross_attention` (must be null or false).
    #[serde(default)]
    pub mid_block_only_cross_attention: Option<bool>,
    /// Width of each level.
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    /// ResNets per down block (up blocks have one more).
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: PerBlock<usize>,
    /// Output divisor of the mid block's ResNets.
    #[serde(default = "default_one")]
    pub mid_block_scale_factor: f64,
    /// Non-linearity of the ResNets and the time embedding.
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    /// GroupNorm groups (must be set: `null` drops `conv_norm_out`, unsupported).
    #[serde(default = "default_norm_num_groups")]
    pub norm_num_groups: Option<usize>,
    /// GroupNorm epsilon of the ResNets and `conv_norm_out`.
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// Width of the cross-attention tokens.
    #[serde(default = "default_cross_attention_dim")]
    pub cross_attention_dim: PerBlock<usize>,
    /// Width of the conditioning input of `encoder_hid_proj`: the CLIP image embedding
    /// (`image_proj`, 2.2) or the M-CLIP text hidden states (`text_image_proj`, 2.1).
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    /// How the conditioning becomes cross-attention tokens (`image_proj`, `text_image_proj`).
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    /// Per-head dimension of the SimpleCrossAttn blocks (heads = channels / this).
    #[serde(default = "default_attention_head_dim")]
    pub attention_head_dim: PerBlock<usize>,
    /// `num_attention_heads` (must be null, as diffusers requires).
    #[serde(default)]
    pub num_attention_heads: Option<serde_json::Value>,
    /// `dual_cross_attention` (must be false).
    #[serde(default)]
    pub dual_cross_attention: bool,
    /// `class_embed_type` (must be null).
    #[serde(default)]
    pub class_embed_type: Option<String>,
    /// `num_class_embeds` (must be null).
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    /// `class_embeddings_concat` (must be false).
    #[serde(default)]
    pub class_embeddings_concat: bool,
    /// The additive time-embedding term: `image`, `image_hint` (2.2), `text_image` (2.1).
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// ResNet time conditioning (must be `scale_shift`).
    #[serde(default = "default_resnet_time_scale_shift")]
    pub resnet_time_scale_shift: String,
    /// ResNets skip the activation before `time_emb_proj`.
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    /// Output divisor of the block ResNets.
    #[serde(default = "default_one")]
    pub resnet_out_scale_factor: f64,
    /// Must be `positional`.
    #[serde(default = "default_time_embedding_type")]
    pub time_embedding_type: String,
    /// Width of the time embedding (default 4 × `block_out_channels[0]`).
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    /// Activation after adding the image term (must be null).
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    /// `timestep_post_act` (must be null).
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    /// `time_cond_proj_dim` (must be null).
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    /// Kernel of `conv_in` (odd).
    #[serde(default = "default_kernel")]
    pub conv_in_kernel: usize,
    /// Kernel of `conv_out` (odd).
    #[serde(default = "default_kernel")]
    pub conv_out_kernel: usize,
    /// Must be `default`.
    #[serde(default = "default_attention_type")]
    pub attention_type: String,
    /// `cross_attention_norm` (must be null).
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
}

fn default_in_channels() -> usize {
    4
}
fn default_true() -> bool {
    true
}
fn default_one() -> f64 {
    1.0
}
fn default_down_block_types() -> Vec<String> {
    [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn default_mid_block_type() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn default_up_block_types() -> Vec<String> {
    [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn default_false_per_block() -> PerBlock<bool> {
    PerBlock::One(false)
}
fn default_block_out_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn default_layers_per_block() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn default_act_fn() -> String {
    "silu".into()
}
fn default_norm_num_groups() -> Option<usize> {
    Some(32)
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_cross_attention_dim() -> PerBlock<usize> {
    PerBlock::One(1280)
}
fn default_attention_head_dim() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn default_resnet_time_scale_shift() -> String {
    "default".into()
}
fn default_time_embedding_type() -> String {
    "positional".into()
}
fn default_kernel() -> usize {
    3
}
fn default_attention_type() -> String {
    "default".into()
}

/// The additive time-embedding term (`addition_embed_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdditionEmbedType {
    /// `image`: `ImageTimeEmbedding` (decoder, inpainting).
    Image,
    /// `image_hint`: `ImageHintTimeEmbedding`; the encoded hint is concatenated to the
    /// latents (ControlNet).
    ImageHint,
    /// `text_image`: Kandinsky 2.1's `TextImageTimeEmbedding` (pooled text embedding and
    /// image embedding).
    TextImage,
}

/// How the conditioning becomes cross-attention tokens (`encoder_hid_dim_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncoderHidDimType {
    /// `image_proj`: `ImageProjection`, 32 tokens.
    ImageProj,
    /// `text_image_proj`: Kandinsky 2.1's `TextImageProjection`, 10 image tokens followed by
    /// the projected text hidden states.
    TextImageProj,
}

/// The checked, expanded form of [`UNet2DConditionConfig`].
#[derive(Debug, Clone)]
struct Plan {
    down: Vec<DownKind>,
    up: Vec<UpKind>,
    layers: Vec<usize>,
    head_dims: Vec<usize>,
    cross_dims: Vec<usize>,
    groups: usize,
    act: Activation,
    encoder_hid_dim: usize,
    hid_type: EncoderHidDimType,
    addition: AdditionEmbedType,
    time_embed_dim: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DownKind {
    ResnetDownsample,
    SimpleCrossAttn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpKind {
    SimpleCrossAttn,
    ResnetUpsample,
}

const DOWN_TYPES: &str = "ResnetDownsampleBlock2D, SimpleCrossAttnDownBlock2D";
const UP_TYPES: &str = "SimpleCrossAttnUpBlock2D, ResnetUpsampleBlock2D";

fn require<T: std::fmt::Debug + PartialEq>(
    field: &str,
    value: &T,
    ok: T,
    supported: &str,
) -> Result<()> {
    if *value == ok {
        Ok(())
    } else {
        Err(Error::unsupported(field, value, supported))
    }
}

impl UNet2DConditionConfig {
    /// The additive time-embedding term.
    pub fn addition_embed_type(&self) -> Result<AdditionEmbedType> {
        match self.addition_embed_type.as_deref() {
            Some("image") => Ok(AdditionEmbedType::Image),
            Some("image_hint") => Ok(AdditionEmbedType::ImageHint),
            Some("text_image") => Ok(AdditionEmbedType::TextImage),
            other => Err(Error::unsupported(
                "addition_embed_type",
                other,
                "\"image\", \"image_hint\", \"text_image\"",
            )),
        }
    }

    /// The conditioning-token projection.
    pub fn encoder_hid_dim_type(&self) -> Result<EncoderHidDimType> {
        match self.encoder_hid_dim_type.as_deref() {
            Some("image_proj") => Ok(EncoderHidDimType::ImageProj),
            Some("text_image_proj") => Ok(EncoderHidDimType::TextImageProj),
            other => Err(Error::unsupported(
                "encoder_hid_dim_type",
                other,
                "\"image_proj\", \"text_image_proj\"",
            )),
        }
    }

    /// Number of 2× upsamplings: latent sides must be multiples of `2^this`.
    pub fn num_upsamplers(&self) -> usize {
        self.block_out_channels.len().saturating_sub(1)
    }

    fn plan(&self) -> Result<Plan> {
        require(
            "center_input_sample",
            &self.center_input_sample,
            false,
            "false",
        )?;
        require(
            "dual_cross_attention",
            &self.dual_cross_attention,
            false,
            "false",
        )?;
        require("class_embed_type", &self.class_embed_type, None, "null")?;
        require("num_class_embeds", &self.num_class_embeds, None, "null")?;
        require(
            "class_embeddings_concat",
            &self.class_embeddings_concat,
            false,
            "false",
        )?;
        require(
            "resnet_time_scale_shift",
            &self.resnet_time_scale_shift.as_str(),
            "scale_shift",
            "\"scale_shift\"",
        )?;
        require(
            "time_embedding_type",
            &self.time_embedding_type.as_str(),
            "positional",
            "\"positional\"",
        )?;
        require(
            "time_embedding_act_fn",
            &self.time_embedding_act_fn,
            None,
            "null",
        )?;
        require("timestep_post_act", &self.timestep_post_act, None, "null")?;
        require("time_cond_proj_dim", &self.time_cond_proj_dim, None, "null")?;
        require(
            "attention_type",
            &self.attention_type.as_str(),
            "default",
            "\"default\"",
        )?;
        require(
            "cross_attention_norm",
            &self.cross_attention_norm,
            None,
            "null",
        )?;
        if let Some(v) = &self.num_attention_heads {
            if !v.is_null() {
                return Err(Error::unsupported(
                    "num_attention_heads",
                    v,
                    "null (diffusers uses attention_head_dim)",
                ));
            }
        }
        if self.mid_block_only_cross_attention == Some(true) {
            return Err(Error::unsupported(
                "mid_block_only_cross_attention",
                true,
                "null, false",
            ));
        }
        for (field, k) in [
            ("conv_in_kernel", self.conv_in_kernel),
            ("conv_out_kernel", self.conv_out_kernel),
        ] {
            if k % 2 == 0 {
                return Err(Error::unsupported(field, k, "an odd kernel size"));
            }
        }

        let n = self.block_out_channels.len();
        if n == 0 || self.block_out_channels.contains(&0) {
            return Err(Error::unsupported(
                "block_out_channels",
                &self.block_out_channels,
                "one or more positive widths",
            ));
        }
        for (field, len) in [
            ("down_block_types", self.down_block_types.len()),
            ("up_block_types", self.up_block_types.len()),
        ] {
            if len != n {
                return Err(Error::unsupported(
                    field,
                    len,
                    format!("one block per block_out_channels entry ({n})"),
                ));
            }
        }
        let down = self
            .down_block_types
            .iter()
            .map(|t| match t.as_str() {
                "ResnetDownsampleBlock2D" => Ok(DownKind::ResnetDownsample),
                "SimpleCrossAttnDownBlock2D" => Ok(DownKind::SimpleCrossAttn),
                other => Err(Error::unsupported("down_block_types", other, DOWN_TYPES)),
            })
            .collect::<Result<Vec<_>>>()?;
        let up = self
            .up_block_types
            .iter()
            .map(|t| match t.as_str() {
                "SimpleCrossAttnUpBlock2D" => Ok(UpKind::SimpleCrossAttn),
                "ResnetUpsampleBlock2D" => Ok(UpKind::ResnetUpsample),
                other => Err(Error::unsupported("up_block_types", other, UP_TYPES)),
            })
            .collect::<Result<Vec<_>>>()?;
        require(
            "mid_block_type",
            &self.mid_block_type.as_deref(),
            Some("UNetMidBlock2DSimpleCrossAttn"),
            "\"UNetMidBlock2DSimpleCrossAttn\"",
        )?;
        let only_cross = self
            .only_cross_attention
            .expand(n, "only_cross_attention")?;
        if only_cross.iter().any(|&b| b) {
            return Err(Error::unsupported(
                "only_cross_attention",
                &only_cross,
                "false",
            ));
        }
        let layers = self.layers_per_block.expand(n, "layers_per_block")?;
        if layers.contains(&0) {
            return Err(Error::unsupported(
                "layers_per_block",
                &layers,
                "positive counts",
            ));
        }
        let head_dims = self.attention_head_dim.expand(n, "attention_head_dim")?;
        let cross_dims = self.cross_attention_dim.expand(n, "cross_attention_dim")?;
        let act = Activation::from_name(&self.act_fn)?;

        let groups = self.norm_num_groups.ok_or_else(|| {
            Error::unsupported(
                "norm_num_groups",
                "null",
                "a group count dividing every width",
            )
        })?;
        let encoder_hid_dim = self.encoder_hid_dim.ok_or_else(|| {
            Error::unsupported(
                "encoder_hid_dim",
                "null",
                "the image-embedding width (image_proj) or the text hidden-state width \
                 (text_image_proj)",
            )
        })?;
        let hid_type = self.encoder_hid_dim_type()?;
        let addition = self.addition_embed_type()?;
        // Only the pairings of the real checkpoints: 2.1 feeds text to both modules, 2.2 to
        // neither, and the embeddings' expected widths differ between the two.
        let text_hid = hid_type == EncoderHidDimType::TextImageProj;
        let text_add = addition == AdditionEmbedType::TextImage;
        if text_hid != text_add {
            return Err(Error::unsupported(
                "encoder_hid_dim_type",
                self.encoder_hid_dim_type.as_deref(),
                format!(
                    "\"{}\" with addition_embed_type {:?} (Kandinsky 2.1 pairs \
                     \"text_image_proj\" with \"text_image\", 2.2 \"image_proj\" with \
                     \"image\" / \"image_hint\")",
                    if text_add {
                        "text_image_proj"
                    } else {
                        "image_proj"
                    },
                    self.addition_embed_type.as_deref().unwrap_or("null"),
                ),
            ));
        }
        // ImageProjection / TextImageProjection are built with cross_attention_dim as an
        // int; diffusers fails on a per-block list here, so require one width.
        if cross_dims.iter().any(|&c| c != cross_dims[0]) {
            return Err(Error::unsupported(
                "cross_attention_dim",
                &cross_dims,
                "one width (encoder_hid_proj builds one token projection)",
            ));
        }
        let hint_channels = match addition {
            AdditionEmbedType::ImageHint => ImageHintTimeEmbedding::HINT_OUT_CHANNELS,
            _ => 0,
        };
        if self.in_channels <= hint_channels {
            return Err(Error::unsupported(
                "in_channels",
                self.in_channels,
                format!("more than the {hint_channels} channels of the encoded hint"),
            ));
        }
        let time_embed_dim = self
            .time_embedding_dim
            .unwrap_or(4 * self.block_out_channels[0]);
        self.check_widths(groups, &layers, &head_dims, &down, &up)?;
        Ok(Plan {
            down,
            up,
            layers,
            head_dims,
            cross_dims,
            groups,
            act,
            encoder_hid_dim,
            hid_type,
            addition,
            time_embed_dim,
        })
    }
}

impl ModelConfig for UNet2DConditionConfig {
    /// Check that every value is one kandinsky-rs implements.
    fn validate(&self) -> Result<()> {
        self.plan().map(|_| ())
    }
}

impl UNet2DConditionConfig {
    /// Every GroupNorm width (skip concatenations included) must split into `groups`, and
    /// every attention width into heads of `head_dim`, as the blocks are built.
    fn check_widths(
        &self,
        groups: usize,
        layers: &[usize],
        head_dims: &[usize],
        down: &[DownKind],
        up: &[UpKind],
    ) -> Result<()> {
        let boc = &self.block_out_channels;
        let n = boc.len();
        let mut norm_widths = vec![boc[0]];
        let mut attn_widths = vec![(boc[n - 1], head_dims[n - 1])];
        for i in 0..n {
            let cin = if i == 0 { boc[0] } else { boc[i - 1] };
            norm_widths.extend([cin, boc[i]]);
            if down[i] == DownKind::SimpleCrossAttn {
                attn_widths.push((boc[i], head_dims[i]));
            }
            let out = boc[n - 1 - i];
            let prev = if i == 0 { boc[n - 1] } else { boc[n - i] };
            let deepest_skip = boc[(n - 1).saturating_sub(i + 1)];
            let up_layers = layers[n - 1 - i] + 1;
            for l in 0..up_layers {
                let cin = if l == 0 { prev } else { out };
                let skip = if l + 1 == up_layers {
                    deepest_skip
                } else {
                    out
                };
                norm_widths.push(cin + skip);
            }
            if up[i] == UpKind::SimpleCrossAttn {
                attn_widths.push((out, head_dims[i]));
            }
        }
        if let Some(w) = norm_widths
            .iter()
            .find(|&&w| groups == 0 || w % groups != 0)
        {
            return Err(Error::unsupported(
                "norm_num_groups",
                groups,
                format!("a divisor of every normalized width (not of {w})"),
            ));
        }
        if let Some((w, d)) = attn_widths.iter().find(|(w, d)| *d == 0 || w % d != 0) {
            return Err(Error::unsupported(
                "attention_head_dim",
                d,
                format!("a divisor of every attention block's channel count (not of {w})"),
            ));
        }
        Ok(())
    }
}

/// The additive time-embedding module.
#[derive(Debug, Clone)]
pub enum AddEmbedding {
    /// `ImageTimeEmbedding`.
    Image(ImageTimeEmbedding),
    /// `ImageHintTimeEmbedding`.
    ImageHint(ImageHintTimeEmbedding),
    /// `TextImageTimeEmbedding` (Kandinsky 2.1).
    TextImage(TextImageTimeEmbedding),
}

/// The cross-attention token projection (`encoder_hid_proj`).
#[derive(Debug, Clone)]
pub enum EncoderHidProj {
    /// `ImageProjection` (Kandinsky 2.2): 32 image tokens.
    Image(ImageProjection),
    /// `TextImageProjection` (Kandinsky 2.1): 10 image tokens and the projected text tokens.
    TextImage(TextImageProjection),
}

/// The Kandinsky 2.2 / 2.1 decoder UNet.
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    encoder_hid_proj: EncoderHidProj,
    add_embedding: AddEmbedding,
    down_blocks: Vec<DownBlock>,
    mid_block: UNetMidBlock2DSimpleCrossAttn,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    act: Activation,
    config: UNet2DConditionConfig,
    device: Device,
    dtype: DType,
}

impl UNet2DConditionModel {
    /// Build the network from `cfg`; every `vb.pp` segment is a checkpoint key segment.
    pub fn new(vb: VarBuilder, cfg: &UNet2DConditionConfig) -> Result<Self> {
        let plan = cfg.plan()?;
        let boc = &cfg.block_out_channels;
        let n = boc.len();
        let c0 = boc[0];
        let groups = plan.groups;
        let ted = plan.time_embed_dim;

        let conv_in = conv2d(
            cfg.in_channels,
            c0,
            cfg.conv_in_kernel,
            Conv2dConfig {
                padding: (cfg.conv_in_kernel - 1) / 2,
                ..Default::default()
            },
            vb.pp("conv_in"),
        )?;
        // Always f32 (3M parameters at the real size): exact for half-precision models, and
        // it lets the shared layer run bf16 models on the CPU, where candle has no bf16 matmul.
        let time_embedding = TimestepEmbedding::new(
            vb.pp("time_embedding").set_dtype(DType::F32),
            c0,
            ted,
            ted,
            plan.act,
        )?;
        let cross = plan.cross_dims[0];
        // diffusers' widths: 2.2 takes the image embedding at encoder_hid_dim; 2.1 takes the
        // image and pooled text embeddings at cross_attention_dim and the text hidden states
        // at encoder_hid_dim.
        let encoder_hid_proj = match plan.hid_type {
            EncoderHidDimType::ImageProj => EncoderHidProj::Image(ImageProjection::new(
                vb.pp("encoder_hid_proj"),
                plan.encoder_hid_dim,
                cross,
            )?),
            EncoderHidDimType::TextImageProj => {
                EncoderHidProj::TextImage(TextImageProjection::new(
                    vb.pp("encoder_hid_proj"),
                    plan.encoder_hid_dim,
                    cross,
                    cross,
                )?)
            }
        };
        let add_vb = vb.pp("add_embedding");
        let add_embedding =
            match plan.addition {
                AdditionEmbedType::Image => {
                    AddEmbedding::Image(ImageTimeEmbedding::new(add_vb, plan.encoder_hid_dim, ted)?)
                }
                AdditionEmbedType::ImageHint => AddEmbedding::ImageHint(
                    ImageHintTimeEmbedding::new(add_vb, plan.encoder_hid_dim, ted)?,
                ),
                AdditionEmbedType::TextImage => {
                    AddEmbedding::TextImage(TextImageTimeEmbedding::new(add_vb, cross, cross, ted)?)
                }
            };

        let settings = |osf: f64| ResnetSettings {
            temb_channels: ted,
            groups,
            eps: cfg.norm_eps,
            act: plan.act,
            skip_time_act: cfg.resnet_skip_time_act,
            output_scale_factor: osf,
        };
        let block_settings = settings(cfg.resnet_out_scale_factor);

        let mut down_blocks = Vec::with_capacity(n);
        let mut out_ch = c0;
        for (i, kind) in plan.down.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = boc[i];
            let ch = BlockChannels {
                in_channels: in_ch,
                prev_output_channel: 0,
                out_channels: out_ch,
                layers: plan.layers[i],
                resample: i + 1 != n,
            };
            let attn = AttentionSettings {
                head_dim: plan.head_dims[i],
                cross_attention_dim: plan.cross_dims[i],
            };
            let bvb = vb.pp("down_blocks").pp(i.to_string());
            down_blocks.push(match kind {
                DownKind::ResnetDownsample => DownBlock::ResnetDownsample(
                    ResnetDownsampleBlock2D::new(bvb, &ch, &block_settings)?,
                ),
                DownKind::SimpleCrossAttn => DownBlock::SimpleCrossAttn(
                    SimpleCrossAttnDownBlock2D::new(bvb, &ch, &block_settings, &attn)?,
                ),
            });
        }

        let mid_block = UNetMidBlock2DSimpleCrossAttn::new(
            vb.pp("mid_block"),
            boc[n - 1],
            &settings(cfg.mid_block_scale_factor),
            &AttentionSettings {
                head_dim: plan.head_dims[n - 1],
                cross_attention_dim: plan.cross_dims[n - 1],
            },
        )?;

        let mut up_blocks = Vec::with_capacity(n);
        let mut out_ch = boc[n - 1];
        for (i, kind) in plan.up.iter().enumerate() {
            let prev = out_ch;
            out_ch = boc[n - 1 - i];
            let ch = BlockChannels {
                in_channels: boc[(n - 1).saturating_sub(i + 1)],
                prev_output_channel: prev,
                out_channels: out_ch,
                layers: plan.layers[n - 1 - i] + 1,
                resample: i + 1 != n,
            };
            // diffusers indexes the up blocks' attention_head_dim *unreversed* (and the
            // cross-attention dim reversed); identical for the uniform real config.
            let attn = AttentionSettings {
                head_dim: plan.head_dims[i],
                cross_attention_dim: plan.cross_dims[n - 1 - i],
            };
            let bvb = vb.pp("up_blocks").pp(i.to_string());
            up_blocks.push(match kind {
                UpKind::SimpleCrossAttn => UpBlock::SimpleCrossAttn(SimpleCrossAttnUpBlock2D::new(
                    bvb,
                    &ch,
                    &block_settings,
                    &attn,
                )?),
                UpKind::ResnetUpsample => {
                    UpBlock::ResnetUpsample(ResnetUpsampleBlock2D::new(bvb, &ch, &block_settings)?)
                }
            });
        }

        let conv_norm_out = group_norm(groups, c0, cfg.norm_eps, vb.pp("conv_norm_out"))?;
        let conv_out = conv2d(
            c0,
            cfg.out_channels,
            cfg.conv_out_kernel,
            Conv2dConfig {
                padding: (cfg.conv_out_kernel - 1) / 2,
                ..Default::default()
            },
            vb.pp("conv_out"),
        )?;
        Ok(Self {
            conv_in,
            time_embedding,
            encoder_hid_proj,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            act: plan.act,
            config: cfg.clone(),
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// Load a diffusers `unet/` folder (config + safetensors weights) in `dtype` on `device`.
    pub fn from_dir(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        load_component(dir, dtype, device, Self::new)
    }

    /// The configuration.
    pub fn config(&self) -> &UNet2DConditionConfig {
        &self.config
    }

    /// True for the ControlNet variant (`image_hint`), which needs a hint image.
    pub fn takes_hint(&self) -> bool {
        matches!(self.add_embedding, AddEmbedding::ImageHint(_))
    }

    /// True for Kandinsky 2.1 (`text_image`), which needs the pooled text embedding and the
    /// text hidden states besides the image embedding.
    pub fn takes_text(&self) -> bool {
        matches!(self.add_embedding, AddEmbedding::TextImage(_))
    }

    /// Width of `image_embeds`: `encoder_hid_dim` for 2.2 (1280), `cross_attention_dim` for
    /// 2.1 (768), as diffusers builds the modules.
    pub fn image_embed_dim(&self) -> usize {
        match self.text_dims() {
            Some((pooled, _)) => pooled,
            None => self.config.encoder_hid_dim.unwrap_or(0),
        }
    }

    /// Kandinsky 2.1 only: (width of the pooled text embedding `text_embeds` =
    /// `cross_attention_dim` (768), width of the text hidden states = `encoder_hid_dim`
    /// (1024)). `None` for the 2.2 UNets.
    pub fn text_dims(&self) -> Option<(usize, usize)> {
        if !self.takes_text() {
            return None;
        }
        // validate() guaranteed one cross_attention_dim and a set encoder_hid_dim.
        let cross = match &self.config.cross_attention_dim {
            PerBlock::One(c) => *c,
            PerBlock::Many(v) => v.first().copied().unwrap_or(0),
        };
        Some((cross, self.config.encoder_hid_dim.unwrap_or(0)))
    }

    /// Channels of the `sample` argument (the hint's encoded channels excluded).
    pub fn sample_channels(&self) -> usize {
        if self.takes_hint() {
            self.config.in_channels - ImageHintTimeEmbedding::HINT_OUT_CHANNELS
        } else {
            self.config.in_channels
        }
    }

    /// One forward of a Kandinsky 2.2 UNet (image conditioning; for 2.1 use
    /// [`forward_text_image`](Self::forward_text_image) or [`Denoiser::predict`]).
    ///
    /// * `sample` `[B, sample_channels, h, w]`, `h` and `w` multiples of 8 (`2^(levels−1)`);
    /// * `timesteps`: one per batch element;
    /// * `image_embeds` `[B, encoder_hid_dim]`;
    /// * `hint` `[B, 3, 8h, 8w]`: required by the ControlNet variant, refused otherwise.
    ///
    /// Returns `[B, out_channels, h, w]` in the model dtype.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &[f64],
        image_embeds: &Tensor,
        hint: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.run(
            sample,
            timesteps,
            Cond {
                image_embeds: Some(image_embeds),
                hint,
                ..Default::default()
            },
        )
    }

    /// One forward of a Kandinsky 2.1 UNet (`text_image` / `text_image_proj`).
    ///
    /// * `sample` `[B, sample_channels, h, w]` (4 channels; 9 for inpainting), `h` and `w`
    ///   multiples of 8;
    /// * `timesteps`: one per batch element;
    /// * `image_embeds` `[B, cross_attention_dim]` (the CLIP image embedding, 768);
    /// * `text_embeds` `[B, cross_attention_dim]` (the pooled, projected M-CLIP embedding);
    /// * `text_hidden_states` `[B, L, encoder_hid_dim]` (M-CLIP's last hidden states, L = 77
    ///   in the pipeline; no mask is applied, as in diffusers).
    ///
    /// Returns `[B, out_channels, h, w]` in the model dtype.
    pub fn forward_text_image(
        &self,
        sample: &Tensor,
        timesteps: &[f64],
        image_embeds: &Tensor,
        text_embeds: &Tensor,
        text_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        self.run(
            sample,
            timesteps,
            Cond {
                image_embeds: Some(image_embeds),
                text_embeds: Some(text_embeds),
                text_hidden_states: Some(text_hidden_states),
                hint: None,
            },
        )
    }

    /// The sinusoidal embedding of `timesteps` (`[B, block_out_channels[0]]`, f32, on the
    /// model's device): computed on the host exactly as diffusers does, then uploaded. The
    /// input of [`Self::predict_prepared_with_sinusoid`].
    pub fn time_sinusoid(&self, timesteps: &[f64]) -> Result<Tensor> {
        timestep_embedding(
            timesteps,
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
            &self.device,
        )
    }

    /// The attention layers in forward order (down blocks, mid block, up blocks): the
    /// order of the image keys and values in a [`PreparedCondition`].
    fn attentions(&self) -> impl Iterator<Item = &Attention> {
        let down = self.down_blocks.iter().flat_map(|b| b.attentions());
        let up = self.up_blocks.iter().flat_map(|b| b.attentions());
        down.chain(self.mid_block.attentions()).chain(up)
    }

    /// [`Denoiser::predict_prepared`] with the timesteps given as their sinusoidal embedding
    /// ([`Self::time_sinusoid`]), so that the forward issues no host-to-device copy of its
    /// own: the form a CUDA graph captures (`graph::GraphedUNet`), the sinusoid's buffer
    /// refilled before each replay.
    pub fn predict_prepared_with_sinusoid(
        &self,
        sample: &Tensor,
        time_sinusoid: &Tensor,
        prepared: &PreparedCondition,
    ) -> Result<Tensor> {
        let dim = self.config.block_out_channels[0];
        let rows = match time_sinusoid.dims() {
            &[n, d] if d == dim => n,
            dims => {
                return Err(Error::invalid(format!(
                    "UNet time sinusoid must be [batch, {dim}], got shape {dims:?}"
                )))
            }
        };
        self.run_prepared(sample, rows, time_sinusoid, prepared.tensors())
    }

    /// [`Denoiser::prepare`]: the conditioning's share of a forward, computed once.
    ///
    /// The prepared tensors, in order: the additive time-embedding term `[B, T]`; each
    /// attention layer's image keys and values ([`Attention::image_kv`], forward order);
    /// for the ControlNet variant the encoded hint `[B, 4, h, w]`.
    pub fn prepare_condition(&self, cond: &DenoiserCondition) -> Result<PreparedCondition> {
        let version = if self.takes_text() { "2.1" } else { "2.2" };
        let e = self.image_embed_dim();
        let b = match cond.image_embeds.as_ref().map(|t| t.dims()) {
            Some(&[b, _]) => b,
            Some(dims) => {
                return Err(Error::invalid(format!(
                    "image_embeds must be [B, {e}] (batch, image-embedding width), got {dims:?}"
                )))
            }
            None => {
                return Err(Error::invalid(format!(
                    "the Kandinsky {version} UNet needs image_embeds [B, {e}]"
                )))
            }
        };
        let tensors = self.prepared_tensors(Cond::of(cond), b, None)?;
        Ok(PreparedCondition::new(cond.clone(), tensors))
    }

    /// The prepared tensors of [`Self::prepare_condition`] for a batch of `b`, with the
    /// latents' `(h, w)` where known (the hint's size is then checked against it).
    fn prepared_tensors(
        &self,
        cond: Cond<'_>,
        b: usize,
        latent_hw: Option<(usize, usize)>,
    ) -> Result<Vec<Tensor>> {
        let checked = self.check_cond(cond, b, latent_hw)?;
        let to_model =
            |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(&self.device)?.to_dtype(self.dtype)?) };
        let image_embeds = to_model(checked.image_embeds)?;
        let text = match checked.text {
            Some((pooled, hidden)) => Some((to_model(pooled)?, to_model(hidden)?)),
            None => None,
        };
        let mismatch = || Error::invalid("the conditioning does not match this UNet's type");
        let (aug, hint) = match (&self.add_embedding, &text, checked.hint) {
            (AddEmbedding::Image(e), None, None) => (e.forward(&image_embeds)?, None),
            (AddEmbedding::ImageHint(e), None, Some(hint)) => {
                let (aug, hint) = e.forward(&image_embeds, &to_model(hint)?)?;
                (aug, Some(hint))
            }
            (AddEmbedding::TextImage(e), Some((pooled, _)), None) => {
                (e.forward(pooled, &image_embeds)?, None)
            }
            // check_cond pairs the conditioning with the UNet type.
            _ => return Err(mismatch()),
        };
        let encoder_hidden_states = match (&self.encoder_hid_proj, &text) {
            (EncoderHidProj::Image(p), None) => p.forward(&image_embeds)?,
            (EncoderHidProj::TextImage(p), Some((_, hidden))) => {
                p.forward(hidden, &image_embeds)?
            }
            _ => return Err(mismatch()),
        };
        let mut tensors = vec![aug];
        for attn in self.attentions() {
            let kv = attn.image_kv(&encoder_hidden_states)?;
            tensors.extend([kv.k, kv.v]);
        }
        tensors.extend(hint);
        Ok(tensors)
    }

    fn run(&self, sample: &Tensor, timesteps: &[f64], cond: Cond<'_>) -> Result<Tensor> {
        // Checked before the upload (the error names the timesteps).
        let (b, h, w) = self.check_sample(sample, timesteps.len())?;
        let prepared = self.prepared_tensors(cond, b, Some((h, w)))?;
        let t_sin = self.time_sinusoid(timesteps)?;
        self.run_prepared(sample, timesteps.len(), &t_sin, &prepared)
    }

    fn run_prepared(
        &self,
        sample: &Tensor,
        n_timesteps: usize,
        t_sin: &Tensor,
        prepared: &[Tensor],
    ) -> Result<Tensor> {
        let (b, h, w) = self.check_sample(sample, n_timesteps)?;
        let n_attn = self.attentions().count();
        let hint_feats = usize::from(self.takes_hint());
        let stale = |what: String| {
            Error::invalid(format!(
                "the prepared conditioning does not fit this UNet and sample ({what}); \
                 prepare it with this UNet for latents of this batch and size"
            ))
        };
        let [aug, rest @ ..] = prepared else {
            return Err(stale("no tensors".into()));
        };
        if rest.len() != 2 * n_attn + hint_feats {
            return Err(stale(format!(
                "{} tensors, expected {}",
                prepared.len(),
                1 + 2 * n_attn + hint_feats
            )));
        }
        if aug.dim(0)? != b {
            return Err(stale(format!(
                "prepared for batch {}, the sample has batch {b}",
                aug.dim(0)?
            )));
        }
        let image_kv: Vec<ImageKv> = rest[..2 * n_attn]
            .chunks(2)
            .map(|kv| ImageKv {
                k: kv[0].clone(),
                v: kv[1].clone(),
            })
            .collect();
        let mut sample = sample.to_device(&self.device)?.to_dtype(self.dtype)?;
        if let Some(hint) = rest.get(2 * n_attn) {
            let (_, _, hh, hw) = hint.dims4()?;
            if (hh, hw) != (h, w) {
                return Err(stale(format!(
                    "a hint encoded to {hh}x{hw} latents, the sample is {h}x{w}"
                )));
            }
            sample = Tensor::cat(&[&sample, hint], 1)?;
        }

        // Time embedding: sinusoid and MLP in f32, then the model dtype.
        let t_sin = t_sin.to_device(&self.device)?.to_dtype(DType::F32)?;
        let emb = self.time_embedding.forward(&t_sin)?.to_dtype(self.dtype)?;
        let emb = (emb + aug)?;

        let mut kv = image_kv.as_slice();
        let mut take = |n: usize| {
            let (mine, others) = kv.split_at(n);
            kv = others;
            mine
        };
        let mut x = self.conv_in.forward(&sample)?;
        let mut skips = Vec::with_capacity(1 + self.down_blocks.len() * 4);
        skips.push(x.clone());
        for block in &self.down_blocks {
            x = block.forward(&x, &emb, take(block.attentions().len()), &mut skips)?;
        }
        x = self
            .mid_block
            .forward(&x, &emb, take(self.mid_block.attentions().len()))?;
        for block in &self.up_blocks {
            x = block.forward(&x, &mut skips, &emb, take(block.attentions().len()))?;
        }
        debug_assert!(skips.is_empty());
        let x = match self.act {
            Activation::Silu => self.conv_norm_out.forward_silu(&x)?,
            act => act.apply(&self.conv_norm_out.forward(&x)?)?,
        };
        let out = self.conv_out.forward(&x)?;
        debug_assert_eq!(out.dims4()?, (b, self.config.out_channels, h, w));
        Ok(out)
    }

    /// Whether `n` latents is a usable side: a positive multiple of the down-scaling.
    fn latent_side_ok(&self, n: usize) -> bool {
        n > 0 && n % (1usize << self.config.num_upsamplers()) == 0
    }

    /// `sample` `[B, sample_channels, h, w]` with `h`, `w` multiples of the UNet's
    /// down-scaling and one timestep per batch element → `(B, h, w)`.
    fn check_sample(&self, sample: &Tensor, n_timesteps: usize) -> Result<(usize, usize, usize)> {
        let expected_c = self.sample_channels();
        let (b, c, h, w) = sample.dims4().map_err(|_| {
            Error::invalid(format!(
                "UNet sample must be [batch, {expected_c}, height, width], got shape {:?}",
                sample.dims()
            ))
        })?;
        if c != expected_c {
            return Err(Error::invalid(format!(
                "UNet sample has {c} channels, this UNet expects {expected_c}{}",
                match (self.takes_hint(), self.config.in_channels) {
                    (true, _) => " (latents; the hint is passed separately)",
                    (false, 9) => " (noisy latents, masked-image latents, mask)",
                    _ => "",
                }
            )));
        }
        if !self.latent_side_ok(h) || !self.latent_side_ok(w) {
            let f = 1usize << self.config.num_upsamplers();
            return Err(Error::invalid(format!(
                "latent height and width must be positive multiples of {f} (image sides multiples \
                 of {}), got {h}x{w}",
                f * 8
            )));
        }
        if n_timesteps != b {
            return Err(Error::invalid(format!(
                "expected one timestep per batch element ({b}), got {n_timesteps}"
            )));
        }
        Ok((b, h, w))
    }

    /// The conditioning of a batch of `b`, present and of the right shapes; the hint is
    /// checked against the latents' `(h, w)` where known, else only for a usable size.
    fn check_cond<'a>(
        &self,
        cond: Cond<'a>,
        b: usize,
        latent_hw: Option<(usize, usize)>,
    ) -> Result<Checked<'a>> {
        let version = if self.takes_text() { "2.1" } else { "2.2" };
        let e = self.image_embed_dim();
        let image_embeds = cond.image_embeds.ok_or_else(|| {
            Error::invalid(format!(
                "the Kandinsky {version} UNet needs image_embeds [{b}, {e}]"
            ))
        })?;
        if image_embeds.dims() != [b, e] {
            return Err(Error::invalid(format!(
                "image_embeds must be [{b}, {e}] (batch of the latents, image-embedding width), got {:?}",
                image_embeds.dims()
            )));
        }
        let text = match (self.text_dims(), cond.text_embeds, cond.text_hidden_states) {
            (None, None, None) => None,
            (None, _, _) => {
                return Err(Error::invalid(
                    "the Kandinsky 2.2 UNet is conditioned on image embeddings only; text \
                     conditioning (text_embeds, text_hidden_states) is Kandinsky 2.1's",
                ))
            }
            (Some((pooled_dim, hidden_dim)), pooled, hidden) => {
                let missing: Vec<String> = [
                    pooled.is_none().then(|| {
                        format!("text_embeds [{b}, {pooled_dim}] (the pooled M-CLIP embedding)")
                    }),
                    hidden.is_none().then(|| {
                        format!(
                            "text_hidden_states [{b}, L, {hidden_dim}] (the M-CLIP hidden states)"
                        )
                    }),
                ]
                .into_iter()
                .flatten()
                .collect();
                let (Some(pooled), Some(hidden)) = (pooled, hidden) else {
                    return Err(Error::invalid(format!(
                        "this Kandinsky 2.1 UNet (addition_embed_type \"text_image\") needs {} \
                         besides image_embeds (use forward_text_image or Denoiser::predict)",
                        missing.join(" and ")
                    )));
                };
                if pooled.dims() != [b, pooled_dim] {
                    return Err(Error::invalid(format!(
                        "text_embeds must be [{b}, {pooled_dim}] (batch of the latents, pooled \
                         text-embedding width = cross_attention_dim), got {:?}",
                        pooled.dims()
                    )));
                }
                match hidden.dims() {
                    &[hb, l, d] if hb == b && l > 0 && d == hidden_dim => {}
                    dims => {
                        return Err(Error::invalid(format!(
                            "text_hidden_states must be [{b}, L, {hidden_dim}] (batch of the \
                             latents, L ≥ 1 tokens, text hidden width = encoder_hid_dim), got \
                             {dims:?}"
                        )))
                    }
                }
                Some((pooled, hidden))
            }
        };
        match (self.takes_hint(), cond.hint) {
            (true, None) => {
                return Err(Error::invalid(
                    "this ControlNet UNet (addition_embed_type \"image_hint\") needs a hint image",
                ))
            }
            (false, Some(_)) => {
                return Err(Error::invalid(
                    "this UNet takes no hint (only addition_embed_type \"image_hint\" does)",
                ))
            }
            (true, Some(hint)) => {
                let d = ImageHintTimeEmbedding::HINT_DOWNSCALE;
                let c = ImageHintTimeEmbedding::HINT_CHANNELS;
                match (latent_hw, hint.dims()) {
                    (Some((h, w)), dims) if dims != [b, c, h * d, w * d] => {
                        return Err(Error::invalid(format!(
                            "hint must be {:?} (batch, RGB, {d}x the latent size), got {dims:?}",
                            [b, c, h * d, w * d]
                        )))
                    }
                    (Some(_), _) => {}
                    (None, &[hb, hc, hh, hw])
                        if hb == b
                            && hc == c
                            && self.latent_side_ok(hh / d)
                            && hh % d == 0
                            && self.latent_side_ok(hw / d)
                            && hw % d == 0 => {}
                    (None, dims) => {
                        let f = d << self.config.num_upsamplers();
                        return Err(Error::invalid(format!(
                            "hint must be [{b}, {c}, H, W] (batch, RGB, image sides positive \
                             multiples of {f}), got {dims:?}"
                        )));
                    }
                }
            }
            (false, None) => {}
        }
        Ok(Checked {
            image_embeds,
            text,
            hint: cond.hint,
        })
    }
}

/// The conditioning of one forward, before checking.
#[derive(Debug, Default, Clone, Copy)]
struct Cond<'a> {
    image_embeds: Option<&'a Tensor>,
    text_embeds: Option<&'a Tensor>,
    text_hidden_states: Option<&'a Tensor>,
    hint: Option<&'a Tensor>,
}

impl<'a> Cond<'a> {
    fn of(cond: &'a DenoiserCondition) -> Self {
        Self {
            image_embeds: cond.image_embeds.as_ref(),
            text_embeds: cond.text_embeds.as_ref(),
            text_hidden_states: cond.text_hidden_states.as_ref(),
            hint: cond.hint.as_ref(),
        }
    }
}

/// The conditioning after [`UNet2DConditionModel::check_cond`]: present and of the right
/// shapes.
struct Checked<'a> {
    image_embeds: &'a Tensor,
    /// (pooled `text_embeds`, `text_hidden_states`), Kandinsky 2.1 only.
    text: Option<(&'a Tensor, &'a Tensor)>,
    hint: Option<&'a Tensor>,
}

impl Denoiser for UNet2DConditionModel {
    /// Kandinsky 2.2 takes `image_embeds` (and `hint` for ControlNet); Kandinsky 2.1 takes
    /// `image_embeds`, `text_embeds` and `text_hidden_states`. Missing or extra conditioning
    /// is an [`Error::InvalidInput`] naming it.
    fn predict(
        &self,
        sample: &Tensor,
        timesteps: &[f64],
        cond: &DenoiserCondition,
    ) -> Result<Tensor> {
        self.run(sample, timesteps, Cond::of(cond))
    }

    /// The additive time-embedding term, every attention layer's image keys and values and
    /// the encoded ControlNet hint ([`UNet2DConditionModel::prepare_condition`]).
    fn prepare(&self, cond: &DenoiserCondition) -> Result<PreparedCondition> {
        self.prepare_condition(cond)
    }

    fn predict_prepared(
        &self,
        sample: &Tensor,
        timesteps: &[f64],
        prepared: &PreparedCondition,
    ) -> Result<Tensor> {
        // Checked before the upload (the error names the timesteps).
        self.check_sample(sample, timesteps.len())?;
        let t_sin = self.time_sinusoid(timesteps)?;
        self.run_prepared(sample, timesteps.len(), &t_sin, prepared.tensors())
    }

    fn sample_channels(&self) -> usize {
        UNet2DConditionModel::sample_channels(self)
    }

    fn out_channels(&self) -> usize {
        self.config.out_channels
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}
