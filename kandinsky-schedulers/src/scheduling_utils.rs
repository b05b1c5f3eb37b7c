//! What every scheduler shares: the scheduler config file, beta tables, timestep spacings,
//! dynamic thresholding and the exact scalar/tensor arithmetic helpers.
//!
//! Precision policy: diffusers keeps its tables as float32 torch tensors and computes the
//! per-step coefficients as 0-dim float32 tensors, so the coefficients here are computed in
//! `f32` from the `f32` tables, with the same operation order. NumPy-side computations
//! (timesteps, Karras sigmas, interpolation) are done in `f64` like NumPy.

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use kandinsky_core::{Error, Result};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// A `scheduler_config.json` as diffusers writes it: `_class_name` plus free-form fields.
///
/// Kept untyped so that one file can build any scheduler class (diffusers' `from_config`):
/// each class reads the fields it knows and takes its own defaults for the rest.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    fields: Map<String, Value>,
    path: Option<PathBuf>,
}

impl SchedulerConfig {
    /// Read a `scheduler_config.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                Error::MissingFile {
                    path: path.to_path_buf(),
                    hint: "expected a diffusers scheduler folder (see `save_pretrained`)".into(),
                }
            } else {
                Error::Io {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        let value: Value =
            serde_json::from_str(&python_literals_to_null(&text)).map_err(|source| {
                Error::Json {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
        let mut cfg = Self::from_value(value)?;
        cfg.path = Some(path.to_path_buf());
        Ok(cfg)
    }

    /// Read the `scheduler/scheduler_config.json` of a diffusers pipeline folder.
    pub fn from_pipeline_dir(dir: impl AsRef<Path>) -> Result<Self> {
        Self::from_file(dir.as_ref().join("scheduler").join("scheduler_config.json"))
    }

    /// Parse a config from JSON text. Python's non-standard `Infinity`/`-Infinity`/`NaN`
    /// literals (diffusers writes `"lambda_min_clipped": -Infinity`) are read as `null`,
    /// i.e. the field's default.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: Value =
            serde_json::from_str(&python_literals_to_null(text)).map_err(|source| Error::Json {
                path: PathBuf::from("<string>"),
                source,
            })?;
        Self::from_value(value)
    }

    /// Wrap a JSON value, which must be an object.
    pub fn from_value(value: Value) -> Result<Self> {
        match value {
            Value::Object(fields) => Ok(Self { fields, path: None }),
            other => Err(Error::invalid(format!(
                "a scheduler config must be a JSON object, got {other}"
            ))),
        }
    }

    /// An empty config (every field takes the class default) for `class_name`.
    pub fn for_class(class_name: &str) -> Self {
        let mut fields = Map::new();
        fields.insert("_class_name".into(), Value::String(class_name.into()));
        Self { fields, path: None }
    }

    /// `_class_name`, if present.
    pub fn class_name(&self) -> Option<&str> {
        self.fields.get("_class_name").and_then(Value::as_str)
    }

    /// The file this config was read from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The raw value of one field.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.fields.get(key)
    }

    /// Override one field (like the keyword arguments of diffusers' `from_config`).
    pub fn set(&mut self, key: &str, value: impl Into<Value>) -> &mut Self {
        self.fields.insert(key.to_string(), value.into());
        self
    }

    /// Builder form of [`SchedulerConfig::set`].
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.set(key, value);
        self
    }

    /// All fields.
    pub fn fields(&self) -> &Map<String, Value> {
        &self.fields
    }

    /// Deserialize into a class config; absent fields take that class's defaults, unknown
    /// fields are ignored.
    pub(crate) fn parse<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_value(Value::Object(self.fields.clone())).map_err(|source| Error::Json {
            path: self
                .path
                .clone()
                .unwrap_or_else(|| PathBuf::from("<scheduler config>")),
            source,
        })
    }

    /// Attach this config's file to an unsupported-value error.
    pub(crate) fn locate(&self, err: Error) -> Error {
        match &self.path {
            Some(p) => err.in_file(p),
            None => err,
        }
    }
}

