//! `DDIMScheduler` (diffusers `schedulers/scheduling_ddim.py`): Kandinsky 2.1's default.

use candle_core::Tensor;
use kandinsky_core::noise::NoiseSource;
use kandinsky_core::traits::Scheduler;
use kandinsky_core::{Error, Result};
use serde::Deserialize;

use crate::scheduling_ddpm::SampleClip;
use crate::scheduling_utils::{
    add_noise_ddpm, as_f64, check_steps, div, draw_noise, mul, spaced_timesteps, split_variance,
    timestep_at, upcast, NoiseTables, PredictionType, SchedulerConfig, TimestepSpacing,
};

/// The fields of a `DDIMScheduler` config, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct DdimSchedulerConfig {
    /// Training timesteps T.
    pub num_train_timesteps: usize,
    /// First beta of `linear`/`scaled_linear`.
    pub beta_start: f64,
    /// Last beta of `linear`/`scaled_linear`.
    pub beta_end: f64,
    /// `linear`, `scaled_linear` or `squaredcos_cap_v2`.
    pub beta_schedule: String,
    /// Explicit betas (override the schedule).
    pub trained_betas: Option<Vec<f64>>,
    /// Clamp the predicted x₀ to ±`clip_sample_range`.
    pub clip_sample: bool,
    /// ᾱ after the last step: 1 if true, else ᾱ₀.
    pub set_alpha_to_one: bool,
    /// Added to `leading` timesteps.
    pub steps_offset: i64,
    /// `epsilon`, `sample` or `v_prediction`.
    pub prediction_type: String,
    /// Dynamic thresholding of x₀ (wins over `clip_sample`).
    pub thresholding: bool,
    /// Quantile of |x₀| used by dynamic thresholding.
    pub dynamic_thresholding_ratio: f64,
    /// Clip range of `clip_sample`.
    pub clip_sample_range: f64,
    /// Upper bound of the dynamic threshold.
    pub sample_max_value: f64,
    /// `leading`, `linspace` or `trailing`.
    pub timestep_spacing: String,
    /// Zero-terminal-SNR rescaling (not supported).
    pub rescale_betas_zero_snr: bool,
}

impl Default for DdimSchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            trained_betas: None,
            clip_sample: true,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: "epsilon".into(),
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            clip_sample_range: 1.0,
            sample_max_value: 1.0,
            timestep_spacing: "leading".into(),
            rescale_betas_zero_snr: false,
        }
    }
}

/// Denoising diffusion implicit models (Song et al.); `eta` = 0 is deterministic.
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    config: DdimSchedulerConfig,
    tables: NoiseTables,
    final_alpha_cumprod: f32,
    prediction_type: PredictionType,
    spacing: TimestepSpacing,
    clip: SampleClip,
    eta: f64,
    use_clipped_model_output: bool,
    num_inference_steps: Option<usize>,
    timesteps: Vec<i64>,
    timesteps_f64: Vec<f64>,
}

