//! Layers shared by several networks, each a thin wrapper so that a faster path (a fused
//! CPU loop, a CUDA kernel) changes one place.

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

pub use candle_nn::{conv2d, conv2d_no_bias, layer_norm, Conv2d, Conv2dConfig, LayerNorm};

use crate::cpu_gemm::PackedLinear;

use crate::error::{Error, Result};

/// Activation functions found in the configs (`act_fn`, `hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu` / `swish`.
    Silu,
    /// `gelu`: the exact erf GELU.
    Gelu,
    /// `gelu_pytorch_tanh` / `gelu_new`: the tanh approximation.
    GeluTanh,
    /// `quick_gelu`: x·σ(1.702x) (OpenAI CLIP).
    QuickGelu,
}

impl Activation {
    /// Parse a config name.
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "silu" | "swish" => Self::Silu,
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Self::GeluTanh,
            "quick_gelu" => Self::QuickGelu,
            other => {
                return Err(Error::unsupported(
                    "act_fn",
                    other,
                    "silu, gelu, gelu_new, gelu_pytorch_tanh, quick_gelu",
                ))
            }
        })
    }

    /// Apply.
    pub fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Silu => x.silu(),
            Self::Gelu if use_fused_kernels() => match crate::cpu_act::gelu_erf(x) {
                Ok(Some(y)) => Ok(y),
                Ok(None) => x.gelu_erf(),
                Err(e) => Err(candle_core::Error::wrap(e)),
            },
            Self::Gelu => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
            Self::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
        }
    }
}

/// A linear layer (`weight [out, in]`, optional `bias [out]`), `y = x·Wᵀ + b`.
///
/// f32 on an AVX2/FMA CPU keeps only a packed copy of the weight and runs the register-tiled
/// kernels of [`crate::cpu_gemm`] (≈ 1.2–1.4× the throughput of candle's matmul at the CLIP
/// and prior shapes, two threads); bf16 on the CPU computes in f32 and rounds back, as
/// PyTorch's CPU bf16 matmul accumulates in f32 (candle 0.11 has no CPU bf16 matmul);
/// f16/bf16 on CUDA with a bias runs one cuBLASLt GEMM with the bias in its epilogue
/// (`cuda::linear_bias`); everything else is candle's `Linear`.
/// `KANDINSKY_PLAIN_KERNELS=1` keeps candle's everywhere.
#[derive(Debug, Clone)]
pub struct Linear(LinearKind);

#[derive(Debug, Clone)]
enum LinearKind {
    Candle(candle_nn::Linear),
    Packed(PackedLinear),
}

impl Linear {
    /// From its tensors (the packed path works on a copy: `weight` may be shared).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let weight = if use_fused_kernels() && PackedLinear::applies(&weight) {
            weight.copy()?
        } else {
            weight
        };
        Self::new_owned(weight, bias)
    }

    /// From a weight nothing else refers to (a fresh load from a checkpoint), which the
    /// packed path then rearranges in place: the layer costs exactly the weight's memory.
    fn new_owned(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let weight = if use_fused_kernels() {
            match PackedLinear::new(weight, bias.as_ref())? {
                Ok(p) => return Ok(Self(LinearKind::Packed(p))),
                Err(weight) => weight,
            }
        } else {
            weight
        };
        Ok(Self(LinearKind::Candle(candle_nn::Linear::new(
            weight, bias,
        ))))
    }
}

/// Load `weight [out, in]` and `bias [out]`.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = vb.get(out_dim, "bias")?;
    // The checkpoint-backed VarBuilders of this project load a fresh tensor per `get`.
    Linear::new_owned(weight, Some(bias)).map_err(candle_core::Error::wrap)
}

/// Load `weight [out, in]` of a layer without bias.
pub fn linear_no_bias(
    in_dim: usize,
    out_dim: usize,
    vb: VarBuilder,
) -> candle_core::Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    Linear::new_owned(weight, None).map_err(candle_core::Error::wrap)
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.0 {
            LinearKind::Packed(p) => p.forward(x).map_err(candle_core::Error::wrap),
            LinearKind::Candle(l) if x.dtype() == DType::BF16 && x.device().is_cpu() => {
                let w = l.weight().to_dtype(DType::F32)?;
                let b = l.bias().map(|b| b.to_dtype(DType::F32)).transpose()?;
                candle_nn::Linear::new(w, b)
                    .forward(&x.to_dtype(DType::F32)?)?
                    .to_dtype(DType::BF16)
            }
            #[cfg(feature = "cuda")]
            LinearKind::Candle(l)
                if crate::cuda::linear_bias_covers(x, l.weight()) && use_fused_kernels() =>
            {
                match l.bias() {
                    Some(b) => crate::cuda::linear_bias(x, l.weight(), b),
                    None => l.forward(x),
                }
            }
            LinearKind::Candle(l) => l.forward(x),
        }
    }
}

