//! The one attention entry point of kandinsky-rs.
//!
//! Every network calls [`attention`]; it picks the fastest path available for the device,
//! dtype and shape: a CUDA kernel (when built with the `cuda` feature and a kernel covers the
//! shape), a fused flash-style CPU kernel (blocks of queries stream the keys with an online
//! softmax, the additive mask added block by block), a query-chunked CPU path that never
//! materialises more than a bounded slice of the score matrix (masked attention when the
//! fused kernels are off, `KANDINSKY_PLAIN_KERNELS`), or the plain path. All paths compute
//! `softmax(q·kᵀ·scale + mask)·v` with the softmax in f32 for half-precision inputs
//! (diffusers' `upcast_softmax`).

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Keys and values of one segment of the key sequence, each `[B, H, L_i, D]`.
///
/// The UNet's added-KV attention has two segments (32 image tokens, then the spatial
/// tokens); passing them separately lets a kernel read both without a concatenation copy.
#[derive(Debug, Clone, Copy)]
pub struct KvSegment<'a> {
    /// Keys `[B, H, L_i, D]`.
    pub k: &'a Tensor,
    /// Values `[B, H, L_i, D]`.
    pub v: &'a Tensor,
}

/// Which implementation runs the attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionPath {
    /// Materialise the full score matrix.
    Plain,
    /// Process queries in chunks bounded by [`CHUNK_SCORE_BYTES`].
    ChunkedQueries,
    /// The fused CPU kernel (any attention on the CPU, the additive mask added to each score
    /// block).
    FusedCpu,
}

/// Largest score-matrix slice (in bytes of f32) the chunked path materialises at once.
pub const CHUNK_SCORE_BYTES: usize = 128 << 20;

/// False when `KANDINSKY_NO_FLASH` is set: attention then takes the plain path even where the
/// CUDA kernel covers the shape (to measure the kernel inside a model).
#[cfg(feature = "cuda")]
fn use_flash() -> bool {
    static FLASH: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FLASH.get_or_init(|| std::env::var_os("KANDINSKY_NO_FLASH").is_none())
}

/// The CUDA kernel the entry point launches for `dtype`, measured on an H200 at the UNet's
/// three levels (GPU run 10, TFLOP/s at 48×48 / 24×24 / 12×12): f16 takes Hopper's pipelined
/// wgmma kernel where the kernels were built for sm_90 (195 / 88 / 15 against the mma
/// kernel's 125 / 72 / 15), otherwise the 32-rows-per-warp one (168 / 75 / 15); bf16 the
/// 32-rows-per-warp one (136 / 66 / 13 against wgmma's 117 / 60 / 14 and mma's 104 / 59 /
/// 13). `KANDINSKY_FLASH=<name>` ([`crate::cuda::FlashKernel::NAMED`]) picks one for both.
#[cfg(feature = "cuda")]
fn flash_kernel(dtype: DType) -> crate::cuda::FlashKernel {
    use crate::cuda::FlashKernel;
    static CHOSEN: std::sync::OnceLock<Option<FlashKernel>> = std::sync::OnceLock::new();
    let chosen = *CHOSEN.get_or_init(|| {
        let name = std::env::var("KANDINSKY_FLASH").ok()?;
        let kernel = FlashKernel::from_name(&name);
        if kernel.is_none() {
            tracing::warn!("KANDINSKY_FLASH={name}: no such attention kernel, using the default");
        }
        kernel
    });
    chosen.unwrap_or(match dtype {
        DType::F16 if FlashKernel::WgmmaPipe.is_built() => FlashKernel::WgmmaPipe,
        _ => FlashKernel::Wide4,
    })
}

/// Whether the kernel reads the heads in the projections' `[B, L, H, D]` layout (no
/// split/merge copies): the default since GPU run 10 (768 px UNet step 21.1 → 19.0 ms on an
/// H200, same output); `KANDINSKY_FLASH_TOKEN_MAJOR=0` restores the head-major copies.
#[cfg(feature = "cuda")]
fn flash_token_major() -> bool {
    env_switch!("KANDINSKY_FLASH_TOKEN_MAJOR", default on)
}

