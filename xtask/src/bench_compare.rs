//! `cargo xtask bench-compare [--only a,b] [--reps N] [--warmup W] [--threads T] [--large]
//! [--no-write]`: the same CPU f32 workloads with kandinsky-rs and with diffusers/PyTorch (the
//! fixture virtualenv), in the same run on the same machine, one workload per process (so each
//! process's peak RSS belongs to its workload), alternating Rust and PyTorch per workload.
//!
//! The Rust side is `benches/src/bin/cpu_compare.rs` (release build), the Python side
//! `xtask/bench/diffusers_bench.py --cpu-workload`; both print one JSON line. The table (times,
//! ratios, peak memory) with the machine, thread count, load average and versions replaces the
//! "CPU comparison" section of `benches/RESULTS.md` (the other sections are kept); the raw
//! JSON lines go to `target/bench-compare/results.jsonl`.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::python::root;

/// Workloads run by default, in order (`unet_step_512` and `prior_loop_25` only with
/// `--large`).
const DEFAULT: &[&str] = &[
    "attention_32x32",
    "attention_48x48",
    "clip_text",
    "prior_step",
    "movq_decode_256",
    "movq_decode_512",
    "unet_step_256",
];
const LARGE: &[&str] = &["unet_step_512", "prior_loop_25"];

/// The heading that starts the section this command owns in `benches/RESULTS.md`.
pub const SECTION: &str = "## CPU comparison (CPU, f32)";
/// The heading of the `--keep-freed-memory` section.
pub const SECTION_KEEP: &str = "## CPU comparison, glibc keeping freed memory (CPU, f32)";
/// glibc settings of `--keep-freed-memory`: never `mmap` (so a freed buffer is reused instead
/// of being unmapped and page-faulted in again by the next allocation) and never trim the heap.
pub const KEEP_TUNABLES: &str = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736";

struct Options {
    only: Option<Vec<String>>,
    reps: usize,
    warmup: usize,
    threads: usize,
    large: bool,
    write: bool,
    keep_freed: bool,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options {
        only: None,
        reps: 3,
        warmup: 1,
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        large: false,
        write: true,
        keep_freed: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |flag: &str| {
            it.next()
                .cloned()
                .with_context(|| format!("{flag} needs a value"))
        };
        let number = |flag: &str, v: String| -> Result<usize> {
            v.parse()
                .with_context(|| format!("{flag}: `{v}` is not a positive number"))
        };
        match a.as_str() {
            "--only" => {
                o.only = Some(
                    value("--only")?
                        .split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect(),
                )
            }
            "--reps" => o.reps = number("--reps", value("--reps")?)?.max(1),
            "--warmup" => o.warmup = number("--warmup", value("--warmup")?)?,
            "--threads" => o.threads = number("--threads", value("--threads")?)?.max(1),
            "--large" => o.large = true,
            "--no-write" => o.write = false,
            "--keep-freed-memory" => o.keep_freed = true,
            other => bail!(
                "bench-compare: unknown option `{other}`; usage: cargo xtask bench-compare \
                 [--only a,b] [--reps N] [--warmup W] [--threads T] [--large] [--no-write] \
                 [--keep-freed-memory]"
            ),
        }
    }
    Ok(o)
}

/// One measured side of one workload (the JSON line of either runner).
#[derive(Debug, Clone, Default)]
struct Measured {
    median_ms: f64,
    min_ms: f64,
    peak_mib: f64,
    start_mib: f64,
    threads: usize,
    raw: String,
}

/// Pull `"key": number` out of a flat JSON line (xtask has no JSON dependency; both runners
/// print flat objects whose numbers are plain decimals).
fn json_number(line: &str, key: &str) -> Option<f64> {
    let pat = format!("\"{key}\":");
    let start = line.find(&pat)? + pat.len();
    let rest = line[start..].trim_start();
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end].trim().parse().ok()
}

