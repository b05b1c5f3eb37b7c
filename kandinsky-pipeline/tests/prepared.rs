//! The denoising loops prepare their conditioning once per generation and use it at every
//! step (`Denoiser::prepare` / `EmbeddingPrior::prepare`), and a network that prepares
//! nothing (the traits' defaults) still gets the same result.

#[allow(dead_code)] // each test file uses its own share of the helpers
mod common;

use std::cell::Cell;

use candle_core::{DType, Device, Tensor};
use common::tiny;
use kandinsky_core::testing::diff;
use kandinsky_core::traits::{
    Denoiser, DenoiserCondition, EmbeddingPrior, PreparedCondition, PreparedPriorCondition,
    PriorCondition,
};
use kandinsky_pipeline::decoder::{self, DecoderModels, DecoderOptions};
use kandinsky_pipeline::prior::{self, PriorModels, PriorOptions};
use kandinsky_pipeline::{DecoderPipeline, Hooks, ImageEncoderUse, Placement, PriorPipeline};

/// Calls of each kind a loop made.
#[derive(Default)]
struct Calls {
    predict: Cell<usize>,
    prepare: Cell<usize>,
    predict_prepared: Cell<usize>,
}

impl Calls {
    fn count(c: &Cell<usize>) {
        c.set(c.get() + 1);
    }

    fn get(&self) -> [usize; 3] {
        [
            self.predict.get(),
            self.prepare.get(),
            self.predict_prepared.get(),
        ]
    }
}

/// A UNet wrapper that counts calls; with `prepares = false` it implements `predict` only
/// (the trait's default preparation: nothing).
struct CountingUNet<'a> {
    inner: &'a dyn Denoiser,
    prepares: bool,
    calls: Calls,
}

impl Denoiser for CountingUNet<'_> {
    fn predict(
        &self,
        s: &Tensor,
        t: &[f64],
        c: &DenoiserCondition,
    ) -> kandinsky_core::Result<Tensor> {
        Calls::count(&self.calls.predict);
        self.inner.predict(s, t, c)
    }
    fn prepare(&self, c: &DenoiserCondition) -> kandinsky_core::Result<PreparedCondition> {
        Calls::count(&self.calls.prepare);
        if self.prepares {
            self.inner.prepare(c)
        } else {
            Ok(PreparedCondition::new(c.clone(), Vec::new()))
        }
    }
    fn predict_prepared(
        &self,
        s: &Tensor,
        t: &[f64],
        p: &PreparedCondition,
    ) -> kandinsky_core::Result<Tensor> {
        Calls::count(&self.calls.predict_prepared);
        if self.prepares {
            self.inner.predict_prepared(s, t, p)
        } else {
            self.predict(s, t, p.condition())
        }
    }
    fn sample_channels(&self) -> usize {
        self.inner.sample_channels()
    }
    fn out_channels(&self) -> usize {
        self.inner.out_channels()
    }
    fn device(&self) -> &Device {
        self.inner.device()
    }
    fn dtype(&self) -> DType {
        self.inner.dtype()
    }
}

/// The same for the prior.
struct CountingPrior<'a> {
    inner: &'a dyn EmbeddingPrior,
    prepares: bool,
    calls: Calls,
}

impl EmbeddingPrior for CountingPrior<'_> {
    fn predict(
        &self,
        l: &Tensor,
        t: f64,
        c: &PriorCondition<'_>,
    ) -> kandinsky_core::Result<Tensor> {
        Calls::count(&self.calls.predict);
        self.inner.predict(l, t, c)
    }
    fn prepare(&self, c: &PriorCondition<'_>) -> kandinsky_core::Result<PreparedPriorCondition> {
        Calls::count(&self.calls.prepare);
        if self.prepares {
            self.inner.prepare(c)
        } else {
            Ok(PreparedPriorCondition::new(c, Vec::new()))
        }
    }
    fn predict_prepared(
        &self,
        l: &Tensor,
        t: f64,
        p: &PreparedPriorCondition,
    ) -> kandinsky_core::Result<Tensor> {
        Calls::count(&self.calls.predict_prepared);
        if self.prepares {
            self.inner.predict_prepared(l, t, p)
        } else {
            self.predict(l, t, &p.condition().view())
        }
    }
    fn post_process_latents(&self, l: &Tensor) -> kandinsky_core::Result<Tensor> {
        self.inner.post_process_latents(l)
    }
    fn embedding_dim(&self) -> usize {
        self.inner.embedding_dim()
    }
    fn device(&self) -> &Device {
        self.inner.device()
    }
    fn dtype(&self) -> DType {
        self.inner.dtype()
    }
}

