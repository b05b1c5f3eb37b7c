// Row softmax of scaled scores, softmax(scale · x) along the last dimension, in f32 for
// every storage type: one block per row, three passes over the row (max, sum of
// exponentials, write), the row re-read from L1/L2. Replaces, on CUDA, the plain attention
// path's scale pass, the upcast to f32, candle's f32 softmax and the downcast (7.2 ms of a
// 768 px MoVQ decode on an H200, GPU runs 5-8), and rounds once instead of three times.
#include "common.cuh"

// blockDim.x: a multiple of 32, at most 1024. `op` 0: max, 1: sum.
__device__ float block_reduce(float v, int op) {
  __shared__ float part[32];
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_xor_sync(0xffffffff, v, o);
    v = op == 0 ? fmaxf(v, w) : v + w;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  if (lane == 0) part[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < nwarps ? part[lane] : (op == 0 ? -INFINITY : 0.f);
    for (int o = 16; o > 0; o >>= 1) {
      const float w = __shfl_xor_sync(0xffffffff, v, o);
      v = op == 0 ? fmaxf(v, w) : v + w;
    }
    if (lane == 0) part[0] = v;
  }
  __syncthreads();
  v = part[0];
  __syncthreads();
  return v;
}

// X: the scores' storage type, Y: the probabilities' (f32 scores from a GEMM with an f32
// output give f16/bf16 probabilities without the scores ever being rounded to 8 bits).
template <typename X, typename Y>
__device__ void softmax_rows(const X *__restrict__ x, Y *__restrict__ y, int ncols, float scale) {
  const X *xr = x + (long long)blockIdx.x * ncols;
  Y *yr = y + (long long)blockIdx.x * ncols;
  float m = -INFINITY;
  for (int i = threadIdx.x; i < ncols; i += blockDim.x) m = fmaxf(m, scale * to_f(xr[i]));
  m = block_reduce(m, 0);
  float s = 0.f;
  for (int i = threadIdx.x; i < ncols; i += blockDim.x) s += expf(scale * to_f(xr[i]) - m);
  const float inv = 1.f / block_reduce(s, 1);
  for (int i = threadIdx.x; i < ncols; i += blockDim.x)
    yr[i] = from_f<Y>(expf(scale * to_f(xr[i]) - m) * inv);
}

#define SOFTMAX_KERNEL(X, Y, SUF)                                                                \
  extern "C" __global__ void softmax_rows_##SUF(const X *x, Y *y, int ncols, float scale) {     \
    softmax_rows<X, Y>(x, y, ncols, scale);                                                      \
  }

SOFTMAX_KERNEL(float, float, f32)
SOFTMAX_KERNEL(__half, __half, f16)
SOFTMAX_KERNEL(__nv_bfloat16, __nv_bfloat16, bf16)
SOFTMAX_KERNEL(float, __half, f32_f16)
SOFTMAX_KERNEL(float, __nv_bfloat16, f32_bf16)
