//! `DPMSolverMultistepScheduler` (diffusers `schedulers/scheduling_dpmsolver_multistep.py`),
//! DPM-Solver++ (Lu et al. 2022) in its multistep form: 20–30 steps instead of 100.

use candle_core::Tensor;
use kandinsky_core::noise::NoiseSource;
use kandinsky_core::traits::Scheduler;
use kandinsky_core::{Error, Result};
use serde::Deserialize;

use crate::scheduling_utils::{
    check_steps, div, dpm_solver_timesteps, mul, np_linspace, split_variance, threshold_sample,
    upcast, BetaSchedule, NoiseTables, PredictionType, SchedulerConfig, TimestepSpacing,
};

/// The fields of a `DPMSolverMultistepScheduler` config, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct DpmSolverMultistepSchedulerConfig {
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
    /// 1, 2 (DPM-Solver++ 2M, recommended for guided sampling) or 3.
    pub solver_order: usize,
    /// `epsilon`, `sample` or `v_prediction`.
    pub prediction_type: String,
    /// Dynamic thresholding of the x₀ predictions.
    pub thresholding: bool,
    /// Quantile of |x₀| used by dynamic thresholding.
    pub dynamic_thresholding_ratio: f64,
    /// Upper bound of the dynamic threshold.
    pub sample_max_value: f64,
    /// Only `dpmsolver++`.
    pub algorithm_type: String,
    /// `midpoint` or `heun` (second-order correction).
    pub solver_type: String,
    /// Use lower orders for the final steps when there are fewer than 15.
    pub lower_order_final: bool,
    /// Use a first-order step at the very end.
    pub euler_at_final: bool,
    /// Karras et al. sigma spacing.
    pub use_karras_sigmas: bool,
    /// Exponential sigmas (not supported).
    pub use_exponential_sigmas: bool,
    /// Beta sigmas (not supported).
    pub use_beta_sigmas: bool,
    /// Lu lambdas (not supported).
    pub use_lu_lambdas: bool,
    /// Flow sigmas (not supported).
    pub use_flow_sigmas: bool,
    /// `zero` (the last step lands on σ = 0) or `sigma_min`.
    pub final_sigmas_type: String,
    /// Clip λ from below (only −∞, the default, is supported).
    pub lambda_min_clipped: Option<f64>,
    /// When `learned`/`learned_range`, the model's variance half is dropped.
    pub variance_type: Option<String>,
    /// `linspace`, `leading` or `trailing`.
    pub timestep_spacing: String,
    /// Added to `leading` timesteps.
    pub steps_offset: i64,
    /// Zero-terminal-SNR rescaling (not supported).
    pub rescale_betas_zero_snr: bool,
    /// Dynamic shifting (not supported).
    pub use_dynamic_shifting: bool,
}

impl Default for DpmSolverMultistepSchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            trained_betas: None,
            solver_order: 2,
            prediction_type: "epsilon".into(),
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            algorithm_type: "dpmsolver++".into(),
            solver_type: "midpoint".into(),
            lower_order_final: true,
            euler_at_final: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_lu_lambdas: false,
            use_flow_sigmas: false,
            final_sigmas_type: "zero".into(),
            lambda_min_clipped: None,
            variance_type: None,
            timestep_spacing: "linspace".into(),
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            use_dynamic_shifting: false,
        }
    }
}

/// The second-order correction of DPM-Solver++.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SolverType {
    /// The midpoint form (diffusers' default).
    Midpoint,
    /// The Heun form.
    Heun,
}

/// Where the last step lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalSigmas {
    /// σ = 0: the last step returns the x₀ prediction (always first order).
    Zero,
    /// σ of the first training timestep.
    SigmaMin,
}

/// DPM-Solver++ multistep (data prediction), orders 1–3.
#[derive(Debug, Clone)]
pub struct DpmSolverMultistepScheduler {
    config: DpmSolverMultistepSchedulerConfig,
    tables: NoiseTables,
    prediction_type: PredictionType,
    solver_type: SolverType,
    final_sigmas: FinalSigmas,
    spacing: TimestepSpacing,
    /// σ_t = √((1−ᾱ)/ᾱ) of every training timestep (float32, like torch).
    train_sigmas: Vec<f32>,
    timesteps: Vec<i64>,
    timesteps_f64: Vec<f64>,
    /// σ of every inference step plus the final one.
    sigmas: Vec<f32>,
    /// x₀ predictions of the last steps (oldest first) with their step index.
    history: Vec<(usize, Tensor)>,
}