#[test]
fn decoder_loop_prepares_once() -> anyhow::Result<()> {
    let cpu = Placement::cpu();
    let mut d = DecoderPipeline::load(
        &tiny("kandinsky-2-2-decoder"),
        &cpu,
        &cpu,
        Default::default(),
    )?;
    let e = d.unet.image_embed_dim();
    let embeds = Tensor::randn(0f32, 1.0, (1, e), &Device::Cpu)?;
    let negative = Tensor::randn(0f32, 1.0, (1, e), &Device::Cpu)?;
    let opts = DecoderOptions {
        height: 64,
        width: 64,
        steps: 3,
        guidance_scale: 4.0,
        seed: 7,
        ..Default::default()
    };
    let mut run = |prepares: bool| -> anyhow::Result<(Tensor, [usize; 3])> {
        let unet = CountingUNet {
            inner: &d.unet,
            prepares,
            calls: Calls::default(),
        };
        let models = DecoderModels {
            unet: &unet,
            movq: &d.movq,
            text: None,
        };
        let latents = decoder::text2img(
            &models,
            &mut d.scheduler,
            &embeds,
            &negative,
            &opts,
            None,
            &mut Hooks::default(),
        )?;
        Ok((latents, unet.calls.get()))
    };
    let (prepared, calls) = run(true)?;
    // [predict, prepare, predict_prepared]: one preparation, one prepared call per step.
    assert_eq!(calls, [0, 1, 3]);
    let (plain, calls) = run(false)?;
    assert_eq!(
        calls,
        [3, 1, 3],
        "a network that prepares nothing is called per step"
    );
    // The same arithmetic, hoisted: bit-identical on the CPU.
    assert_eq!(diff(&prepared, &plain)?.max_abs, 0.0);
    Ok(())
}

#[test]
fn prior_loop_prepares_once() -> anyhow::Result<()> {
    let cpu = Placement::cpu();
    let mut p = PriorPipeline::load(
        &tiny("kandinsky-2-2-prior"),
        &cpu,
        &cpu,
        ImageEncoderUse::ZeroEmbeddingOnly { cache: None },
    )?;
    let opts = PriorOptions {
        steps: 4,
        guidance_scale: 4.0,
        seed: 3,
        ..Default::default()
    };
    let prompts = ["a red cat".to_string(), "two boats at dusk".to_string()];
    let mut run = |prepares: bool| -> anyhow::Result<(Tensor, [usize; 3])> {
        let prior = CountingPrior {
            inner: &p.prior,
            prepares,
            calls: Calls::default(),
        };
        let models = PriorModels {
            tokenizer: &p.tokenizer,
            text_encoder: &p.text_encoder,
            prior: &prior,
        };
        let out = prior::prior(
            &models,
            &mut p.scheduler,
            &prompts,
            None,
            &p.zero_image_embed,
            &opts,
            &mut Hooks::default(),
        )?;
        Ok((out.image_embeds, prior.calls.get()))
    };
    let (prepared, calls) = run(true)?;
    assert_eq!(calls, [0, 1, 4]);
    let (full, calls) = run(false)?;
    assert_eq!(calls, [4, 1, 4]);
    // The prepared prior runs 3 of 81 tokens per step against cached keys and values: the
    // same values summed over fewer rows, so equal up to f32 rounding (embeddings are O(1)).
    let d = diff(&prepared, &full)?;
    assert!(d.max_abs <= 1e-5, "prepared vs full prior loop: {d:?}");
    Ok(())
}
