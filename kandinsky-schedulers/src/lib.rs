//! # kandinsky-schedulers
//!
//! Diffusion schedulers matched to diffusers (max abs difference ≤ 1e-6 in f32 against
//! fixtures recorded from diffusers 0.42): [`DdpmScheduler`] (the Kandinsky 2.2 decoder's),
//! [`UnClipScheduler`] (the prior's), [`DdimScheduler`] (Kandinsky 2.1's) and
//! [`DpmSolverMultistepScheduler`] (DPM-Solver++ 2M, optionally with Karras sigmas).
//!
//! A `scheduler_config.json` is read by its `_class_name` into an [`AnyScheduler`]; like
//! diffusers' `from_config`, the same config can build another class
//! ([`AnyScheduler::from_config_as`]): shared fields (betas, spacing, offset…) are read, the
//! rest takes the target class's defaults. Every scheduler implements
//! [`kandinsky_core::traits::Scheduler`]; stochastic steps draw their noise from a
//! [`kandinsky_core::noise::NoiseSource`].
#![warn(missing_docs)]

use candle_core::Tensor;
use kandinsky_core::noise::NoiseSource;
use kandinsky_core::traits::Scheduler;
use kandinsky_core::{Error, Result};

pub mod scheduling_ddim;
pub mod scheduling_ddpm;
pub mod scheduling_dpmsolver_multistep;
pub mod scheduling_unclip;
pub mod scheduling_utils;

pub use scheduling_ddim::{DdimScheduler, DdimSchedulerConfig};
pub use scheduling_ddpm::{DdpmScheduler, DdpmSchedulerConfig, VarianceType};
pub use scheduling_dpmsolver_multistep::{
    DpmSolverMultistepScheduler, DpmSolverMultistepSchedulerConfig,
};
pub use scheduling_unclip::{UnClipScheduler, UnClipSchedulerConfig};
pub use scheduling_utils::{
    add_noise_ddpm, torch_linspace_f32, BetaSchedule, NoiseTables, PredictionType, SchedulerConfig,
    TimestepSpacing,
};

/// The scheduler classes this crate implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// `DDPMScheduler`.
    Ddpm,
    /// `DDIMScheduler`.
    Ddim,
    /// `UnCLIPScheduler`.
    UnClip,
    /// `DPMSolverMultistepScheduler`.
    DpmSolverMultistep,
}

impl SchedulerKind {
    /// Every kind, in the order of [`SchedulerKind::class_name`]'s allowed list.
    pub const ALL: [SchedulerKind; 4] = [
        SchedulerKind::Ddpm,
        SchedulerKind::Ddim,
        SchedulerKind::UnClip,
        SchedulerKind::DpmSolverMultistep,
    ];

    /// diffusers' class name.
    pub fn class_name(self) -> &'static str {
        match self {
            Self::Ddpm => "DDPMScheduler",
            Self::Ddim => "DDIMScheduler",
            Self::UnClip => "UnCLIPScheduler",
            Self::DpmSolverMultistep => "DPMSolverMultistepScheduler",
        }
    }

    /// The kind of a diffusers class name.
    pub fn from_class_name(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.class_name() == name)
            .ok_or_else(|| {
                Error::unsupported(
                    "_class_name",
                    name,
                    Self::ALL
                        .iter()
                        .map(|k| k.class_name())
                        .collect::<Vec<_>>()
                        .join(", "),
                )
            })
    }
}

/// Any supported scheduler, chosen at run time from a config.
#[derive(Debug, Clone)]
pub enum AnyScheduler {
    /// DDPM.
    Ddpm(DdpmScheduler),
    /// DDIM.
    Ddim(DdimScheduler),
    /// UnCLIP.
    UnClip(UnClipScheduler),
    /// DPM-Solver++ multistep.
    DpmSolverMultistep(DpmSolverMultistepScheduler),
}

macro_rules! dispatch {
    ($self:expr, $s:ident => $body:expr) => {
        match $self {
            AnyScheduler::Ddpm($s) => $body,
            AnyScheduler::Ddim($s) => $body,
            AnyScheduler::UnClip($s) => $body,
            AnyScheduler::DpmSolverMultistep($s) => $body,
        }
    };
}

impl AnyScheduler {
    /// Build the class named by the config's `_class_name`.
    pub fn from_config(cfg: &SchedulerConfig) -> Result<Self> {
        let name = cfg.class_name().ok_or_else(|| {
            cfg.locate(Error::unsupported(
                "_class_name",
                "(missing)",
                "DDPMScheduler, DDIMScheduler, UnCLIPScheduler, DPMSolverMultistepScheduler",
            ))
        })?;
        let kind = SchedulerKind::from_class_name(name).map_err(|e| cfg.locate(e))?;
        Self::from_config_as(cfg, kind)
    }

    /// Read a `scheduler_config.json` and build its class.
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<Self> {
        Self::from_config(&SchedulerConfig::from_file(path)?)
    }

    /// diffusers' `Kind.from_config(cfg)`: build `kind` from any scheduler's config.
    pub fn from_config_as(cfg: &SchedulerConfig, kind: SchedulerKind) -> Result<Self> {
        Ok(match kind {
            SchedulerKind::Ddpm => Self::Ddpm(DdpmScheduler::from_config(cfg)?),
            SchedulerKind::Ddim => Self::Ddim(DdimScheduler::from_config(cfg)?),
            SchedulerKind::UnClip => Self::UnClip(UnClipScheduler::from_config(cfg)?),
            SchedulerKind::DpmSolverMultistep => {
                Self::DpmSolverMultistep(DpmSolverMultistepScheduler::from_config(cfg)?)
            }
        })
    }

    /// Which class this is.
    pub fn kind(&self) -> SchedulerKind {
        match self {
            Self::Ddpm(_) => SchedulerKind::Ddpm,
            Self::Ddim(_) => SchedulerKind::Ddim,
            Self::UnClip(_) => SchedulerKind::UnClip,
            Self::DpmSolverMultistep(_) => SchedulerKind::DpmSolverMultistep,
        }
    }

    /// β, α and ᾱ tables.
    pub fn tables(&self) -> &NoiseTables {
        dispatch!(self, s => s.tables())
    }

    /// The integer timesteps.
    pub fn timesteps_i64(&self) -> &[i64] {
        dispatch!(self, s => s.timesteps_i64())
    }
}

impl Scheduler for AnyScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        dispatch!(self, s => s.set_timesteps(num_inference_steps))
    }

    fn timesteps(&self) -> &[f64] {
        dispatch!(self, s => s.timesteps())
    }

    fn num_train_timesteps(&self) -> usize {
        dispatch!(self, s => s.num_train_timesteps())
    }

    fn init_noise_sigma(&self) -> f64 {
        dispatch!(self, s => s.init_noise_sigma())
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        dispatch!(self, s => s.scale_model_input(sample, step_index))
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        dispatch!(self, s => s.step(model_output, step_index, sample, noise))
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        dispatch!(self, s => s.add_noise(original, noise, step_index))
    }

    fn uses_learned_variance(&self) -> bool {
        dispatch!(self, s => s.uses_learned_variance())
    }
}