/// False when `KANDINSKY_PLAIN_KERNELS` is set: every op then takes candle's plain path
/// (to compare against the fused kernels).
pub fn use_fused_kernels() -> bool {
    static FUSED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FUSED.get_or_init(|| std::env::var_os("KANDINSKY_PLAIN_KERNELS").is_none())
}

/// GroupNorm with statistics in f32 whatever the input dtype (half-precision sums overflow).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

/// Load a GroupNorm (`weight`, `bias`) of `channels` channels in `groups` groups.
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    if groups == 0 || channels % groups != 0 {
        return Err(Error::invalid(format!(
            "GroupNorm: {channels} channels cannot be split into {groups} groups"
        )));
    }
    Ok(GroupNorm {
        weight: vb.get(channels, "weight")?,
        bias: vb.get(channels, "bias")?,
        groups,
        eps,
    })
}

impl GroupNorm {
    /// A GroupNorm from its tensors (`weight`, `bias` of shape `[C]`).
    pub fn from_parts(weight: Tensor, bias: Tensor, groups: usize, eps: f64) -> Result<Self> {
        let c = weight.dims1()?;
        if groups == 0 || c % groups != 0 || bias.dims1()? != c {
            return Err(Error::invalid(format!(
                "GroupNorm: weight [{c}], bias {:?} and {groups} groups do not fit",
                bias.dims()
            )));
        }
        Ok(Self {
            weight,
            bias,
            groups,
            eps,
        })
    }

    /// The tensors and settings, for kernels that normalise on read: `(weight, bias, groups,
    /// eps)`.
    #[cfg(feature = "cuda")]
    pub(crate) fn parts(&self) -> (&Tensor, &Tensor, usize, f64) {
        (&self.weight, &self.bias, self.groups, self.eps)
    }

    /// Number of channels.
    pub fn channels(&self) -> usize {
        self.weight.dims1().unwrap_or(0)
    }

    /// Number of groups.
    pub fn groups(&self) -> usize {
        self.groups
    }

