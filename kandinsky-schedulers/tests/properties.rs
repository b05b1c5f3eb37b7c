//! Invariants (proptest), DPM-Solver++ convergence order, bad input and half precision.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use kandinsky_core::noise::{RecordedNoise, SeededNoise};
use kandinsky_core::traits::Scheduler;
use kandinsky_core::Error;
use kandinsky_schedulers::{
    AnyScheduler, DdimScheduler, DdimSchedulerConfig, DpmSolverMultistepScheduler,
    DpmSolverMultistepSchedulerConfig, SchedulerConfig, SchedulerKind,
};
use proptest::prelude::*;
use serde_json::json;

fn build(cfg: serde_json::Value) -> AnyScheduler {
    AnyScheduler::from_config(&SchedulerConfig::from_value(cfg).expect("object"))
        .expect("valid config")
}

fn spacing_name(i: usize) -> &'static str {
    ["leading", "linspace", "trailing"][i % 3]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn timesteps_strictly_decrease_inside_the_training_range(
        n in 1usize..=500, spacing in 0usize..3, offset in 0i64..=1, class in 0usize..3,
    ) {
        let class = ["DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler"][class];
        let mut s = build(json!({
            "_class_name": class, "timestep_spacing": spacing_name(spacing), "steps_offset": offset,
        }));
        if let Err(e) = s.set_timesteps(n) {
            // Only NumPy's trailing `arange` can overshoot to timestep −1 (see set_timesteps).
            prop_assert!(spacing_name(spacing) == "trailing", "{}", e);
            return Ok(());
        }
        let ts = s.timesteps_i64();
        prop_assert!(ts.len() == n || (spacing_name(spacing) == "trailing" && ts.len() == n + 1), "{:?}", ts);
        prop_assert!(ts.windows(2).all(|w| w[0] > w[1]), "{:?}", ts);
        prop_assert!(ts.iter().all(|&t| (0..1000).contains(&t)), "{:?}", ts);
    }

    #[test]
    fn unclip_timesteps_strictly_decrease(n in 2usize..=1000) {
        let mut s = build(json!({"_class_name": "UnCLIPScheduler"}));
        s.set_timesteps(n).unwrap();
        let ts = s.timesteps_i64();
        prop_assert_eq!(ts.first().copied(), Some(999));
        prop_assert_eq!(ts.last().copied(), Some(0));
        prop_assert!(ts.windows(2).all(|w| w[0] > w[1]));
    }

    #[test]
    fn alphas_cumprod_strictly_decrease_in_the_unit_interval(
        start in 1e-5f64..5e-3, span in 1e-3f64..0.05, schedule in 0usize..3,
    ) {
        let schedule = ["linear", "scaled_linear", "squaredcos_cap_v2"][schedule];
        let s = build(json!({
            "_class_name": "DDPMScheduler", "beta_schedule": schedule,
            "beta_start": start, "beta_end": start + span,
        }));
        let ac = &s.tables().alphas_cumprod;
        prop_assert!(ac.iter().all(|&a| a > 0.0 && a < 1.0));
        prop_assert!(ac.windows(2).all(|w| w[0] > w[1]));
    }

    #[test]
    fn ddim_with_eta_zero_is_deterministic(seed in 0u64..1000, n in 2usize..60, idx in 0usize..60) {
        let idx = idx % n;
        let mut s = DdimScheduler::new(DdimSchedulerConfig::default()).unwrap();
        s.set_timesteps(n).unwrap();
        let x = kandinsky_core::noise::randn_seeded(seed, (1, 4, 3, 3), DType::F32, &Device::Cpu).unwrap();
        let eps = kandinsky_core::noise::randn_seeded(seed + 1, (1, 4, 3, 3), DType::F32, &Device::Cpu).unwrap();
        // An empty recorded source errors if anything is drawn.
        let a = s.step(&eps, idx, &x, &mut RecordedNoise::default()).unwrap();
        let b = s.step(&eps, idx, &x, &mut SeededNoise::new(seed + 7, 1)).unwrap();
        prop_assert_eq!(a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }

    #[test]
    fn add_noise_then_the_epsilon_formula_recovers_x0(
        seed in 0u64..1000, n in 1usize..100, idx in 0usize..100, class in 0usize..3,
    ) {
        let idx = idx % n;
        let class = ["DDPMScheduler", "DDIMScheduler", "UnCLIPScheduler"][class];
        let mut s = build(json!({"_class_name": class}));
        s.set_timesteps(n.max(2)).unwrap();
        let idx = idx % s.timesteps().len();
        let x0 = kandinsky_core::noise::randn_seeded(seed, (2, 4, 3, 3), DType::F32, &Device::Cpu).unwrap();
        let eps = kandinsky_core::noise::randn_seeded(seed + 1, (2, 4, 3, 3), DType::F32, &Device::Cpu).unwrap();
        let xt = s.add_noise(&x0, &eps, idx).unwrap();
        let a = s.tables().alphas_cumprod[s.timesteps_i64()[idx] as usize] as f64;
        let rec = ((xt - (eps * (1.0 - a).sqrt()).unwrap()).unwrap() / a.sqrt()).unwrap();
        let err = (rec - &x0).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        // f32 rounding of x_t is amplified by 1/√ᾱ.
        prop_assert!((err as f64) < 4e-6 / a.sqrt(), "err {} at ᾱ {}", err, a);
    }
}