/// Replace the bare `Infinity`, `-Infinity` and `NaN` tokens Python's `json` writes (outside
/// strings) with `null`.
pub fn python_literals_to_null(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_string = true;
        }
        let token = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t));
        match token {
            Some(t) => {
                out.push_str("null");
                rest = &rest[t.len()..];
            }
            None => {
                out.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    out
}

/// How the betas are laid out over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    /// `linspace(beta_start, beta_end)` (the Kandinsky decoder's).
    Linear,
    /// `linspace(√beta_start, √beta_end)²` (Stable Diffusion's).
    ScaledLinear,
    /// The cosine schedule of Nichol & Dhariwal, capped at 0.999 (the prior's).
    SquaredcosCapV2,
}

impl BetaSchedule {
    const ALLOWED: &'static str = "linear, scaled_linear, squaredcos_cap_v2";

    /// Parse diffusers' name.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "linear" => Ok(Self::Linear),
            "scaled_linear" => Ok(Self::ScaledLinear),
            "squaredcos_cap_v2" => Ok(Self::SquaredcosCapV2),
            other => Err(Error::unsupported("beta_schedule", other, Self::ALLOWED)),
        }
    }
}

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    /// The added noise ε.
    Epsilon,
    /// The clean sample x₀.
    Sample,
    /// v = √ᾱ·ε − √(1−ᾱ)·x₀.
    VPrediction,
}

impl PredictionType {
    pub(crate) fn parse(name: &str, allowed: &[Self]) -> Result<Self> {
        let p = match name {
            "epsilon" => Some(Self::Epsilon),
            "sample" => Some(Self::Sample),
            "v_prediction" => Some(Self::VPrediction),
            _ => None,
        };
        match p {
            Some(p) if allowed.contains(&p) => Ok(p),
            _ => Err(Error::unsupported(
                "prediction_type",
                name,
                allowed
                    .iter()
                    .map(|p| p.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            )),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Epsilon => "epsilon",
            Self::Sample => "sample",
            Self::VPrediction => "v_prediction",
        }
    }
}

/// How `set_timesteps` spreads the inference steps over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    /// `k·(T // N) + steps_offset` (the Kandinsky decoder's).
    Leading,
    /// `round(linspace(0, T−1, N))`.
    Linspace,
    /// `round(arange(T, 0, −T/N)) − 1`.
    Trailing,
}

impl TimestepSpacing {
    /// Parse diffusers' name.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "leading" => Ok(Self::Leading),
            "linspace" => Ok(Self::Linspace),
            "trailing" => Ok(Self::Trailing),
            other => Err(Error::unsupported(
                "timestep_spacing",
                other,
                "leading, linspace, trailing",
            )),
        }
    }
}

/// `torch.linspace(start, end, n, dtype=float32)` bit for bit: torch's CPU kernel evaluates
/// `start + step·i` for the first half and `end − step·(n−1−i)` for the second, in float32
/// with fused multiply-adds.
pub fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    match n {
        0 => vec![],
        1 => vec![start],
        _ => {
            let step = (end - start) / (n - 1) as f32;
            let half = n / 2;
            (0..n)
                .map(|i| {
                    if i < half {
                        step.mul_add(i as f32, start)
                    } else {
                        (-step).mul_add((n - 1 - i) as f32, end)
                    }
                })
                .collect()
        }
    }
}

/// `numpy.linspace(start, stop, num)` (endpoint included) in f64: `i·step + start`, the last
/// element set to `stop`.
pub fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return vec![];
    }
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    y[num - 1] = stop;
    y
}

/// `numpy.arange(start, stop, step)` for floats: length `ceil((stop − start)/step)`, values
/// `start + i·d` with `d = (start + step) − start` (NumPy fills from the first two values).
pub fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return vec![];
    }
    let len = len as usize;
    let second = start + step;
    let delta = second - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// Cosine ᾱ(t) of the `squaredcos_cap_v2` schedule.
fn alpha_bar_cosine(t: f64) -> f64 {
    ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
        .cos()
        .powi(2)
}

