//! With the `cuda` feature, compile `kernels/*.cu` to PTX with nvcc (embedded in the crate and
//! JIT-compiled by the driver on first use). Needs nvcc (`$NVCC` or on PATH) and
//! `$CUDA_COMPUTE_CAP` (default 90); see ../shared/cuda/README.md for a toolchain recipe.
use std::{env, path::PathBuf, process::Command};

const KERNELS: [&str; 10] = [
    "group_norm",
    "flash_attention",
    "flash_attention_mma",
    "flash_attention_wide",
    "flash_attention_wgmma",
    "conv",
    "conv_gemm",
    "conv_gemm_wgmma",
    "softmax",
    "transpose",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo::rustc-check-cfg=cfg(kandinsky_wgmma)");
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
    println!("cargo:rerun-if-changed=kernels/wgmma_ops.cuh");
    println!("cargo:rerun-if-changed=kernels/flash_common.cuh");
    println!("cargo:rerun-if-changed=kernels/conv_gemm_common.cuh");
    // wgmma exists only in the architecture-specific sm_90a target, which runs on sm_90
    // cards alone: the `*_wgmma` kernels are built for it when the target is 9.0 (and traps elsewhere,
    // where `kandinsky_wgmma` is unset and the Rust side never launches it).
    if cap == "90" {
        println!("cargo:rustc-cfg=kandinsky_wgmma");
    }
    for name in KERNELS {
        let src = format!("kernels/{name}.cu");
        println!("cargo:rerun-if-changed={src}");
        let ptx = out.join(format!("{name}.ptx"));
        let arch = if name.ends_with("_wgmma") && cap == "90" {
            "sm_90a".to_string()
        } else {
            format!("sm_{cap}")
        };
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", &format!("-arch={arch}"), "-o"])
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| panic!("cannot run `{nvcc}` ({e}): the `cuda` feature needs nvcc"));
        assert!(status.success(), "nvcc failed on {src}");
    }
}
