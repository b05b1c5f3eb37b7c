//! One prepared GPU run (issue: performance/CUDA): tiny-fixture parity of every flow on the
//! device, the fused kernels against candle's plain path, and timings of the real-config
//! networks with random weights. Prints a table last.
//!
//! Build here with the CUDA recipe (`../shared/cuda/README.md`), run on the GPU machine:
//! `gpu_check [--quick] [--timings-only [--unet-only]] [--kernels-only]`,
//! `gpu_check --attention-only [KERNEL,...]` (the attention kernels not yet checked on a GPU,
//! beside the mma one; or those listed), `gpu_check --conv-gemm-only` (the one-kernel
//! convolution GEMM against candle's conv2d in f32, timed against the cuBLAS path),
//! `gpu_check --text2img-only [--px N] [--steps P,D]` (only the whole flow), or
//! `gpu_check --profile unet|movq` under `ncu --profile-from-start off` (one 768 px UNet step
//! or MoVQ decode inside the profiler range, after two warm-up runs). Without a CUDA
//! device it runs the same on the CPU (slowly; `--kernels-only` then checks the fused CPU
//! paths against the same references).

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use kandinsky_benches::{random_var_builder, sync};
use kandinsky_core::testing::{diff, fixtures_dir, get, load_fixture};
use kandinsky_core::traits::{
    Denoiser, DenoiserCondition, EmbeddingPrior, PriorCondition, TextEncoder,
};
use kandinsky_pipeline::decoder::DecoderOptions;
use kandinsky_pipeline::prior::{ImageEmbeds, PriorOptions};
use kandinsky_pipeline::PriorModels;
use kandinsky_pipeline::{
    images, DecoderPipeline, Hooks, ImageEncoderUse, Placement, PriorPipeline, SchedulerChoice,
};

struct Row {
    what: String,
    value: String,
    ok: Option<bool>,
}

fn cfg<T: serde::de::DeserializeOwned>(name: &str) -> Result<T> {
    let p = fixtures_dir().join("real-configs").join(name);
    let text = std::fs::read_to_string(&p).with_context(|| p.display().to_string())?;
    Ok(serde_json::from_str(&text)?)
}

fn time<F: FnMut() -> Result<()>>(
    dev: &Device,
    warmup: usize,
    iters: usize,
    mut f: F,
) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    sync(dev)?;
    let mut ts = Vec::new();
    for _ in 0..iters {
        let t0 = Instant::now();
        f()?;
        sync(dev)?;
        ts.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    ts.sort_by(|a, b| a.total_cmp(b));
    Ok(ts[ts.len() / 2])
}

#[cfg(feature = "cuda")]
fn used_mib(dev: &Device) -> f64 {
    let _ = dev.synchronize();
    match kandinsky_core::cuda::mem_info() {
        Ok((free, total)) => (total - free) as f64 / 1048576.0,
        Err(_) => f64::NAN,
    }
}

#[cfg(not(feature = "cuda"))]
fn used_mib(_dev: &Device) -> f64 {
    f64::NAN
}

/// Restart the CUDA pool's peak counter (what candle's tensors hold, like PyTorch's
/// `reset_peak_memory_stats`).
fn reset_peak(dev: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(c) = dev {
        let _ = dev.synchronize();
        let _ = kandinsky_core::cuda::pool_reset_peak(c);
    }
    let _ = dev;
}

/// Peak MiB held by tensors since [`reset_peak`] (NaN on the CPU).
fn peak_mib(dev: &Device) -> f64 {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(c) = dev {
        let _ = dev.synchronize();
        return match kandinsky_core::cuda::pool_peak_bytes(c) {
            Ok(b) => b as f64 / 1048576.0,
            Err(_) => f64::NAN,
        };
    }
    let _ = dev;
    f64::NAN
}

fn parity(dev: &Device, rows: &mut Vec<Row>) -> Result<()> {
    let place = Placement {
        device: dev.clone(),
        dtype: DType::F32,
    };
    let tiny = fixtures_dir().join("tiny");
    // Prior: recorded noise replayed, as in the CPU end-to-end test.
    let f = load_fixture("pipeline/prior.safetensors")?;
    let mut noise = kandinsky_core::noise::RecordedNoise::with_prefix(&f, "noise_");
    let mut p = PriorPipeline::load(
        &tiny.join("kandinsky-2-2-prior"),
        &place,
        &place,
        ImageEncoderUse::Load,
    )?;
    let opts = PriorOptions {
        steps: 5,
        ..Default::default()
    };
    let e = p.generate(
        &["a red cat on a sofa".into()],
        None,
        &opts,
        &mut Hooks {
            noise: Some(&mut noise),
            ..Default::default()
        },
    )?;
    let d = diff(&e.image_embeds, get(&f, "image_embeds")?)?;
    rows.push(Row {
        what: "parity prior (CUDA f32 vs diffusers)".into(),
        value: format!("{:.2e}", d.max_abs),
        ok: Some(d.max_abs <= 1e-3),
    });
    for (repo, file, hint) in [
        ("kandinsky-2-2-decoder", "text2img", false),
        ("kandinsky-2-2-controlnet-depth", "controlnet", true),
    ] {
        let f = load_fixture(&format!("pipeline/{file}.safetensors"))?;
        let mut dp = DecoderPipeline::load(
            &tiny.join(repo),
            &place,
            &place,
            SchedulerChoice::Kind(kandinsky_schedulers::SchedulerKind::Ddim),
        )?;
        let (_, _, h, w) = get(&f, "image")?.dims4()?;
        let o = DecoderOptions {
            height: h,
            width: w,
            steps: 4,
            guidance_scale: 4.0,
            noise: Some(get(&f, "latents")?.clone()),
            ..Default::default()
        };
        let emb = ImageEmbeds {
            image_embeds: get(&f, "image_embeds")?.clone(),
            negative_image_embeds: get(&f, "negative_image_embeds")?.clone(),
        };
        let hint_t = if hint {
            Some(get(&f, "hint")?.to_device(dev)?)
        } else {
            None
        };
        let img = dp.text2img(&emb, &o, hint_t.as_ref(), &mut Hooks::default())?;
        let d = diff(&images::to_unit_range(&img)?, get(&f, "output")?)?;
        rows.push(Row {
            what: format!("parity {file} (CUDA f32 vs diffusers)"),
            value: format!("{:.2e}", d.max_abs),
            ok: Some(d.max_abs <= 1e-3),
        });
    }
    Ok(())
}

/// The fused attention kernels [`fast_attention`] runs in the default checks (head-major,
/// and `-tm` token-major): the entry point's defaults since run 10 (wide for bf16,
/// wgmma-pipe for f16 where this build has it) beside the mma kernel; the entry point off
/// CUDA.
fn attention_kernels(dev: &Device) -> Vec<&'static str> {
    if !dev.is_cuda() {
        return vec!["entry point"];
    }
    #[cfg(feature = "cuda")]
    let wgmma = kandinsky_core::cuda::FlashKernel::WgmmaPipe.is_built();
    #[cfg(not(feature = "cuda"))]
    let wgmma = false;
    let mut names = vec!["mma", "wide", "wide-tm"];
    if wgmma {
        names.extend(["wgmma-pipe", "wgmma-pipe-tm"]);
    }
    names
}

/// `--attention-only`: the mma kernel beside the wide and wgmma ones (first run on a GPU in
/// run 10). Separate processes in `xtask/gpu/run.sh`: a kernel fault poisons the CUDA
/// context for everything after it.
const NEW_ATTENTION_KERNELS: [&str; 10] = [
    "mma",
    "mma-tm",
    "wide",
    "wide-tm",
    "wide2",
    "wide2-tm",
    "wgmma-pipe",
    "wgmma-pipe-tm",
    "wgmma-pipe-ns",
    "wgmma-pipe-ns-tm",
];

/// Attention with the kernel named `kernel` (see [`attention_kernels`]). A `-tm` kernel
/// takes and returns `[B, L, H, 64]` tensors (see [`kernel_layout`]), the others
/// `[B, H, L, 64]`.
fn fast_attention(
    kernel: &str,
    q: &Tensor,
    ki: &Tensor,
    vi: &Tensor,
    ks: &Tensor,
    vs: &Tensor,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        use kandinsky_core::cuda::{
            flash_attention_token_major, flash_attention_with, FlashKernel,
        };
        let (base, tm) = match kernel.strip_suffix("-tm") {
            Some(base) => (base, true),
            None => (kernel, false),
        };
        let k =
            FlashKernel::from_name(base).with_context(|| format!("no attention kernel {base}"))?;
        let kv = [(ki, vi), (ks, vs)];
        return Ok(if tm {
            flash_attention_token_major(q, &kv, 0.125, k)?
        } else {
            flash_attention_with(q, &kv, 0.125, k)?
        });
    }
    let _ = kernel;
    use kandinsky_core::attention::{attention, KvSegment};
    let segs = [KvSegment { k: ki, v: vi }, KvSegment { k: ks, v: vs }];
    Ok(attention(q, &segs, None, 0.125)?)
}