impl DpmSolverMultistepScheduler {
    /// Build from a typed config, rejecting values that are not implemented.
    pub fn new(config: DpmSolverMultistepSchedulerConfig) -> Result<Self> {
        for (field, on) in [
            ("use_exponential_sigmas", config.use_exponential_sigmas),
            ("use_beta_sigmas", config.use_beta_sigmas),
            ("use_lu_lambdas", config.use_lu_lambdas),
            ("use_flow_sigmas", config.use_flow_sigmas),
            ("rescale_betas_zero_snr", config.rescale_betas_zero_snr),
            ("use_dynamic_shifting", config.use_dynamic_shifting),
        ] {
            if on {
                return Err(Error::unsupported(field, true, "false"));
            }
        }
        if config.algorithm_type != "dpmsolver++" {
            return Err(Error::unsupported(
                "algorithm_type",
                &config.algorithm_type,
                "dpmsolver++",
            ));
        }
        if !(1..=3).contains(&config.solver_order) {
            return Err(Error::unsupported(
                "solver_order",
                config.solver_order,
                "1, 2, 3",
            ));
        }
        if let Some(l) = config.lambda_min_clipped {
            if l != f64::NEG_INFINITY {
                return Err(Error::unsupported(
                    "lambda_min_clipped",
                    l,
                    "-inf (no clipping)",
                ));
            }
        }
        let solver_type = match config.solver_type.as_str() {
            "midpoint" => SolverType::Midpoint,
            "heun" => SolverType::Heun,
            other => return Err(Error::unsupported("solver_type", other, "midpoint, heun")),
        };
        let final_sigmas = match config.final_sigmas_type.as_str() {
            "zero" => FinalSigmas::Zero,
            "sigma_min" => FinalSigmas::SigmaMin,
            other => {
                return Err(Error::unsupported(
                    "final_sigmas_type",
                    other,
                    "zero, sigma_min",
                ))
            }
        };
        let prediction_type = PredictionType::parse(
            &config.prediction_type,
            &[
                PredictionType::Epsilon,
                PredictionType::Sample,
                PredictionType::VPrediction,
            ],
        )?;
        let spacing = TimestepSpacing::parse(&config.timestep_spacing)?;
        let tables = NoiseTables::from_fields(
            config.trained_betas.as_deref(),
            &config.beta_schedule,
            config.beta_start,
            config.beta_end,
            config.num_train_timesteps,
        )?;
        let train_sigmas = tables
            .alphas_cumprod
            .iter()
            .map(|&a| ((1.0 - a) / a).sqrt())
            .collect();
        Ok(Self {
            config,
            tables,
            prediction_type,
            solver_type,
            final_sigmas,
            spacing,
            train_sigmas,
            timesteps: vec![],
            timesteps_f64: vec![],
            sigmas: vec![],
            history: vec![],
        })
    }

    /// Build from a `scheduler_config.json` (any class: only this class's fields are read).
    pub fn from_config(cfg: &SchedulerConfig) -> Result<Self> {
        Self::new(cfg.parse()?).map_err(|e| cfg.locate(e))
    }

    /// The typed config.
    pub fn config(&self) -> &DpmSolverMultistepSchedulerConfig {
        &self.config
    }

    /// β, α and ᾱ tables.
    pub fn tables(&self) -> &NoiseTables {
        &self.tables
    }

    /// σ of every inference step, plus the final σ.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// The integer timesteps.
    pub fn timesteps_i64(&self) -> &[i64] {
        &self.timesteps
    }

    /// Karras et al. sigmas (ρ = 7) between the training σ_min and σ_max.
    fn karras_sigmas(&self, n: usize) -> Vec<f64> {
        let sigma_min = self.train_sigmas[0] as f64;
        let sigma_max = *self.train_sigmas.last().unwrap_or(&0.0) as f64;
        let rho = 7.0f64;
        let min_inv = sigma_min.powf(1.0 / rho);
        let max_inv = sigma_max.powf(1.0 / rho);
        np_linspace(0.0, 1.0, n)
            .into_iter()
            .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
            .collect()
    }

