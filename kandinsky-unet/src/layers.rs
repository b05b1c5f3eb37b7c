//! `Conv2d` that also runs in bf16 on the CPU (and the shared `Linear`, which does too).
//!
//! candle 0.11's CPU matmul (used by linear layers and by the im2col convolution) has no bf16
//! kernel. For bf16 on the CPU these layers compute in f32 and round the result back to
//! bf16, as PyTorch's CPU bf16 matmul accumulates in f32. Every other dtype/device goes
//! straight to candle (or to the packed CPU kernels).

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;
use kandinsky_core::cpu_conv::PackedConv3x3;
use kandinsky_core::gpu_conv::{InputNorm, MapStats, ShiftedConv};
use kandinsky_core::nn::{use_fused_kernels, Conv2dConfig};

/// True when `x` needs the f32 detour (bf16 on the CPU).
pub fn needs_f32(x: &Tensor) -> bool {
    x.dtype() == DType::BF16 && x.device().is_cpu()
}

/// The linear layer of kandinsky-core (packed f32 kernels on the CPU, the same bf16 detour).
pub use kandinsky_core::nn::{linear, Linear};

/// Bytes of scratch above which a CUDA convolution runs in bands of output rows: the
/// largest whole-map one at 768 px (an up-block's 768 → 384 channels at 96², 87 MB of
/// shifted copies) set the step's peak 46 MiB above diffusers'. Measured on an H200 (GPU
/// run 10, f16, batch 2), peak / eager step: none 2734 MiB / 17.3 ms; 96 MiB 2680 / 17.7
/// (1024 px: 2966 → 2846 MiB, 25.7 → 27.6 ms); diffusers 2688 (1024 px: 2865).
const CONV_SCRATCH_LIMIT: usize = 96 << 20;

/// A 2-D convolution with bias.
///
/// On the CPU, 3×3 stride-1 padding-1 convolutions (all but the shortcuts, the hint block's
/// downsampling and the 1×1s) keep their weight pre-arranged from load and run
/// [`PackedConv3x3`]: candle 0.11.1 rebuilds the weight matrix and a full im2col matrix on
/// every call. On CUDA, stride-1 convolutions run kandinsky-core's [`ShiftedConv`] (no
/// im2col matrix, f32 accumulation, the bias, a nearest-2× upsampling of the input and a
/// residual add fused). `KANDINSKY_PLAIN_KERNELS=1` (read at load) keeps candle's kernel
/// everywhere.
#[derive(Debug, Clone)]
pub struct Conv2d(ConvKind);

#[derive(Debug, Clone)]
enum ConvKind {
    Candle(candle_nn::Conv2d),
    /// Only the packed copy is kept (the candle weight is dropped after packing).
    Packed3x3(PackedConv3x3),
    /// Only the rearranged taps are kept.
    Shifted(ShiftedConv),
}

/// Load `weight [out, in, k, k]`/`bias [out]` of a convolution.
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> candle_core::Result<Conv2d> {
    let packable = kernel == 3
        && cfg.padding == 1
        && cfg.stride == 1
        && cfg.dilation == 1
        && cfg.groups == 1
        && vb.device().is_cpu()
        // f64 stays exact in candle; the packed kernel computes in f32.
        && vb.dtype() != DType::F64
        && use_fused_kernels();
    let shifted = ShiftedConv::covers(
        vb.device(),
        (kernel, kernel),
        cfg.stride,
        cfg.dilation,
        cfg.groups,
    ) && use_fused_kernels();
    let conv = candle_nn::conv2d(in_channels, out_channels, kernel, cfg, vb)?;
    // The manifest checks' zero-stride placeholders are not weights: packing would
    // materialise them (1.2B zeros, 100 s of a test).
    if !conv.weight().is_contiguous() {
        return Ok(Conv2d(ConvKind::Candle(conv)));
    }
    if shifted {
        let p = cfg.padding;
        let s = ShiftedConv::new(conv.weight(), conv.bias(), [p, p, p, p])
            .map_err(candle_core::Error::wrap)?
            .with_scratch_limit(Some(CONV_SCRATCH_LIMIT));
        return Ok(Conv2d(ConvKind::Shifted(s)));
    }
    if !packable {
        return Ok(Conv2d(ConvKind::Candle(conv)));
    }
    let packed =
        PackedConv3x3::new(conv.weight(), conv.bias()).map_err(candle_core::Error::wrap)?;
    Ok(Conv2d(ConvKind::Packed3x3(packed)))
}

impl Conv2d {
    /// `conv(up(n(x))) + residual` with `n` the GroupNorm (+ modulation) (+ SiLU) of
    /// `input_norm`, and with `stats_groups` also the output's GroupNorm statistics in that
    /// many groups where the CUDA path leaves them, for the norm that reads the output next:
    /// on the CUDA path [`ShiftedConv::forward_normed_stats`] (with `KANDINSKY_CONV_NORM=1`
    /// the copy kernel normalises on read); elsewhere the norm, then [`Self::forward_fused`],
    /// and no statistics.
    pub fn forward_normed_stats(
        &self,
        x: &Tensor,
        input_norm: InputNorm<'_>,
        upsample2x: bool,
        residual: Option<&Tensor>,
        stats_groups: Option<usize>,
    ) -> candle_core::Result<(Tensor, Option<MapStats>)> {
        if let ConvKind::Shifted(s) = &self.0 {
            return s
                .forward_normed_stats(x, input_norm, upsample2x, residual, stats_groups)
                .map_err(candle_core::Error::wrap);
        }
        let h = input_norm.apply(x).map_err(candle_core::Error::wrap)?;
        Ok((self.forward_fused(&h, upsample2x, residual)?, None))
    }

    /// `conv(up(x)) + residual`, where `up` is the nearest-2× upsampling when `upsample2x`:
    /// one kernel on the CUDA path (neither the upsampled map nor the sum before the add is
    /// materialised), the same ops one after the other elsewhere.
    pub fn forward_fused(
        &self,
        x: &Tensor,
        upsample2x: bool,
        residual: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        if let ConvKind::Shifted(s) = &self.0 {
            return s
                .forward(x, upsample2x, residual)
                .map_err(candle_core::Error::wrap);
        }
        let y = if upsample2x {
            let (_, _, h, w) = x.dims4()?;
            self.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)?
        } else {
            self.forward(x)?
        };
        match residual {
            Some(r) => r + y,
            None => Ok(y),
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let conv = match &self.0 {
            // Computes in f32 and returns x's dtype (errors off the CPU).
            ConvKind::Packed3x3(p) => return p.forward(x).map_err(candle_core::Error::wrap),
            ConvKind::Shifted(s) => {
                return s.forward(x, false, None).map_err(candle_core::Error::wrap)
            }
            ConvKind::Candle(c) => c,
        };
        if !needs_f32(x) {
            return conv.forward(x);
        }
        let w = conv.weight().to_dtype(DType::F32)?;
        let b = conv.bias().map(|b| b.to_dtype(DType::F32)).transpose()?;
        candle_nn::Conv2d::new(w, b, *conv.config())
            .forward(&x.to_dtype(DType::F32)?)?
            .to_dtype(DType::BF16)
    }
}