impl DdimScheduler {
    /// Build from a typed config, rejecting values that are not implemented.
    pub fn new(config: DdimSchedulerConfig) -> Result<Self> {
        if config.rescale_betas_zero_snr {
            return Err(Error::unsupported("rescale_betas_zero_snr", true, "false"));
        }
        let tables = NoiseTables::from_fields(
            config.trained_betas.as_deref(),
            &config.beta_schedule,
            config.beta_start,
            config.beta_end,
            config.num_train_timesteps,
        )?;
        let prediction_type = PredictionType::parse(
            &config.prediction_type,
            &[
                PredictionType::Epsilon,
                PredictionType::Sample,
                PredictionType::VPrediction,
            ],
        )?;
        let spacing = TimestepSpacing::parse(&config.timestep_spacing)?;
        let clip = SampleClip::new(
            config.thresholding,
            config.dynamic_thresholding_ratio,
            config.sample_max_value,
            config.clip_sample,
            config.clip_sample_range,
        );
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            tables.alphas_cumprod[0]
        };
        let timesteps: Vec<i64> = (0..config.num_train_timesteps as i64).rev().collect();
        Ok(Self {
            timesteps_f64: as_f64(&timesteps),
            timesteps,
            config,
            tables,
            final_alpha_cumprod,
            prediction_type,
            spacing,
            clip,
            eta: 0.0,
            use_clipped_model_output: false,
            num_inference_steps: None,
        })
    }

    /// Build from a `scheduler_config.json` (any class: only DDIM's fields are read).
    pub fn from_config(cfg: &SchedulerConfig) -> Result<Self> {
        Self::new(cfg.parse()?).map_err(|e| cfg.locate(e))
    }

    /// The typed config.
    pub fn config(&self) -> &DdimSchedulerConfig {
        &self.config
    }

    /// β, α and ᾱ tables.
    pub fn tables(&self) -> &NoiseTables {
        &self.tables
    }

    /// The η of the steps (diffusers' `step(eta=…)`); 0 by default.
    pub fn eta(&self) -> f64 {
        self.eta
    }

    /// Set η ≥ 0 (0: deterministic DDIM, 1: DDPM-like variance).
    pub fn set_eta(&mut self, eta: f64) -> Result<()> {
        if eta.is_nan() || eta < 0.0 || eta.is_infinite() {
            return Err(Error::invalid(format!(
                "eta must be a finite number ≥ 0, got {eta}"
            )));
        }
        self.eta = eta;
        Ok(())
    }

    /// Re-derive ε from the clipped x₀ (diffusers' `use_clipped_model_output`).
    pub fn set_use_clipped_model_output(&mut self, on: bool) {
        self.use_clipped_model_output = on;
    }

    /// The integer timesteps.
    pub fn timesteps_i64(&self) -> &[i64] {
        &self.timesteps
    }

    /// One DDIM step from timestep `t` (to `t − T // N`, as diffusers does for every spacing).
    pub fn step_from(
        &self,
        model_output: &Tensor,
        t: i64,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let n = self
            .num_inference_steps
            .ok_or_else(|| Error::invalid("set_timesteps must be called before stepping"))?;
        if t < 0 || t as usize >= self.tables.len() {
            return Err(Error::invalid(format!(
                "timestep {t} is outside [0, {})",
                self.tables.len()
            )));
        }
        let prev_t = t - (self.config.num_train_timesteps / n) as i64;
        let dtype = sample.dtype();
        let (mo, _) = split_variance(model_output, sample, false)?;
        let (mo, x) = (upcast(&mo)?, upcast(sample)?);

        let a_t = self.tables.alphas_cumprod[t as usize];
        let a_prev = self.tables.alpha_prod(prev_t, self.final_alpha_cumprod);
        let beta_prod_t = 1.0 - a_t;

        let (x0, eps) = match self.prediction_type {
            PredictionType::Epsilon => (
                div(&(&x - mul(&mo, beta_prod_t.sqrt())?)?, a_t.sqrt())?,
                mo.clone(),
            ),
            PredictionType::Sample => (
                mo.clone(),
                div(&(&x - mul(&mo, a_t.sqrt())?)?, beta_prod_t.sqrt())?,
            ),
            PredictionType::VPrediction => (
                (mul(&x, a_t.sqrt())? - mul(&mo, beta_prod_t.sqrt())?)?,
                (mul(&mo, a_t.sqrt())? + mul(&x, beta_prod_t.sqrt())?)?,
            ),
        };
        let x0 = self.clip.apply(x0)?;

        let beta_prod_prev = 1.0 - a_prev;
        let variance = (beta_prod_prev / beta_prod_t) * (1.0 - a_t / a_prev);
        let std_dev = self.eta as f32 * variance.sqrt();
        let eps = if self.use_clipped_model_output {
            div(&(&x - mul(&x0, a_t.sqrt())?)?, beta_prod_t.sqrt())?
        } else {
            eps
        };
        let direction = mul(&eps, (1.0 - a_prev - std_dev * std_dev).sqrt())?;
        let mut prev = (mul(&x0, a_prev.sqrt())? + direction)?;
        if self.eta > 0.0 {
            let z = draw_noise(noise, &mo)?;
            prev = (prev + mul(&z, std_dev)?)?;
        }
        Ok(prev.to_dtype(dtype)?)
    }
}

impl Scheduler for DdimScheduler {
    fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        check_steps(num_inference_steps, self.config.num_train_timesteps)?;
        self.num_inference_steps = Some(num_inference_steps);
        self.timesteps = spaced_timesteps(
            self.spacing,
            num_inference_steps,
            self.config.num_train_timesteps,
            self.config.steps_offset,
        )?;
        self.timesteps_f64 = as_f64(&self.timesteps);
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps_f64
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        if self.num_inference_steps.is_none() {
            return Err(Error::invalid(
                "set_timesteps must be called before stepping",
            ));
        }
        let t = timestep_at(&self.timesteps, step_index)?;
        self.step_from(model_output, t, sample, noise)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        let t = timestep_at(&self.timesteps, step_index)?;
        add_noise_ddpm(&self.tables, original, noise, t)
    }

    fn uses_learned_variance(&self) -> bool {
        false
    }
}
