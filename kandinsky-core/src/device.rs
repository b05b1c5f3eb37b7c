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
