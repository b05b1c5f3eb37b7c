//! `DDPMScheduler` (diffusers `schedulers/scheduling_ddpm.py`): the Kandinsky 2.2 decoder's.

use candle_core::Tensor;
use kandinsky_core::noise::NoiseSource;
use kandinsky_core::traits::Scheduler;
use kandinsky_core::{Error, Result};
use serde::Deserialize;

use crate::scheduling_utils::{
    add_noise_ddpm, as_f64, check_steps, div, draw_noise, mul, spaced_timesteps, split_variance,
    threshold_sample, timestep_at, upcast, NoiseTables, PredictionType, SchedulerConfig,
    TimestepSpacing,
};

/// The fields of a `DDPMScheduler` config, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct DdpmSchedulerConfig {
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
    /// `fixed_small`, `fixed_small_log`, `fixed_large`, `learned` or `learned_range`.
    pub variance_type: String,
    /// Clamp the predicted x₀ to ±`clip_sample_range`.
    pub clip_sample: bool,
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
    /// Added to `leading` timesteps.
    pub steps_offset: i64,
    /// Zero-terminal-SNR rescaling (not supported).
    pub rescale_betas_zero_snr: bool,
}

impl Default for DdpmSchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            trained_betas: None,
            variance_type: "fixed_small".into(),
            clip_sample: true,
            prediction_type: "epsilon".into(),
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            clip_sample_range: 1.0,
            sample_max_value: 1.0,
            timestep_spacing: "leading".into(),
            steps_offset: 0,
            rescale_betas_zero_snr: false,
        }
    }
}

/// How DDPM draws the variance of the reverse step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarianceType {
    /// σ² = β̃_t = (1−ᾱ_prev)/(1−ᾱ_t)·β_t (posterior variance).
    FixedSmall,
    /// Same value, computed as exp(½·ln β̃_t).
    FixedSmallLog,
    /// σ² = β_t.
    FixedLarge,
    /// The model's extra channels are σ² itself.
    Learned,
    /// The model's extra channels v ∈ [−1, 1] interpolate ln β̃_t … ln β_t.
    LearnedRange,
}

impl VarianceType {
    /// Parse diffusers' name.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "fixed_small" => Ok(Self::FixedSmall),
            "fixed_small_log" => Ok(Self::FixedSmallLog),
            "fixed_large" => Ok(Self::FixedLarge),
            "learned" => Ok(Self::Learned),
            "learned_range" => Ok(Self::LearnedRange),
            // diffusers accepts `fixed_large_log` but its step then takes √ln β = NaN.
            other => Err(Error::unsupported(
                "variance_type",
                other,
                "fixed_small, fixed_small_log, fixed_large, learned, learned_range",
            )),
        }
    }

    /// True for the variants that read the model's extra output channels.
    pub fn is_learned(self) -> bool {
        matches!(self, Self::Learned | Self::LearnedRange)
    }
}

/// x₀ clipping shared by DDPM and DDIM.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum SampleClip {
    None,
    Clip(f64),
    Threshold { ratio: f64, max: f64 },
}

impl SampleClip {
    pub(crate) fn new(
        thresholding: bool,
        ratio: f64,
        max: f64,
        clip_sample: bool,
        range: f64,
    ) -> Self {
        if thresholding {
            Self::Threshold { ratio, max }
        } else if clip_sample {
            Self::Clip(range)
        } else {
            Self::None
        }
    }

    pub(crate) fn apply(self, x0: Tensor) -> Result<Tensor> {
        match self {
            Self::None => Ok(x0),
            Self::Clip(r) => Ok(x0.clamp(-r as f32, r as f32)?),
            Self::Threshold { ratio, max } => threshold_sample(&x0, ratio, max),
        }
    }
}

/// Denoising diffusion probabilistic models (Ho et al.), stride-aware for fewer steps.
#[derive(Debug, Clone)]
pub struct DdpmScheduler {
    config: DdpmSchedulerConfig,
    tables: NoiseTables,
    variance_type: VarianceType,
    prediction_type: PredictionType,
    spacing: TimestepSpacing,
    clip: SampleClip,
    timesteps: Vec<i64>,
    timesteps_f64: Vec<f64>,
}

impl DdpmScheduler {
    /// Build from a typed config, rejecting values that are not implemented.
    pub fn new(config: DdpmSchedulerConfig) -> Result<Self> {
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
        let variance_type = VarianceType::parse(&config.variance_type)?;
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
        // Before set_timesteps diffusers steps over every training timestep.
        let timesteps: Vec<i64> = (0..config.num_train_timesteps as i64).rev().collect();
        Ok(Self {
            timesteps_f64: as_f64(&timesteps),
            timesteps,
            config,
            tables,
            variance_type,
            prediction_type,
            spacing,
            clip,
        })
    }

