//! Progress bars (indicatif) and tracing output; the libraries never print.

use std::path::Path;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use kandinsky_pipeline::{Control, Stage, StepEvent};

/// Set up `tracing`: warnings to stderr, and a Chrome trace when `--tracing FILE` is given.
pub fn init_tracing(chrome: Option<&Path>) -> Option<tracing_chrome::FlushGuard> {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false);
    match chrome {
        Some(path) => {
            let (layer, guard) = tracing_chrome::ChromeLayerBuilder::new().file(path).build();
            tracing_subscriber::registry()
                .with(filter)
                .with(fmt)
                .with(layer)
                .init();
            Some(guard)
        }
        None => {
            tracing_subscriber::registry().with(filter).with(fmt).init();
            None
        }
    }
}

/// A spinner for a loading stage.
pub fn spinner(msg: &str) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("valid template"),
    );
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

/// Step bars for the prior and decoder loops.
pub struct Steps {
    bar: Option<ProgressBar>,
    stage: Option<Stage>,
    pub timings: Vec<(String, Duration)>,
    started: Instant,
}

impl Steps {
    pub fn new() -> Self {
        Self {
            bar: None,
            stage: None,
            timings: Vec::new(),
            started: Instant::now(),
        }
    }

    /// The step callback.
    pub fn on_step(&mut self, ev: &StepEvent<'_>) -> Control {
        if self.stage != Some(ev.stage) || self.bar.is_none() {
            if let Some(b) = self.bar.take() {
                b.finish_and_clear();
            }
            let pb = ProgressBar::new(ev.total as u64);
            pb.set_style(
                ProgressStyle::with_template("{msg:8} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            pb.set_message(match ev.stage {
                Stage::Prior => "prior",
                Stage::Decoder => "decoder",
            });
            self.bar = Some(pb);
            self.stage = Some(ev.stage);
        }
        if let Some(b) = &self.bar {
            b.set_position((ev.step + 1) as u64);
            if ev.step + 1 == ev.total {
                b.finish_and_clear();
                self.bar = None;
            }
        }
        Control::Continue
    }

    /// Record the time since the last mark under `name`.
    pub fn mark(&mut self, name: &str) {
        self.timings
            .push((name.to_string(), self.started.elapsed()));
        self.started = Instant::now();
    }

    /// `load prior 3.1 s · prior 1.2 s · … · total 25.4 s` (total: the sum of the stages).
    pub fn summary(&self) -> String {
        let total: Duration = self.timings.iter().map(|(_, d)| *d).sum();
        self.timings
            .iter()
            .map(|(n, d)| format!("{n} {:.1} s", d.as_secs_f64()))
            .chain(std::iter::once(format!(
                "total {:.1} s",
                total.as_secs_f64()
            )))
            .collect::<Vec<_>>()
            .join(" · ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_totals_the_stages() {
        let mut s = Steps::new();
        s.timings
            .push(("load prior".into(), Duration::from_millis(1500)));
        s.timings
            .push(("prior".into(), Duration::from_millis(2600)));
        assert_eq!(s.summary(), "load prior 1.5 s · prior 2.6 s · total 4.1 s");
    }
}
