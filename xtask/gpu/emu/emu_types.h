// What the emulation drivers (check.cpp, check_conv.cpp) share: conversions between the
// kernels' storage types and float, by type.
#pragma once
#include <warp_emu.h>

template <typename T> T from_float(float v);
template <> inline __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> inline __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
