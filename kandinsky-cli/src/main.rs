//! `kandinsky`: Kandinsky 2.2 text-to-image from the command line.

mod args;
mod output;
mod progress;
mod run;

use clap::Parser;

fn main() {
    // Large CPU intermediates are reused instead of page-faulted in again on every step.
    kandinsky_core::device::keep_freed_memory();
    let cli = args::Cli::parse();
    let _guard = progress::init_tracing(cli.tracing.as_deref());
    if let Err(e) = run::run(cli) {
        // One clear line a new user can act on.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
