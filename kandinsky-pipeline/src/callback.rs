//! Progress reporting and cancellation: the library never prints.

use candle_core::Tensor;

/// Which loop a step belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The diffusion prior (text → image embedding).
    Prior,
    /// The decoder UNet (image embedding → latents).
    Decoder,
}

/// What a step callback sees.
#[derive(Debug)]
pub struct StepEvent<'a> {
    /// The loop.
    pub stage: Stage,
    /// Zero-based step index within this run.
    pub step: usize,
    /// Number of steps of this run.
    pub total: usize,
    /// The model timestep of this step.
    pub timestep: f64,
    /// The latents after the step.
    pub latents: &'a Tensor,
}

/// What the callback asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Go on.
    Continue,
    /// Stop now: the flow returns [`kandinsky_core::Error::Cancelled`].
    Cancel,
}

/// A step callback (`None` for none).
pub type Callback<'c> = Option<&'c mut dyn FnMut(&StepEvent<'_>) -> Control>;

/// Optional hooks of a run: a step callback, and a noise source that replaces the seeded
/// host RNG (to replay noise recorded elsewhere, e.g. by diffusers).
#[derive(Default)]
pub struct Hooks<'a> {
    /// Called after every step; may cancel.
    pub callback: Callback<'a>,
    /// Replaces `SeededNoise::new(seed, batch)` for the initial noise and stochastic steps.
    pub noise: Option<&'a mut dyn kandinsky_core::noise::NoiseSource>,
}

impl std::fmt::Debug for Hooks<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("callback", &self.callback.is_some())
            .field("noise", &self.noise.is_some())
            .finish()
    }
}

pub(crate) fn report(cb: &mut Callback<'_>, ev: StepEvent<'_>) -> kandinsky_core::Result<()> {
    if let Some(f) = cb.as_mut() {
        if f(&ev) == Control::Cancel {
            return Err(kandinsky_core::Error::Cancelled);
        }
    }
    Ok(())
}
