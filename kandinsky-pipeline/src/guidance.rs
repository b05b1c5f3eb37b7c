//! Classifier-free guidance helpers shared by the flows.

use candle_core::Tensor;
use kandinsky_core::Result;

/// CFG is on when the scale exceeds 1 (diffusers' `do_classifier_free_guidance`).
pub fn enabled(guidance_scale: f64) -> bool {
    guidance_scale > 1.0
}

/// `repeat_interleave(n, dim 0)`.
pub fn repeat_interleave(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let dims = x.dims();
    let b = dims[0];
    let mut expanded = vec![b, n];
    expanded.extend_from_slice(&dims[1..]);
    let mut out = vec![b * n];
    out.extend_from_slice(&dims[1..]);
    Ok(x.unsqueeze(1)?
        .broadcast_as(expanded)?
        .contiguous()?
        .reshape(out)?)
}

/// Combine the `[uncond; cond]` halves of a prediction: `u + g·(c − u)`.
pub fn combine(pred: &Tensor, guidance_scale: f64) -> Result<Tensor> {
    let half = pred.dim(0)? / 2;
    let uncond = pred.narrow(0, 0, half)?;
    let cond = pred.narrow(0, half, half)?;
    Ok((&uncond + ((&cond - &uncond)? * guidance_scale)?)?)
}

/// The decoder's 8-channel output under CFG: guidance on the ε channels, the variance
/// channels taken from the conditional half; then the variance is dropped unless the
/// scheduler learns it (diffusers' KandinskyV22 pipelines).
pub fn decoder_prediction(
    pred: &Tensor,
    latent_channels: usize,
    cfg: Option<f64>,
    keep_variance: bool,
) -> Result<Tensor> {
    let channels = pred.dim(1)?;
    let pred = match cfg {
        Some(g) if channels > latent_channels => {
            let eps = combine(&pred.narrow(1, 0, latent_channels)?, g)?;
            let var = pred.narrow(1, latent_channels, channels - latent_channels)?;
            let half = var.dim(0)? / 2;
            Tensor::cat(&[eps, var.narrow(0, half, half)?], 1)?
        }
        Some(g) => combine(pred, g)?,
        None => pred.clone(),
    };
    if keep_variance || pred.dim(1)? == latent_channels {
        Ok(pred)
    } else {
        Ok(pred.narrow(1, 0, latent_channels)?)
    }
}

/// Concatenate along the channel axis.
pub fn cat_channels(parts: &[&Tensor]) -> Result<Tensor> {
    Ok(Tensor::cat(parts, 1)?)
}