/// `[B, H, L, 64]` as `kernel` reads it: token-major copies for a `-tm` kernel (made before
/// the clock starts: in a model the projections produce that layout).
fn kernel_layout(kernel: &str, t: &Tensor) -> Result<Tensor> {
    Ok(if kernel.ends_with("-tm") {
        t.transpose(1, 2)?.contiguous()?
    } else {
        t.clone()
    })
}

/// The relative-error bar of a kernel against candle's ops in f32, by storage type.
fn tolerance(dt: DType) -> f32 {
    match dt {
        DType::F32 => 1e-4,
        DType::F16 => 5e-3,
        _ => 1e-2,
    }
}

/// A checked kernel's row: "rel err / ms (TFLOP/s) / baseline ms" and pass/fail, or the
/// error (a kernel that fails to launch is a failed row, not the end of the checks).
fn kernel_row(
    checked: Result<(kandinsky_core::testing::Diff, f64)>,
    tol: f32,
    flops: f64,
    baseline_ms: f64,
) -> (String, bool) {
    match checked {
        Ok((d, ms)) => (
            format!(
                "{:.1e} / {ms:.3} ({:.0} TFLOP/s) / {baseline_ms:.3}",
                d.rel,
                flops / ms / 1e9
            ),
            d.rel <= tol && !d.rel.is_nan(),
        ),
        Err(e) => (format!("ERROR {e:#}"), false),
    }
}

/// `softmax(q·kᵀ·scale)·v` with candle's ops alone, in f32 (the kernels' reference).
fn candle_attention_f32(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let up = |t: &Tensor| t.to_dtype(DType::F32);
    let kt = up(k)?.transpose(2, 3)?.contiguous()?;
    let scores = (up(q)?.contiguous()?.matmul(&kt)? * scale)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    Ok(probs.matmul(&up(v)?.contiguous()?)?)
}

/// One convolution of the checks: random f32 weights, bias, input and residual, and in a
/// given dtype the [`kandinsky_core::gpu_conv::ShiftedConv`] and the f32 reference (candle's
/// conv2d on the same rounded inputs).
struct ConvCase {
    w: Tensor,
    b: Tensor,
    x: Tensor,
    r: Tensor,
    k: usize,
    up: bool,
    /// The output's side.
    os: usize,
}

impl ConvCase {
    fn new(
        dev: &Device,
        cin: usize,
        cout: usize,
        k: usize,
        s: usize,
        batch: usize,
        up: bool,
    ) -> Result<Self> {
        let os = if up { 2 * s } else { s };
        Ok(Self {
            w: (Tensor::randn(0f32, 1.0, (cout, cin, k, k), dev)? / ((cin * k * k) as f64).sqrt())?,
            b: Tensor::randn(0f32, 1.0, cout, dev)?,
            x: Tensor::randn(0f32, 1.0, (batch, cin, s, s), dev)?,
            r: Tensor::randn(0f32, 1.0, (batch, cout, os, os), dev)?,
            k,
            up,
            os,
        })
    }

    /// (weight, bias, input, residual) rounded to `dt`, the convolution, and the reference
    /// (with the residual where `res`).
    fn at(
        &self,
        dt: DType,
        res: bool,
    ) -> Result<(
        Tensor,
        Tensor,
        Tensor,
        Tensor,
        kandinsky_core::gpu_conv::ShiftedConv,
        Tensor,
    )> {
        let f = |t: &Tensor| t.to_dtype(dt);
        let (w, b, x, r) = (f(&self.w)?, f(&self.b)?, f(&self.x)?, f(&self.r)?);
        let p = self.k / 2;
        let conv = kandinsky_core::gpu_conv::ShiftedConv::new(&w, Some(&b), [p, p, p, p])?;
        let up32 = |t: &Tensor| t.to_dtype(DType::F32);
        let xin = if self.up {
            up32(&x)?.upsample_nearest2d(self.os, self.os)?
        } else {
            up32(&x)?
        };
        let cout = self.b.dim(0)?;
        let mut reference = xin
            .conv2d(&up32(&w)?, p, 1, 1, 1)?
            .broadcast_add(&up32(&b)?.reshape((1, cout, 1, 1))?)?;
        if res {
            reference = (reference + up32(&r)?)?;
        }
        Ok((w, b, x, r, conv, reference))
    }
}

