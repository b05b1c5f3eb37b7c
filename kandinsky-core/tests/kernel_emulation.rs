//! The CUDA attention kernels (`kernels/flash_attention_{mma,wide,wgmma}.cu`) compiled for the host
//! against `xtask/gpu/emu/warp_emu.h`, where host threads play the lanes of each warp, and
//! compared with attention in double precision (f16 ≤ 5e-3, bf16 ≤ 1e-2 relative error,
//! written in `check.cpp`). This checks the kernels' fragment layouts, tile offsets, masking
//! and cp.async pipeline on a machine without a GPU; the mma kernel, which GPU runs 5–10
//! measured on an H200, is in the set as the check of the emulation itself. It is a check,
//! not a proof: run 10 found a wgmma kernel it passed wrong on the card (since removed). Then the
//! normalise-on-read convolution copy (`conv_shift_norm_*`, `KANDINSKY_CONV_NORM=1`) against
//! the plain copy of a map normalised in double precision (`check_conv.cpp`, ≤ 1 ulp; there
//! too the cuBLAS path's crop kernel `conv_finish_*` against its definition, exactly, and the
//! GroupNorm statistics it can leave against double precision, read by `group_norm_apply_*`;
//! the skip concatenation `cat_channels_*` exactly, with its statistics), and
//! the one-kernel convolution GEMMs (`conv_gemm{,1}_*` and `conv_gemm{,1}_wgmma_*`,
//! `KANDINSKY_CONV_GEMM=mma|wgmma|mma-1copy|wgmma-1copy`) against a convolution in double precision
//! (`check_conv_gemm.cpp`, f16 ≤ 2e-3, bf16 ≤ 1e-2), and the tiled transpose (+ addend)
//! against its definition, exactly (`check_transpose.cpp`). Beside the values, every
//! shared-memory access through cp.async, ldmatrix and `st_shared16` is counted per source
//! line: the attention kernels and the convolution GEMMs must be free of bank conflicts and
//! divergent accesses, and read the fewest 32-byte sectors where the shapes allow it (one
//! verdict line each, `warp_emu.h`'s `traffic_report`).
//!
//! Needs g++ ≥ 12 (C++20, `_Float16`); without it the test says so and passes.

use std::path::Path;
use std::process::Command;

#[test]
fn attention_kernels_under_host_emulation() -> anyhow::Result<()> {
    let gxx = Command::new("g++").arg("-dumpversion").output();
    let major = gxx
        .as_ref()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .split('.')
                .next()?
                .parse::<u32>()
                .ok()
        });
    match major {
        Some(v) if v >= 12 => {}
        other => {
            eprintln!("skipped: the host emulation needs g++ >= 12 (found {other:?})");
            return Ok(());
        }
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../xtask/gpu/emu/check.sh");
    let out = Command::new("bash").arg(&script).output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    anyhow::ensure!(out.status.success(), "{} failed", script.display());
    // Every case printed a passing line: attention 5 kernels × 2 layouts × 4 shapes and its
    // traffic verdict, then the normalise-on-read convolution copy's 5 cases (2 of them a
    // band read in place) and the crop kernel's 7 (3 with the statistics, 2 with a band of a
    // taller residual), the skip concatenation's 3, the four convolution GEMMs' 5 each and
    // their traffic verdict, and the tiled transpose's 3.
    let passed = stdout.lines().filter(|l| l.ends_with(" ok")).count();
    anyhow::ensure!(
        passed == 40 + 1 + 5 + 7 + 3 + 20 + 1 + 3,
        "{passed} of 80 cases passed"
    );
    Ok(())
}
