// Shared by the element-wise kernels: conversions between the storage types and f32, in
// which every kernel of this crate computes, and an aligned 8-element vector for 16-byte
// loads and stores of 2-byte types (two 16-byte accesses for f32).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }

template <typename T> struct alignas(16) Vec8 { T v[8]; };
// Four elements in one access (8 bytes for 2-byte types, 16 for f32).
template <typename T> struct alignas(4 * sizeof(T)) Vec4 { T v[4]; };
