//! Group normalisation over large maps, band by band, fused with the spatial modulation of
//! `SpatialNorm` and the following activation.
//!
//! Same arithmetic as [`kandinsky_core::nn::GroupNorm`] (statistics in f32 whatever the
//! dtype; two passes: mean, then the centred variance), but that one materialises about four
//! full-size f32 temporaries, i.e. 4 GB for a 256-channel 1024² decoder map. Here the
//! statistics are accumulated over horizontal bands of rows (per row, then per band, then
//! per group: a hierarchical sum, more accurate than one long f32 sum), and the output
//! `act((x − μ)·σ⁻¹·γ + β) [· Y + B]` is written band by band into one preallocated tensor.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use kandinsky_core::gpu_conv::MapStats;
use kandinsky_core::nn::{Activation, NormModulation};
use kandinsky_core::{Error, Result};

/// Bands hold about this many bytes of f32.
const BAND_BYTES: usize = 32 << 20;

/// `torch.nn.GroupNorm(groups, channels, eps, affine=True)` (`weight`, `bias`).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

/// Per-pixel modulation applied after the normalisation: `y·scale + shift`, with `scale` and
/// `shift` `[B, C, h, w]` at a resolution that divides the map's (nearest-neighbour upsampled
/// on the fly, as `SpatialNorm` does with its 1×1 convolutions of the latent).
#[derive(Debug, Clone, Copy)]
pub struct Modulation<'a> {
    /// Multiplies the normalised map.
    pub scale: &'a Tensor,
    /// Added afterwards.
    pub shift: &'a Tensor,
}

impl GroupNorm {
    /// Load a GroupNorm of `channels` channels in `groups` groups.
    pub fn new(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        if groups == 0 || channels % groups != 0 {
            return Err(Error::invalid(format!(
                "GroupNorm: {channels} channels cannot be split into {groups} groups"
            )));
        }
        Ok(Self {
            weight: vb.get(channels, "weight")?,
            bias: vb.get(channels, "bias")?,
            groups,
            eps,
        })
    }

    /// Number of channels.
    pub fn channels(&self) -> usize {
        self.weight.dims1().unwrap_or(0)
    }

    /// Rows per band for a `[B, C, H, W]` map, a multiple of `align`.
    fn band_rows(dims: (usize, usize, usize, usize), align: usize) -> usize {
        let (b, c, _, w) = dims;
        let rows = BAND_BYTES / (b * c * w * 4).max(1);
        (rows / align).max(1) * align
    }

    /// Per-channel `[B, C, 1, 1]` sums of `f(x)` over the map, accumulated in f32 by bands.
    fn channel_sums(
        x: &Tensor,
        rows: usize,
        f: impl Fn(Tensor) -> candle_core::Result<Tensor>,
    ) -> Result<Tensor> {
        let (_, _, h, _) = x.dims4()?;
        let mut acc: Option<Tensor> = None;
        let mut r0 = 0;
        while r0 < h {
            let n = rows.min(h - r0);
            let band = f(x.narrow(2, r0, n)?.to_dtype(DType::F32)?)?;
            let s = band.sum_keepdim(3)?.sum_keepdim(2)?;
            acc = Some(match acc {
                Some(a) => (a + s)?,
                None => s,
            });
            r0 += n;
        }
        acc.ok_or_else(|| Error::invalid("GroupNorm over an empty map"))
    }

    /// Per-group value `[B, G]` broadcast back to channels `[B, C, 1, 1]`.
    fn per_channel(&self, g: &Tensor, b: usize, c: usize) -> candle_core::Result<Tensor> {
        g.reshape((b, self.groups, 1))?
            .broadcast_as((b, self.groups, c / self.groups))?
            .contiguous()?
            .reshape((b, c, 1, 1))
    }

    /// Integer up-scaling factors `(H / h, W / w)` of the modulation maps; an error when
    /// they do not divide the map.
    fn upscale(x: &Tensor, modulation: Option<Modulation<'_>>) -> Result<(usize, usize)> {
        let (_, _, h, w) = x.dims4()?;
        let Some(m) = modulation else {
            return Ok((1, 1));
        };
        let (_, _, mh, mw) = m.scale.dims4()?;
        if mh == 0 || mw == 0 || h % mh != 0 || w % mw != 0 || m.shift.dims() != m.scale.dims() {
            return Err(Error::invalid(format!(
                "modulation {:?} / {:?} does not divide the map {:?}",
                m.scale.dims(),
                m.shift.dims(),
                x.dims()
            )));
        }
        Ok((h / mh, w / mw))
    }

    /// `act(group_norm(x)) [· scale + shift]` for `x` `[B, C, H, W]`, in the dtype of `x`.
    pub fn forward(
        &self,
        x: &Tensor,
        modulation: Option<Modulation<'_>>,
        act: Option<Activation>,
    ) -> Result<Tensor> {
        let (_, c, _, _) = x.dims4()?;
        if c != self.channels() {
            return Err(Error::invalid(format!(
                "GroupNorm of {} channels got a map of shape {:?}",
                self.channels(),
                x.dims()
            )));
        }
        Self::upscale(x, modulation)?;
        // The banding is a CPU memory measure for candle's composite ops; everywhere else
        // kandinsky-core's GroupNorm (the fused CPU loop or the CUDA kernel) does the work.
        if !x.device().is_cpu() || kandinsky_core::nn::use_fused_kernels() {
            return self.forward_core(x, modulation, act);
        }
        self.forward_banded(x, modulation, act)
    }

