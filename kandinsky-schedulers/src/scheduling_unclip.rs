//! `UnCLIPScheduler` (diffusers `schedulers/scheduling_unclip.py`): the Kandinsky prior's.

use candle_core::Tensor;
use kandinsky_core::noise::NoiseSource;
use kandinsky_core::traits::Scheduler;
use kandinsky_core::{Error, Result};
use serde::Deserialize;

use crate::scheduling_ddpm::missing_variance;
use crate::scheduling_utils::{
    add_noise_ddpm, as_f64, check_steps, div, draw_noise, mul, split_variance, timestep_at, upcast,
    BetaSchedule, NoiseTables, PredictionType, SchedulerConfig,
};

/// The fields of an `UnCLIPScheduler` config, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct UnClipSchedulerConfig {
    /// Training timesteps T.
    pub num_train_timesteps: usize,
    /// `fixed_small_log` or `learned_range`.
    pub variance_type: String,
    /// Clamp the predicted x₀ to ±`clip_sample_range`.
    pub clip_sample: bool,
    /// Clip range (the Kandinsky prior uses 10).
    pub clip_sample_range: f64,
    /// `epsilon` or `sample`.
    pub prediction_type: String,
    /// Only `squaredcos_cap_v2`.
    pub beta_schedule: String,
}

impl Default for UnClipSchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            variance_type: "fixed_small_log".into(),
            clip_sample: true,
            clip_sample_range: 1.0,
            prediction_type: "epsilon".into(),
            beta_schedule: "squaredcos_cap_v2".into(),
        }
    }
}

/// UnCLIP's variance choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnClipVarianceType {
    /// σ = exp(½·ln clamp(β̃_t, 1e-20)).
    FixedSmallLog,
    /// The model's extra channels interpolate ln β̃_t … ln β_t.
    LearnedRange,
}

/// The DDPM variant of unCLIP: cosine betas, explicit previous timestep.
#[derive(Debug, Clone)]
pub struct UnClipScheduler {
    config: UnClipSchedulerConfig,
    tables: NoiseTables,
    variance_type: UnClipVarianceType,
    prediction_type: PredictionType,
    timesteps: Vec<i64>,
    timesteps_f64: Vec<f64>,
}

impl UnClipScheduler {
    /// Build from a typed config, rejecting values that are not implemented.
    pub fn new(config: UnClipSchedulerConfig) -> Result<Self> {
        if BetaSchedule::parse(&config.beta_schedule).ok() != Some(BetaSchedule::SquaredcosCapV2) {
            return Err(Error::unsupported(
                "beta_schedule",
                &config.beta_schedule,
                "squaredcos_cap_v2",
            ));
        }
        let variance_type = match config.variance_type.as_str() {
            "fixed_small_log" => UnClipVarianceType::FixedSmallLog,
            "learned_range" => UnClipVarianceType::LearnedRange,
            other => {
                return Err(Error::unsupported(
                    "variance_type",
                    other,
                    "fixed_small_log, learned_range",
                ))
            }
        };
        let prediction_type = PredictionType::parse(
            &config.prediction_type,
            &[PredictionType::Epsilon, PredictionType::Sample],
        )?;
        let tables = NoiseTables::from_fields(
            None,
            "squaredcos_cap_v2",
            0.0,
            0.0,
            config.num_train_timesteps,
        )?;
        let timesteps: Vec<i64> = (0..config.num_train_timesteps as i64).rev().collect();
        Ok(Self {
            timesteps_f64: as_f64(&timesteps),
            timesteps,
            config,
            tables,
            variance_type,
            prediction_type,
        })
    }

    /// Build from a `scheduler_config.json` (any class: only UnCLIP's fields are read).
    pub fn from_config(cfg: &SchedulerConfig) -> Result<Self> {
        Self::new(cfg.parse()?).map_err(|e| cfg.locate(e))
    }

    /// The typed config.
    pub fn config(&self) -> &UnClipSchedulerConfig {
        &self.config
    }

    /// β, α and ᾱ tables.
    pub fn tables(&self) -> &NoiseTables {
        &self.tables
    }