/// The betas of a schedule, as the float32 tensor diffusers stores. `squaredcos_cap_v2` is
/// computed in f64 (Python floats) and rounded once, like `torch.tensor(list, float32)`.
pub fn betas(
    schedule: BetaSchedule,
    beta_start: f64,
    beta_end: f64,
    num_train_timesteps: usize,
) -> Vec<f32> {
    match schedule {
        BetaSchedule::Linear => torch_linspace_f32(beta_start, beta_end, num_train_timesteps),
        BetaSchedule::ScaledLinear => {
            torch_linspace_f32(beta_start.sqrt(), beta_end.sqrt(), num_train_timesteps)
                .into_iter()
                .map(|b| b * b)
                .collect()
        }
        BetaSchedule::SquaredcosCapV2 => {
            let n = num_train_timesteps as f64;
            (0..num_train_timesteps)
                .map(|i| {
                    let t1 = i as f64 / n;
                    let t2 = (i + 1) as f64 / n;
                    (1.0 - alpha_bar_cosine(t2) / alpha_bar_cosine(t1)).min(0.999) as f32
                })
                .collect()
        }
    }
}

/// The float32 tables every DDPM-family scheduler derives from its betas.
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseTables {
    /// β_t.
    pub betas: Vec<f32>,
    /// α_t = 1 − β_t.
    pub alphas: Vec<f32>,
    /// ᾱ_t = Π α_s, accumulated in f64 and rounded per entry (torch's CPU `cumprod`).
    pub alphas_cumprod: Vec<f32>,
}

impl NoiseTables {
    /// Build the tables from betas.
    pub fn from_betas(betas: Vec<f32>) -> Self {
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        let mut acc = 1.0f64;
        let alphas_cumprod = alphas
            .iter()
            .map(|&a| {
                acc *= a as f64;
                acc as f32
            })
            .collect();
        Self {
            betas,
            alphas,
            alphas_cumprod,
        }
    }

    /// Tables from the shared beta fields of a config (`trained_betas` wins when given).
    pub(crate) fn from_fields(
        trained_betas: Option<&[f64]>,
        beta_schedule: &str,
        beta_start: f64,
        beta_end: f64,
        num_train_timesteps: usize,
    ) -> Result<Self> {
        if num_train_timesteps < 2 {
            return Err(Error::unsupported(
                "num_train_timesteps",
                num_train_timesteps,
                "at least 2",
            ));
        }
        let betas = match trained_betas {
            Some(b) => {
                if b.len() != num_train_timesteps {
                    return Err(Error::invalid(format!(
                        "trained_betas has {} entries, num_train_timesteps is {num_train_timesteps}",
                        b.len()
                    )));
                }
                b.iter().map(|&x| x as f32).collect()
            }
            None => betas(
                BetaSchedule::parse(beta_schedule)?,
                beta_start,
                beta_end,
                num_train_timesteps,
            ),
        };
        Ok(Self::from_betas(betas))
    }

    /// Number of training timesteps.
    pub fn len(&self) -> usize {
        self.betas.len()
    }

    /// Never true for a valid config (kept for clippy's `len_without_is_empty`).
    pub fn is_empty(&self) -> bool {
        self.betas.is_empty()
    }

    /// ᾱ at `t`, or `fallback` for a negative `t` (the step past the end of the chain).
    pub(crate) fn alpha_prod(&self, t: i64, fallback: f32) -> f32 {
        if t >= 0 {
            self.alphas_cumprod[t as usize]
        } else {
            fallback
        }
    }
}

/// Reject step counts diffusers cannot honour.
pub(crate) fn check_steps(num_inference_steps: usize, num_train_timesteps: usize) -> Result<()> {
    if num_inference_steps == 0 {
        return Err(Error::invalid(
            "num_inference_steps must be at least 1, got 0",
        ));
    }
    if num_inference_steps > num_train_timesteps {
        return Err(Error::invalid(format!(
            "num_inference_steps {num_inference_steps} exceeds num_train_timesteps {num_train_timesteps}"
        )));
    }
    Ok(())
}

/// Refuse a timestep list that leaves `[0, T)`: NumPy's float `arange` in the `trailing`
/// spacing yields one extra entry, −1, for some step counts (e.g. 217), and an offset can
/// push `leading` to T; diffusers would then index ᾱ[−1] (the last entry) or fail.
pub(crate) fn check_range(
    timesteps: Vec<i64>,
    num_inference_steps: usize,
    num_train_timesteps: usize,
) -> Result<Vec<i64>> {
    if let Some(bad) = timesteps
        .iter()
        .find(|&&t| t < 0 || t >= num_train_timesteps as i64)
    {
        return Err(Error::invalid(format!(
            "{num_inference_steps} steps with this timestep spacing give timestep {bad}, outside \
             [0, {num_train_timesteps}) (diffusers does the same and then misbehaves); use another \
             step count or spacing"
        )));
    }
    Ok(timesteps)
}