    /// Build from a `scheduler_config.json` (any class: only DDPM's fields are read).
    pub fn from_config(cfg: &SchedulerConfig) -> Result<Self> {
        Self::new(cfg.parse()?).map_err(|e| cfg.locate(e))
    }

    /// The typed config.
    pub fn config(&self) -> &DdpmSchedulerConfig {
        &self.config
    }

    /// β, α and ᾱ tables.
    pub fn tables(&self) -> &NoiseTables {
        &self.tables
    }

    /// The variance type.
    pub fn variance_type(&self) -> VarianceType {
        self.variance_type
    }

    /// The integer timesteps.
    pub fn timesteps_i64(&self) -> &[i64] {
        &self.timesteps
    }

    /// The timestep after `timesteps()[step_index]`, −1 after the last one.
    pub fn previous_timestep(&self, step_index: usize) -> i64 {
        self.timesteps.get(step_index + 1).copied().unwrap_or(-1)
    }

    /// One reverse step from timestep `t` to `prev_t` (−1 = past the end of the chain).
    pub fn step_between(
        &self,
        model_output: &Tensor,
        t: i64,
        prev_t: i64,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let n = self.tables.len() as i64;
        if t < 0 || t >= n || prev_t >= t {
            return Err(Error::invalid(format!(
                "cannot step from timestep {t} to {prev_t} with {n} training timesteps"
            )));
        }
        let dtype = sample.dtype();
        let (eps, predicted_variance) =
            split_variance(model_output, sample, self.variance_type.is_learned())?;
        let (eps, x) = (upcast(&eps)?, upcast(sample)?);
        let predicted_variance = predicted_variance.map(|v| upcast(&v)).transpose()?;

        let a_t = self.tables.alphas_cumprod[t as usize];
        let a_prev = self.tables.alpha_prod(prev_t, 1.0);
        let beta_prod_t = 1.0 - a_t;
        let beta_prod_prev = 1.0 - a_prev;
        let cur_alpha = a_t / a_prev;
        let cur_beta = 1.0 - cur_alpha;

        let x0 = match self.prediction_type {
            PredictionType::Epsilon => div(&(&x - mul(&eps, beta_prod_t.sqrt())?)?, a_t.sqrt())?,
            PredictionType::Sample => eps.clone(),
            PredictionType::VPrediction => (mul(&x, a_t.sqrt())? - mul(&eps, beta_prod_t.sqrt())?)?,
        };
        let x0 = self.clip.apply(x0)?;

        let x0_coeff = (a_prev.sqrt() * cur_beta) / beta_prod_t;
        let cur_coeff = cur_alpha.sqrt() * beta_prod_prev / beta_prod_t;
        let mut prev = (mul(&x0, x0_coeff)? + mul(&x, cur_coeff)?)?;

        if t > 0 {
            let z = draw_noise(noise, &eps)?;
            let variance = (beta_prod_prev / beta_prod_t * cur_beta).max(1e-20);
            let term = match self.variance_type {
                VarianceType::FixedSmall => mul(&z, variance.sqrt())?,
                VarianceType::FixedSmallLog => mul(&z, (0.5 * variance.ln()).exp())?,
                VarianceType::FixedLarge => mul(&z, cur_beta.sqrt())?,
                VarianceType::Learned => match &predicted_variance {
                    Some(v) => (v.sqrt()? * &z)?,
                    None => return Err(missing_variance(model_output, sample)),
                },
                VarianceType::LearnedRange => match &predicted_variance {
                    Some(v) => {
                        let frac = ((v + 1.0)? * 0.5)?;
                        let one_minus = frac.affine(-1.0, 1.0)?;
                        let log_var =
                            (mul(&frac, cur_beta.ln())? + mul(&one_minus, variance.ln())?)?;
                        (mul(&log_var, 0.5)?.exp()? * &z)?
                    }
                    None => return Err(missing_variance(model_output, sample)),
                },
            };
            prev = (prev + term)?;
        }
        Ok(prev.to_dtype(dtype)?)
    }
}

pub(crate) fn missing_variance(model_output: &Tensor, sample: &Tensor) -> Error {
    Error::invalid(format!(
        "a learned variance needs a model output with twice the sample's channels; got {:?} for a sample of {:?}",
        model_output.dims(),
        sample.dims()
    ))
}

impl Scheduler for DdpmScheduler {
    fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        check_steps(num_inference_steps, self.config.num_train_timesteps)?;
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
        let t = timestep_at(&self.timesteps, step_index)?;
        let prev_t = self.previous_timestep(step_index);
        self.step_between(model_output, t, prev_t, sample, noise)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        let t = timestep_at(&self.timesteps, step_index)?;
        add_noise_ddpm(&self.tables, original, noise, t)
    }

    fn uses_learned_variance(&self) -> bool {
        self.variance_type.is_learned()
    }
}