    /// diffusers' `_sigma_to_t`: the fractional training timestep of a σ, interpolating
    /// linearly in log σ (NumPy mixes f64 and the f32 table here; mirrored exactly).
    fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
        let log_sigma = sigma.max(1e-10).ln();
        let n = log_sigmas.len();
        let low = log_sigmas
            .iter()
            .rposition(|&l| log_sigma - l as f64 >= 0.0)
            .unwrap_or(0)
            .min(n - 2);
        let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
        let w = ((lo as f64 - log_sigma) / (lo - hi) as f64).clamp(0.0, 1.0);
        (1.0 - w) * low as f64 + w * (low + 1) as f64
    }

    /// α_t, σ_t of the VP process from σ = σ_t/α_t.
    fn alpha_sigma(sigma: f32) -> (f32, f32) {
        let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
        (alpha, sigma * alpha)
    }

    fn lambda(alpha: f32, sigma: f32) -> f32 {
        alpha.ln() - sigma.ln()
    }

    /// The model output turned into an x₀ prediction at step `i`.
    fn convert_model_output(&self, mo: &Tensor, x: &Tensor, i: usize) -> Result<Tensor> {
        let (alpha, sigma) = Self::alpha_sigma(self.sigmas[i]);
        let x0 = match self.prediction_type {
            PredictionType::Epsilon => div(&(x - mul(mo, sigma)?)?, alpha)?,
            PredictionType::Sample => mo.clone(),
            PredictionType::VPrediction => (mul(x, alpha)? - mul(mo, sigma)?)?,
        };
        if self.config.thresholding {
            threshold_sample(
                &x0,
                self.config.dynamic_thresholding_ratio,
                self.config.sample_max_value,
            )
        } else {
            Ok(x0)
        }
    }

    fn first_order(&self, x0: &Tensor, x: &Tensor, i: usize) -> Result<Tensor> {
        let (alpha_t, sigma_t) = Self::alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s, sigma_s) = Self::alpha_sigma(self.sigmas[i]);
        let h = Self::lambda(alpha_t, sigma_t) - Self::lambda(alpha_s, sigma_s);
        Ok((mul(x, sigma_t / sigma_s)? - mul(x0, alpha_t * ((-h).exp() - 1.0))?)?)
    }

    fn second_order(&self, m0: &Tensor, m1: &Tensor, x: &Tensor, i: usize) -> Result<Tensor> {
        let (alpha_t, sigma_t) = Self::alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = Self::alpha_sigma(self.sigmas[i]);
        let (alpha_s1, sigma_s1) = Self::alpha_sigma(self.sigmas[i - 1]);
        let lambda_t = Self::lambda(alpha_t, sigma_t);
        let lambda_s0 = Self::lambda(alpha_s0, sigma_s0);
        let lambda_s1 = Self::lambda(alpha_s1, sigma_s1);
        let h = lambda_t - lambda_s0;
        let h0 = lambda_s0 - lambda_s1;
        let r0 = h0 / h;
        let d1 = mul(&(m0 - m1)?, 1.0 / r0)?;
        let e = (-h).exp() - 1.0;
        let base = (mul(x, sigma_t / sigma_s0)? - mul(m0, alpha_t * e)?)?;
        Ok(match self.solver_type {
            SolverType::Midpoint => (base - mul(&d1, 0.5 * (alpha_t * e))?)?,
            SolverType::Heun => (base + mul(&d1, alpha_t * (e / h + 1.0))?)?,
        })
    }

    fn third_order(
        &self,
        m0: &Tensor,
        m1: &Tensor,
        m2: &Tensor,
        x: &Tensor,
        i: usize,
    ) -> Result<Tensor> {
        let (alpha_t, sigma_t) = Self::alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = Self::alpha_sigma(self.sigmas[i]);
        let (alpha_s1, sigma_s1) = Self::alpha_sigma(self.sigmas[i - 1]);
        let (alpha_s2, sigma_s2) = Self::alpha_sigma(self.sigmas[i - 2]);
        let lambda_t = Self::lambda(alpha_t, sigma_t);
        let lambda_s0 = Self::lambda(alpha_s0, sigma_s0);
        let lambda_s1 = Self::lambda(alpha_s1, sigma_s1);
        let lambda_s2 = Self::lambda(alpha_s2, sigma_s2);
        let h = lambda_t - lambda_s0;
        let (h0, h1) = (lambda_s0 - lambda_s1, lambda_s1 - lambda_s2);
        let (r0, r1) = (h0 / h, h1 / h);
        let d1_0 = mul(&(m0 - m1)?, 1.0 / r0)?;
        let d1_1 = mul(&(m1 - m2)?, 1.0 / r1)?;
        let diff = (&d1_0 - &d1_1)?;
        let d1 = (&d1_0 + mul(&diff, r0 / (r0 + r1))?)?;
        let d2 = mul(&diff, 1.0 / (r0 + r1))?;
        let e = (-h).exp() - 1.0;
        let out = (mul(x, sigma_t / sigma_s0)? - mul(m0, alpha_t * e)?)?;
        let out = (out + mul(&d1, alpha_t * (e / h + 1.0))?)?;
        Ok((out - mul(&d2, alpha_t * ((e + h) / (h * h) - 0.5))?)?)
    }
}

