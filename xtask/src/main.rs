//! Developer tasks: `cargo xtask <command>`.
//!
//! - `fixtures [--only a,b]`: create the pinned Python virtualenv (`.venv/`) if needed and
//!   regenerate `fixtures/` with the diffusers/transformers generator in `xtask/fixtures/`.
//! - `bench-compare [--only a,b] [--reps N] [--warmup W] [--threads T] [--large] [--no-write]
//!   [--keep-freed-memory]`:
//!   the same CPU f32 workloads with kandinsky-rs and diffusers/PyTorch, one process each;
//!   writes the table into `benches/RESULTS.md` (see `bench_compare.rs`).
//! - `movq-full`, `unet-full [--regenerate]`: one full-size network, diffusers vs kandinsky-rs.
//! - `pipeline-full [--regenerate]`: full-size prior and decoder folders in the hub's layout,
//!   diffusers' text2img vs the library's, then the CLI on them (`pipeline_full.rs`).

mod bench_compare;
mod movq_full;
mod pipeline_full;
mod python;
mod unet_full;

use anyhow::{bail, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        bail!("usage: cargo xtask <fixtures> [options]");
    };
    let rest = &args[1..];
    match cmd.as_str() {
        "fixtures" => python::fixtures(rest),
        "bench-compare" => bench_compare::bench_compare(rest),
        "movq-full" => movq_full::movq_full(rest),
        "unet-full" => unet_full::unet_full(rest),
        "pipeline-full" => pipeline_full::pipeline_full(rest),
        other => bail!("unknown xtask command `{other}`; available: fixtures, bench-compare, movq-full, unet-full, pipeline-full"),
    }
}