/// Error of DPM-Solver++ at `order` with `n` steps on dx/dλ-semilinear ODE whose data
/// prediction is x̂₀(λ) = cos λ: x_t = (σ_t/σ_s)·x_s + σ_t·[F(λ_t) − F(λ_s)],
/// F(λ) = e^λ (cos λ + sin λ)/2 (σ_t, α_t the VP noise/signal scales, λ = ln α_t − ln σ_t).
fn dpm_error(order: usize, n: usize) -> Result<f64> {
    let mut s = DpmSolverMultistepScheduler::new(DpmSolverMultistepSchedulerConfig {
        solver_order: order,
        prediction_type: "sample".into(),
        final_sigmas_type: "sigma_min".into(),
        lower_order_final: false,
        // Karras sigmas are smooth in λ (integer timesteps near t = 0 are not).
        use_karras_sigmas: true,
        ..Default::default()
    })?;
    s.set_timesteps(n)?;
    let sig: Vec<f64> = s.sigmas().iter().map(|&x| x as f64).collect();
    let vp = |sigma: f64| {
        let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
        (alpha, sigma * alpha, -sigma.ln())
    };
    let f = |l: f64| l.exp() * (l.cos() + l.sin()) / 2.0;
    let x_start = 0.3f64;
    let mut x = Tensor::new(&[[x_start as f32]], &Device::Cpu)?;
    for (i, &sigma) in sig.iter().take(n).enumerate() {
        let (_, _, lambda) = vp(sigma);
        let mo = Tensor::new(&[[lambda.cos() as f32]], &Device::Cpu)?;
        x = s.step(&mo, i, &x, &mut RecordedNoise::default())?;
    }
    let (_, sigma_s, lambda_s) = vp(sig[0]);
    let (_, sigma_t, lambda_t) = vp(sig[n]);
    let exact = sigma_t / sigma_s * x_start + sigma_t * (f(lambda_t) - f(lambda_s));
    let got = x.flatten_all()?.to_vec1::<f32>()?[0] as f64;
    Ok((got - exact).abs())
}

#[test]
fn dpm_solver_converges_with_its_stated_order() -> Result<()> {
    for (order, lo, hi) in [(1usize, 1.6, 2.6), (2, 3.0, 6.0)] {
        let errs: Vec<f64> = [12usize, 24, 48, 96]
            .into_iter()
            .map(|n| dpm_error(order, n))
            .collect::<Result<_>>()?;
        let ratios: Vec<f64> = errs.windows(2).map(|w| w[0] / w[1]).collect();
        eprintln!("order {order}: errors {errs:?}, ratios {ratios:?}");
        for r in &ratios[1..] {
            assert!(
                (lo..hi).contains(r),
                "order {order}: error ratio {r} when halving the step, expected ≈ {}",
                1 << order
            );
        }
    }
    Ok(())
}

fn is_unsupported(e: &Error, field: &str) -> bool {
    matches!(e, Error::UnsupportedConfig { field: f, .. } if f == field)
}