fn kernels(dev: &Device, rows: &mut Vec<Row>) -> Result<()> {
    use kandinsky_core::nn::{GroupNorm, NormModulation};
    // GroupNorm (+ modulation) + SiLU against candle ops at UNet/MoVQ shapes (batch 2): plain,
    // the UNet ResNet's scale-shift (halves of one time projection, read through their
    // strides) and MoVQ's SpatialNorm (a latent-sized map upsampled on the fly), where a
    // latent map size is given.
    for (c, s, map) in [
        (384usize, 96usize, Some(12usize)),
        (768, 48, Some(12)),
        (1536, 12, None),
        (3072, 12, None),
        (128, 256, Some(32)),
        // 15×15: not a multiple of 8 pixels, the kernels' scalar path.
        (384, 15, Some(5)),
    ] {
        let gn_w = (Tensor::randn(0f32, 0.1, c, dev)? + 1.0)?;
        let gn_b = Tensor::randn(0f32, 0.1, c, dev)?;
        let x = ((Tensor::randn(0f32, 1.0, (2, c, s, s), dev)? * 3.0)? + 0.5)?;
        let temb = (Tensor::randn(0f32, 1.0, (2, 2 * c, 1, 1), dev)? * 0.5)?;
        let maps = match map {
            Some(m) => Some((Tensor::randn(0f32, 1.0, (2, 2 * c, m, m), dev)? * 0.5)?),
            None => None,
        };
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let xd = x.to_dtype(dt)?;
            let gn = GroupNorm::from_parts(gn_w.to_dtype(dt)?, gn_b.to_dtype(dt)?, 32, 1e-5)?;
            // The reference: candle's ops in f32 on the same (rounded) inputs, so the error
            // is the kernel's alone.
            let up = |t: &Tensor| t.to_dtype(DType::F32);
            let gn32 = GroupNorm::from_parts(
                up(&gn_w.to_dtype(dt)?)?,
                up(&gn_b.to_dtype(dt)?)?,
                32,
                1e-5,
            )?;
            let tol = tolerance(dt);
            let t = temb.to_dtype(dt)?;
            let (scale, shift) = (t.narrow(1, 0, c)?, t.narrow(1, c, c)?);
            let spatial = match &maps {
                Some(m) => {
                    let m = m.to_dtype(dt)?;
                    Some((m.narrow(1, 0, c)?.contiguous()?, m.narrow(1, c, c)?))
                }
                None => None,
            };
            let mut kinds = vec![("", None)];
            if let Some((ms, mh)) = &spatial {
                kinds.push((
                    "+scale-shift",
                    Some(NormModulation::ScaleShift {
                        scale: &scale,
                        shift: &shift,
                    }),
                ));
                kinds.push((
                    "+spatial",
                    Some(NormModulation::Spatial {
                        scale: ms,
                        shift: mh,
                    }),
                ));
            }
            for (kind, modulation) in kinds {
                // candle ops: GroupNorm, the modulation, SiLU.
                let plain = |gn: &GroupNorm, x: &Tensor, m: Option<(&Tensor, &Tensor)>| {
                    let y = gn.forward_plain(x)?;
                    let y = match (modulation, m) {
                        (Some(NormModulation::Spatial { .. }), Some((sc, sh))) => y
                            .mul(&sc.upsample_nearest2d(s, s)?)?
                            .add(&sh.upsample_nearest2d(s, s)?)?,
                        (Some(_), Some((sc, sh))) => {
                            y.broadcast_mul(&(sc + 1.0)?)?.broadcast_add(sh)?
                        }
                        _ => y,
                    };
                    y.silu()
                };
                let (sc, sh) = match modulation {
                    Some(NormModulation::Spatial { scale, shift })
                    | Some(NormModulation::ScaleShift { scale, shift }) => (scale, shift),
                    None => (&scale, &shift),
                };
                let (sc32, sh32) = (up(sc)?, up(sh)?);
                let fused = gn.forward_modulated(&xd, modulation, true)?;
                let reference = plain(&gn32, &up(&xd)?, Some((&sc32, &sh32)))?;
                let d = diff(&fused, &reference)?;
                let t_f = time(dev, 2, 10, || {
                    gn.forward_modulated(&xd, modulation, true)?;
                    Ok(())
                })?;
                let t_p = time(dev, 2, 10, || {
                    plain(&gn, &xd, Some((sc, sh)))?;
                    Ok(())
                })?;
                rows.push(Row {
                    what: format!(
                        "groupnorm{kind}+silu {c}x{s}x{s} {dt:?}: rel err vs f32 / ms / plain ms"
                    ),
                    value: format!("{:.1e} / {:.3} / {:.3}", d.rel, t_f, t_p),
                    ok: Some(d.rel <= tol && !d.rel.is_nan()),
                });
            }
        }
    }
    // The shifted-GEMM convolution against candle's conv2d computed in f32 on the same
    // rounded inputs: the UNet's and MoVQ's 768 px shapes (3×3, 1×1, the input and output
    // convolutions, the folded upsampling, the fused residual).
    for (cin, cout, k, s, batch, up, res) in [
        (384usize, 384usize, 3usize, 96usize, 2usize, false, true),
        (768, 768, 3, 48, 2, false, false),
        (3072, 1536, 3, 12, 2, false, true),
        (1536, 1536, 3, 24, 2, true, false),
        (4, 384, 3, 96, 2, false, false),
        (384, 8, 3, 96, 2, false, false),
        (768, 384, 1, 48, 2, false, false),
        (128, 128, 3, 384, 1, true, false),
        (128, 3, 3, 768, 1, false, false),
    ] {
        let case = ConvCase::new(dev, cin, cout, k, s, batch, up)?;
        let (os, p) = (case.os, k / 2);
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let (w, b, x, r, conv, reference) = case.at(dt, res)?;
            let res = if res { Some(&r) } else { None };
            // Whole map, in bands (KANDINSKY_CONV_SCRATCH_MB: at least three, each at most
            // 64 MiB of scratch; the input and the residual read in place), or (the upsampling
            // ones) the four 2×2 phase convolutions (KANDINSKY_CONV_SUBPIXEL=1).
            let band_limit = (conv.scratch_bytes(&x, up)? / 3).min(64 << 20);
            let run = |mode: &str| match mode {
                "banded" => conv.forward_banded(&x, up, res, band_limit),
                "subpixel" => conv.forward_subpixel(&x, res),
                _ => conv.forward(&x, up, res),
            };
            let check = |mode: &str| -> Result<(kandinsky_core::testing::Diff, f64)> {
                let d = diff(&run(mode)?, &reference)?;
                let ms = time(dev, 2, 10, || {
                    run(mode)?;
                    Ok(())
                })?;
                Ok((d, ms))
            };
            let ms_candle = time(dev, 1, 5, || {
                let xin = if up {
                    x.upsample_nearest2d(os, os)?
                } else {
                    x.clone()
                };
                let y = xin
                    .conv2d(&w, p, 1, 1, 1)?
                    .broadcast_add(&b.reshape((1, cout, 1, 1))?)?;
                if let Some(r) = res {
                    (y + r)?;
                }
                Ok(())
            })?;
            let tol = tolerance(dt);
            let flops = 2.0 * (batch * os * os) as f64 * (cout * cin * k * k) as f64;
            for mode in ["whole", "banded", "subpixel"] {
                if (mode == "banded" && s < 24) || (mode == "subpixel" && !(up && k == 3)) {
                    continue;
                }
                let (value, ok) = kernel_row(check(mode), tol, flops, ms_candle);
                rows.push(Row {
                    what: format!(
                        "conv {cin}->{cout} k{k} {s}x{s}{} b{batch}{}{} {dt:?}: rel err / ms / candle ms",
                        if up { " up2x" } else { "" },
                        if res.is_some() { " +res" } else { "" },
                        match mode {
                            "banded" => " banded",
                            "subpixel" => " subpixel",
                            _ => "",
                        }
                    ),
                    value,
                    ok: Some(ok),
                });
            }
        }
    }
    // The convolution normalising its input on read (`KANDINSKY_CONV_NORM=1`: GroupNorm
    // (+ scale-shift or spatial modulation) + SiLU inside the copy kernel) against candle's
    // ops in f32 (the composite GroupNorm, the modulation, SiLU, conv2d), at the UNet's 768 px
    // ResNet shapes (conv1 with the folded upsampling, conv2 with the scale-shift and the
    // residual) and a MoVQ one (spatial); timed against the two-kernel path (GroupNorm kernel,
    // then the shifted convolution).
    #[cfg(feature = "cuda")]
    for (c, s, batch, up, kind) in [
        (384usize, 96usize, 2usize, false, "scale-shift"),
        (768, 48, 2, false, "scale-shift"),
        (1536, 24, 2, true, ""),
        (768, 48, 2, true, ""),
        (256, 96, 1, false, "spatial"),
    ] {
        use kandinsky_core::gpu_conv::{InputNorm, ShiftedConv};
        let w32 = (Tensor::randn(0f32, 1.0, (c, c, 3, 3), dev)? / ((c * 9) as f64).sqrt())?;
        let b32 = Tensor::randn(0f32, 1.0, c, dev)?;
        let x32 = ((Tensor::randn(0f32, 1.0, (batch, c, s, s), dev)? * 2.0)? + 0.5)?;
        let gw32 = (Tensor::randn(0f32, 0.2, c, dev)? + 1.0)?;
        let gb32 = Tensor::randn(0f32, 0.2, c, dev)?;
        let os = if up { 2 * s } else { s };
        let r32 = Tensor::randn(0f32, 1.0, (batch, c, os, os), dev)?;
        let temb32 = Tensor::randn(0f32, 0.3, (batch, 2 * c, 1, 1), dev)?;
        let map32 = (Tensor::randn(0f32, 0.5, (batch, 2 * c, s / 4, s / 4), dev)? + 0.5)?;
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let r = |t: &Tensor| t.to_dtype(dt);
            let f = |t: &Tensor| t.to_dtype(dt)?.to_dtype(DType::F32);
            let (w, x, res) = (r(&w32)?, r(&x32)?, r(&r32)?);
            let conv = ShiftedConv::new(&w, Some(&r(&b32)?), [1, 1, 1, 1])?;
            let gn = GroupNorm::from_parts(r(&gw32)?, r(&gb32)?, 32, 1e-5)?;
            let temb = r(&temb32)?;
            let maps = r(&map32)?.contiguous()?;
            let (scale, shift) = match kind {
                "spatial" => (
                    maps.narrow(1, 0, c)?.contiguous()?,
                    maps.narrow(1, c, c)?.contiguous()?,
                ),
                _ => (temb.narrow(1, 0, c)?, temb.narrow(1, c, c)?),
            };
            let modulation = match kind {
                "scale-shift" => Some(NormModulation::ScaleShift {
                    scale: &scale,
                    shift: &shift,
                }),
                "spatial" => Some(NormModulation::Spatial {
                    scale: &scale,
                    shift: &shift,
                }),
                _ => None,
            };
            let residual = (!up).then_some(&res);
            let input_norm = InputNorm {
                norm: &gn,
                modulation,
                silu: true,
                stats: None,
            };
            // candle's ops in f32 on the same rounded inputs.
            let gn32 = GroupNorm::from_parts(f(&gw32)?, f(&gb32)?, 32, 1e-5)?;
            let mut h = gn32.forward_plain(&f(&x32)?)?;
            h = match kind {
                "scale-shift" => h
                    .broadcast_mul(&(scale.to_dtype(DType::F32)? + 1.0)?)?
                    .broadcast_add(&shift.to_dtype(DType::F32)?)?,
                "spatial" => h
                    .mul(&scale.to_dtype(DType::F32)?.upsample_nearest2d(s, s)?)?
                    .add(&shift.to_dtype(DType::F32)?.upsample_nearest2d(s, s)?)?,
                _ => h,
            };
            h = h.silu()?;
            if up {
                h = h.upsample_nearest2d(os, os)?;
            }
            let mut reference = h
                .conv2d(&f(&w32)?, 1, 1, 1, 1)?
                .broadcast_add(&f(&b32)?.reshape((1, c, 1, 1))?)?;
            if residual.is_some() {
                reference = (reference + f(&r32)?)?;
            }
            // Whole map, or in bands (about three) normalised with the whole map's statistics.
            let band_limit = conv.scratch_bytes(&x, up)? / 3;
            let fused = |banded: bool| {
                if banded {
                    conv.forward_norm_on_read_banded(&x, input_norm, up, residual, band_limit)
                } else {
                    conv.forward_norm_on_read(&x, input_norm, up, residual)
                }
            };
            let two_step = || conv.forward(&input_norm.apply(&x)?, up, residual);
            let check = |banded: bool| -> Result<(kandinsky_core::testing::Diff, f64)> {
                let d = diff(&fused(banded)?, &reference)?;
                let ms = time(dev, 2, 10, || {
                    fused(banded)?;
                    Ok(())
                })?;
                Ok((d, ms))
            };
            let ms_two = time(dev, 2, 10, || {
                two_step()?;
                Ok(())
            })?;
            let flops = 2.0 * (batch * os * os) as f64 * (c * c * 9) as f64;
            for banded in [false, true] {
                let (value, ok) = kernel_row(check(banded), tolerance(dt), flops, ms_two);
                rows.push(Row {
                    what: format!(
                        "conv norm-on-read {c} {s}x{s}{} b{batch} gn{}{}+silu{} {dt:?}: rel err / ms / two-step ms",
                        if up { " up2x" } else { "" },
                        if kind.is_empty() { String::new() } else { format!("+{kind}") },
                        if residual.is_some() { " +res" } else { "" },
                        if banded { " banded" } else { "" },
                    ),
                    value,
                    ok: Some(ok),
                });
            }
        }
    }
    // The convolution's crop kernel leaving its output's GroupNorm statistics
    // (KANDINSKY_CONV_STATS=1): the norm reading them (GroupNorm + SiLU materialised, and
    // normalised on read by the next convolution) against candle's ops in f32 on the same
    // output, at the UNet's ResNet conv1 shapes (768 px) and a MoVQ upsampling one; timed
    // (convolution + norm) against the convolution and the norm's own statistics pass.
    #[cfg(feature = "cuda")]
    for (c, s, batch, up) in [
        (384usize, 96usize, 2usize, false),
        (768, 48, 2, false),
        (1536, 24, 2, true),
        (1536, 12, 2, false),
        (128, 384, 1, true),
    ] {
        use kandinsky_core::gpu_conv::{InputNorm, ShiftedConv};
        let w32 = (Tensor::randn(0f32, 1.0, (c, c, 3, 3), dev)? / ((c * 9) as f64).sqrt())?;
        let b32 = (Tensor::randn(0f32, 1.0, c, dev)? + 1.0)?;
        let x32 = Tensor::randn(0f32, 1.0, (batch, c, s, s), dev)?;
        let gw32 = (Tensor::randn(0f32, 0.2, c, dev)? + 1.0)?;
        let gb32 = Tensor::randn(0f32, 0.2, c, dev)?;
        let os = if up { 2 * s } else { s };
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let r = |t: &Tensor| t.to_dtype(dt);
            let f = |t: &Tensor| t.to_dtype(dt)?.to_dtype(DType::F32);
            let x = r(&x32)?;
            let conv = ShiftedConv::new(&r(&w32)?, Some(&r(&b32)?), [1, 1, 1, 1])?;
            let conv2 = ShiftedConv::new(&r(&w32)?, None, [1, 1, 1, 1])?;
            let gn = GroupNorm::from_parts(r(&gw32)?, r(&gb32)?, 32, 1e-5)?;
            let gn32 = GroupNorm::from_parts(f(&gw32)?, f(&gb32)?, 32, 1e-5)?;
            let what = format!(
                "conv stats {c} {s}x{s}{} b{batch} {dt:?}: rel err (norm, on read) / ms / ms with a stats pass",
                if up { " up2x" } else { "" }
            );
            let checked = (|| -> Result<Option<(f32, f32, f64, f64)>> {
                let (y, stats) = conv.forward_leaving_stats(&x, up, None, 32)?;
                let Some(stats) = stats else {
                    return Ok(None);
                };
                // candle's ops in f32 on the convolution's (rounded) output.
                let normed32 = gn32.forward_plain(&y.to_dtype(DType::F32)?)?.silu()?;
                let input_norm = InputNorm {
                    norm: &gn,
                    modulation: None,
                    silu: true,
                    stats: Some(&stats),
                };
                let d_norm = diff(&input_norm.apply(&y)?, &normed32)?.rel;
                let on_read = conv2.forward_norm_on_read(&y, input_norm, false, None)?;
                let reference = normed32.conv2d(&f(&w32)?, 1, 1, 1, 1)?;
                let d_read = diff(&on_read, &reference)?.rel;
                let ms = time(dev, 2, 10, || {
                    let (y, st) = conv.forward_leaving_stats(&x, up, None, 32)?;
                    gn.forward_with_stats(&y, None, true, st.as_ref())?;
                    Ok(())
                })?;
                let ms_pass = time(dev, 2, 10, || {
                    gn.forward_silu(&conv.forward(&x, up, None)?)?;
                    Ok(())
                })?;
                Ok(Some((d_norm, d_read, ms, ms_pass)))
            })();
            let (value, ok) = match checked {
                Ok(Some((dn, dr, ms, ms_pass))) => (
                    format!("{dn:.1e}, {dr:.1e} / {ms:.3} / {ms_pass:.3}"),
                    dn <= tolerance(dt) && dr <= tolerance(dt),
                ),
                Ok(None) => (format!("no statistics ({os}x{os} output)"), false),
                Err(e) => (format!("error: {e}"), false),
            };
            rows.push(Row {
                what,
                value,
                ok: Some(ok),
            });
        }
    }
    // The UNet's skip concatenation in one kernel leaving the ResNet norm1's statistics
    // (KANDINSKY_CONV_STATS=1): the copy against candle's `cat` (exactly), the norm reading
    // the statistics against candle's ops in f32; at the 96² level (384 + 384 channels) and
    // the 12² one (1536 + 1152: groups of 84 channels straddle the two maps), timed against
    // candle's `cat` plus the norm's own statistics pass.
    #[cfg(feature = "cuda")]
    for (c1, c2, s) in [(384usize, 384usize, 96usize), (1536, 1152, 12)] {
        use kandinsky_core::gpu_conv::MapStats;
        let a32 = (Tensor::randn(0f32, 1.0, (2, c1, s, s), dev)? + 0.5)?;
        let b32 = Tensor::randn(0f32, 2.0, (2, c2, s, s), dev)?;
        let c = c1 + c2;
        let gw32 = (Tensor::randn(0f32, 0.2, c, dev)? + 1.0)?;
        let gb32 = Tensor::randn(0f32, 0.2, c, dev)?;
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let r = |t: &Tensor| t.to_dtype(dt);
            let (a, b) = (r(&a32)?, r(&b32)?);
            let gn = GroupNorm::from_parts(r(&gw32)?, r(&gb32)?, 32, 1e-5)?;
            let gn32 = GroupNorm::from_parts(
                r(&gw32)?.to_dtype(DType::F32)?,
                r(&gb32)?.to_dtype(DType::F32)?,
                32,
                1e-5,
            )?;
            let checked = (|| -> Result<Option<(f32, f32, f64, f64)>> {
                let (y, stats) = kandinsky_core::cuda::cat_channels_with_stats(&a, &b, Some(32))?;
                let Some(stats) = stats.map(MapStats::from) else {
                    return Ok(None);
                };
                let want = Tensor::cat(&[&a, &b], 1)?;
                let d_copy = diff(&y.to_dtype(DType::F32)?, &want.to_dtype(DType::F32)?)?.max_abs;
                let given = gn.forward_with_stats(&y, None, true, Some(&stats))?;
                let reference = gn32.forward_plain(&want.to_dtype(DType::F32)?)?.silu()?;
                let d_norm = diff(&given, &reference)?.rel;
                let ms = time(dev, 2, 10, || {
                    let (y, st) = kandinsky_core::cuda::cat_channels_with_stats(&a, &b, Some(32))?;
                    gn.forward_with_stats(&y, None, true, st.map(MapStats::from).as_ref())?;
                    Ok(())
                })?;
                let ms_pass = time(dev, 2, 10, || {
                    gn.forward_silu(&Tensor::cat(&[&a, &b], 1)?)?;
                    Ok(())
                })?;
                Ok(Some((d_copy, d_norm, ms, ms_pass)))
            })();
            let (value, ok) = match checked {
                Ok(Some((dc, dn, ms, ms_pass))) => (
                    format!("{dc:.0e}, {dn:.1e} / {ms:.3} / {ms_pass:.3}"),
                    dc == 0.0 && dn <= tolerance(dt),
                ),
                Ok(None) => ("no statistics".into(), false),
                Err(e) => (format!("error: {e}"), false),
            };
            rows.push(Row {
                what: format!(
                    "cat stats {c1}+{c2} {s}x{s} b2 {dt:?}: copy max diff, norm rel err / ms / ms cat + stats pass"
                ),
                value,
                ok: Some(ok),
            });
        }
    }
    // Linear layers with the bias in the cuBLASLt epilogue (the UNet's attention projections
    // at the 48×48 level, its image-token projections, the prior's width), against candle's
    // ops in f32.
    for (b, l, k, n) in [
        (2usize, 2304usize, 768usize, 768usize),
        (2, 32, 1280, 768),
        (2, 81, 2048, 2048),
    ] {
        let x32 = Tensor::randn(0f32, 1.0, (b, l, k), dev)?;
        let w32 = (Tensor::randn(0f32, 1.0, (n, k), dev)? / (k as f64).sqrt())?;
        let b32 = Tensor::randn(0f32, 1.0, n, dev)?;
        for dt in [DType::F16, DType::BF16] {
            let (x, w, bias) = (x32.to_dtype(dt)?, w32.to_dtype(dt)?, b32.to_dtype(dt)?);
            let layer = kandinsky_core::nn::Linear::new(w.clone(), Some(bias.clone()))?;
            let up = |t: &Tensor| t.to_dtype(DType::F32);
            let reference = up(&x)?
                .broadcast_matmul(&up(&w)?.t()?)?
                .broadcast_add(&up(&bias)?)?;
            let d = diff(&layer.forward(&x)?, &reference)?;
            let ms = time(dev, 2, 10, || {
                layer.forward(&x)?;
                Ok(())
            })?;
            let candle_layer = candle_nn::Linear::new(w.clone(), Some(bias.clone()));
            let ms_candle = time(dev, 2, 10, || {
                candle_layer.forward(&x)?;
                Ok(())
            })?;
            let tol = tolerance(dt);
            rows.push(Row {
                what: format!("linear {b}x{l}x{k}->{n} {dt:?}: rel err vs f32 / ms / candle ms"),
                value: format!("{:.1e} / {ms:.3} / {ms_candle:.3}", d.rel),
                ok: Some(d.rel <= tol && !d.rel.is_nan()),
            });
        }
    }
    // The plain attention path on CUDA (MoVQ's single head of 512 at 96×96, an odd small
    // shape): scale + softmax in one kernel, against candle's ops in f32.
    for (heads, lq, lk, d) in [(1usize, 9216usize, 9216usize, 512usize), (3, 77, 81, 64)] {
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let scale = 1.0 / (d as f64).sqrt();
            let q = Tensor::randn(0f32, 1.0, (1, heads, lq, d), dev)?.to_dtype(dt)?;
            let k = Tensor::randn(0f32, 1.0, (1, heads, lk, d), dev)?.to_dtype(dt)?;
            let v = Tensor::randn(0f32, 1.0, (1, heads, lk, d), dev)?.to_dtype(dt)?;
            let reference = candle_attention_f32(&q, &k, &v, scale)?;
            let got = kandinsky_core::attention::plain(&q, &k, &v, None, scale)?;
            let d_ = diff(&got, &reference)?;
            let ms = time(dev, 1, 5, || {
                kandinsky_core::attention::plain(&q, &k, &v, None, scale)?;
                Ok(())
            })?;
            let ms_candle = time(dev, 1, 5, || {
                let kt = k.transpose(2, 3)?.contiguous()?;
                let s = (q.matmul(&kt)? * scale)?.to_dtype(DType::F32)?;
                candle_nn::ops::softmax_last_dim(&s)?
                    .to_dtype(dt)?
                    .matmul(&v)?;
                Ok(())
            })?;
            let tol = tolerance(dt);
            rows.push(Row {
                what: format!(
                    "plain attention {heads}x{lq}x{lk} d{d} {dt:?}: rel err vs f32 / ms / candle ms"
                ),
                value: format!("{:.1e} / {ms:.3} / {ms_candle:.3}", d_.rel),
                ok: Some(d_.rel <= tol && !d_.rel.is_nan()),
            });
        }
    }
    // The tiled transpose (`KANDINSKY_TILED_TRANSPOSE=1`) against candle's strided copy and
    // add, which it must match exactly: the UNet's attention blocks at the 48² level
    // (tokens, then the residual) and MoVQ's at 96².
    #[cfg(feature = "cuda")]
    if dev.is_cuda() {
        use kandinsky_core::cuda::transpose_add;
        for (b, m, n, add) in [
            (2usize, 768usize, 2304usize, false),
            (2, 2304, 768, true),
            (1, 9216, 512, true),
        ] {
            for dt in [DType::F16, DType::BF16] {
                let x = Tensor::randn(0f32, 1.0, (b, m, n), dev)?.to_dtype(dt)?;
                let a = Tensor::randn(0f32, 1.0, (b, n, m), dev)?.to_dtype(dt)?;
                let addend = if add { Some(&a) } else { None };
                let candle = || -> Result<Tensor> {
                    let t = x.transpose(1, 2)?;
                    Ok(match addend {
                        Some(a) => (a + t)?,
                        None => t.contiguous()?,
                    })
                };
                let got = transpose_add(&x, addend)?;
                let mismatches = got
                    .to_dtype(DType::F32)?
                    .ne(&candle()?.to_dtype(DType::F32)?)?
                    .to_dtype(DType::F32)?
                    .sum_all()?
                    .to_scalar::<f32>()?;
                let ms = time(dev, 2, 10, || {
                    transpose_add(&x, addend)?;
                    Ok(())
                })?;
                let ms_candle = time(dev, 2, 10, || {
                    candle()?;
                    Ok(())
                })?;
                rows.push(Row {
                    what: format!(
                        "transpose [{b}, {m}, {n}]{} {dt:?}: mismatches / ms / candle ms",
                        if add { " + addend" } else { "" }
                    ),
                    value: format!("{mismatches} / {ms:.4} / {ms_candle:.4}"),
                    ok: Some(mismatches == 0.0),
                });
            }
        }
    }
    attention_rows(dev, rows, &attention_kernels(dev))
}

