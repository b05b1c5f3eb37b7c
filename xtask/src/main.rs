//! Developer tasks: `cargo xtask <command>`.
//!
//! - `fixtures [--only a,b]`: create the pinned Python virtualenv (`.venv/`) if needed and
//!   regenerate `fixtures/` with the diffusers/transformers generator in `xtask/fixtures/`.

mod movq_full;
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
        "movq-full" => movq_full::movq_full(rest),
        "unet-full" => unet_full::unet_full(rest),
        other => bail!("unknown xtask command `{other}`; available: fixtures"),
    }
}