/// The DDPM/DDIM timesteps (descending) for a spacing (the step count passed [`check_steps`]).
pub(crate) fn spaced_timesteps(
    spacing: TimestepSpacing,
    num_inference_steps: usize,
    num_train_timesteps: usize,
    steps_offset: i64,
) -> Result<Vec<i64>> {
    let ts = spaced_timesteps_unchecked(
        spacing,
        num_inference_steps,
        num_train_timesteps,
        steps_offset,
    );
    check_range(ts, num_inference_steps, num_train_timesteps)
}

/// DPM-Solver++'s timesteps (descending) for a spacing (the step count passed
/// [`check_steps`]): diffusers spaces `n + 1` points for `linspace` and `leading` (the DDPM
/// formulas for `n + 1` steps) and drops the last one (0, or the offset); `trailing` is DDPM's
/// for `n` steps.
pub(crate) fn dpm_solver_timesteps(
    spacing: TimestepSpacing,
    num_inference_steps: usize,
    num_train_timesteps: usize,
    steps_offset: i64,
) -> Result<Vec<i64>> {
    let n = num_inference_steps;
    let ts = if spacing == TimestepSpacing::Trailing {
        spaced_timesteps_unchecked(spacing, n, num_train_timesteps, steps_offset)
    } else {
        let mut ts = spaced_timesteps_unchecked(spacing, n + 1, num_train_timesteps, steps_offset);
        ts.pop();
        ts
    };
    check_range(ts, n, num_train_timesteps)
}

fn spaced_timesteps_unchecked(
    spacing: TimestepSpacing,
    num_inference_steps: usize,
    num_train_timesteps: usize,
    steps_offset: i64,
) -> Vec<i64> {
    let n = num_inference_steps;
    let train = num_train_timesteps;
    match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (train - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|x| x.round_ties_even() as i64)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = (train / n) as i64;
            (0..n as i64)
                .rev()
                .map(|k| k * ratio + steps_offset)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = train as f64 / n as f64;
            np_arange(train as f64, 0.0, -ratio)
                .into_iter()
                .map(|x| x.round_ties_even() as i64 - 1)
                .collect()
        }
    }
}

/// Compute in at least f32: half-precision inputs are upcast for the step arithmetic.
pub(crate) fn upcast(t: &Tensor) -> Result<Tensor> {
    Ok(match t.dtype() {
        DType::F32 | DType::F64 => t.clone(),
        _ => t.to_dtype(DType::F32)?,
    })
}

/// `t · c` (one rounding per element, like torch's tensor × 0-dim tensor).
pub(crate) fn mul(t: &Tensor, c: f32) -> Result<Tensor> {
    Ok(t.affine(c as f64, 0.0)?)
}

/// `t / c` as a true division (candle's `Tensor / f64` multiplies by the reciprocal, which
/// rounds differently).
pub(crate) fn div(t: &Tensor, c: f32) -> Result<Tensor> {
    let c = Tensor::new(c, t.device())?.to_dtype(t.dtype())?;
    Ok(t.broadcast_div(&c)?)
}

/// Check that a model output and a sample can be stepped together; returns the output
/// without any learned-variance half when `split` and it has twice the sample's channels.
pub(crate) fn split_variance(
    model_output: &Tensor,
    sample: &Tensor,
    split: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let (mo, s) = (model_output.dims(), sample.dims());
    if mo.len() != s.len() || mo.is_empty() || mo[0] != s[0] || mo.get(2..) != s.get(2..) {
        return Err(Error::invalid(format!(
            "model output of shape {mo:?} does not match the sample of shape {s:?}"
        )));
    }
    if mo.len() >= 2 && mo[1] == 2 * s[1] && mo[1] != s[1] {
        let c = s[1];
        let eps = model_output.narrow(1, 0, c)?;
        let var = model_output.narrow(1, c, c)?;
        return Ok((eps, if split { Some(var) } else { None }));
    }
    if mo != s {
        return Err(Error::invalid(format!(
            "model output of shape {mo:?} does not match the sample of shape {s:?}"
        )));
    }
    Ok((model_output.clone(), None))
}