/// The one-kernel convolution GEMM (`KANDINSKY_CONV_GEMM=mma`, `kernels/conv_gemm.cu`) against
/// candle's conv2d in f32 on the same rounded inputs, timed against the cuBLAS path (k GEMMs
/// into an f32 accumulator, then the crop), at the UNet's and MoVQ's 768 px shapes.
#[cfg(feature = "cuda")]
fn conv_gemm_rows(dev: &Device, rows: &mut Vec<Row>) -> Result<()> {
    use kandinsky_core::gpu_conv::ConvGemm;
    for (cin, cout, k, s, batch, up, res) in [
        (384usize, 384usize, 3usize, 96usize, 2usize, false, true),
        (768, 384, 3, 96, 2, false, false),
        (768, 768, 3, 48, 2, false, false),
        (1152, 1152, 3, 24, 2, false, true),
        (3072, 1536, 3, 12, 2, false, true),
        (1536, 1536, 3, 24, 2, true, false),
        (384, 8, 3, 96, 2, false, false),
        (768, 384, 1, 48, 2, false, false),
        (512, 512, 3, 96, 1, false, false),
        (128, 128, 3, 384, 1, true, false),
        (128, 3, 3, 768, 1, false, false),
    ] {
        let case = ConvCase::new(dev, cin, cout, k, s, batch, up)?;
        let (os, p) = (case.os, k / 2);
        for dt in [DType::F16, DType::BF16] {
            let (_, _, x, r, conv, reference) = case.at(dt, res)?;
            let res = if res { Some(&r) } else { None };
            let ms_cublas = time(dev, 2, 10, || {
                conv.forward_gemm(&x, up, res, ConvGemm::Cublas)?;
                Ok(())
            })?;
            let check = |gemm: ConvGemm| -> Result<(kandinsky_core::testing::Diff, f64)> {
                let d = diff(&conv.forward_gemm(&x, up, res, gemm)?, &reference)?;
                let ms = time(dev, 2, 10, || {
                    conv.forward_gemm(&x, up, res, gemm)?;
                    Ok(())
                })?;
                Ok((d, ms))
            };
            let flops = 2.0 * (batch * os * os) as f64 * (cout * cin * k * k) as f64;
            // "small": a grid that leaves multiprocessors idle or tiles mostly empty, where
            // the selected path keeps cuBLAS (ShiftedConv::fused_suits); run.sh ranks the
            // kernels without these rows.
            let small = !conv.fused_suits(&x, up, [p, p, p, p])?;
            for (name, gemm) in ConvGemm::NAMED.into_iter().skip(1) {
                if gemm.effective(dt, k, cin) != gemm {
                    continue; // wgmma where the kernels were not built for sm_90a
                }
                let (value, ok) = kernel_row(check(gemm), tolerance(dt), flops, ms_cublas);
                rows.push(Row {
                    what: format!(
                        "conv gemm {name} {cin}->{cout} k{k} {s}x{s}{} b{batch}{}{} {dt:?}: rel err / ms / cublas ms",
                        if up { " up2x" } else { "" },
                        if res.is_some() { " +res" } else { "" },
                        if small { " small" } else { "" },
                    ),
                    value,
                    ok: Some(ok),
                });
            }
        }
    }
    Ok(())
}

