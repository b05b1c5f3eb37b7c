//! Parity with diffusers 0.42.1: tables, timesteps, recorded step trajectories, add_noise and
//! img2img strength, from `fixtures/schedulers/` (written by `xtask/fixtures/gen_schedulers.py`).

use std::collections::HashMap;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Tensor};
use kandinsky_core::noise::RecordedNoise;
use kandinsky_core::testing::{assert_close, fixtures_dir, get, load_fixture};
use kandinsky_core::traits::Scheduler;
use kandinsky_schedulers::{
    AnyScheduler, DdimScheduler, DdimSchedulerConfig, SchedulerConfig, SchedulerKind,
};
use serde_json::Value;

/// Max abs difference allowed on f32 step outputs (the bar).
const STEP_TOL: f32 = 1e-6;
/// Max abs difference allowed at the end of a whole free-running trajectory (≤ 25 steps;
/// the third-order multistep extrapolation amplifies one-ulp differences the most).
const TRAJECTORY_TOL: f32 = 5e-5;

fn ints(t: &Tensor) -> Result<Vec<i64>> {
    Ok(t.to_dtype(DType::I64)?.to_vec1::<i64>()?)
}

fn floats(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

/// Max relative difference (to the reference) of two equally long lists.
fn max_rel(ours: &[f32], reference: &[f32]) -> f32 {
    assert_eq!(ours.len(), reference.len(), "lengths differ");
    ours.iter()
        .zip(reference)
        .map(|(a, b)| if a == b { 0.0 } else { ((a - b) / b).abs() })
        .fold(0f32, f32::max)
}

fn build(cfg: Value) -> Result<AnyScheduler> {
    Ok(AnyScheduler::from_config(&SchedulerConfig::from_value(
        cfg,
    )?)?)
}

#[test]
fn beta_tables_match_torch_bit_for_bit() -> Result<()> {
    let fx = load_fixture("schedulers/tables.safetensors")?;
    let cases = [
        (
            "linear_k22",
            serde_json::json!({"_class_name": "DDPMScheduler", "beta_start": 0.00085, "beta_end": 0.012}),
        ),
        (
            "linear_default",
            serde_json::json!({"_class_name": "DDPMScheduler"}),
        ),
        (
            "scaled_linear",
            serde_json::json!({"_class_name": "DDPMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}),
        ),
        (
            "squaredcos_cap_v2",
            serde_json::json!({"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2"}),
        ),
        (
            "unclip",
            serde_json::json!({"_class_name": "UnCLIPScheduler"}),
        ),
    ];
    for (name, cfg) in cases {
        let s = build(cfg)?;
        for (what, ours) in [
            ("betas", &s.tables().betas),
            ("alphas_cumprod", &s.tables().alphas_cumprod),
        ] {
            let reference = floats(get(&fx, &format!("{name}.{what}"))?)?;
            assert_eq!(ours.len(), reference.len(), "{name}.{what} length");
            let max = ours
                .iter()
                .zip(&reference)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let differing = ours.iter().zip(&reference).filter(|(a, b)| a != b).count();
            eprintln!("{name}.{what}: {differing} entries differ, max abs {max:.3e}");
            // Exact: the tables are float32 in both, computed the same way.
            assert_eq!(differing, 0, "{name}.{what}: max abs {max:e}");
        }
    }
    // σ table of DPM-Solver (its default config). torch's vectorised f32 sqrt (MKL) is not
    // correctly rounded, so one ulp is allowed here.
    let s = build(serde_json::json!({"_class_name": "DPMSolverMultistepScheduler"}))?;
    let ac = &s.tables().alphas_cumprod;
    let ours: Vec<f32> = ac.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect();
    let rel = max_rel(&ours, &floats(get(&fx, "dpm.sigmas_train")?)?);
    eprintln!("dpm sigmas: max rel {rel:.3e}");
    assert!(rel <= 1.2e-7, "dpm sigma table: max rel {rel:e}");
    Ok(())
}

fn spacing_cfg(class: &str, spacing: &str) -> Value {
    serde_json::json!({
        "_class_name": class,
        "timestep_spacing": spacing,
        "steps_offset": if spacing == "leading" { 1 } else { 0 },
    })
}

#[test]
fn timesteps_match_for_every_spacing_and_step_count() -> Result<()> {
    let fx = load_fixture("schedulers/timesteps.safetensors")?;
    let counts = [1usize, 2, 3, 7, 13, 25, 50, 100, 300, 999, 1000];
    let (mut checked, mut refused) = (0, 0);
    for spacing in ["leading", "linspace", "trailing"] {
        for n in counts {
            for (tag, class) in [
                ("ddpm", "DDPMScheduler"),
                ("ddim", "DDIMScheduler"),
                ("dpm", "DPMSolverMultistepScheduler"),
            ] {
                let mut s = build(spacing_cfg(class, spacing))?;
                let reference = ints(get(&fx, &format!("{tag}.{spacing}.{n}"))?)?;
                if reference.iter().any(|&t| !(0..1000).contains(&t)) {
                    // diffusers leaves [0, T) here (leading + offset at 999/1000 steps,
                    // NumPy's trailing arange overshoot); we refuse with a typed error.
                    assert!(s.set_timesteps(n).is_err(), "{tag} {spacing} {n}");
                    refused += 1;
                    continue;
                }
                s.set_timesteps(n)?;
                assert_eq!(s.timesteps_i64(), &reference[..], "{tag} {spacing} {n}");
                assert_eq!(
                    s.timesteps(),
                    &reference.iter().map(|&t| t as f64).collect::<Vec<_>>()[..]
                );
                if let AnyScheduler::DpmSolverMultistep(d) = &s {
                    let sig = floats(get(&fx, &format!("dpm.{spacing}.{n}.sigmas"))?)?;
                    let rel = max_rel(d.sigmas(), &sig);
                    // torch's vectorised f32 sqrt is not correctly rounded: one ulp.
                    assert!(rel <= 1.2e-7, "dpm sigmas {spacing} {n}: rel {rel:e}");
                }
                checked += 1;
            }
        }
    }
    for n in counts {
        if n >= 2 {
            let mut s = build(serde_json::json!({"_class_name": "UnCLIPScheduler"}))?;
            s.set_timesteps(n)?;
            assert_eq!(
                s.timesteps_i64(),
                &ints(get(&fx, &format!("unclip.{n}"))?)?[..],
                "unclip {n}"
            );
            checked += 1;
        }
        for sched in ["linear", "squaredcos_cap_v2", "scaled_linear"] {
            let mut s = build(serde_json::json!({
                "_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": true,
                "beta_schedule": sched, "beta_start": 0.00085, "beta_end": 0.012,
            }))?;
            s.set_timesteps(n)?;
            let key = format!("dpm_karras.{sched}.{n}");
            assert_eq!(s.timesteps_i64(), &ints(get(&fx, &key)?)?[..], "{key}");
            let AnyScheduler::DpmSolverMultistep(d) = &s else {
                bail!("not a DPM-Solver")
            };
            let reference = floats(get(&fx, &format!("{key}.sigmas"))?)?;
            let max = max_rel(d.sigmas(), &reference);
            // NumPy's f64 pow/log vs Rust's: allow one float32 ulp (relative).
            assert!(max <= 1.2e-7, "{key} sigmas: max rel diff {max:e}");
            checked += 1;
        }
    }
    eprintln!("{checked} timestep lists identical, {refused} out-of-range lists refused");
    assert!(refused <= 9, "{refused} refused");
    Ok(())
}

#[test]
fn unclip_25_steps_round_half_to_even() -> Result<()> {
    let mut s = build(serde_json::json!({"_class_name": "UnCLIPScheduler"}))?;
    s.set_timesteps(25)?;
    let expected = [
        999, 957, 916, 874, 832, 791, 749, 708, 666, 624, 583, 541, 500, 458, 416, 375, 333, 291,
        250, 208, 166, 125, 83, 42, 0,
    ];
    assert_eq!(s.timesteps_i64(), &expected[..]);
    Ok(())
}

#[test]
fn strength_selects_the_tail_like_the_pipelines() -> Result<()> {
    let fx = load_fixture("schedulers/timesteps.safetensors")?;
    let dir = fixtures_dir().join("tiny");
    for n in [25usize, 50, 100] {
        for strength in [0.3, 0.5, 0.85, 1.0] {
            for (tag, repo) in [
                ("ddpm", "kandinsky-2-2-decoder"),
                ("unclip", "kandinsky-2-2-prior"),
            ] {
                let mut s = AnyScheduler::from_config(&SchedulerConfig::from_pipeline_dir(
                    dir.join(repo),
                )?)?;
                s.set_timesteps(n)?;
                let start = s.img2img_start(strength)?;
                let reference = ints(get(&fx, &format!("strength.{tag}.{n}.{strength:?}"))?)?;
                assert_eq!(
                    &s.timesteps_i64()[start..],
                    &reference[..],
                    "{tag} {n} {strength}"
                );
            }
        }
    }
    Ok(())
}

struct Case<'a> {
    name: &'a str,
    v: &'a Value,
}

impl Case<'_> {
    fn usize(&self, key: &str) -> Result<usize> {
        self.v[key]
            .as_u64()
            .map(|x| x as usize)
            .ok_or_else(|| anyhow!("{}: no `{key}`", self.name))
    }

    fn scheduler(&self) -> Result<AnyScheduler> {
        let mut cfg = SchedulerConfig::from_value(self.v["config"].clone())?;
        if let Some(over) = self.v["overrides"].as_object() {
            for (k, val) in over {
                cfg.set(k, val.clone());
            }
        }
        let mut s = match self.v["as_class"].as_str() {
            Some(class) => {
                AnyScheduler::from_config_as(&cfg, SchedulerKind::from_class_name(class)?)?
            }
            None => AnyScheduler::from_config(&cfg)?,
        };
        if let (AnyScheduler::Ddim(d), Some(eta)) = (&mut s, self.v["eta"].as_f64()) {
            d.set_eta(eta)?;
        }
        Ok(s)
    }
}

#[test]
fn step_trajectories_match_diffusers() -> Result<()> {
    let fx = load_fixture("schedulers/steps.safetensors")?;
    let cases: Value = serde_json::from_str(&std::fs::read_to_string(
        fixtures_dir().join("schedulers/cases.json"),
    )?)?;
    let cases = cases.as_array().context("cases.json is a list")?;
    let mut ran = 0;
    for v in cases {
        let name = v["name"].as_str().context("case name")?;
        if name.starts_with("add_noise.") {
            continue;
        }
        let case = Case { name, v };
        let mut s = case.scheduler().with_context(|| name.to_string())?;
        s.set_timesteps(case.usize("num_inference_steps")?)?;
        let (start, count, n_noise) = (
            case.usize("start")?,
            case.usize("count")?,
            case.usize("noise")?,
        );
        let noise: Vec<Tensor> = (0..n_noise)
            .map(|j| get(&fx, &format!("{name}.noise.{j}")).cloned())
            .collect::<kandinsky_core::Result<_>>()?;
        let sample = get(&fx, &format!("{name}.sample"))?.clone();
        // Teacher-forced: every step starts from diffusers' previous output, so each step is
        // held to STEP_TOL on its own (torch's f32 sqrt is not correctly rounded, so one-ulp
        // coefficient differences would otherwise add up over a trajectory).
        let mut forced = s.clone();
        let mut recorded = RecordedNoise::new(noise.clone());
        let mut worst = 0f32;
        for k in 0..count {
            let mo = get(&fx, &format!("{name}.model_output.{k}"))?;
            let x_in = match k {
                0 => sample.clone(),
                _ => get(&fx, &format!("{name}.out.{}", k - 1))?.clone(),
            };
            let x = forced.step(mo, start + k, &x_in, &mut recorded)?;
            let d = assert_close(
                &format!("{name} step {}", start + k),
                &x,
                get(&fx, &format!("{name}.out.{k}"))?,
                STEP_TOL,
            )?;
            worst = worst.max(d.max_abs);
        }
        assert_eq!(recorded.remaining(), 0, "{name}: recorded noise left over");
        // Free-running: our own outputs feed the next step; the whole trajectory stays close.
        let mut recorded = RecordedNoise::new(noise);
        let mut x = sample;
        for k in 0..count {
            let mo = get(&fx, &format!("{name}.model_output.{k}"))?;
            x = s.step(mo, start + k, &x, &mut recorded)?;
        }
        let end = get(&fx, &format!("{name}.out.{}", count - 1))?;
        let free = assert_close(&format!("{name} free-running"), &x, end, TRAJECTORY_TOL)?;
        eprintln!(
            "== {name}: {count} steps, worst per-step max abs {worst:.3e}, free-running {:.3e}",
            free.max_abs
        );
        ran += 1;
    }
    assert!(ran >= 25, "only {ran} trajectories");
    Ok(())
}

#[test]
fn add_noise_matches_diffusers() -> Result<()> {
    let fx = load_fixture("schedulers/steps.safetensors")?;
    let tiny = fixtures_dir().join("tiny");
    let decoder = SchedulerConfig::from_pipeline_dir(tiny.join("kandinsky-2-2-decoder"))?;
    let prior = SchedulerConfig::from_pipeline_dir(tiny.join("kandinsky-2-2-prior"))?;
    let k21_ddim = DdimScheduler::new(DdimSchedulerConfig {
        beta_start: 0.00085,
        beta_end: 0.012,
        clip_sample: false,
        set_alpha_to_one: false,
        steps_offset: 1,
        ..Default::default()
    })?;
    let cases: Vec<(&str, AnyScheduler, usize)> = vec![
        ("ddpm", AnyScheduler::from_config(&decoder)?, 100),
        ("ddim", AnyScheduler::Ddim(k21_ddim), 50),
        ("unclip", AnyScheduler::from_config(&prior)?, 25),
        (
            "dpm",
            AnyScheduler::from_config_as(&decoder, SchedulerKind::DpmSolverMultistep)?,
            20,
        ),
    ];
    for (tag, mut s, n) in cases {
        s.set_timesteps(n)?;
        let x0 = get(&fx, &format!("add_noise.{tag}.x0"))?;
        let z = get(&fx, &format!("add_noise.{tag}.noise"))?;
        for i in [0, n / 3, n - 1] {
            let ours = s.add_noise(x0, z, i)?;
            assert_close(
                &format!("add_noise {tag} step {i}"),
                &ours,
                get(&fx, &format!("add_noise.{tag}.{i}"))?,
                STEP_TOL,
            )?;
        }
    }
    Ok(())
}

#[test]
fn tiny_pipeline_configs_load_as_their_classes() -> Result<()> {
    let tiny = fixtures_dir().join("tiny");
    let expect: HashMap<&str, SchedulerKind> = [
        ("kandinsky-2-2-decoder", SchedulerKind::Ddpm),
        ("kandinsky-2-2-decoder-inpaint", SchedulerKind::Ddpm),
        ("kandinsky-2-2-controlnet-depth", SchedulerKind::Ddpm),
        ("kandinsky-2-2-prior", SchedulerKind::UnClip),
    ]
    .into_iter()
    .collect();
    for (repo, kind) in expect {
        let s = AnyScheduler::from_config(&SchedulerConfig::from_pipeline_dir(tiny.join(repo))?)?;
        assert_eq!(s.kind(), kind, "{repo}");
        if let AnyScheduler::Ddpm(d) = &s {
            // The decoder and controlnet configs clip x0, the inpaint one does not.
            assert_eq!(
                d.config().clip_sample,
                repo != "kandinsky-2-2-decoder-inpaint",
                "{repo}"
            );
            assert_eq!(d.config().steps_offset, 1);
        }
    }
    Ok(())
}

#[test]
fn dpm_config_written_by_diffusers_loads() -> Result<()> {
    // diffusers writes `"lambda_min_clipped": -Infinity`, which is not JSON.
    let dir = fixtures_dir().join("schedulers/dpm_from_decoder");
    let text = std::fs::read_to_string(dir.join("scheduler_config.json"))?;
    assert!(text.contains("-Infinity"), "fixture lost its -Infinity");
    let s = AnyScheduler::from_file(dir.join("scheduler_config.json"))?;
    let AnyScheduler::DpmSolverMultistep(d) = &s else {
        bail!("expected DPM-Solver, got {:?}", s.kind())
    };
    assert!(d.config().use_karras_sigmas);
    assert_eq!(d.config().timestep_spacing, "leading");
    assert_eq!(d.config().steps_offset, 1);
    assert_eq!(d.config().lambda_min_clipped, None);
    Ok(())
}
