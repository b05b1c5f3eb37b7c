//! The pinned Python environment used to produce reference data with diffusers.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Path of the virtualenv's python, creating and filling the venv when missing.
pub fn venv_python() -> Result<PathBuf> {
    let root = root();
    let venv = root.join(".venv");
    let python = venv.join("bin/python");
    let requirements = root.join("xtask/fixtures/requirements.txt");
    let stamp = venv.join(".requirements");
    let wanted = std::fs::read_to_string(&requirements).context("reading requirements.txt")?;
    if python.is_file() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str())
    {
        return Ok(python);
    }
    if !python.is_file() {
        eprintln!("creating {}", venv.display());
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    eprintln!("installing {}", requirements.display());
    run(Command::new(&python)
        .args(["-m", "pip", "install", "-q", "-r"])
        .arg(&requirements))?;
    std::fs::write(&stamp, wanted)?;
    Ok(python)
}

/// Run a command, failing on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// `cargo xtask fixtures [--only a,b]`.
pub fn fixtures(args: &[String]) -> Result<()> {
    let python = venv_python()?;
    let root = root();
    let mut cmd = Command::new(python);
    cmd.arg(root.join("xtask/fixtures/generate.py"))
        .arg("--out")
        .arg(root.join("fixtures"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("PYTHONHASHSEED", "0");
    run(&mut cmd)
}

/// Fail unless the machine has `gb` GB available (`MemAvailable` of /proc/meminfo; no check
/// off Linux) for `what`.
pub fn require_memory_gb(gb: f64, what: &str) -> Result<()> {
    let Some(available) = mem_available_gb() else {
        return Ok(());
    };
    eprintln!("available memory: {available:.1} GB");
    if available < gb {
        bail!("{what} needs ≈ {gb} GB of free RAM; {available:.1} GB available");
    }
    Ok(())
}

fn mem_available_gb() -> Option<f64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0 / 1024.0)
}

/// The cargo that runs this xtask (`$CARGO`), for the builds and runs it starts.
pub fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Where cargo puts the workspace's build outputs (`CARGO_TARGET_DIR`, else `target/`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// A full-size comparison: a Python `script` (run by the fixture venv with the output folder
/// and `xtask/fixtures` as its arguments) writes random-weight diffusers weights plus inputs
/// and outputs into `target/<dir>/`, unless the `outputs` (relative paths) already exist and
/// `--regenerate` was not given; then `example` of `package` (release) compares on them.
pub struct FullCompare<'a> {
    /// Folder under `target/`.
    pub dir: &'a str,
    /// What the script writes, relative to the folder (all present = reuse).
    pub outputs: &'a [&'a str],
    /// The Python source.
    pub script: &'a str,
    /// What the script builds, for the progress line.
    pub what: &'a str,
    /// The Rust package and example that compare.
    pub package: &'a str,
    /// See `package`.
    pub example: &'a str,
}

/// Run a [`FullCompare`] (`args`: the xtask's arguments, `--regenerate` honoured).
pub fn full_compare(args: &[String], c: FullCompare<'_>) -> Result<()> {
    let root = root();
    let out = root.join("target").join(c.dir);
    let regenerate = args.iter().any(|a| a == "--regenerate");
    if regenerate || !c.outputs.iter().all(|p| out.join(p).is_file()) {
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        let script = out.join("make_full.py");
        std::fs::write(&script, c.script)?;
        eprintln!("diffusers: building {} into {}", c.what, out.display());
        run(Command::new(venv_python()?)
            .arg(&script)
            .arg(&out)
            .arg(root.join("xtask/fixtures"))
            .env("HF_HUB_OFFLINE", "1"))?;
    } else {
        eprintln!("reusing {} (pass --regenerate to rewrite)", out.display());
    }
    run(cargo()
        .current_dir(&root)
        .args([
            "run",
            "--release",
            "-p",
            c.package,
            "--example",
            c.example,
            "--",
        ])
        .arg(&out))
}