#[test]
fn bad_input_gives_typed_errors() {
    let try_build = |cfg: serde_json::Value| {
        AnyScheduler::from_config(&SchedulerConfig::from_value(cfg).unwrap()).unwrap_err()
    };
    let e = try_build(json!({"_class_name": "LMSDiscreteScheduler"}));
    assert!(is_unsupported(&e, "_class_name"), "{e}");
    assert!(e.to_string().contains("DDPMScheduler"), "{e}");
    let e = try_build(json!({"beta_schedule": "linear"}));
    assert!(is_unsupported(&e, "_class_name"), "{e}");
    let e = try_build(json!({"_class_name": "DDPMScheduler", "beta_schedule": "sigmoid"}));
    assert!(is_unsupported(&e, "beta_schedule") && e.to_string().contains("squaredcos_cap_v2"));
    let e = try_build(json!({"_class_name": "DDPMScheduler", "variance_type": "wide"}));
    assert!(is_unsupported(&e, "variance_type") && e.to_string().contains("learned_range"));
    let e = try_build(json!({"_class_name": "DDIMScheduler", "timestep_spacing": "karras"}));
    assert!(is_unsupported(&e, "timestep_spacing"), "{e}");
    let e = try_build(json!({"_class_name": "UnCLIPScheduler", "beta_schedule": "linear"}));
    assert!(is_unsupported(&e, "beta_schedule"), "{e}");
    let e = try_build(
        json!({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}),
    );
    assert!(is_unsupported(&e, "algorithm_type"), "{e}");
    let e = try_build(json!({"_class_name": "DDPMScheduler", "prediction_type": "flow"}));
    assert!(is_unsupported(&e, "prediction_type"), "{e}");

    for kind in SchedulerKind::ALL {
        let mut s = AnyScheduler::from_config_as(&SchedulerConfig::for_class("x"), kind).unwrap();
        assert!(
            matches!(s.set_timesteps(0), Err(Error::InvalidInput(_))),
            "{kind:?}"
        );
        assert!(
            matches!(s.set_timesteps(1001), Err(Error::InvalidInput(_))),
            "{kind:?}"
        );
        s.set_timesteps(10).unwrap();
        for strength in [-0.1, 1.5, f64::NAN] {
            assert!(matches!(
                s.img2img_start(strength),
                Err(Error::InvalidInput(_))
            ));
        }
        let x = Tensor::zeros((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
        let wrong = Tensor::zeros((1, 3, 2, 2), DType::F32, &Device::Cpu).unwrap();
        let mut noise = SeededNoise::new(0, 1);
        assert!(matches!(
            s.step(&wrong, 0, &x, &mut noise),
            Err(Error::InvalidInput(_))
        ));
        assert!(matches!(
            s.step(&x, 10, &x, &mut noise),
            Err(Error::InvalidInput(_))
        ));
        assert!(matches!(
            s.add_noise(&x, &wrong, 0),
            Err(Error::InvalidInput(_))
        ));
    }
    let mut unclip = build(json!({"_class_name": "UnCLIPScheduler"}));
    assert!(matches!(
        unclip.set_timesteps(1),
        Err(Error::InvalidInput(_))
    ));
    // strength 0.3 of 100 steps keeps int(30.000000000000004) = 30 steps.
    let mut ddpm = build(json!({"_class_name": "DDPMScheduler"}));
    ddpm.set_timesteps(100).unwrap();
    assert_eq!(ddpm.img2img_start(0.3).unwrap(), 70);
}

#[test]
fn half_precision_steps_follow_f32() -> Result<()> {
    let dev = Device::Cpu;
    for kind in SchedulerKind::ALL {
        let cfg = SchedulerConfig::for_class("x");
        let mut s32 = AnyScheduler::from_config_as(&cfg, kind)?;
        s32.set_timesteps(10)?;
        let x = kandinsky_core::noise::randn_seeded(3, (1, 4, 4, 4), DType::F32, &dev)?;
        let mo = (kandinsky_core::noise::randn_seeded(4, (1, 4, 4, 4), DType::F32, &dev)? * 0.5)?;
        for dtype in [DType::F16, DType::BF16] {
            // A few steps stay in the dtype and finite.
            let mut s = s32.clone();
            let mut b = x.to_dtype(dtype)?;
            for i in 0..3 {
                b = s.step(
                    &mo.to_dtype(dtype)?,
                    i,
                    &b,
                    &mut SeededNoise::new(i as u64, 1),
                )?;
                assert_eq!(b.dtype(), dtype);
            }
            let m = b
                .to_dtype(DType::F32)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(m.is_finite(), "{kind:?} {dtype:?}");
            // One step in half precision vs f32 from the same input.
            let x_h = x.to_dtype(dtype)?;
            let mut s1 = s32.clone();
            let mut s2 = s32.clone();
            let r32 = s1.step(
                &mo,
                0,
                &x_h.to_dtype(DType::F32)?,
                &mut SeededNoise::new(9, 1),
            )?;
            let rh = s2.step(&mo.to_dtype(dtype)?, 0, &x_h, &mut SeededNoise::new(9, 1))?;
            let d = (rh.to_dtype(DType::F32)? - r32)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            let tol = if dtype == DType::F16 { 1e-2 } else { 5e-2 };
            assert!(d < tol, "{kind:?} {dtype:?}: {d}");
        }
    }
    Ok(())
}