/// The fused attention kernels named in `kernels` (see [`attention_kernels`]) at the UNet's
/// shapes (latent 96: levels 48/24/12, batch 2, 32 image tokens + the spatial ones), against
/// candle's ops in f32, timed against the plain path.
fn attention_rows(dev: &Device, rows: &mut Vec<Row>, kernels: &[&str]) -> Result<()> {
    for (level, heads) in [(48usize, 12usize), (24, 18), (12, 24)] {
        for dt in [DType::F16, DType::BF16] {
            let n = level * level;
            let q = Tensor::randn(0f32, 1.0, (2, heads, n, 64), dev)?.to_dtype(dt)?;
            let ki = Tensor::randn(0f32, 1.0, (2, heads, 32, 64), dev)?.to_dtype(dt)?;
            let vi = Tensor::randn(0f32, 1.0, (2, heads, 32, 64), dev)?.to_dtype(dt)?;
            let ks = Tensor::randn(0f32, 1.0, (2, heads, n, 64), dev)?.to_dtype(dt)?;
            let vs = Tensor::randn(0f32, 1.0, (2, heads, n, 64), dev)?.to_dtype(dt)?;
            let k = Tensor::cat(&[&ki, &ks], 2)?;
            let v = Tensor::cat(&[&vi, &vs], 2)?;
            // Reference: candle's ops in f32 on the same rounded inputs (the kernel's error
            // alone).
            let reference = candle_attention_f32(&q, &k, &v, 0.125)?;
            let tol = tolerance(dt);
            let ms_plain = time(dev, 1, 5, || {
                kandinsky_core::attention::plain(&q, &k, &v, None, 0.125)?;
                Ok(())
            })?;
            let flops = 4.0 * 2.0 * heads as f64 * n as f64 * (n + 32) as f64 * 64.0;
            for kernel in kernels {
                // A kernel that fails to launch is a failed row, not the end of the checks.
                let checked = (|| {
                    let l = |t: &Tensor| kernel_layout(kernel, t);
                    let (q, ki, vi, ks, vs) = (l(&q)?, l(&ki)?, l(&vi)?, l(&ks)?, l(&vs)?);
                    let fast = fast_attention(kernel, &q, &ki, &vi, &ks, &vs)?;
                    let fast = if kernel.ends_with("-tm") {
                        fast.transpose(1, 2)?
                    } else {
                        fast
                    };
                    let d = diff(&fast, &reference)?;
                    let ms = time(dev, 2, 10, || {
                        fast_attention(kernel, &q, &ki, &vi, &ks, &vs)?;
                        Ok(())
                    })?;
                    Ok((d, ms))
                })();
                let (value, ok) = kernel_row(checked, tol, flops, ms_plain);
                rows.push(Row {
                    what: format!(
                        "attention {level}x{level} h{heads} {dt:?} {kernel}: rel err vs f32 / ms / plain ms"
                    ),
                    value,
                    ok: Some(ok),
                });
            }
        }
    }
    Ok(())
}