    /// Normalise `x` of shape `[B, C, ...]`: the fused CUDA kernel on a GPU, the fused CPU
    /// loop (`cpu_norm`) on the CPU, else (`KANDINSKY_PLAIN_KERNELS`) the plain path.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_modulated(x, None, false)
    }

    /// `silu(GroupNorm(x))` in one pass where a fused kernel exists.
    pub fn forward_silu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_modulated(x, None, true)
    }

    /// `[silu](GroupNorm(x) [· scale + shift])`: the modulation and the SiLU applied in the
    /// same output pass on the CPU and on CUDA (one read of `x` for the statistics, one read
    /// and one write for the output, instead of ~10 candle ops). Elsewhere, or with
    /// `KANDINSKY_PLAIN_KERNELS`, the same sequence of candle ops.
    pub fn forward_modulated(
        &self,
        x: &Tensor,
        modulation: Option<NormModulation<'_>>,
        silu: bool,
    ) -> candle_core::Result<Tensor> {
        self.forward_with_stats(x, modulation, silu, None)
    }

    /// [`Self::forward_modulated`] with the statistics of `x` where the kernel that wrote it
    /// left them (CUDA; the kernel's statistics pass is skipped, elsewhere they are unused).
    pub fn forward_with_stats(
        &self,
        x: &Tensor,
        modulation: Option<NormModulation<'_>>,
        silu: bool,
        stats: Option<&crate::gpu_conv::MapStats>,
    ) -> candle_core::Result<Tensor> {
        #[cfg(not(feature = "cuda"))]
        let _ = stats;
        if let Some(m) = modulation {
            m.check(x)?;
        }
        if x.device().is_cpu() && use_fused_kernels() {
            if let Some(y) = self.forward_cpu(x, modulation, silu)? {
                return Ok(y);
            }
        }
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() && x.rank() >= 3 && use_fused_kernels() {
            return crate::cuda::group_norm(
                x,
                self,
                modulation,
                silu,
                stats.map(crate::gpu_conv::MapStats::cuda),
            );
        }
        let y = self.forward_plain(x)?;
        let y = match modulation {
            None => y,
            Some(m) => m.apply_plain(&y)?,
        };
        if silu {
            y.silu()
        } else {
            Ok(y)
        }
    }

    /// The fused CPU path; `None` where it does not apply (dtype, empty tensor).
    fn forward_cpu(
        &self,
        x: &Tensor,
        modulation: Option<NormModulation<'_>>,
        silu: bool,
    ) -> candle_core::Result<Option<Tensor>> {
        let dims = x.dims();
        if dims.len() < 3 || x.elem_count() == 0 || !crate::cpu_norm::supports(x.dtype()) {
            return Ok(None);
        }
        let (b, c) = (dims[0], dims[1]);
        if c != self.channels() {
            candle_core::bail!(
                "GroupNorm of {} channels got a tensor of shape {dims:?}",
                self.channels()
            );
        }
        let hw = if dims.len() == 4 {
            (dims[2], dims[3])
        } else {
            (1, dims[2..].iter().product())
        };
        let host = |t: &Tensor| -> candle_core::Result<Vec<f32>> {
            t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
        };
        let (gamma, beta) = (host(&self.weight)?, host(&self.bias)?);
        let x = x.contiguous()?;
        let params = crate::cpu_norm::Params {
            b,
            c,
            groups: self.groups,
            hw,
            eps: self.eps,
            gamma: &gamma,
            beta: &beta,
            silu,
        };
        use crate::cpu_norm::{f32_slice, group_norm, CpuModulation};
        match modulation {
            None => group_norm(&x, &params, CpuModulation::None),
            Some(NormModulation::ScaleShift { scale, shift }) => {
                // [B·C] values each: copies are negligible.
                let scale = host(&(scale + 1.0)?)?;
                let shift = host(shift)?;
                group_norm(
                    &x,
                    &params,
                    CpuModulation::Channel {
                        scale: &scale,
                        shift: &shift,
                    },
                )
            }
            Some(NormModulation::Spatial { scale, shift }) => {
                // Full-size maps at the latent's resolution: read in place when f32.
                let (_, _, mh, mw) = scale.dims4()?;
                let s = scale.to_dtype(DType::F32)?.contiguous()?;
                let t = shift.to_dtype(DType::F32)?.contiguous()?;
                let (s_store, s_layout) = s.storage_and_layout();
                let (t_store, t_layout) = t.storage_and_layout();
                match (f32_slice(&s_store, s_layout), f32_slice(&t_store, t_layout)) {
                    (Some(scale), Some(shift)) => group_norm(
                        &x,
                        &params,
                        CpuModulation::Spatial {
                            scale,
                            shift,
                            mh,
                            mw,
                        },
                    ),
                    _ => Ok(None),
                }
            }
        }
    }

    /// The reference path: statistics in f32, affine in f32, cast back.
    pub fn forward_plain(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        if dims.len() < 3 {
            candle_core::bail!("GroupNorm expects [B, C, ...], got {dims:?}");
        }
        let (b, c) = (dims[0], dims[1]);
        let per_group = dims[2..].iter().product::<usize>() * c / self.groups;
        let dtype = x.dtype();
        let xf = x
            .to_dtype(DType::F32)?
            .reshape((b, self.groups, per_group))?;
        let mean = (xf.sum_keepdim(2)? / per_group as f64)?;
        let centered = xf.broadcast_sub(&mean)?;
        let var = (centered.sqr()?.sum_keepdim(2)? / per_group as f64)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let mut wshape = vec![1usize; dims.len()];
        wshape[1] = c;
        let w = self
            .weight
            .to_dtype(DType::F32)?
            .reshape(wshape.as_slice())?;
        let bias = self.bias.to_dtype(DType::F32)?.reshape(wshape.as_slice())?;
        normed
            .reshape(dims.as_slice())?
            .broadcast_mul(&w)?
            .broadcast_add(&bias)?
            .to_dtype(dtype)
    }
}

