//! With the `cuda` feature, compile `kernels/*.cu` to PTX with nvcc (embedded in the crate and
//! JIT-compiled by the driver on first use). Needs nvcc (`$NVCC` or on PATH) and
//! `$CUDA_COMPUTE_CAP` (default 90); see ../shared/cuda/README.md for a toolchain recipe.
use std::{env, path::PathBuf, process::Command};

const KERNELS: [&str; 6] = [
    "group_norm",
    "flash_attention",
    "flash_attention_mma",
    "flash_attention_wide",
    "conv",
    "softmax",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-changed=kernels/common.cuh");
    println!("cargo:rerun-if-changed=kernels/welford.cuh");
    println!("cargo:rerun-if-changed=kernels/warp_ops.cuh");
    for name in KERNELS {
        let src = format!("kernels/{name}.cu");
        println!("cargo:rerun-if-changed={src}");
        let ptx = out.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args([
                "--ptx",
                "-O3",
                "-std=c++17",
                &format!("-arch=sm_{cap}"),
                "-o",
            ])
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| panic!("cannot run `{nvcc}` ({e}): the `cuda` feature needs nvcc"));
        assert!(status.success(), "nvcc failed on {src}");
    }
}