/// One UNet step (conditioning prepared) captured into a CUDA graph and replayed: how much of an eager step is host
/// work (candle issues every op from the host; a replay issues none), and whether a step
/// can be captured at all (no host copies inside; candle's small uploads — dims, strides,
/// the timesteps — are served from its capture cache, filled by one eager step first).
/// Returns (ms per replay, relative difference replay vs eager).
#[cfg(feature = "cuda")]
fn unet_graph_step(
    dev: &Device,
    unet: &kandinsky_unet::UNet2DConditionModel,
    x: &Tensor,
    cond: &DenoiserCondition,
    iters: usize,
) -> Result<(f64, f64)> {
    let Device::Cuda(cuda) = dev else {
        anyhow::bail!("not a CUDA device");
    };
    // As a generation runs it: the conditioning's share prepared once, outside the graph.
    let prepared = unet.prepare(cond)?;
    let eager = unet.predict_prepared(x, &[500.0, 500.0], &prepared)?;
    let (graph, captured) = kandinsky_core::cuda::capture_graph(cuda, || {
        unet.predict_prepared(x, &[500.0, 500.0], &prepared)
            .map_err(candle_core::Error::wrap)
    })?;
    graph.launch()?;
    dev.synchronize()?;
    let d = diff(&captured, &eager)?;
    let ms = time(dev, 2, iters, || {
        graph.launch()?;
        Ok(())
    })?;
    drop(captured);
    Ok((ms, f64::from(d.rel)))
}

/// Sixteen values of `t` at fixed spread-out positions, to 4 significant digits: enough to
/// tell a path whose rounding differs (≈ 1e-3 of the largest after a UNet step in f16) from
/// one that computes something else (run.sh compares a switch's against the default's).
fn fingerprint(t: &Tensor) -> Result<String> {
    let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let n = v.len();
    Ok((0..16)
        .map(|i| format!("{:.3e}", v[(i * n / 16 + 7 * i + 3) % n.max(1)]))
        .collect::<Vec<_>>()
        .join(","))
}

fn timings(dev: &Device, rows: &mut Vec<Row>, quick: bool) -> Result<()> {
    let iters = if quick { 3 } else { 10 };
    let unet_cfg: kandinsky_unet::UNet2DConditionConfig = cfg("kandinsky-2-2-decoder__unet.json")?;
    for dt in [DType::F16, DType::BF16] {
        let base = used_mib(dev);
        // The same weights and inputs in every process, whatever ran before (parity and
        // kernel checks draw from the same generator): a switch's output can then be held
        // against the default's across processes (the fingerprint row, run.sh).
        if dev.is_cuda() {
            dev.set_seed(0x6b61_6e64)?;
        }
        let unet =
            kandinsky_unet::UNet2DConditionModel::new(random_var_builder(dt, dev), &unet_cfg)?;
        let sizes: &[usize] = if dt == DType::F16 {
            &[64, 96, 128]
        } else {
            &[96]
        };
        for &s in sizes {
            let x = Tensor::randn(0f32, 1.0, (2, 4, s, s), dev)?.to_dtype(dt)?;
            let cond = DenoiserCondition {
                image_embeds: Some(Tensor::randn(0f32, 1.0, (2, 1280), dev)?.to_dtype(dt)?),
                ..Default::default()
            };
            let ms = time(dev, 2, iters, || {
                unet.predict(&x, &[500.0, 500.0], &cond)?;
                Ok(())
            })?;
            reset_peak(dev);
            let out = unet.predict(&x, &[500.0, 500.0], &cond)?;
            let (peak, used) = (peak_mib(dev), used_mib(dev) - base);
            if dt == DType::F16 && s == 96 {
                rows.push(Row {
                    what: "unet output 768px b2 F16 fingerprint".into(),
                    value: fingerprint(&out)?,
                    ok: None,
                });
            }
            drop(out);
            if dt == DType::F16 && s == 96 {
                // A step as the pipeline runs it: the image tokens' keys and values (and the
                // additive embedding) computed once per generation, not per step.
                let prepared = unet.prepare(&cond)?;
                let pms = time(dev, 2, iters, || {
                    unet.predict_prepared(&x, &[500.0, 500.0], &prepared)?;
                    Ok(())
                })?;
                rows.push(Row {
                    what: "unet step 768px b2 F16, prepared conditioning".into(),
                    value: format!("{pms:.2} ms"),
                    ok: None,
                });
            }
            #[cfg(feature = "cuda")]
            if dt == DType::F16 && s == 96 {
                let (what, value, ok) = match unet_graph_step(dev, &unet, &x, &cond, iters) {
                    Ok((gms, rel)) => (
                        "unet step 768px b2 F16, CUDA graph replay (prepared conditioning): ms / \
                         rel diff vs eager",
                        format!("{gms:.2} ms / {rel:.1e}"),
                        Some(rel <= 1e-3),
                    ),
                    Err(e) => (
                        "unet step 768px b2 F16, CUDA graph replay",
                        format!("not capturable: {e:#}"),
                        None,
                    ),
                };
                rows.push(Row {
                    what: what.into(),
                    value,
                    ok,
                });
            }
            rows.push(Row {
                what: format!("unet step {}px b2 {dt:?}", s * 8),
                value: format!("{ms:.2} ms, peak {peak:.0} MiB, ~{used:.0} MiB used"),
                ok: None,
            });
        }
        drop(unet);
    }
    // One added-KV attention block of the UNet at the 48×48 level (768 px), alone.
    {
        let vb = random_var_builder(DType::F16, dev);
        let block = kandinsky_unet::attention_processor::Attention::new(vb, 768, 64, 768, 32)?;
        let x = Tensor::randn(0f32, 1.0, (2, 768, 48, 48), dev)?.to_dtype(DType::F16)?;
        let e = Tensor::randn(0f32, 1.0, (2, 32, 768), dev)?.to_dtype(DType::F16)?;
        let ms = time(dev, 2, iters, || {
            block.forward(&x, &e)?;
            Ok(())
        })?;
        rows.push(Row {
            what: "unet attention block 48x48 C768 F16".into(),
            value: format!("{ms:.3} ms"),
            ok: None,
        });
    }
    // Where a step's time goes, without a profiler: the host cost of one small candle op
    // (launch + allocation + free; a 768 px step issues a few thousand) and the UNet's
    // largest convolution alone (candle: im2col + cuBLAS GEMM + NHWC→NCHW copy, or cuDNN
    // with the `cudnn` feature).
    {
        let a = Tensor::ones((2, 1280), DType::F16, dev)?;
        let n = 2000;
        let ms = time(dev, 1, 3, || {
            let mut t = a.clone();
            for _ in 0..n {
                t = (&t + &a)?;
            }
            Ok(())
        })?;
        rows.push(Row {
            what: format!("host cost per small op ({n} adds of 2x1280 F16)"),
            value: format!("{:.2} us", ms * 1e3 / n as f64),
            ok: None,
        });
        for (c, s) in [(384usize, 96usize), (768, 48), (1536, 24)] {
            let vb = random_var_builder(DType::F16, dev);
            let w = vb.get((c, c, 3, 3), "w")?;
            let x = Tensor::randn(0f32, 1.0, (2, c, s, s), dev)?.to_dtype(DType::F16)?;
            let ms = time(dev, 2, iters, || {
                x.conv2d(&w, 1, 1, 1, 1)?;
                Ok(())
            })?;
            let flops = 2.0 * 2.0 * (s * s) as f64 * (c * c * 9) as f64;
            rows.push(Row {
                what: format!("conv3x3 {c}->{c} {s}x{s} b2 F16"),
                value: format!("{ms:.3} ms ({:.0} TFLOP/s)", flops / ms / 1e9),
                ok: None,
            });
        }
    }
    if std::env::args().any(|a| a == "--unet-only") {
        return Ok(());
    }
    let movq_cfg: kandinsky_movq::VQModelConfig = cfg("kandinsky-2-2-decoder__movq.json")?;
    let movq = kandinsky_movq::VQModel::new(random_var_builder(DType::F16, dev), &movq_cfg)?;
    for px in [512usize, 768, 1024] {
        let z = Tensor::randn(0f32, 1.0, (1, 4, px / 8, px / 8), dev)?.to_dtype(DType::F16)?;
        let ms = time(dev, 1, iters.min(5), || {
            movq.decode(&z, true)?;
            Ok(())
        })?;
        reset_peak(dev);
        let out = movq.decode(&z, true)?;
        let peak = peak_mib(dev);
        let finite = out
            .to_dtype(DType::F32)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?
            .is_finite();
        rows.push(Row {
            what: format!("movq decode {px}px F16"),
            value: format!("{ms:.2} ms, peak {peak:.0} MiB"),
            ok: Some(finite),
        });
    }
    drop(movq);
    let prior_cfg: kandinsky_prior::PriorTransformerConfig =
        cfg("kandinsky-2-2-prior__prior.json")?;
    let prior =
        kandinsky_prior::PriorTransformer::new(random_var_builder(DType::F16, dev), &prior_cfg)?;
    let lat = Tensor::randn(0f32, 1.0, (2, 1280), dev)?.to_dtype(DType::F16)?;
    let pe = Tensor::randn(0f32, 1.0, (2, 1280), dev)?.to_dtype(DType::F16)?;
    let hs = Tensor::randn(0f32, 1.0, (2, 77, 1280), dev)?.to_dtype(DType::F16)?;
    let mask = Tensor::ones((2, 77), DType::U8, dev)?;
    let pc = PriorCondition {
        proj_embedding: &pe,
        encoder_hidden_states: &hs,
        attention_mask: &mask,
    };
    let ms = time(dev, 2, iters, || {
        prior.predict(&lat, 500.0, &pc)?;
        Ok(())
    })?;
    rows.push(Row {
        what: "prior step b2 F16".into(),
        value: format!("{ms:.2} ms"),
        ok: None,
    });
    // As the pipeline runs it: the text tokens' keys and values prepared once, a step runs
    // 3 of the 81 tokens; eagerly and replayed from a graph. Checked against the full step.
    {
        let prepared = prior.prepare(&pc)?;
        let graphed = kandinsky_prior::GraphedPrior::new(&prior);
        let full = prior.predict(&lat, 500.0, &pc)?;
        for (what, p) in [
            ("prior step b2 F16, prepared", &prior as &dyn EmbeddingPrior),
            ("prior step b2 F16, prepared, CUDA graph replay", &graphed),
        ] {
            let ms = time(dev, 2, iters, || {
                p.predict_prepared(&lat, 500.0, &prepared)?;
                Ok(())
            })?;
            let d = diff(&p.predict_prepared(&lat, 500.0, &prepared)?, &full)?;
            rows.push(Row {
                what: format!("{what}: ms / rel diff vs full step"),
                value: format!("{ms:.2} ms / {:.1e}", d.rel),
                // f16 through 20 layers, summed in another order: as the f16 checks allow.
                ok: Some(d.rel <= 5e-3),
            });
        }
    }
    drop(prior);
    let text_cfg: kandinsky_clip::ClipTextConfig = cfg("kandinsky-2-2-prior__text_encoder.json")?;
    let te = kandinsky_clip::ClipTextModelWithProjection::new(
        random_var_builder(DType::F16, dev),
        &text_cfg,
    )?;
    let ids = Tensor::from_vec(
        (0..154u32).map(|i| (i * 331) % 49000).collect::<Vec<_>>(),
        (2, 77),
        dev,
    )?;
    let ms = time(dev, 2, iters, || {
        te.encode_text(&ids, None)?;
        Ok(())
    })?;
    rows.push(Row {
        what: "clip text encoder b2x77 F16".into(),
        value: format!("{ms:.2} ms"),
        ok: None,
    });
    drop(te);
    // The whole flow the performance goal names: 768 px, 25 prior + 50 decoder steps
    // (`--no-text2img` skips it, for the A/B parts of run.sh).
    if std::env::args().any(|a| a == "--no-text2img") {
        return Ok(());
    }
    rows.extend(text2img_flow(
        dev,
        DType::F16,
        768,
        (25, 50),
        if quick { 1 } else { 3 },
    )?);
    Ok(())
}