/// A modulation applied after a GroupNorm, fused into its output pass on the CPU.
#[derive(Debug, Clone, Copy)]
pub enum NormModulation<'a> {
    /// `y·(1 + scale) + shift`, `scale` and `shift` of `B·C` elements (`[B, C]`,
    /// `[B, C, 1, 1]`, …): diffusers' `scale_shift` time conditioning of a ResNet block.
    ScaleShift {
        /// Added to 1, then multiplies the normalised map.
        scale: &'a Tensor,
        /// Added afterwards.
        shift: &'a Tensor,
    },
    /// `y·scale + shift` with maps `[B, C, h, w]` whose `h`, `w` divide the map's `H`, `W`
    /// (nearest-neighbour upsampled): MoVQ's `SpatialNorm` (its 1×1 convolutions of the latent).
    Spatial {
        /// Multiplies the normalised map.
        scale: &'a Tensor,
        /// Added afterwards.
        shift: &'a Tensor,
    },
}

impl NormModulation<'_> {
    /// Shapes against the map `x` `[B, C, ...]`.
    pub(crate) fn check(&self, x: &Tensor) -> candle_core::Result<()> {
        let dims = x.dims();
        match self {
            Self::ScaleShift { scale, shift } => {
                let (b, c) = (dims.first().copied(), dims.get(1).copied());
                for t in [scale, shift] {
                    let d = t.dims();
                    let per_channel = d.len() >= 2
                        && Some(d[0]) == b
                        && Some(d[1]) == c
                        && d[2..].iter().all(|&n| n == 1);
                    if !per_channel {
                        candle_core::bail!(
                            "GroupNorm scale-shift: {d:?} is not per channel of a map {dims:?}"
                        );
                    }
                }
            }
            Self::Spatial { scale, shift } => {
                let (b, c, h, w) = x.dims4()?;
                let (sb, sc, mh, mw) = scale.dims4()?;
                if shift.dims() != scale.dims()
                    || sb != b
                    || sc != c
                    || mh == 0
                    || mw == 0
                    || h % mh != 0
                    || w % mw != 0
                {
                    candle_core::bail!(
                        "GroupNorm modulation {:?} / {:?} does not divide the map {dims:?}",
                        scale.dims(),
                        shift.dims()
                    );
                }
            }
        }
        Ok(())
    }

    /// The candle-op version, on the normalised map `y`.
    fn apply_plain(&self, y: &Tensor) -> candle_core::Result<Tensor> {
        let dims = y.dims();
        match self {
            Self::ScaleShift { scale, shift } => {
                let mut shape = vec![1usize; dims.len()];
                shape[..2].copy_from_slice(&dims[..2]);
                let scale = scale.to_dtype(y.dtype())?.reshape(shape.as_slice())?;
                let shift = shift.to_dtype(y.dtype())?.reshape(shape.as_slice())?;
                y.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(&shift)
            }
            Self::Spatial { scale, shift } => {
                let (_, _, h, w) = y.dims4()?;
                let up = |t: &Tensor| t.to_dtype(y.dtype())?.upsample_nearest2d(h, w);
                y.mul(&up(scale)?)?.add(&up(shift)?)
            }
        }
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        GroupNorm::forward(self, x)
    }
}

/// LayerNorm computed in f32 for half-precision inputs.
pub fn layer_norm_f32(ln: &LayerNorm, x: &Tensor) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    if dtype == DType::F32 || dtype == DType::F64 {
        return ln.forward(x);
    }
    let w = ln.weight().to_dtype(DType::F32)?;
    let b = ln.bias().map(|b| b.to_dtype(DType::F32)).transpose()?;
    let ln32 = match b {
        Some(b) => LayerNorm::new(w, b, ln.eps()),
        None => LayerNorm::new_no_bias(w, ln.eps()),
    };
    ln32.forward(&x.to_dtype(DType::F32)?)?.to_dtype(dtype)
}

/// Whether [`swap_last2`] runs the tiled CUDA kernel: the default since GPU run 10 (768 px
/// UNet step 21.1 → 19.8 ms on an H200, output unchanged); `KANDINSKY_TILED_TRANSPOSE=0`
/// keeps candle's strided copy.
#[cfg(feature = "cuda")]
fn tiled_transpose() -> bool {
    env_switch!("KANDINSKY_TILED_TRANSPOSE", default on)
}

