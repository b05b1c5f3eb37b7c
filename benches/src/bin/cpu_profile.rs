//! Where the CPU time of a `cpu_compare` workload goes: times the pieces of one workload
//! separately (f32, random weights, the thread count of `RAYON_NUM_THREADS`), and candidate
//! rewrites of the slow pieces built from candle ops, so a proposed change to a model crate
//! can be measured before it is made.
//!
//! `cpu_profile attention [--level 32] [--reps 3]`: the attention entry point's steps
//! (segment concatenation, kᵀ copy, q·kᵀ, scale, softmax, p·v) and variants of the whole.
//! `cpu_profile movq [--reps 3]`: the MoVQ decoder's pieces at their 256 px shapes (batch 1):
//! a `ResnetBlockCondNorm2D`, its SpatialNorm+SiLU, its banded 3×3 convolution, candle's own
//! convolution at the same shape, the fused upsample convolution.
//! `cpu_profile unet [--px 256] [--reps 3]`: the decoder UNet's pieces at their shapes (batch 2):
//! a ResNet block per level, its GroupNorm+SiLU, its 3×3 convolution (the packed kernel,
//! Winograd or direct as chosen), an attention block per level.
//! `cpu_profile linear [--reps 5]`: the packed linear layer against candle's at the UNet
//! attention blocks' token shapes.
//! `cpu_profile clip [--reps 5]`: one CLIP bigG text encoder layer (batch 2 × 77 tokens) and
//! its pieces: the LayerNorms, the q/k/v/out and MLP linear layers, the GELU, the causal
//! attention, the head split/merge copies and the residual adds.
//! `cpu_profile conv [--reps 5]`: the packed 3×3 convolution alone at the UNet's and MoVQ's
//! shapes (minimum time, GFLOP/s).

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use kandinsky_core::attention::{attention, plain, KvSegment};

fn time<T>(reps: usize, mut f: impl FnMut() -> Result<T>) -> Result<f64> {
    f()?;
    let mut ms = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    Ok(ms[ms.len() / 2])
}

