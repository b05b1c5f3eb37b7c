//! Choosing devices and dtypes from user strings.

use candle_core::{DType, Device};

use crate::error::{Error, Result};

/// Parse `f32`, `f16`, `bf16` (also `float32`, `fp16`, `float16`, `bfloat16`).
pub fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "f32" | "fp32" | "float32" => DType::F32,
        "f16" | "fp16" | "float16" | "half" => DType::F16,
        "bf16" | "bfloat16" => DType::BF16,
        other => return Err(Error::unsupported("dtype", other, "f32, f16, bf16")),
    })
}

/// Parse `cpu`, `cuda`, `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    let s = s.to_ascii_lowercase();
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match s.as_str() {
        "cuda" | "gpu" => Some(0),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok()),
    };
    match ordinal {
        Some(i) => Device::new_cuda(i).map_err(|e| {
            Error::invalid(format!(
                "cannot open CUDA device {i} ({e}); build with `--features cuda` on a machine with an NVIDIA driver, or use `--device cpu`"
            ))
        }),
        None => Err(Error::unsupported("device", s, "cpu, cuda, cuda:N")),
    }
}

/// The best device available: CUDA 0 when compiled in and present, else the CPU.
pub fn best_device() -> Device {
    Device::new_cuda(0).unwrap_or(Device::Cpu)
}

/// Make glibc keep freed memory for reuse instead of handing it back to the kernel.
///
/// By default glibc serves every allocation above 32 MiB with its own `mmap` and unmaps it
/// on free, so each large intermediate of a forward pass is page-faulted and zero-filled by
/// the kernel again: on the CPU that cost more than the arithmetic in attention (98k page
/// faults per call) and 31% of a MoVQ decode (benches/RESULTS.md, "CPU profile"). This sets
/// `M_MMAP_MAX = 0` (no per-allocation mappings) and a 2 GiB trim threshold. It changes the
/// whole process's allocator, so only binaries call it, once at start-up (the `kandinsky`
/// CLI and the bench runners do); libraries never do. A no-op outside Linux/glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator parameters; it is called before the program
    // allocates anything large and takes plain integers.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        assert_eq!(parse_dtype("bf16").unwrap(), DType::BF16);
        assert_eq!(parse_dtype("FP16").unwrap(), DType::F16);
        let e = parse_dtype("int8").unwrap_err().to_string();
        assert!(e.contains("int8") && e.contains("f32, f16, bf16"), "{e}");
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device("tpu").is_err());
    }
}