    /// The CPU path with candle ops, band by band (what `KANDINSKY_PLAIN_KERNELS` selects);
    /// public so that benchmarks can compare it with the fused path of [`Self::forward`].
    pub fn forward_banded(
        &self,
        x: &Tensor,
        modulation: Option<Modulation<'_>>,
        act: Option<Activation>,
    ) -> Result<Tensor> {
        let dims = x.dims4()?;
        let (b, c, h, w) = dims;
        let (sh, sw) = Self::upscale(x, modulation)?;
        let rows = Self::band_rows(dims, sh);
        let per_group = ((c / self.groups) * h * w) as f64;

        let group_sum = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, self.groups, c / self.groups))?.sum(2)
        };
        let sums = Self::channel_sums(x, rows, Ok)?;
        let mean = (group_sum(sums)? / per_group)?;
        let mean_c = self.per_channel(&mean, b, c)?;
        let sq = Self::channel_sums(x, rows, |t| t.broadcast_sub(&mean_c)?.sqr())?;
        let var = (group_sum(sq)? / per_group)?;
        let rstd_c = self.per_channel(&(var + self.eps)?.sqrt()?.recip()?, b, c)?;
        // torch's CPU kernel folds the affine into one scale and shift per channel too.
        let gamma = self.weight.to_dtype(DType::F32)?.reshape((1, c, 1, 1))?;
        let beta = self.bias.to_dtype(DType::F32)?.reshape((1, c, 1, 1))?;
        let scale = rstd_c.broadcast_mul(&gamma)?;
        let shift = beta.broadcast_sub(&mean_c.mul(&scale)?)?;
        let modulation = match modulation {
            Some(m) => Some((m.scale.to_dtype(DType::F32)?, m.shift.to_dtype(DType::F32)?)),
            None => None,
        };

        let out = Tensor::zeros(dims, x.dtype(), x.device())?;
        let mut r0 = 0;
        while r0 < h {
            let n = rows.min(h - r0);
            let xb = x.narrow(2, r0, n)?.to_dtype(DType::F32)?;
            let mut y = xb.broadcast_mul(&scale)?.broadcast_add(&shift)?;
            if let Some((ms, mb)) = &modulation {
                let (mh, mw) = (n / sh, w / sw);
                let ms = ms.narrow(2, r0 / sh, mh)?.reshape((b, c, mh, 1, mw, 1))?;
                let mb = mb.narrow(2, r0 / sh, mh)?.reshape((b, c, mh, 1, mw, 1))?;
                y = y
                    .reshape((b, c, mh, sh, mw, sw))?
                    .broadcast_mul(&ms)?
                    .broadcast_add(&mb)?
                    .reshape((b, c, n, w))?;
            }
            if let Some(a) = act {
                y = a.apply(&y)?;
            }
            out.slice_set(&y.to_dtype(x.dtype())?.contiguous()?, 2, r0)?;
            r0 += n;
        }
        Ok(out)
    }
}

impl GroupNorm {
    /// The same norm as kandinsky-core's (whose CUDA kernel and fused CPU loop it uses).
    pub fn core(&self) -> Result<kandinsky_core::nn::GroupNorm> {
        kandinsky_core::nn::GroupNorm::from_parts(
            self.weight.clone(),
            self.bias.clone(),
            self.groups,
            self.eps,
        )
    }

    /// `conv(act(group_norm(x)) [· scale + shift]) [+ residual]`: with `conv` on CUDA and
    /// SiLU (or no activation), the convolution normalises on read
    /// ([`ShiftedConv::forward_normed`](kandinsky_core::gpu_conv::ShiftedConv::forward_normed):
    /// with `KANDINSKY_CONV_NORM=1` the normalised map is never written); otherwise
    /// [`Self::forward`], then the convolution. Takes `x` so that the normalised map's input
    /// is freed before the convolution where the caller holds no other reference.
    ///
    /// `stats`: on CUDA, the statistics of `x` where the kernel that wrote it left them, and
    /// the groups in which the convolution's crop kernel leaves those of its output
    /// (returned; with `KANDINSKY_CONV_STATS=1`, see
    /// [`ShiftedConv::forward_normed_stats`](kandinsky_core::gpu_conv::ShiftedConv::forward_normed_stats)).
    pub fn forward_into_conv(
        &self,
        conv: &crate::conv::Conv2d,
        x: Tensor,
        modulation: Option<Modulation<'_>>,
        act: Option<Activation>,
        residual: Option<&Tensor>,
        stats: ConvStats<'_>,
    ) -> Result<(Tensor, Option<MapStats>)> {
        if let (Some(shifted), None | Some(Activation::Silu)) = (conv.shifted(), act) {
            Self::upscale(&x, modulation)?;
            let gn = self.core()?;
            let input_norm = kandinsky_core::gpu_conv::InputNorm {
                norm: &gn,
                modulation: modulation.map(|m| NormModulation::Spatial {
                    scale: m.scale,
                    shift: m.shift,
                }),
                silu: act.is_some(),
                stats: stats.input,
            };
            return shifted.forward_normed_stats(
                &x,
                input_norm,
                false,
                residual,
                stats.output_groups,
            );
        }
        let h = self.forward(&x, modulation, act)?;
        drop(x);
        Ok((
            match residual {
                Some(r) => conv.forward_add(h, r)?,
                None => conv.forward(&h)?,
            },
            None,
        ))
    }