fn json_string(line: &str, key: &str) -> Option<String> {
    let pat = format!("\"{key}\":");
    let start = line.find(&pat)? + pat.len();
    let rest = line[start..].trim_start().strip_prefix('"')?;
    Some(rest[..rest.find('"')?].to_string())
}

/// Run one process and parse its last JSON line.
fn measure(cmd: &mut Command, what: &str) -> Result<Measured> {
    let out = cmd
        .output()
        .with_context(|| format!("starting {what}: {cmd:?}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!("{what} failed with {}:\n{}", out.status, tail.join("\n"));
    }
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .with_context(|| format!("{what} printed no JSON line; stdout:\n{stdout}"))?
        .trim()
        .to_string();
    if json_string(&line, "dtype").as_deref() != Some("f32") {
        bail!("{what} did not run in f32: {line}");
    }
    let num =
        |k: &str| json_number(&line, k).with_context(|| format!("{what}: no `{k}` in {line}"));
    Ok(Measured {
        median_ms: num("median_ms")?,
        min_ms: num("min_ms")?,
        peak_mib: num("peak_rss_mib")?,
        start_mib: json_number(&line, "rss_start_mib").unwrap_or(f64::NAN),
        threads: num("threads")? as usize,
        raw: line,
    })
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn loadavg() -> String {
    read("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn mem_mib(field: &str) -> f64 {
    read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn cpu_model() -> String {
    let info = read("/proc/cpuinfo");
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let model = field("model name").unwrap_or_else(|| "unknown CPU".into());
    let flags = field("flags").unwrap_or_default();
    let simd: Vec<&str> = ["avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"]
        .into_iter()
        .filter(|f| flags.split_whitespace().any(|x| x == *f))
        .collect();
    format!("{model} ({})", simd.join(", "))
}

fn command_output(cmd: &mut Command) -> String {
    cmd.output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// The locked version of a crate in `Cargo.lock`.
fn locked_version(root: &Path, krate: &str) -> String {
    let lock = std::fs::read_to_string(root.join("Cargo.lock")).unwrap_or_default();
    let pat = format!("name = \"{krate}\"");
    lock.lines()
        .skip_while(|l| l.trim() != pat)
        .nth(1)
        .and_then(|l| l.trim().strip_prefix("version = "))
        .map_or_else(|| "unknown".into(), |v| v.trim_matches('"').to_string())
}

fn fmt_ms(ms: f64) -> String {
    if ms >= 100.0 {
        format!("{ms:.0}")
    } else {
        format!("{ms:.1}")
    }
}

fn fmt_cell(m: &Result<Measured>, f: impl Fn(&Measured) -> String) -> String {
    match m {
        Ok(m) => f(m),
        Err(_) => "failed".into(),
    }
}

/// Replace the section of `text` whose heading starts with `heading` (up to the next `## `
/// heading) with `section`, or append it.
pub fn replace_section(text: &str, heading: &str, section: &str) -> String {
    let section = section.trim_end();
    let Some(start) = text
        .find(&format!("\n{heading}"))
        .map(|i| i + 1)
        .or_else(|| text.starts_with(heading).then_some(0))
    else {
        return format!("{}\n\n{section}\n", text.trim_end());
    };
    let after = &text[start + heading.len()..];
    let end = after
        .find("\n## ")
        .map_or(text.len(), |i| start + heading.len() + i + 1);
    let mut out = text[..start].to_string();
    out.push_str(section);
    out.push('\n');
    if end < text.len() {
        out.push('\n');
        out.push_str(&text[end..]);
    }
    out
}

/// `cargo xtask bench-compare`.
pub fn bench_compare(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    let root = root();
    let python = root.join(".venv/bin/python");
    if !python.is_file() {
        bail!(
            "the Python reference environment {} is missing: run `cargo xtask fixtures` first",
            python.display()
        );
    }
    let script = root.join("xtask/bench/diffusers_bench.py");
    let mut workloads: Vec<&str> = DEFAULT.to_vec();
    if o.large {
        workloads.extend_from_slice(LARGE);
    }
    if let Some(only) = &o.only {
        let all: Vec<&str> = DEFAULT.iter().chain(LARGE).copied().collect();
        for w in only {
            if !all.contains(&w.as_str()) {
                bail!(
                    "bench-compare: unknown workload `{w}`; available: {}",
                    all.join(", ")
                );
            }
        }
        workloads = all
            .into_iter()
            .filter(|w| only.iter().any(|x| x == w))
            .collect();
    }

    eprintln!("building the Rust runner (release)");
    crate::python::run(crate::python::cargo().current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "kandinsky-benches",
        "--bin",
        "cpu_compare",
    ]))?;
    let target = crate::python::target_dir();
    let runner = target.join("release/cpu_compare");
    if !runner.is_file() {
        bail!("the runner {} was not built", runner.display());
    }

    let load_start = loadavg();
    let started = command_output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]));
    eprintln!("load average at start: {load_start}");
    let threads = o.threads.to_string();
    let heading = if o.keep_freed { SECTION_KEEP } else { SECTION };
    let mut rows = Vec::new();
    let mut raw = String::new();
    for (i, w) in workloads.iter().enumerate() {
        let reps = o.reps.to_string();
        let warmup = o.warmup.to_string();
        let mut rust = Command::new(&runner);
        rust.current_dir(&root)
            .args([*w, "--reps", &reps, "--warmup", &warmup])
            .env("RAYON_NUM_THREADS", &threads);
        let mut torch = Command::new(&python);
        torch
            .current_dir(&root)
            .arg(&script)
            .args([
                "--cpu-workload",
                w,
                "--reps",
                &reps,
                "--warmup",
                &warmup,
                "--threads",
                &threads,
            ])
            .env("OMP_NUM_THREADS", &threads)
            .env("MKL_NUM_THREADS", &threads)
            .env("HF_HUB_OFFLINE", "1");
        if o.keep_freed {
            rust.env("GLIBC_TUNABLES", KEEP_TUNABLES);
            torch.env("GLIBC_TUNABLES", KEEP_TUNABLES);
        }
        // Alternate which side goes first, so neither always runs on a warmer/cooler machine.
        let (rs, pt) = if i % 2 == 0 {
            eprintln!("[{w}] kandinsky-rs …");
            let rs = measure(&mut rust, &format!("kandinsky-rs {w}"));
            eprintln!("[{w}] PyTorch …");
            (rs, measure(&mut torch, &format!("PyTorch {w}")))
        } else {
            eprintln!("[{w}] PyTorch …");
            let pt = measure(&mut torch, &format!("PyTorch {w}"));
            eprintln!("[{w}] kandinsky-rs …");
            (measure(&mut rust, &format!("kandinsky-rs {w}")), pt)
        };
        for m in [&rs, &pt] {
            match m {
                Ok(m) => {
                    eprintln!("  {}", m.raw);
                    raw.push_str(&m.raw);
                    raw.push('\n');
                }
                Err(e) => eprintln!("  ERROR: {e:#}"),
            }
        }
        rows.push((w.to_string(), rs, pt));
    }
    let load_end = loadavg();

    let versions = command_output(Command::new(&python).args([
        "-c",
        "import torch, diffusers, transformers; \
         print(torch.__version__, diffusers.__version__, transformers.__version__)",
    ]));
    let mut v = versions.split_whitespace();
    let (torch_v, diffusers_v, transformers_v) = (
        v.next().unwrap_or("?").to_string(),
        v.next().unwrap_or("?").to_string(),
        v.next().unwrap_or("?").to_string(),
    );
    let rustc = command_output(Command::new("rustc").arg("-V"));
    let commit = command_output(Command::new("git").current_dir(&root).args([
        "rev-parse",
        "--short",
        "HEAD",
    ]));
    let dirty = !command_output(Command::new("git").current_dir(&root).args([
        "status",
        "--porcelain",
        "--untracked-files=no",
    ]))
    .is_empty();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());

    let mut s = String::new();
    writeln!(s, "{heading} — {started}")?;
    writeln!(s)?;
    writeln!(
        s,
        "`cargo xtask bench-compare{}` — each workload in its own process, kandinsky-rs \
         (`benches/src/bin/cpu_compare.rs`) and diffusers/PyTorch \
         (`xtask/bench/diffusers_bench.py --cpu-workload`) alternately, random weights at the \
         real configs, {} warm-up + {} timed repetitions: median (and minimum, the better estimate \
         when other work shares the machine).",
        if args.is_empty() {
            String::new()
        } else {
            format!(" {}", args.join(" "))
        },
        o.warmup,
        o.reps
    )?;
    writeln!(s)?;
    writeln!(
        s,
        "- machine: {}, {cores} cores, {:.1} GiB RAM; threads: {} on both sides \
         (`RAYON_NUM_THREADS` / `torch.set_num_threads`)",
        cpu_model(),
        mem_mib("MemTotal:") / 1024.0,
        o.threads
    )?;
    if o.keep_freed {
        writeln!(
            s,
            "- both processes ran with `GLIBC_TUNABLES={KEEP_TUNABLES}` (freed memory is \
             reused, not returned to the kernel and page-faulted in again)"
        )?;
    } else {
        writeln!(
            s,
            "- allocator: the kandinsky-rs runner calls `kandinsky_core::device::keep_freed_memory()` \
             at start-up as the `kandinsky` CLI does (glibc keeps freed memory for reuse); the \
             PyTorch process runs with glibc's defaults (`--keep-freed-memory` gives both the \
             same setting)"
        )?;
    }
    writeln!(
        s,
        "- load average (1/5/15 min): {load_start} at start, {load_end} at the end (the \
         machine may be shared)"
    )?;
    writeln!(
        s,
        "- kandinsky-rs at {commit}{}: {rustc}, candle {}; PyTorch: torch {torch_v}, diffusers \
         {diffusers_v}, transformers {transformers_v}",
        if dirty { " (uncommitted changes)" } else { "" },
        locked_version(&root, "candle-core")
    )?;
    writeln!(s)?;
    writeln!(
        s,
        "| workload | kandinsky-rs ms | PyTorch ms | ratio (rs/pt) | rs peak MiB | pt peak MiB \
         | rs / pt peak above process start MiB |"
    )?;
    writeln!(s, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |")?;
    let mut errors = Vec::new();
    for (w, rs, pt) in &rows {
        let ratio = match (rs, pt) {
            (Ok(r), Ok(p)) => format!(
                "{:.2} (min {:.2})",
                r.median_ms / p.median_ms,
                r.min_ms / p.min_ms
            ),
            _ => "—".into(),
        };
        let above = match (rs, pt) {
            (Ok(r), Ok(p)) => format!(
                "{:.0} / {:.0}",
                r.peak_mib - r.start_mib,
                p.peak_mib - p.start_mib
            ),
            _ => "—".into(),
        };
        writeln!(
            s,
            "| {w} | {} | {} | {ratio} | {} | {} | {above} |",
            fmt_cell(rs, |m| format!(
                "{} (min {})",
                fmt_ms(m.median_ms),
                fmt_ms(m.min_ms)
            )),
            fmt_cell(pt, |m| format!(
                "{} (min {})",
                fmt_ms(m.median_ms),
                fmt_ms(m.min_ms)
            )),
            fmt_cell(rs, |m| format!("{:.0}", m.peak_mib)),
            fmt_cell(pt, |m| format!("{:.0}", m.peak_mib)),
        )?;
        for (side, m) in [("kandinsky-rs", rs), ("PyTorch", pt)] {
            if let Err(e) = m {
                errors.push(format!("{w} ({side}): {e:#}"));
            } else if let Ok(m) = m {
                if m.threads != o.threads {
                    errors.push(format!(
                        "{w} ({side}) ran with {} threads, not {}",
                        m.threads, o.threads
                    ));
                }
            }
        }
    }
    writeln!(s)?;
    writeln!(
        s,
        "Peak = the process's VmHWM (peak resident set), which includes each runtime's own \
         footprint (the Python process starts at ≈ {} MiB after importing torch, the Rust \
         runner at ≈ {} MiB); the last column subtracts the resident set at process start.",
        rows.iter()
            .find_map(|(_, _, p)| p.as_ref().ok().map(|m| format!("{:.0}", m.start_mib)))
            .unwrap_or_else(|| "?".into()),
        rows.iter()
            .find_map(|(_, r, _)| r.as_ref().ok().map(|m| format!("{:.0}", m.start_mib)))
            .unwrap_or_else(|| "?".into()),
    )?;
    if !errors.is_empty() {
        writeln!(s)?;
        for e in &errors {
            let first = e.lines().next().unwrap_or_default();
            writeln!(s, "- problem: {first}")?;
        }
    }

    let out_dir = target.join("bench-compare");
    std::fs::create_dir_all(&out_dir)?;
    std::fs::write(out_dir.join("results.jsonl"), &raw)?;
    std::fs::write(out_dir.join("section.md"), &s)?;
    println!("\n{s}");
    if o.write {
        let path = root.join("benches/RESULTS.md");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        std::fs::write(&path, replace_section(&text, heading, &s))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote the CPU comparison into {}", path.display());
    }
    if !errors.is_empty() {
        for e in &errors {
            eprintln!("error: {e}");
        }
        bail!("{} workload side(s) failed or misbehaved", errors.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn section_is_replaced_and_others_kept() {
        let text = "# R\n\n## GPU run 1\n\na\n\n## CPU comparison (CPU, f32) — old\n\nold\n\n## GPU run 2\n\nb\n";
        let out = replace_section(text, SECTION, "## CPU comparison (CPU, f32) — new\n\nnew\n");
        assert_eq!(
            out,
            "# R\n\n## GPU run 1\n\na\n\n## CPU comparison (CPU, f32) — new\n\nnew\n\n## GPU run 2\n\nb\n"
        );
        let appended = replace_section(
            "# R\n\n## GPU\n\nx\n",
            SECTION,
            &format!("{SECTION}\n\ny\n"),
        );
        assert_eq!(appended, format!("# R\n\n## GPU\n\nx\n\n{SECTION}\n\ny\n"));
        let last = replace_section(&appended, SECTION, &format!("{SECTION}\n\nz\n"));
        assert_eq!(last, format!("# R\n\n## GPU\n\nx\n\n{SECTION}\n\nz\n"));
        // The two headings do not replace each other.
        let both = replace_section(&last, SECTION_KEEP, &format!("{SECTION_KEEP}\n\nk\n"));
        assert_eq!(
            both,
            format!("# R\n\n## GPU\n\nx\n\n{SECTION}\n\nz\n\n{SECTION_KEEP}\n\nk\n")
        );
        let again = replace_section(&both, SECTION, &format!("{SECTION}\n\nw\n"));
        assert_eq!(
            again,
            format!("# R\n\n## GPU\n\nx\n\n{SECTION}\n\nw\n\n{SECTION_KEEP}\n\nk\n")
        );
    }

    #[test]
    fn json_fields() {
        let l = r#"{"impl":"kandinsky-rs","median_ms":12.5,"threads":2,"dtype":"f32"}"#;
        assert_eq!(json_number(l, "median_ms"), Some(12.5));
        assert_eq!(json_number(l, "threads"), Some(2.0));
        assert_eq!(json_string(l, "dtype").as_deref(), Some("f32"));
        let p = r#"{"impl": "pytorch", "median_ms": 3.25, "all_ms": [1, 2]}"#;
        assert_eq!(json_number(p, "median_ms"), Some(3.25));
    }
}