/// A tokenizer stand-in for timing: 77 fixed ids (the networks' cost does not depend on them).
struct FixedTokens;

impl kandinsky_pipeline::prior::PromptTokenizer for FixedTokens {
    fn tokenize(
        &self,
        prompts: &[String],
    ) -> kandinsky_core::Result<kandinsky_pipeline::prior::Tokens> {
        let b = prompts.len();
        let ids: Vec<u32> = (0..b * 77).map(|i| (i as u32 * 331) % 49000).collect();
        Ok(kandinsky_pipeline::prior::Tokens {
            ids: Tensor::from_vec(ids, (b, 77), &Device::Cpu)?,
            mask: Tensor::ones((b, 77), DType::U32, &Device::Cpu)?,
        })
    }
}

/// The whole text2img flow at `px` with full-size random-weight networks (real configs),
/// through the pipeline's functional API: CLIP text, `steps.0` prior steps (UnCLIP, CFG),
/// `steps.1` decoder steps (DDPM, CFG), MoVQ decode; one warm-up run, then the median of
/// `runs`. Returns rows: total and per stage (ms).
fn text2img_flow(
    dev: &Device,
    dt: DType,
    px: usize,
    steps: (usize, usize),
    runs: usize,
) -> Result<Vec<Row>> {
    use kandinsky_pipeline::{decoder, prior};
    let text_cfg: kandinsky_clip::ClipTextConfig = cfg("kandinsky-2-2-prior__text_encoder.json")?;
    let text_encoder =
        kandinsky_clip::ClipTextModelWithProjection::new(random_var_builder(dt, dev), &text_cfg)?;
    let prior_cfg: kandinsky_prior::PriorTransformerConfig =
        cfg("kandinsky-2-2-prior__prior.json")?;
    let prior_model =
        kandinsky_prior::PriorTransformer::new(random_var_builder(dt, dev), &prior_cfg)?;
    let unet_cfg: kandinsky_unet::UNet2DConditionConfig = cfg("kandinsky-2-2-decoder__unet.json")?;
    let unet = kandinsky_unet::UNet2DConditionModel::new(random_var_builder(dt, dev), &unet_cfg)?;
    let movq_cfg: kandinsky_movq::VQModelConfig = cfg("kandinsky-2-2-decoder__movq.json")?;
    let movq = kandinsky_movq::VQModel::new(random_var_builder(dt, dev), &movq_cfg)?;
    let tiny = fixtures_dir().join("tiny");
    let mut prior_sched = kandinsky_schedulers::AnyScheduler::from_file(
        tiny.join("kandinsky-2-2-prior/scheduler/scheduler_config.json"),
    )?;
    let mut decoder_sched = kandinsky_schedulers::AnyScheduler::from_file(
        tiny.join("kandinsky-2-2-decoder/scheduler/scheduler_config.json"),
    )?;
    let zero = Tensor::zeros((1, EmbeddingPrior::embedding_dim(&prior_model)), dt, dev)?;
    let graphed = kandinsky_unet::GraphedUNet::new(&unet);
    let graphed_prior = kandinsky_prior::GraphedPrior::new(&prior_model);
    // The denoising loops eagerly, then (CUDA) replaying the prior and the UNet from graphs.
    let mut rows = Vec::new();
    let mut finals: Vec<Tensor> = Vec::new();
    for use_graph in [false, true] {
        if use_graph && !dev.is_cuda() {
            continue;
        }
        let prior_models = PriorModels {
            tokenizer: &FixedTokens,
            text_encoder: &text_encoder,
            prior: if use_graph {
                &graphed_prior
            } else {
                &prior_model
            },
        };
        let decoder_models = decoder::DecoderModels {
            unet: if use_graph { &graphed } else { &unet },
            movq: &movq,
            text: None,
        };
        let mut last = None;
        let mut once = || -> Result<[f64; 3]> {
            sync(dev)?;
            let t0 = Instant::now();
            let e = prior::prior(
                &prior_models,
                &mut prior_sched,
                &["a red cat on a sofa".into()],
                None,
                &zero,
                &PriorOptions {
                    steps: steps.0,
                    ..Default::default()
                },
                &mut Hooks::default(),
            )?;
            sync(dev)?;
            let t1 = Instant::now();
            let latents = decoder::text2img(
                &decoder_models,
                &mut decoder_sched,
                &e.image_embeds,
                &e.negative_image_embeds,
                &DecoderOptions {
                    height: px,
                    width: px,
                    steps: steps.1,
                    ..Default::default()
                },
                None,
                &mut Hooks::default(),
            )?;
            sync(dev)?;
            let t2 = Instant::now();
            last = Some(decoder::decode(&movq, &latents)?);
            sync(dev)?;
            let t3 = Instant::now();
            let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
            Ok([ms(t0, t1), ms(t1, t2), ms(t2, t3)])
        };
        let what = format!(
            "text2img {px}px {dt:?}: {} prior + {} decoder steps (CFG) + decode{}",
            steps.0,
            steps.1,
            if use_graph {
                ", prior and UNet from CUDA graphs"
            } else {
                ""
            }
        );
        let mut measure = || -> Result<String> {
            once()?;
            reset_peak(dev);
            let mut all = (0..runs.max(1))
                .map(|_| once())
                .collect::<Result<Vec<_>>>()?;
            let peak = peak_mib(dev);
            all.sort_by(|a, b| a.iter().sum::<f64>().total_cmp(&b.iter().sum::<f64>()));
            let [p, d, m] = all[all.len() / 2];
            Ok(format!(
                "{:.0} ms (prior {p:.0} / decoder {d:.0} / decode {m:.0}), peak {peak:.0} MiB",
                p + d + m
            ))
        };
        // The graphed flow is new on the GPU: its failure is a failed row, not the end of
        // the run.
        let row = match measure() {
            // A failed capture falls back to eager (with a warning): say so.
            Ok(value) if use_graph && !(graphed.is_captured() && graphed_prior.is_captured()) => {
                Row {
                    what,
                    value: format!(
                        "{value}; NOT captured (UNet {}, prior {}), ran eagerly",
                        graphed.is_captured(),
                        graphed_prior.is_captured()
                    ),
                    ok: Some(false),
                }
            }
            Ok(value) => Row {
                what,
                value,
                ok: None,
            },
            Err(e) if use_graph => Row {
                what,
                value: format!("ERROR {e:#}"),
                ok: Some(false),
            },
            Err(e) => return Err(e),
        };
        finals.extend(last);
        rows.push(row);
    }
    // Same seed, same kernels in the same order: the graph's image equals the eager one.
    if let [eager, replayed] = &finals[..] {
        let d = diff(replayed, eager)?;
        rows.push(Row {
            what: format!("text2img {px}px {dt:?}, CUDA graph vs eager image: rel diff"),
            value: format!("{:.1e}", d.rel),
            ok: Some(d.rel <= 1e-3 && !d.rel.is_nan()),
        });
    }
    Ok(rows)
}