    /// Number of groups.
    pub fn groups(&self) -> usize {
        self.groups
    }
}

/// The GroupNorm statistics around a normalised convolution on CUDA
/// ([`GroupNorm::forward_into_conv`]): those of its input where the kernel that wrote it left
/// them, and the groups to leave its output's in for the norm that reads it next.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConvStats<'a> {
    /// The input's statistics.
    pub input: Option<&'a MapStats>,
    /// Leave the output's statistics in this many groups.
    pub output_groups: Option<usize>,
}

impl GroupNorm {
    /// kandinsky-core's GroupNorm with the modulation and the SiLU (on the CPU inside its
    /// one output pass; on CUDA the kernel, then the modulation); any other activation is
    /// applied afterwards.
    fn forward_core(
        &self,
        x: &Tensor,
        modulation: Option<Modulation<'_>>,
        act: Option<Activation>,
    ) -> Result<Tensor> {
        let gn = self.core()?;
        let m = modulation.map(|m| NormModulation::Spatial {
            scale: m.scale,
            shift: m.shift,
        });
        let silu = act == Some(Activation::Silu);
        let y = gn.forward_modulated(x, m, silu)?;
        Ok(match act {
            Some(a) if !silu => a.apply(&y)?,
            _ => y,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;

    #[test]
    fn banded_equals_core_group_norm() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let ours = GroupNorm::new(4, 8, 1e-6, vb.pp("n"))?;
        let core = kandinsky_core::nn::group_norm(4, 8, 1e-6, vb.pp("n"))?;
        for t in map.all_vars() {
            t.set(&Tensor::randn(0.5f32, 1.0, t.shape(), &dev)?)?;
        }
        // Several bands: 8 channels × 2 batch × 513 columns × 4 bytes per row.
        let x = (Tensor::randn(0f32, 3.0, (2, 8, 1100, 513), &dev)? + 2.0)?;
        assert!(GroupNorm::band_rows(x.dims4()?, 1) < 1100);
        let a = ours.forward_banded(&x, None, None)?;
        let b = core.forward_plain(&x)?;
        let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        // Same formula, different summation order of 560k-element sums.
        assert!(d < 1e-4, "max abs diff {d}");
        Ok(())
    }

    #[test]
    fn modulation_equals_upsampled_product() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let ours = GroupNorm::new(2, 4, 1e-6, vb.pp("n"))?;
        let x = Tensor::randn(0f32, 1.0, (1, 4, 12, 8), &dev)?;
        let s = Tensor::randn(0f32, 1.0, (1, 4, 3, 2), &dev)?;
        let t = Tensor::randn(0f32, 1.0, (1, 4, 3, 2), &dev)?;
        let fused = ours.forward_banded(
            &x,
            Some(Modulation {
                scale: &s,
                shift: &t,
            }),
            Some(Activation::Silu),
        )?;
        let plain = ours
            .forward_banded(&x, None, None)?
            .mul(&s.upsample_nearest2d(12, 8)?)?
            .add(&t.upsample_nearest2d(12, 8)?)?
            .silu()?;
        let d = (fused - plain)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-6, "max abs diff {d}");
        Ok(())
    }

    #[test]
    fn fused_equals_banded() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let ours = GroupNorm::new(32, 64, 1e-6, vb.pp("n"))?;
        for t in map.all_vars() {
            t.set(&Tensor::randn(0.5f32, 1.0, t.shape(), &dev)?)?;
        }
        let x = (Tensor::randn(0f32, 2.0, (1, 64, 24, 16), &dev)? + 1.0)?;
        let s = Tensor::randn(0f32, 1.0, (1, 64, 6, 4), &dev)?;
        let t = Tensor::randn(0f32, 1.0, (1, 64, 6, 4), &dev)?;
        let m = Modulation {
            scale: &s,
            shift: &t,
        };
        for (m, act) in [
            (Some(m), Some(Activation::Silu)),
            (Some(m), None),
            (None, Some(Activation::Silu)),
            (None, Some(Activation::Gelu)),
        ] {
            let fused = ours.forward_core(&x, m, act)?;
            let banded = ours.forward_banded(&x, m, act)?;
            let d = (fused - banded)?.abs()?.max_all()?.to_scalar::<f32>()?;
            // f64 statistics vs banded f32 sums, polynomial vs libm exp: a few ulps.
            assert!(d < 1e-5, "{act:?}: max abs diff {d}");
        }
        Ok(())
    }
}
