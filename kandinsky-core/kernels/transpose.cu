// The last two dimensions of a contiguous [B, M, N] map swapped, optionally plus an addend in
// the output's layout: out[b, n, m] = x[b, m, n] (+ y[b, n, m]). The attention blocks turn
// [B, C, H·W] into tokens [B, H·W, C] and add their output back to the [B, C, H·W] input;
// candle does both as strided element-wise kernels, so one side's accesses are 2·M or 2·N
// bytes apart (GPU run 9: 154 `ucopy` calls 2.4 ms and 23 strided `badd` 0.8 ms of a 768 px
// UNet step, not all of them these). Here a 32 × 32 tile goes through shared memory so that
// reads and writes are both along rows; the sum in f32 is exact for two f16/bf16 values and
// rounds once, as candle's add does.
#include "common.cuh"

// 256 threads: tile (m0, n0) = (32·blockIdx.y, 32·blockIdx.x) of batch blockIdx.z, each
// thread (tx, ty) = (t % 32, t / 32) 4 elements in and 4 out. The tile holds floats, one column of padding: a column
// read (32 rows, 4-byte words) hits 32 distinct banks.
template <typename T>
__device__ void transpose_add(const T* __restrict__ x, const T* __restrict__ y, T* __restrict__ out, int m, int n,
                              int has_y) {
  __shared__ float tile[32][33];
  const int m0 = blockIdx.y * 32, n0 = blockIdx.x * 32;
  const long long base = (long long)blockIdx.z * m * n;
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < 32; i += 8) {
    const int r = m0 + ty + i, c = n0 + tx;
    if (r < m && c < n) tile[ty + i][tx] = to_f<T>(x[base + (long long)r * n + c]);
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 32; i += 8) {
    const int r = n0 + ty + i, c = m0 + tx;  // output row (an n), column (an m)
    if (r < n && c < m) {
      float v = tile[tx][ty + i];
      const long long o = base + (long long)r * m + c;
      if (has_y) v += to_f<T>(y[o]);
      out[o] = from_f<T>(v);
    }
  }
}

#define TRANSPOSE_KERNEL(T, SUF)                                                                       \
  extern "C" __global__ void transpose_add_##SUF(const T* x, const T* y, T* out, int m, int n, int has_y) { \
    transpose_add<T>(x, y, out, m, n, has_y);                                                          \
  }

TRANSPOSE_KERNEL(float, f32)
TRANSPOSE_KERNEL(__half, f16)
TRANSPOSE_KERNEL(__nv_bfloat16, bf16)
