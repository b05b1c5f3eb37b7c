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
        Some(i) => cuda_device(i).map_err(|e| {
            Error::invalid(format!(
                "cannot open CUDA device {i} ({e}); build with `--features cuda` on a machine with an NVIDIA driver, or use `--device cpu`"
            ))
        }),
        None => Err(Error::unsupported("device", s, "cpu, cuda, cuda:N")),
    }
}

/// The best device available: CUDA 0 when compiled in and present, else the CPU.
pub fn best_device() -> Device {
    cuda_device(0).unwrap_or(Device::Cpu)
}

/// Open CUDA device `ordinal` set up for inference: freed device memory stays in the CUDA
/// memory pool for reuse, and buffers are not tracked with CUDA events (see [`tune_cuda`]).
/// The tuning is an optimisation: where the driver refuses it (a GPU without memory pools),
/// the device is returned as candle opened it, with a `tracing` warning. Without the `cuda`
/// feature this is candle's "not compiled with CUDA" error.
pub fn cuda_device(ordinal: usize) -> candle_core::Result<Device> {
    let device = Device::new_cuda(ordinal)?;
    if let Err(e) = tune_cuda(&device) {
        tracing::warn!("CUDA device {ordinal}: memory pool tuning not applied: {e}");
    }
    Ok(device)
}

/// Environment variable that leaves a CUDA device as candle opens it (for A/B timings).
pub const CUDA_DEFAULTS_ENV: &str = "KANDINSKY_CUDA_DEFAULTS";

/// Two process-level settings candle leaves at the driver's defaults, both costs that grow
/// with the number of ops per step, neither of which PyTorch pays (it has its own caching
/// allocator and never creates per-buffer events):
/// - the stream-ordered pool's release threshold is 0, so every synchronisation (one per
///   sampler step) hands all freed memory back to the driver and the next step maps it
///   again; it is set to "never release" (memory stays reserved for this process, as in
///   PyTorch; [`cuda_pool_trim`] gives it back);
/// - cudarc creates and destroys two CUDA events per allocation to order streams, which
///   candle's single stream never waits on; new buffers are created without them.
///
/// Does nothing for a CPU device, or when `KANDINSKY_CUDA_DEFAULTS` is set.
pub fn tune_cuda(device: &Device) -> candle_core::Result<()> {
    if std::env::var_os(CUDA_DEFAULTS_ENV).is_some() {
        return Ok(());
    }
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        return crate::cuda::tune(cuda);
    }
    let _ = device;
    Ok(())
}

/// Give the unused part of a CUDA device's memory pool back to the driver (after a stage
/// that will not run again, e.g. before loading the next model in a memory-tight setup).
/// A no-op on the CPU.
pub fn cuda_pool_trim(device: &Device) -> candle_core::Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        return crate::cuda::pool_trim(cuda);
    }
    let _ = device;
    Ok(())
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

    #[test]
    fn cuda_setup_is_harmless_on_the_cpu() {
        // The tuning and the pool trim are no-ops for a CPU device (and with the env knob).
        tune_cuda(&Device::Cpu).unwrap();
        cuda_pool_trim(&Device::Cpu).unwrap();
        // Without the feature (CI), opening a GPU is an error naming the way out, not a panic.
        #[cfg(not(feature = "cuda"))]
        {
            assert!(cuda_device(0).is_err());
            let e = parse_device("cuda:1").unwrap_err().to_string();
            assert!(e.contains("cuda:1") || e.contains("device 1"), "{e}");
            assert!(e.contains("--features cuda"), "{e}");
            assert!(best_device().is_cpu());
        }
    }
}