/// `torch.lerp` on floats (fused multiply-add form).
fn lerp(a: f32, b: f32, w: f32) -> f32 {
    let d = b - a;
    if w.abs() < 0.5 {
        w.mul_add(d, a)
    } else {
        (w - 1.0).mul_add(d, b)
    }
}

/// `torch.quantile(x, q)` with linear interpolation, on an unsorted slice.
pub fn torch_quantile(values: &[f32], q: f64) -> f32 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f32::NAN;
    }
    // torch computes the rank in the input dtype.
    let rank = q as f32 * (v.len() - 1) as f32;
    let below = rank.floor() as usize;
    let above = (rank.ceil() as usize).min(v.len() - 1);
    let w = rank - below as f32;
    lerp(v[below], v[above], w)
}

/// Dynamic thresholding (Imagen): per batch item, `s = clamp(quantile(|x0|, ratio), 1, max)`,
/// `x0 = clamp(x0, −s, s) / s`.
pub(crate) fn threshold_sample(x0: &Tensor, ratio: f64, max_value: f64) -> Result<Tensor> {
    let dtype = x0.dtype();
    let dims = x0.dims().to_vec();
    let batch = dims.first().copied().unwrap_or(1);
    let flat = x0
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_device(&candle_core::Device::Cpu)?
        .to_vec1::<f32>()?;
    let per = flat.len() / batch.max(1);
    let mut out = Vec::with_capacity(flat.len());
    for item in flat.chunks(per.max(1)) {
        let abs: Vec<f32> = item.iter().map(|x| x.abs()).collect();
        let s = torch_quantile(&abs, ratio).clamp(1.0, max_value as f32);
        out.extend(item.iter().map(|&x| x.clamp(-s, s) / s));
    }
    Ok(Tensor::from_vec(out, dims, &candle_core::Device::Cpu)?
        .to_device(x0.device())?
        .to_dtype(dtype)?)
}

/// Draw the step noise in the dtype and device of `like`.
pub(crate) fn draw_noise(
    noise: &mut dyn kandinsky_core::noise::NoiseSource,
    like: &Tensor,
) -> Result<Tensor> {
    noise.randn(like.shape(), like.dtype(), like.device())
}

/// Fetch `timesteps[step_index]` with a clear error.
pub(crate) fn timestep_at(timesteps: &[i64], step_index: usize) -> Result<i64> {
    if timesteps.is_empty() {
        return Err(Error::invalid(
            "set_timesteps must be called before stepping",
        ));
    }
    timesteps.get(step_index).copied().ok_or_else(|| {
        Error::invalid(format!(
            "step index {step_index} is out of range for {} timesteps",
            timesteps.len()
        ))
    })
}

/// `add_noise` of the DDPM family at a training timestep `t`: `√ᾱ_t·x0 + √(1−ᾱ_t)·ε`
/// (computed in f32 like diffusers; also used with Kandinsky 2.1's fixed img2img schedule).
pub fn add_noise_ddpm(
    tables: &NoiseTables,
    original: &Tensor,
    noise: &Tensor,
    timestep: i64,
) -> Result<Tensor> {
    if original.dims() != noise.dims() {
        return Err(Error::invalid(format!(
            "noise of shape {:?} does not match the sample of shape {:?}",
            noise.dims(),
            original.dims()
        )));
    }
    if timestep < 0 || timestep as usize >= tables.len() {
        return Err(Error::invalid(format!(
            "timestep {timestep} is outside [0, {})",
            tables.len()
        )));
    }
    let dtype = original.dtype();
    let (x, n) = (upcast(original)?, upcast(noise)?);
    let ac = tables.alphas_cumprod[timestep as usize];
    let out = (mul(&x, ac.sqrt())? + mul(&n, (1.0 - ac).sqrt())?)?;
    Ok(out.to_dtype(dtype)?)
}

/// `i64` timesteps as the `f64` list the [`kandinsky_core::traits::Scheduler`] trait exposes.
pub(crate) fn as_f64(ts: &[i64]) -> Vec<f64> {
    ts.iter().map(|&t| t as f64).collect()
}