/// `x` `[B, M, N]` with its last two dimensions swapped, contiguous `[B, N, M]`, plus
/// `addend` `[B, N, M]` where given: the attention blocks' way into tokens and back onto
/// their residual. On CUDA one tiled kernel (unless `KANDINSKY_TILED_TRANSPOSE=0`)
/// (`kernels/transpose.cu`: reads and writes both along rows); otherwise candle's strided
/// copy, or its add of a transposed view.
pub fn swap_last2(x: &Tensor, addend: Option<&Tensor>) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && tiled_transpose() && use_fused_kernels() {
        return Ok(crate::cuda::transpose_add(x, addend)?);
    }
    let t = x.transpose(1, 2)?;
    Ok(match addend {
        Some(a) => (a + t)?,
        None => t.contiguous()?,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn swap_last2_transposes_and_adds() -> candle_core::Result<()> {
        let dev = candle_core::Device::Cpu;
        let x = Tensor::arange(0f32, 2.0 * 3.0 * 5.0, &dev)?.reshape((2, 3, 5))?;
        let a = Tensor::randn(0f32, 1.0, (2, 5, 3), &dev)?;
        let t = swap_last2(&x, None).map_err(candle_core::Error::wrap)?;
        let s = swap_last2(&x, Some(&a)).map_err(candle_core::Error::wrap)?;
        assert!(t.is_contiguous());
        assert_eq!(t.dims(), [2, 5, 3]);
        let (xv, tv) = (x.to_vec3::<f32>()?, t.to_vec3::<f32>()?);
        let (av, sv) = (a.to_vec3::<f32>()?, s.to_vec3::<f32>()?);
        for b in 0..2 {
            for m in 0..3 {
                for n in 0..5 {
                    assert_eq!(tv[b][n][m], xv[b][m][n]);
                    assert_eq!(sv[b][n][m], xv[b][m][n] + av[b][n][m]);
                }
            }
        }
        Ok(())
    }

    #[test]
    fn linear_new_leaves_a_shared_weight_alone() -> candle_core::Result<()> {
        let dev = candle_core::Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (32, 40), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 32, &dev)?;
        let before = w.to_vec2::<f32>()?;
        let shared = w.clone();
        let lin = Linear::new(w, Some(b.clone())).map_err(candle_core::Error::wrap)?;
        assert_eq!(
            shared.to_vec2::<f32>()?,
            before,
            "the caller's weight was rearranged"
        );
        let x = Tensor::randn(0f32, 1.0, (3, 40), &dev)?;
        let want = candle_nn::Linear::new(shared, Some(b)).forward(&x)?;
        let err = (lin.forward(&x)? - want)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(err < 1e-4, "{err}");
        Ok(())
    }

    use super::*;
    use candle_core::Device;

    fn norm(groups: usize, c: usize, eps: f64) -> anyhow::Result<GroupNorm> {
        let dev = Device::Cpu;
        let w = (Tensor::randn(0f32, 0.5, c, &dev)? + 1.0)?;
        let b = Tensor::randn(0f32, 0.5, c, &dev)?;
        Ok(GroupNorm::from_parts(w, b, groups, eps)?)
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> anyhow::Result<f32> {
        Ok((a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?)
    }

    /// Shapes `[B, C, H, W]` with groups: 1 / 4 / 32 groups, odd sizes, batch 1 and 2.
    const CASES: [(usize, usize, usize, usize, usize); 6] = [
        (1, 4, 5, 7, 1),
        (2, 8, 3, 9, 4),
        (1, 64, 17, 13, 32),
        (2, 96, 8, 8, 32),
        (2, 32, 1, 1, 32),
        (1, 12, 31, 33, 4),
    ];

    /// The fused CPU pass of `gn` on `x` with `modulation`, without and with SiLU, against
    /// the plain reference (`forward_plain`, the modulation's `apply_plain`, then `silu`).
    fn check_fused(
        gn: &GroupNorm,
        x: &Tensor,
        modulation: Option<NormModulation>,
        case: &str,
    ) -> anyhow::Result<()> {
        let mut plain = gn.forward_plain(x)?;
        if let Some(m) = modulation {
            plain = m.apply_plain(&plain)?;
        }
        for silu in [false, true] {
            let fused = gn.forward_cpu(x, modulation, silu)?.expect("f32 is fused");
            let want = if silu { plain.silu()? } else { plain.clone() };
            // Same formula, f64 statistics vs candle's f32 sums (the affine and a modulation
            // folded into one multiply-add): ~1e-6 at these sizes.
            let d = max_abs(&fused, &want)?;
            assert!(d <= 1e-5, "{case} silu={silu}: max abs diff {d}");
        }
        Ok(())
    }

    #[test]
    fn fused_equals_plain() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        for (b, c, h, w, g) in CASES {
            let gn = norm(g, c, 1e-5)?;
            // A non-zero mean, as real activations have.
            let x = (Tensor::randn(0f32, 3.0, (b, c, h, w), &dev)? + 2.0)?;
            check_fused(&gn, &x, None, &format!("{b}x{c}x{h}x{w}/{g}"))?;
            // Rank 3 (the UNet attention's [B, C, HW] view).
            let x3 = x.reshape((b, c, h * w))?;
            check_fused(&gn, &x3, None, &format!("rank 3 {b}x{c}x{}/{g}", h * w))?;
        }
        Ok(())
    }

    #[test]
    fn fused_scale_shift_equals_plain() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        for (b, c, h, w, g) in CASES {
            let gn = norm(g, c, 1e-5)?;
            let x = Tensor::randn(0f32, 1.0, (b, c, h, w), &dev)?;
            // As the UNet passes them: narrowed halves of one [B, 2C, 1, 1] projection.
            let temb = Tensor::randn(0f32, 0.5, (b, 2 * c, 1, 1), &dev)?;
            let (scale, shift) = (temb.narrow(1, 0, c)?, temb.narrow(1, c, c)?);
            let m = NormModulation::ScaleShift {
                scale: &scale,
                shift: &shift,
            };
            check_fused(&gn, &x, Some(m), &format!("{b}x{c}x{h}x{w}/{g}"))?;
        }
        Ok(())
    }

    #[test]
    fn fused_spatial_equals_plain() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        for (b, c, h, w, g, mh, mw) in [
            (1, 64, 12, 8, 32, 3, 2),
            (2, 8, 9, 15, 4, 9, 15),
            (1, 4, 6, 6, 1, 1, 1),
        ] {
            let gn = norm(g, c, 1e-6)?;
            let x = (Tensor::randn(0f32, 2.0, (b, c, h, w), &dev)? - 1.0)?;
            let s = Tensor::randn(0f32, 1.0, (b, c, mh, mw), &dev)?;
            let t = Tensor::randn(0f32, 1.0, (b, c, mh, mw), &dev)?;
            let m = NormModulation::Spatial {
                scale: &s,
                shift: &t,
            };
            check_fused(&gn, &x, Some(m), &format!("{b}x{c}x{h}x{w}/{g}"))?;
        }
        Ok(())
    }

    #[test]
    fn half_precision_in_half_precision_out() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let gn = norm(4, 16, 1e-5)?;
        let x = Tensor::randn(0f32, 1.0, (2, 16, 5, 6), &dev)?;
        for (dt, bits) in [(DType::BF16, 8), (DType::F16, 11)] {
            let xh = x.to_dtype(dt)?;
            let fused = gn.forward_cpu(&xh, None, true)?.expect("half is fused");
            assert_eq!(fused.dtype(), dt);
            // The f32 result of the same (rounded) input, rounded once at the end: within half
            // an ulp, i.e. |Δ| ≤ 2^-bits·|y| (+1e-6 for the f32 arithmetic).
            let want = gn.forward_plain(&xh.to_dtype(DType::F32)?)?.silu()?;
            let excess = ((fused.to_dtype(DType::F32)? - &want)?.abs()?
                - (want.abs()? * (0.5f64).powi(bits))?)?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
            assert!(excess <= 1e-6, "{dt:?}: beyond half an ulp by {excess}");
        }
        Ok(())
    }

    #[test]
    fn dispatch_and_bad_shapes() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let gn = norm(4, 8, 1e-5)?;
        let x = Tensor::randn(0f32, 1.0, (2, 8, 4, 4), &dev)?;
        // `forward` takes the fused path unless KANDINSKY_PLAIN_KERNELS is set; either way
        // it equals the reference.
        assert!(max_abs(&gn.forward(&x)?, &gn.forward_plain(&x)?)? <= 1e-5);
        let wrong = Tensor::zeros((2, 8, 3, 3), DType::F32, &dev)?;
        let m = NormModulation::Spatial {
            scale: &wrong,
            shift: &wrong,
        };
        assert!(gn.forward_modulated(&x, Some(m), true).is_err());
        let m = NormModulation::ScaleShift {
            scale: &wrong,
            shift: &wrong,
        };
        assert!(gn.forward_modulated(&x, Some(m), false).is_err());
        let y = Tensor::zeros((2, 6, 4, 4), DType::F32, &dev)?;
        assert!(gn.forward(&y).is_err());
        Ok(())
    }
}