/// Run `f` twice to warm up, then once inside the CUDA profiler range (`cuProfilerStart`/
/// `Stop`), so `ncu --profile-from-start off` records exactly one run's kernels.
fn profile_range<F: FnMut() -> Result<()>>(dev: &Device, mut f: F) -> Result<()> {
    f()?;
    f()?;
    sync(dev)?;
    #[cfg(feature = "cuda")]
    unsafe {
        candle_core::cuda_backend::cudarc::driver::sys::cuProfilerStart().result()?;
    }
    f()?;
    sync(dev)?;
    #[cfg(feature = "cuda")]
    unsafe {
        candle_core::cuda_backend::cudarc::driver::sys::cuProfilerStop().result()?;
    }
    Ok(())
}

/// `--profile unet|movq`: one f16 UNet step at 768 px (batch 2) or one MoVQ decode at 768 px.
fn profile(dev: &Device, what: &str) -> Result<()> {
    match what {
        "unet" => {
            let c: kandinsky_unet::UNet2DConditionConfig = cfg("kandinsky-2-2-decoder__unet.json")?;
            let unet =
                kandinsky_unet::UNet2DConditionModel::new(random_var_builder(DType::F16, dev), &c)?;
            let x = Tensor::randn(0f32, 1.0, (2, 4, 96, 96), dev)?.to_dtype(DType::F16)?;
            let cond = DenoiserCondition {
                image_embeds: Some(Tensor::randn(0f32, 1.0, (2, 1280), dev)?.to_dtype(DType::F16)?),
                ..Default::default()
            };
            profile_range(dev, || {
                unet.predict(&x, &[500.0, 500.0], &cond)?;
                Ok(())
            })
        }
        "movq" => {
            let c: kandinsky_movq::VQModelConfig = cfg("kandinsky-2-2-decoder__movq.json")?;
            let movq = kandinsky_movq::VQModel::new(random_var_builder(DType::F16, dev), &c)?;
            let z = Tensor::randn(0f32, 1.0, (1, 4, 96, 96), dev)?.to_dtype(DType::F16)?;
            profile_range(dev, || {
                movq.decode(&z, true)?;
                Ok(())
            })
        }
        other => anyhow::bail!("--profile takes unet or movq, not {other:?}"),
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--profile") {
        let dev = kandinsky_core::device::cuda_device(0)?;
        return profile(&dev, args.get(i + 1).map(String::as_str).unwrap_or(""));
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let only_timings = std::env::args().any(|a| a == "--timings-only");
    // As `kandinsky_core::device::cuda_device`, but saying what happened to the tuning.
    let dev = Device::new_cuda(0).unwrap_or_else(|e| {
        eprintln!("no CUDA device ({e}): running on the CPU");
        Device::Cpu
    });
    let tuning = if !dev.is_cuda() {
        String::new()
    } else if std::env::var_os(kandinsky_core::device::CUDA_DEFAULTS_ENV).is_some() {
        ", CUDA pool/event tuning off (KANDINSKY_CUDA_DEFAULTS)".into()
    } else {
        match kandinsky_core::device::tune_cuda(&dev) {
            Ok(()) => ", CUDA pool/event tuning on".into(),
            Err(e) => format!(", CUDA pool/event tuning FAILED: {e}"),
        }
    };
    eprintln!("device: {dev:?}{tuning}");
    let kernels_only = std::env::args().any(|a| a == "--kernels-only");
    let mut rows = Vec::new();
    if args.iter().any(|a| a == "--text2img-only") {
        let value = |flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .and_then(|i| args.get(i + 1))
                .cloned()
        };
        let px: usize = value("--px").map_or(Ok(768), |v| v.parse())?;
        let steps = match value("--steps") {
            Some(v) => {
                let (p, d) = v
                    .split_once(',')
                    .context("--steps takes PRIOR,DECODER (e.g. 25,50)")?;
                (p.parse()?, d.parse()?)
            }
            None => (25, 50),
        };
        let dt = if dev.is_cuda() {
            DType::F16
        } else {
            DType::F32
        };
        rows.extend(text2img_flow(&dev, dt, px, steps, 1)?);
        for r in &rows {
            println!("{:<62} {}", r.what, r.value);
        }
        return Ok(());
    }
    // A part that fails as a whole becomes one failed row; the others still run.
    fn record(what: &str, r: Result<()>, rows: &mut Vec<Row>) {
        if let Err(e) = r {
            rows.push(Row {
                what: what.into(),
                value: format!("ERROR {e:#}"),
                ok: Some(false),
            });
        }
    }
    if args.iter().any(|a| a == "--conv-gemm-only") {
        #[cfg(feature = "cuda")]
        {
            let r = conv_gemm_rows(&dev, &mut rows);
            record("conv gemm", r, &mut rows);
        }
        #[cfg(not(feature = "cuda"))]
        anyhow::bail!("--conv-gemm-only needs the cuda feature");
    } else if let Some(i) = args.iter().position(|a| a == "--attention-only") {
        // An optional comma-separated list of kernels follows.
        let listed: Vec<&str> = match args.get(i + 1) {
            Some(l) if !l.starts_with("--") => l.split(',').collect(),
            _ => Vec::new(),
        };
        let kernels: Vec<&str> = if !dev.is_cuda() {
            attention_kernels(&dev)
        } else if listed.is_empty() {
            NEW_ATTENTION_KERNELS.to_vec()
        } else {
            listed
        };
        let r = attention_rows(&dev, &mut rows, &kernels);
        record("attention", r, &mut rows);
    } else {
        if !only_timings && !kernels_only {
            let r = parity(&dev, &mut rows);
            record("parity", r, &mut rows);
        }
        if !only_timings {
            let r = kernels(&dev, &mut rows);
            record("kernels", r, &mut rows);
        }
        if !kernels_only {
            let r = timings(&dev, &mut rows, quick);
            record("timings", r, &mut rows);
        }
    }
    println!("\n{:<62} {:<40} ok", "check", "value");
    for r in &rows {
        let ok = match r.ok {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "",
        };
        println!("{:<62} {:<40} {ok}", r.what, r.value);
    }
    let failed = rows.iter().filter(|r| r.ok == Some(false)).count();
    println!(
        "GPU_CHECK: {} checks, {failed} failed",
        rows.iter().filter(|r| r.ok.is_some()).count()
    );
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