impl Scheduler for DpmSolverMultistepScheduler {
    fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let (n, train) = (num_inference_steps, self.config.num_train_timesteps);
        check_steps(n, train)?;
        // lambda_min_clipped = −∞ keeps every training timestep.
        let timesteps = dpm_solver_timesteps(self.spacing, n, train, self.config.steps_offset)?;
        let (timesteps, mut sigmas): (Vec<i64>, Vec<f32>) = if self.config.use_karras_sigmas {
            let log_sigmas: Vec<f32> = self.train_sigmas.iter().map(|s| s.ln()).collect();
            let karras = self.karras_sigmas(n);
            let round = BetaSchedule::parse(&self.config.beta_schedule).ok()
                != Some(BetaSchedule::SquaredcosCapV2)
                || self.config.trained_betas.is_some();
            let karras_ts: Vec<i64> = karras
                .iter()
                .map(|&s| {
                    let t = Self::sigma_to_t(s, &log_sigmas);
                    // diffusers rounds except for the cosine schedule, then casts (truncates).
                    (if round { t.round_ties_even() } else { t }) as i64
                })
                .collect();
            (karras_ts, karras.into_iter().map(|s| s as f32).collect())
        } else {
            let sigmas = timesteps
                .iter()
                .map(|&t| self.train_sigmas[t as usize])
                .collect();
            (timesteps, sigmas)
        };
        sigmas.push(match self.final_sigmas {
            FinalSigmas::Zero => 0.0,
            FinalSigmas::SigmaMin => {
                let a = self.tables.alphas_cumprod[0];
                ((1.0 - a) / a).sqrt()
            }
        });
        self.timesteps_f64 = timesteps.iter().map(|&t| t as f64).collect();
        self.timesteps = timesteps;
        self.sigmas = sigmas;
        self.history.clear();
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
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let len = self.timesteps.len();
        if len == 0 {
            return Err(Error::invalid(
                "set_timesteps must be called before stepping",
            ));
        }
        if step_index >= len {
            return Err(Error::invalid(format!(
                "step index {step_index} is out of range for {len} timesteps"
            )));
        }
        let i = step_index;
        // The history only counts if the previous calls were the preceding steps (a run that
        // starts mid-schedule, e.g. img2img, begins with first-order steps like diffusers).
        let consecutive = self
            .history
            .iter()
            .rev()
            .enumerate()
            .take_while(|(k, (idx, _))| *idx + k + 1 == i)
            .count();
        let keep = consecutive.min(self.config.solver_order - 1);
        let drop = self.history.len() - keep;
        self.history.drain(..drop);

        let dtype = model_output.dtype();
        let (mo, _) = split_variance(model_output, sample, false)?;
        let (mo, x) = (upcast(&mo)?, upcast(sample)?);
        let x0 = self.convert_model_output(&mo, &x, i)?;

        let lower_order_final = i == len - 1
            && (self.config.euler_at_final
                || (self.config.lower_order_final && len < 15)
                || self.final_sigmas == FinalSigmas::Zero);
        let lower_order_second = i + 2 == len && self.config.lower_order_final && len < 15;
        let prev_count = self.history.len();
        let order = self.config.solver_order;

        let out = if order == 1 || prev_count < 1 || lower_order_final {
            self.first_order(&x0, &x, i)?
        } else if order == 2 || prev_count < 2 || lower_order_second {
            let m1 = &self.history[prev_count - 1].1;
            self.second_order(&x0, m1, &x, i)?
        } else {
            let m1 = &self.history[prev_count - 1].1;
            let m2 = &self.history[prev_count - 2].1;
            self.third_order(&x0, m1, m2, &x, i)?
        };
        self.history.push((i, x0));
        if self.history.len() > order.saturating_sub(1).max(1) {
            self.history.remove(0);
        }
        Ok(out.to_dtype(dtype)?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        if original.dims() != noise.dims() {
            return Err(Error::invalid(format!(
                "noise of shape {:?} does not match the sample of shape {:?}",
                noise.dims(),
                original.dims()
            )));
        }
        let sigma = *self.sigmas.get(step_index).ok_or_else(|| {
            Error::invalid(format!(
                "step index {step_index} is out of range for {} sigmas (call set_timesteps first)",
                self.sigmas.len()
            ))
        })?;
        let dtype = original.dtype();
        let (alpha_t, sigma_t) = Self::alpha_sigma(sigma);
        let out = (mul(&upcast(original)?, alpha_t)? + mul(&upcast(noise)?, sigma_t)?)?;
        Ok(out.to_dtype(dtype)?)
    }

    fn uses_learned_variance(&self) -> bool {
        // The variance half is never used; the pipeline may drop it.
        false
    }
}