    /// The integer timesteps.
    pub fn timesteps_i64(&self) -> &[i64] {
        &self.timesteps
    }

    /// diffusers' `step(model_output, timestep, sample, prev_timestep)`: `None` means `t − 1`
    /// (what the prior pipeline passes at its last step).
    pub fn step_with_prev(
        &self,
        model_output: &Tensor,
        t: i64,
        sample: &Tensor,
        prev_timestep: Option<i64>,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let prev_t = prev_timestep.unwrap_or(t - 1);
        let n = self.tables.len() as i64;
        if t < 0 || t >= n || prev_t >= t {
            return Err(Error::invalid(format!(
                "cannot step from timestep {t} to {prev_t} with {n} training timesteps"
            )));
        }
        let dtype = sample.dtype();
        let learned = self.variance_type == UnClipVarianceType::LearnedRange;
        let (mo, predicted_variance) = split_variance(model_output, sample, learned)?;
        let (mo, x) = (upcast(&mo)?, upcast(sample)?);

        let a_t = self.tables.alphas_cumprod[t as usize];
        let a_prev = self.tables.alpha_prod(prev_t, 1.0);
        let beta_prod_t = 1.0 - a_t;
        let beta_prod_prev = 1.0 - a_prev;
        let (beta, alpha) = if prev_t == t - 1 {
            (
                self.tables.betas[t as usize],
                self.tables.alphas[t as usize],
            )
        } else {
            let beta = 1.0 - a_t / a_prev;
            (beta, 1.0 - beta)
        };

        let x0 = match self.prediction_type {
            PredictionType::Sample => mo.clone(),
            _ => div(&(&x - mul(&mo, beta_prod_t.sqrt())?)?, a_t.sqrt())?,
        };
        let x0 = if self.config.clip_sample {
            let r = self.config.clip_sample_range as f32;
            x0.clamp(-r, r)?
        } else {
            x0
        };
        let x0_coeff = (a_prev.sqrt() * beta) / beta_prod_t;
        let cur_coeff = alpha.sqrt() * beta_prod_prev / beta_prod_t;
        let mut prev = (mul(&x0, x0_coeff)? + mul(&x, cur_coeff)?)?;

        if t > 0 {
            let z = draw_noise(noise, &mo)?;
            let variance = beta_prod_prev / beta_prod_t * beta;
            let term = match self.variance_type {
                UnClipVarianceType::FixedSmallLog => {
                    mul(&z, (0.5 * variance.max(1e-20).ln()).exp())?
                }
                UnClipVarianceType::LearnedRange => match &predicted_variance {
                    Some(v) => {
                        let frac = ((v + 1.0)? * 0.5)?;
                        let one_minus = frac.affine(-1.0, 1.0)?;
                        let log_var = (mul(&frac, beta.ln())? + mul(&one_minus, variance.ln())?)?;
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

impl Scheduler for UnClipScheduler {
    fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        check_steps(num_inference_steps, self.config.num_train_timesteps)?;
        if num_inference_steps < 2 {
            // diffusers divides by N − 1 here and produces garbage for one step.
            return Err(Error::invalid(
                "UnCLIPScheduler needs at least 2 inference steps, got 1",
            ));
        }
        let ratio = (self.config.num_train_timesteps - 1) as f64 / (num_inference_steps - 1) as f64;
        // NumPy rounds half to even: 25 steps give …, 832, …, 500, …, 166, ….
        self.timesteps = (0..num_inference_steps)
            .rev()
            .map(|k| (k as f64 * ratio).round_ties_even() as i64)
            .collect();
        self.timesteps_f64 = as_f64(&self.timesteps);
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps_f64
    }

    /// Steps to the next entry of the timestep list (`t − 1` after the last), as the prior
    /// pipeline does.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let t = timestep_at(&self.timesteps, step_index)?;
        let prev = self.timesteps.get(step_index + 1).copied();
        self.step_with_prev(model_output, t, sample, prev, noise)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        let t = timestep_at(&self.timesteps, step_index)?;
        add_noise_ddpm(&self.tables, original, noise, t)
    }

    fn uses_learned_variance(&self) -> bool {
        self.variance_type == UnClipVarianceType::LearnedRange
    }
}
