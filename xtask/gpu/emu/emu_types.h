// What the emulation drivers (check.cpp, check_conv.cpp, ...) share: conversions between the
// kernels' storage types and float, by type, and device-like buffers.
#pragma once
#include <warp_emu.h>

#include <cstdlib>
#include <new>
#include <vector>

// Allocates as cudaMalloc does (256-byte aligned), so that which 32-byte sectors a read
// touches is what it would be on the GPU (operator new promises 16 bytes).
template <typename T> struct DeviceAlloc {
  using value_type = T;
  DeviceAlloc() = default;
  template <typename U> DeviceAlloc(const DeviceAlloc<U>&) {}
  T* allocate(size_t n) {
    void* p = aligned_alloc(256, (n * sizeof(T) + 255) / 256 * 256);
    if (!p) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { free(p); }
  template <typename U> bool operator==(const DeviceAlloc<U>&) const { return true; }
};
template <typename T> using DeviceVec = std::vector<T, DeviceAlloc<T>>;

template <typename T> T from_float(float v);
template <> inline __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> inline __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