/// The minimum ms of each of `fs` over `reps` runs after one warm-up, the functions taking
/// turns so that all see the same (shared) machine.
fn min_ms_alternating<const N: usize>(
    reps: usize,
    mut fs: [&mut dyn FnMut() -> Result<Tensor>; N],
) -> Result<[f64; N]> {
    for f in fs.iter_mut() {
        f()?;
    }
    let mut best = [f64::MAX; N];
    for _ in 0..reps {
        for (b, f) in best.iter_mut().zip(fs.iter_mut()) {
            let t = Instant::now();
            f()?;
            *b = b.min(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(best)
}

fn row(what: &str, ms: f64) {
    println!("{what:<72} {ms:>9.1} ms");
}

fn arg(args: &[String], flag: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// softmax(q·kᵀ·scale)·v with the scale folded into q (a `[Lq, D]` pass instead of an
/// `[Lq, Lk]` one) and the queries in chunks of `rows` per batch·head.
fn chunked_prescaled(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    rows: usize,
) -> candle_core::Result<Tensor> {
    let (_, _, lq, _) = q.dims4()?;
    let q = (q * scale)?;
    let kt = k.transpose(2, 3)?.contiguous()?;
    let v = v.contiguous()?;
    let mut outs = Vec::new();
    let mut s = 0;
    while s < lq {
        let n = rows.min(lq - s);
        let qc = q.narrow(2, s, n)?.contiguous()?;
        let p = candle_nn::ops::softmax_last_dim(&qc.matmul(&kt)?)?;
        outs.push(p.matmul(&v)?);
        s += n;
    }
    Tensor::cat(&outs, 2)
}

fn attention_profile(args: &[String]) -> Result<()> {
    let reps = arg(args, "--reps", 3);
    let level = arg(args, "--level", 32);
    let dev = Device::Cpu;
    let (b, h, n, d) = (2, 12, level * level, 64);
    let scale = 0.125;
    println!(
        "attention b{b} h{h} q{n} k32+{n} d{d}, {} threads",
        candle_core::utils::get_num_threads()
    );
    let q = Tensor::randn(0f32, 1.0, (b, h, n, d), &dev)?;
    let ki = Tensor::randn(0f32, 1.0, (b, h, 32, d), &dev)?;
    let vi = Tensor::randn(0f32, 1.0, (b, h, 32, d), &dev)?;
    let ks = Tensor::randn(0f32, 1.0, (b, h, n, d), &dev)?;
    let vs = Tensor::randn(0f32, 1.0, (b, h, n, d), &dev)?;
    let segs = [KvSegment { k: &ki, v: &vi }, KvSegment { k: &ks, v: &vs }];
    row(
        "entry point `attention` (as cpu_compare)",
        time(reps, || Ok(attention(&q, &segs, None, scale)?))?,
    );
    let k = Tensor::cat(&[&ki, &ks], 2)?;
    let v = Tensor::cat(&[&vi, &vs], 2)?;
    row(
        "  cat segments (k and v)",
        time(reps, || {
            Ok((Tensor::cat(&[&ki, &ks], 2)?, Tensor::cat(&[&vi, &vs], 2)?))
        })?,
    );
    row(
        "  `plain` on concatenated k, v",
        time(reps, || Ok(plain(&q, &k, &v, None, scale)?))?,
    );
    let kt = k.transpose(2, 3)?.contiguous()?;
    row(
        "    kᵀ contiguous copy",
        time(reps, || Ok(k.transpose(2, 3)?.contiguous()?))?,
    );
    row("    q·kᵀ (matmul)", time(reps, || Ok(q.matmul(&kt)?))?);
    let scores = q.matmul(&kt)?;
    row("    scores × scale", time(reps, || Ok((&scores * scale)?))?);
    row(
        "    softmax_last_dim",
        time(reps, || Ok(candle_nn::ops::softmax_last_dim(&scores)?))?,
    );
    let p = candle_nn::ops::softmax_last_dim(&scores)?;
    row("    p·v (matmul)", time(reps, || Ok(p.matmul(&v)?))?);
    row("    q × scale (instead)", time(reps, || Ok((&q * scale)?))?);
    let reference = plain(&q, &k, &v, None, scale)?;
    let mut chunk_rows = vec![n, 1024, 256, 64];
    chunk_rows.retain(|&r| r <= n);
    chunk_rows.dedup();
    for rows in chunk_rows {
        let out = chunked_prescaled(&q, &k, &v, scale, rows)?;
        let err = (out - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        row(
            &format!("variant: scale folded into q, {rows} query rows per chunk (err {err:.1e})"),
            time(reps, || Ok(chunked_prescaled(&q, &k, &v, scale, rows)?))?,
        );
    }
    Ok(())
}

fn movq_profile(args: &[String]) -> Result<()> {
    use candle_core::DType;
    use kandinsky_core::nn::Activation;
    use kandinsky_movq::attention_processor::NormKind;
    use kandinsky_movq::conv::{Conv2d, Padding};
    use kandinsky_movq::resnet::ResnetBlock2D;
    let reps = arg(args, "--reps", 3);
    let dev = Device::Cpu;
    println!(
        "MoVQ decoder pieces (256 px decode), {} threads",
        candle_core::utils::get_num_threads()
    );
    let norm = NormKind::Spatial { zq_channels: 4 };
    let zq = Tensor::randn(0f32, 1.0, (1, 4, 32, 32), &dev)?;
    // (channels, side, how many of this resnet a 256 px decode runs)
    for (c, side, count) in [
        (512usize, 32usize, 5usize),
        (256, 64, 3),
        (256, 128, 3),
        (128, 256, 3),
    ] {
        let vb = kandinsky_benches::random_var_builder(DType::F32, &dev);
        let block = ResnetBlock2D::new(c, c, Activation::Silu, norm, vb.pp("r"))?;
        let n = norm.build(c, vb.pp("n"))?;
        let conv = Conv2d::new(c, c, 3, 1, Padding::same(1), vb.pp("c"))?;
        let x = Tensor::randn(0f32, 1.0, (1, c, side, side), &dev)?;
        let flops = 2.0 * (c * c * 9 * side * side) as f64;
        println!("-- {c} channels at {side}x{side} (×{count} resnets per decode)");
        row(
            "resnet block (2 × (SpatialNorm+SiLU, conv 3×3))",
            time(reps, || Ok(block.forward(&x, Some(&zq))?))?,
        );
        row(
            "  SpatialNorm + SiLU",
            time(reps, || {
                Ok(n.forward(&x, Some(&zq), Some(Activation::Silu))?)
            })?,
        );
        // The norm alone, with the two 1×1-convolution outputs at latent resolution as
        // SpatialNorm passes them: the fused CPU loop against the banded candle ops.
        let gn = kandinsky_movq::normalization::GroupNorm::new(32, c, 1e-6, vb.pp("gn"))?;
        let ys = Tensor::randn(0f32, 1.0, (1, c, 32, 32), &dev)?;
        let yb = Tensor::randn(0f32, 1.0, (1, c, 32, 32), &dev)?;
        let m = Some(kandinsky_movq::normalization::Modulation {
            scale: &ys,
            shift: &yb,
        });
        let silu = Some(Activation::Silu);
        let fused = gn.forward(&x, m, silu)?;
        let banded = gn.forward_banded(&x, m, silu)?;
        let err = (fused - banded)?.abs()?.max_all()?.to_scalar::<f32>()?;
        row(
            "    GN·y+b+SiLU, `forward` (fused CPU loop unless PLAIN_KERNELS)",
            time(reps, || Ok(gn.forward(&x, m, silu)?))?,
        );
        row(
            &format!("    GN·y+b+SiLU, banded candle ops (diff {err:.0e})"),
            time(reps, || Ok(gn.forward_banded(&x, m, silu)?))?,
        );
        let ms = time(reps, || Ok(conv.forward(&x)?))?;
        row(
            &format!("  banded conv 3×3 ({:.0} GFLOP/s)", flops / ms / 1e6),
            ms,
        );
        let w = Tensor::randn(0f32, 0.02, (c, c, 3, 3), &dev)?;
        let ms = time(reps, || Ok(x.conv2d(&w, 1, 1, 1, 1)?))?;
        row(
            &format!(
                "  candle conv2d 3×3, same shape ({:.0} GFLOP/s)",
                flops / ms / 1e6
            ),
            ms,
        );
        // The GEMM alone: [c, 9c] × [9c, side²] (what an im2col convolution must do).
        let a = Tensor::randn(0f32, 1.0, (c, 9 * c), &dev)?;
        let bm = Tensor::randn(0f32, 1.0, (9 * c, side * side), &dev)?;
        let ms = time(reps, || Ok(a.matmul(&bm)?))?;
        row(
            &format!(
                "  bare GEMM of the same size ({:.0} GFLOP/s)",
                flops / ms / 1e6
            ),
            ms,
        );
        if side >= 64 {
            let half = Tensor::randn(0f32, 1.0, (1, c, side / 2, side / 2), &dev)?;
            row(
                "  fused nearest-2× upsample + conv 3×3 (Upsample2D)",
                time(reps, || Ok(conv.forward_upsample2x(&half)?))?,
            );
        }
    }
    Ok(())
}

/// The weight `[out, in, k, k]` as the `[out, k·k·in]` matrix of an im2col product, computed
/// once (what a convolution layer could keep from load time instead of rebuilding per call).
fn weight_matrix(w: &Tensor) -> candle_core::Result<Tensor> {
    let (o, i, k, _) = w.dims4()?;
    w.permute((0, 2, 3, 1))?
        .contiguous()?
        .reshape((o, k * k * i))
}

/// 3×3, stride 1, padding 1 convolution as im2col (k² shifted views, one copy) and one GEMM
/// per batch item with a precomputed weight matrix `wm` (see [`weight_matrix`]).
fn conv3x3_cached(x: &Tensor, wm: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let xp = x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
    let mut taps = Vec::with_capacity(9);
    for kh in 0..3 {
        for kw in 0..3 {
            taps.push(xp.narrow(2, kh, h)?.narrow(3, kw, w)?);
        }
    }
    let col = Tensor::cat(&taps, 1)?.reshape((b, 9 * c, h * w))?;
    let mut outs = Vec::with_capacity(b);
    for i in 0..b {
        outs.push(wm.matmul(&col.get(i)?)?);
    }
    let o = wm.dim(0)?;
    Tensor::stack(&outs, 0)?
        .reshape((b, o, h, w))?
        .broadcast_add(&bias.reshape((1, o, 1, 1))?)
}

fn unet_profile(args: &[String]) -> Result<()> {
    use candle_core::{DType, Module};
    use kandinsky_core::nn::{Activation, Conv2dConfig};
    use kandinsky_unet::resnet::{Resample, ResnetBlock2D, ResnetSettings};
    let reps = arg(args, "--reps", 3);
    let px = arg(args, "--px", 256);
    let dev = Device::Cpu;
    println!(
        "decoder UNet pieces ({px} px, batch 2), {} threads",
        candle_core::utils::get_num_threads()
    );
    let settings = ResnetSettings {
        temb_channels: 1536,
        groups: 32,
        eps: 1e-5,
        act: Activation::Silu,
        skip_time_act: false,
        output_scale_factor: 1.0,
    };
    let temb = Tensor::randn(0f32, 1.0, (2, 1536), &dev)?;
    let emb = Tensor::randn(0f32, 1.0, (2, 32, 768), &dev)?;
    // (channels, side, resnets per step: 3 down + 4 up per level (+2 mid at the bottom))
    for (c, side, count) in [
        (384usize, 32usize, 7usize),
        (768, 16, 7),
        (1152, 8, 7),
        (1536, 4, 9),
    ] {
        let side = side * px / 256;
        let vb = kandinsky_benches::random_var_builder(DType::F32, &dev);
        let block = ResnetBlock2D::new(vb.pp("r"), c, c, Resample::None, &settings)?;
        let gn = kandinsky_core::nn::group_norm(32, c, 1e-5, vb.pp("gn"))?;
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv = kandinsky_unet::layers::conv2d(c, c, 3, cfg, vb.pp("c"))?;
        let x = Tensor::randn(0f32, 1.0, (2, c, side, side), &dev)?;
        let flops = 2.0 * (2 * c * c * 9 * side * side) as f64;
        println!("-- {c} channels at {side}x{side} (×{count} resnets per step)");
        row(
            "resnet block (GN+SiLU, conv, time proj, GN, SiLU, conv)",
            time(reps, || Ok(block.forward(&x, &temb)?))?,
        );
        row(
            "  GroupNorm + SiLU (fused CPU loop unless PLAIN_KERNELS)",
            time(reps, || Ok(gn.forward_silu(&x)?))?,
        );
        let err = (gn.forward_silu(&x)? - gn.forward_plain(&x)?.silu()?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        row(
            &format!("  GroupNorm + SiLU, candle composite (diff {err:.0e})"),
            time(reps, || Ok(gn.forward_plain(&x)?.silu()?))?,
        );
        // The second norm of the block: GroupNorm, ·(1 + scale) + shift, SiLU.
        let scale = Tensor::randn(0f32, 0.5, (2, c, 1, 1), &dev)?;
        let shift = Tensor::randn(0f32, 0.5, (2, c, 1, 1), &dev)?;
        let m = Some(kandinsky_core::nn::NormModulation::ScaleShift {
            scale: &scale,
            shift: &shift,
        });
        row(
            "  GroupNorm + scale-shift + SiLU (fused unless PLAIN_KERNELS)",
            time(reps, || Ok(gn.forward_modulated(&x, m, true)?))?,
        );
        row(
            "  GroupNorm + scale-shift + SiLU, candle composite",
            time(reps, || {
                Ok(gn
                    .forward_plain(&x)?
                    .broadcast_mul(&(&scale + 1.0)?)?
                    .broadcast_add(&shift)?
                    .silu()?)
            })?,
        );
        let ms = time(reps, || Ok(conv.forward(&x)?))?;
        row(
            &format!(
                "  conv 3×3 as the UNet runs it ({:.0} direct-equivalent GFLOP/s)",
                flops / ms / 1e6
            ),
            ms,
        );
        let w = Tensor::randn(0f32, 0.02, (c, c, 3, 3), &dev)?;
        let bias = Tensor::randn(0f32, 0.02, c, &dev)?;
        let ms = time(reps, || Ok(weight_matrix(&w)?))?;
        row(
            "  weight → [out, 9·in] matrix (per call in both paths above)",
            ms,
        );
        let wm = weight_matrix(&w)?;
        let reference = x
            .conv2d(&w, 1, 1, 1, 1)?
            .broadcast_add(&bias.reshape((1, c, 1, 1))?)?;
        let err = (conv3x3_cached(&x, &wm, &bias)? - reference)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        let ms = time(reps, || Ok(conv3x3_cached(&x, &wm, &bias)?))?;
        row(
            &format!(
                "  variant: im2col + GEMM, weight matrix kept from load ({:.0} GFLOP/s, err {err:.0e})",
                flops / ms / 1e6
            ),
            ms,
        );
        if c != 384 {
            let head_dim = 64;
            let attn = kandinsky_unet::attention_processor::Attention::new(
                vb.pp("a"),
                c,
                head_dim,
                768,
                32,
            )?;
            row(
                "attention block (GN, q/k/v/add_k/add_v, attention, out)",
                time(reps, || Ok(attn.forward(&x, &emb)?))?,
            );
        }
    }
    Ok(())
}

/// The packed 3×3 convolution alone at the UNet's and MoVQ's shapes, direct (tap kernel or
/// im2col) against Winograd F(2×2, 3×3), the two alternating so that both see the same
/// machine; the minimum over `--reps` runs each (the machine is shared; the minimum is the
/// least disturbed run). GFLOP/s count the direct algorithm's 2·9·Cin·Cout per output.
fn conv_profile(args: &[String]) -> Result<()> {
    use kandinsky_core::cpu_conv::{Conv3x3Path, PackedConv3x3};
    let reps = arg(args, "--reps", 5);
    let dev = Device::Cpu;
    // As `cpu_compare` and the CLI run: freed buffers are reused, not page-faulted again.
    kandinsky_core::device::keep_freed_memory();
    println!(
        "packed conv 3×3, {} threads, min of {reps}, freed memory kept",
        candle_core::utils::get_num_threads()
    );
    println!(
        "{:<34} {:>16} {:>16} {:>9} {:>6}",
        "batch × cin → cout @ side", "direct", "winograd", "speedup", "auto"
    );
    // (batch, cin, cout, side): UNet levels at 256/512/768/1024 px (batch 2), its first
    // convolution, MoVQ decoder levels at 256/512 px (batch 1).
    for (b, cin, cout, side) in [
        (2usize, 4usize, 384usize, 64usize),
        (2, 384, 384, 32),
        (2, 384, 384, 64),
        (2, 384, 384, 96),
        (2, 768, 384, 64),
        (2, 768, 768, 16),
        (2, 768, 768, 32),
        (2, 768, 768, 48),
        (2, 1152, 1152, 8),
        (2, 1152, 1152, 16),
        (2, 1152, 1152, 24),
        (2, 1536, 1536, 4),
        (2, 1536, 1536, 8),
        (2, 1536, 1536, 16),
        (1, 512, 512, 32),
        (1, 512, 512, 64),
        (1, 256, 256, 128),
        (1, 128, 128, 256),
        (1, 128, 128, 512),
        (1, 128, 3, 256),
    ] {
        let w = Tensor::randn(0f32, 0.02, (cout, cin, 3, 3), &dev)?;
        let conv = PackedConv3x3::new(&w, None)?;
        let x = Tensor::randn(0f32, 1.0, (b, cin, side, side), &dev)?;
        let flops = 2.0 * (b * cin * cout * 9 * side * side) as f64;
        let best = min_ms_alternating(
            reps,
            [
                &mut || Ok(conv.forward_with(&x, false, Conv3x3Path::Direct)?),
                &mut || Ok(conv.forward_with(&x, false, Conv3x3Path::Winograd)?),
            ],
        )?;
        let cell = |ms: f64| format!("{ms:.1} ms {:>4.0}", flops / ms / 1e6);
        let auto = match conv.auto_path(b, side, side) {
            Conv3x3Path::Winograd => "wino",
            _ => "direct",
        };
        println!(
            "{:<34} {:>16} {:>16} {:>8.2}× {:>6}",
            format!("{b} × {cin} → {cout} @ {side}²"),
            cell(best[0]),
            cell(best[1]),
            best[0] / best[1],
            auto
        );
    }
    Ok(())
}

/// The linear layer (`kandinsky_core::nn::Linear`, packed weights) at the UNet attention
/// blocks' token shapes (batch 2 at 512 px) against candle's matmul on the same operands.
fn linear_profile(args: &[String]) -> Result<()> {
    let reps = arg(args, "--reps", 5);
    let dev = Device::Cpu;
    kandinsky_core::device::keep_freed_memory();
    println!(
        "linear layers, {} threads, min of {reps}",
        candle_core::utils::get_num_threads()
    );
    for (m, k, n) in [
        (2048usize, 768usize, 768usize),
        (512, 1152, 1152),
        (128, 1536, 1536),
        (154, 1280, 1280),
    ] {
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
        let b = Tensor::randn(0f32, 0.02, n, &dev)?;
        let packed = kandinsky_core::nn::Linear::new(w.copy()?, Some(b.clone()))?;
        let plain = candle_nn::Linear::new(w, Some(b));
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let flops = 2.0 * (m * k * n) as f64;
        let best = min_ms_alternating(
            reps,
            [
                &mut || Ok(candle_core::Module::forward(&packed, &x)?),
                &mut || Ok(candle_core::Module::forward(&plain, &x)?),
            ],
        )?;
        row(
            &format!(
                "{m} × {k} → {n}: packed {:.0} GFLOP/s, candle {:.0} GFLOP/s ({:.1} ms)",
                flops / best[0] / 1e6,
                flops / best[1] / 1e6,
                best[1]
            ),
            best[0],
        );
    }
    Ok(())
}

fn clip_profile(args: &[String]) -> Result<()> {
    use kandinsky_clip::modeling_clip::{ClipEncoderLayer, TowerDims};
    use kandinsky_core::attention::{merge_heads, split_heads};
    let reps = arg(args, "--reps", 5);
    let dev = Device::Cpu;
    kandinsky_core::device::keep_freed_memory();
    let (hidden, heads, inter, tokens) = (1280usize, 20usize, 5120usize, 77usize);
    let dims = TowerDims {
        hidden,
        intermediate: inter,
        heads,
        layers: 1,
        eps: 1e-5,
        act: kandinsky_core::nn::Activation::Gelu,
    };
    let vb = kandinsky_benches::random_var_builder(candle_core::DType::F32, &dev);
    let layer = ClipEncoderLayer::new(vb.pp("layer"), &dims)?;
    let x = Tensor::randn(0f32, 1.0, (2, tokens, hidden), &dev)?;
    let causal: Vec<f32> = (0..tokens * tokens)
        .map(|i| {
            if i % tokens > i / tokens {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(causal, (1, 1, tokens, tokens), &dev)?;
    println!(
        "CLIP bigG text layer, batch 2 × {tokens} tokens, {} threads, median of {reps}",
        candle_core::utils::get_num_threads()
    );
    row(
        "whole layer (× 32 layers ≈ the encoder)",
        time(reps, || Ok(layer.forward(&x, Some(&mask))?))?,
    );
    let w = |n, k| -> Result<kandinsky_core::nn::Linear> {
        Ok(kandinsky_core::nn::Linear::new(
            Tensor::randn(0f32, 0.02, (n, k), &dev)?,
            Some(Tensor::randn(0f32, 0.02, n, &dev)?),
        )?)
    };
    let (q, fc1, fc2) = (w(hidden, hidden)?, w(inter, hidden)?, w(hidden, inter)?);
    let (wk, wv, wo) = (w(hidden, hidden)?, w(hidden, hidden)?, w(hidden, hidden)?);
    let ln = candle_nn::LayerNorm::new(
        Tensor::ones(hidden, candle_core::DType::F32, &dev)?,
        Tensor::zeros(hidden, candle_core::DType::F32, &dev)?,
        1e-5,
    );
    let m = |l: &kandinsky_core::nn::Linear, t: &Tensor| candle_core::Module::forward(l, t);
    row(
        "layer norm",
        time(reps, || Ok(kandinsky_core::nn::layer_norm_f32(&ln, &x)?))?,
    );
    row(
        "one 1280 → 1280 linear (× 4: q, k, v, out)",
        time(reps, || Ok(m(&q, &x)?))?,
    );
    let h = m(&fc1, &x)?;
    row("fc1 1280 → 5120", time(reps, || Ok(m(&fc1, &x)?))?);
    row(
        "GELU on [2, 77, 5120]",
        time(reps, || Ok(kandinsky_core::nn::Activation::Gelu.apply(&h)?))?,
    );
    row("fc2 5120 → 1280", time(reps, || Ok(m(&fc2, &h)?))?);
    let qh = split_heads(&x, heads)?;
    row(
        "split_heads (× 3)",
        time(reps, || Ok(split_heads(&x, heads)?))?,
    );
    let scale = 1.0 / 8.0;
    row(
        "attention, causal mask",
        time(reps, || {
            Ok(attention(
                &qh,
                &[KvSegment { k: &qh, v: &qh }],
                Some(&mask),
                scale,
            )?)
        })?,
    );
    row(
        "attention, no mask",
        time(reps, || {
            Ok(attention(
                &qh,
                &[KvSegment { k: &qh, v: &qh }],
                None,
                scale,
            )?)
        })?,
    );
    let o = attention(&qh, &[KvSegment { k: &qh, v: &qh }], Some(&mask), scale)?;
    row("merge_heads", time(reps, || Ok(merge_heads(&o)?))?);
    row("residual add (× 2)", time(reps, || Ok((&x + &x)?))?);
    // The same pieces one after the other with their own weights, as in the layer: the
    // difference to the layer is the layer's own overhead, the difference to the sum of
    // the pieces above is the weights streaming from memory instead of the cache.
    let chained = || -> Result<Tensor> {
        let ln_ = |t: &Tensor| kandinsky_core::nn::layer_norm_f32(&ln, t);
        let h = ln_(&x)?;
        let (qq, kk, vv) = (
            split_heads(&m(&q, &h)?, heads)?,
            split_heads(&m(&wk, &h)?, heads)?,
            split_heads(&m(&wv, &h)?, heads)?,
        );
        let a = attention(&qq, &[KvSegment { k: &kk, v: &vv }], Some(&mask), scale)?;
        let x1 = (&x + m(&wo, &merge_heads(&a)?)?)?;
        let h = kandinsky_core::nn::Activation::Gelu.apply(&m(&fc1, &ln_(&x1)?)?)?;
        Ok((&x1 + m(&fc2, &h)?)?)
    };
    row("the pieces chained, own weights", time(reps, chained)?);
    row(
        "whole layer again",
        time(reps, || Ok(layer.forward(&x, Some(&mask))?))?,
    );
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("attention") => attention_profile(&args),
        Some("movq") => movq_profile(&args),
        Some("unet") => unet_profile(&args),
        Some("conv") => conv_profile(&args),
        Some("linear") => linear_profile(&args),
        Some("clip") => clip_profile(&args),
        _ => bail!(
            "usage: cpu_profile attention [--level 32|48] [--reps N] | movq [--reps N] \
             | unet [--px N] [--reps N] | conv [--reps N] | linear [--reps N] | clip [--reps N]"
        ),
    }
}