/// Choose the path for these shapes (masked or not: every path takes the additive mask).
pub fn choose_path(device: &Device, b: usize, h: usize, lq: usize, lk: usize) -> AttentionPath {
    let score_bytes = b * h * lq * lk * 4;
    if device.is_cpu() && crate::nn::use_fused_kernels() {
        AttentionPath::FusedCpu
    } else if score_bytes > CHUNK_SCORE_BYTES && lq > 1 {
        // On CUDA too (MoVQ's one 512-wide head over 9216 tokens at 768 px: 340 MB of f32
        // scores at once otherwise, 1.1 GB at 1024 px).
        AttentionPath::ChunkedQueries
    } else {
        AttentionPath::Plain
    }
}

/// Scaled dot-product attention.
///
/// * `q`: `[B, H, Lq, D]`
/// * `kv`: one or more key/value segments, concatenated along the sequence in order
/// * `mask`: optional additive mask broadcastable to `[B, H, Lq, Lk]`
/// * returns `[B, H, Lq, D]` in the dtype of `q`.
pub fn attention(
    q: &Tensor,
    kv: &[KvSegment<'_>],
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (b, h, lq, d) = q.dims4()?;
    if kv.is_empty() {
        return Err(Error::invalid(
            "attention needs at least one key/value segment",
        ));
    }
    let mut lk = 0;
    for seg in kv {
        let (kb, kh, kl, kd) = seg.k.dims4()?;
        if (kb, kh, kd) != (b, h, d) || seg.v.dims4()? != (kb, kh, kl, kd) {
            return Err(Error::invalid(format!(
                "attention: q {:?} and k {:?} / v {:?} disagree",
                q.dims(),
                seg.k.dims(),
                seg.v.dims()
            )));
        }
        lk += kl;
    }
    #[cfg(feature = "cuda")]
    if crate::nn::use_fused_kernels()
        && use_flash()
        && crate::cuda::flash_covers(q, kv.len(), mask.is_some())
    {
        let kernel = flash_kernel(q.dtype());
        if flash_token_major() && kernel.reads_token_major() {
            // Heads split by `split_heads` are transposed views of the projections: back to
            // [B, L, H, D] they are contiguous, and the output goes back as a view.
            let tm = |t: &Tensor| t.transpose(1, 2);
            let kv_tm = kv
                .iter()
                .map(|s| Ok((tm(s.k)?, tm(s.v)?)))
                .collect::<Result<Vec<_>>>()?;
            let segs: Vec<(&Tensor, &Tensor)> = kv_tm.iter().map(|(k, v)| (k, v)).collect();
            let out = crate::cuda::flash_attention_token_major(&tm(q)?, &segs, scale, kernel)?;
            return Ok(out.transpose(1, 2)?);
        }
        let segs: Vec<(&Tensor, &Tensor)> = kv.iter().map(|s| (s.k, s.v)).collect();
        return Ok(crate::cuda::flash_attention_with(q, &segs, scale, kernel)?);
    }
    let path = choose_path(q.device(), b, h, lq, lk);
    if path == AttentionPath::FusedCpu {
        return crate::cpu_attention::flash_attention(q, kv, mask, scale);
    }
    let (k, v) = concat_segments(kv)?;
    match path {
        AttentionPath::Plain | AttentionPath::FusedCpu => plain(q, &k, &v, mask, scale),
        AttentionPath::ChunkedQueries => chunked_queries(q, &k, &v, mask, scale),
    }
}

/// The plain path over chunks of queries, each chunk's scores at most [`CHUNK_SCORE_BYTES`].
fn chunked_queries(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (b, h, lq, _) = q.dims4()?;
    let lk = k.dim(2)?;
    let rows = (CHUNK_SCORE_BYTES / (b * h * lk * 4)).max(1);
    let mut outs = Vec::with_capacity(lq.div_ceil(rows));
    let mut start = 0;
    while start < lq {
        let n = rows.min(lq - start);
        let qc = q.narrow(2, start, n)?;
        let mc = match mask {
            Some(m) if m.rank() == 4 && m.dim(2)? == lq => Some(m.narrow(2, start, n)?),
            Some(m) => Some(m.clone()),
            None => None,
        };
        outs.push(plain(&qc, k, v, mc.as_ref(), scale)?);
        start += n;
    }
    Ok(Tensor::cat(&outs, 2)?)
}

fn concat_segments(kv: &[KvSegment<'_>]) -> Result<(Tensor, Tensor)> {
    if kv.len() == 1 {
        return Ok((kv[0].k.clone(), kv[0].v.clone()));
    }
    let ks: Vec<&Tensor> = kv.iter().map(|s| s.k).collect();
    let vs: Vec<&Tensor> = kv.iter().map(|s| s.v).collect();
    Ok((Tensor::cat(&ks, 2)?, Tensor::cat(&vs, 2)?))
}

/// A key/value segment that many [`attention`] calls will read (a generation's image
/// tokens, [`KvSegment`] `[B, H, L, D]`) in the layout the entry point reads on this device
/// without converting it each call: f32 and contiguous for the fused CPU kernel; contiguous
/// heads on CUDA (token-major unless `KANDINSKY_FLASH_TOKEN_MAJOR=0`, still viewed as
/// `[B, H, L, D]`). Same shape and values. The f32 conversion happens only where the fused
/// CPU kernel runs (it reads every dtype as f32); with the fused kernels off the segment
/// keeps its dtype, which the plain path needs to match the query's.
pub fn prepare_segment(k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
    let f = |t: &Tensor| -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if t.device().is_cuda()
            && flash_token_major()
            && flash_kernel(t.dtype()).reads_token_major()
        {
            return Ok(t.transpose(1, 2)?.contiguous()?.transpose(1, 2)?);
        }
        if t.device().is_cpu() && crate::nn::use_fused_kernels() {
            return Ok(t.to_dtype(DType::F32)?.contiguous()?);
        }
        Ok(t.contiguous()?)
    };
    Ok((f(k)?, f(v)?))
}

/// The reference path: full scores, softmax in f32 (on CUDA without a mask one fused kernel
/// for the scale and the softmax, `cuda::softmax_scaled`).
pub fn plain(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let dtype = q.dtype();
    let q = q.contiguous()?;
    // On CUDA without a mask: f16/bf16 scores come out of the GEMM in f32, and one kernel
    // scales, exponentiates in f32 and normalises them (candle's ops: 16-bit scores, a scale
    // pass, an upcast, an f32 softmax and a downcast).
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() && mask.is_none() && crate::nn::use_fused_kernels() {
        let probs = if matches!(dtype, DType::F16 | DType::BF16) {
            let scores = crate::cuda::attention_scores_f32(&q, k)?;
            crate::cuda::softmax_scaled_to(&scores, scale, dtype)?
        } else {
            crate::cuda::softmax_scaled(&q.matmul(&k.transpose(2, 3)?.contiguous()?)?, scale)?
        };
        return Ok(probs.matmul(&v.contiguous()?)?);
    }
    let kt = k.transpose(2, 3)?.contiguous()?;
    let scores = (q.matmul(&kt)? * scale)?;
    let scores = if dtype == DType::F32 {
        scores
    } else {
        scores.to_dtype(DType::F32)?
    };
    let scores = match mask {
        Some(m) => scores.broadcast_add(&m.to_dtype(DType::F32)?)?,
        None => scores,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
    Ok(probs.matmul(&v.contiguous()?)?)
}

/// Split `[B, L, H·D]` into heads `[B, H, L, D]`.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, l, c) = x.dims3()?;
    Ok(x.reshape((b, l, heads, c / heads))?.transpose(1, 2)?)
}

/// Merge heads `[B, H, L, D]` back into `[B, L, H·D]`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, l, d) = x.dims4()?;
    Ok(x.transpose(1, 2)?.reshape((b, l, h * d))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_equals_plain() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 2, 2000, 8), &dev)?;
        let k1 = Tensor::randn(0f32, 1.0, (1, 2, 32, 8), &dev)?;
        let v1 = Tensor::randn(0f32, 1.0, (1, 2, 32, 8), &dev)?;
        let k2 = Tensor::randn(0f32, 1.0, (1, 2, 9000, 8), &dev)?;
        let v2 = Tensor::randn(0f32, 1.0, (1, 2, 9000, 8), &dev)?;
        // The chunked path runs when the fused kernels are off (`KANDINSKY_PLAIN_KERNELS`).
        let expected = if crate::nn::use_fused_kernels() {
            AttentionPath::FusedCpu
        } else {
            AttentionPath::ChunkedQueries
        };
        assert_eq!(choose_path(&dev, 1, 2, 2000, 9032), expected);
        let k = Tensor::cat(&[&k1, &k2], 2)?;
        let v = Tensor::cat(&[&v1, &v2], 2)?;
        // An all-zero mask: the chunked path with the same arithmetic as plain.
        let mask = Tensor::zeros((1, 1, 1, 9032), DType::F32, &dev)?;
        let out = chunked_queries(&q, &k, &v, Some(&mask), 0.3)?;
        // More than one chunk of queries.
        const { assert!(CHUNK_SCORE_BYTES / (2 * 9032 * 4) < 2000) };
        let reference = plain(&q, &k, &v, None, 0.3)?;
        let diff = (out - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        // Same arithmetic per row, only the batching differs.
        assert!(diff < 1e-6, "max abs diff {diff}");
        Ok(())
    }

    #[test]
    fn fused_cpu_equals_plain_across_block_edges() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        // Query and key counts that are not multiples of the kernel's blocks (128 / 512),
        // two key segments (the UNet's 32 image tokens + spatial tokens), large logits so
        // the running maximum moves between key blocks.
        for (lq, l1, l2, d) in [(1, 3, 0, 8), (150, 32, 600, 64), (300, 5, 1100, 40)] {
            let q = (Tensor::randn(0f32, 1.0, (2, 3, lq, d), &dev)? * 3.0)?;
            let k1 = Tensor::randn(0f32, 1.0, (2, 3, l1, d), &dev)?;
            let v1 = Tensor::randn(0f32, 1.0, (2, 3, l1, d), &dev)?;
            let mut segs = vec![(k1, v1)];
            if l2 > 0 {
                let k2 = (Tensor::randn(0f32, 1.0, (2, 3, l2, d), &dev)? * 2.0)?;
                let v2 = Tensor::randn(0f32, 1.0, (2, 3, l2, d), &dev)?;
                segs.push((k2, v2));
            }
            let kv: Vec<KvSegment> = segs.iter().map(|(k, v)| KvSegment { k, v }).collect();
            // KANDINSKY_PLAIN_KERNELS turns the kernel off (then this compares plain to plain).
            if crate::nn::use_fused_kernels() {
                assert_eq!(
                    choose_path(&dev, 2, 3, lq, l1 + l2),
                    AttentionPath::FusedCpu
                );
            }
            let fused = attention(&q, &kv, None, 0.125)?;
            let k = Tensor::cat(&segs.iter().map(|s| &s.0).collect::<Vec<_>>(), 2)?;
            let v = Tensor::cat(&segs.iter().map(|s| &s.1).collect::<Vec<_>>(), 2)?;
            let reference = plain(&q, &k, &v, None, 0.125)?;
            let diff = (fused - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            // f32 throughout; only the summation order and the polynomial exp differ.
            assert!(
                diff < 2e-5,
                "lq {lq} lk {l1}+{l2} d {d}: max abs diff {diff}"
            );
        }
        Ok(())
    }

    #[test]
    fn bf16_on_cpu_works_and_stays_close_to_f32() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 2, 16, 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (1, 2, 20, 8), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (1, 2, 20, 8), &dev)?;
        let r = plain(&q, &k, &v, None, 0.35)?;
        let b = |t: &Tensor| t.to_dtype(DType::BF16);
        let h = attention(
            &b(&q)?,
            &[KvSegment {
                k: &b(&k)?,
                v: &b(&v)?,
            }],
            None,
            0.35,
        )?;
        assert_eq!(h.dtype(), DType::BF16);
        let d = (h.to_dtype(DType::F32)? - r)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        // bf16 keeps 8 bits of mantissa: inputs and output rounding dominate.
        assert!(d < 3e-2, "bf16 attention differs by {d}");
        Ok(())
    }

    #[test]
    fn softmax_rows_sum_to_one_with_mask() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 1, 3, 4), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (2, 1, 5, 4), &dev)?;
        // v = identity rows: the output is the probability matrix.
        let v = Tensor::eye(5, DType::F32, &dev)?
            .reshape((1, 1, 5, 5))?
            .repeat((2, 1, 1, 1))?;
        let v = v.narrow(3, 0, 4)?; // drop one column: head dim must match q's
        let mask = Tensor::new(&[0f32, 0., -10000., 0., 0.], &dev)?.reshape((1, 1, 1, 5))?;
        let out = attention(&q, &[KvSegment { k: &k, v: &v }], Some(&mask), 0.5)?;
        let p2 = out.narrow(3, 2, 1)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(p2 < 1e-6, "masked key got probability {p2}");
        Ok(())
    }
}
