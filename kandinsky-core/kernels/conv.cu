// The two element-wise halves of the shifted-GEMM convolution (`kandinsky_core::gpu_conv`):
// the k×k stride-1 convolution of an NCHW map as k cuBLAS GEMMs over shifted views of the
// zero-padded input, accumulated in f32 (no im2col matrix).
//
// `conv_shift_*` writes X3 [B, k·C, S]: for each dx in [0, k) a copy of the padded input
// (optionally nearest-upsampled 2×), flattened with row stride Wp and shifted left by dx
// elements, so that row block dy of the GEMM reads X3[b, dx·C + c, dy·Wp + j] =
// padded[b, c, (dy·Wp + dx + j)]. Wp and S are multiples of 8 (16-byte aligned views for
// cuBLAS's tensor-core kernels). Positions past the padded map are zero.
//
// `conv_finish_*` crops the accumulator [B, Cout, OH·Wp] (f32) to [B, Cout, OH, OW], adds the
// bias and an optional same-shape residual, and rounds once to the output type.
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

// Grid: x = one (b, dx, c) row of X3 (B·k·C rows), y = chunks of 256 positions of S.
// x: contiguous [B, C, H, W]; the padded map is [Hp, Wp] with the (upsampled) input at
// rows [pt, pt + H << up), columns [pl, pl + W << up).
template <typename T>
__device__ void conv_shift(const T *__restrict__ x, T *__restrict__ x3, int C, int H, int W,
                           int up, int pt, int pl, int Hp, int Wp, long long S, int k) {
  const long long row = blockIdx.x;  // (b·k + dx)·C + c
  const int c = (int)(row % C);
  const long long bdx = row / C;
  const int dx = (int)(bdx % k);
  const long long b = bdx / k;
  const long long i = (long long)blockIdx.y * blockDim.x + threadIdx.x;
  if (i >= S) return;
  const long long p = i + dx;  // position in the flattened padded map
  T out = from_f<T>(0.f);
  const long long r = p / Wp;
  if (r < Hp) {
    const int yy = (int)r - pt, xx = (int)(p - r * Wp) - pl;
    const int hu = H << up, wu = W << up;
    if (yy >= 0 && yy < hu && xx >= 0 && xx < wu) {
      out = x[((b * C + c) * H + (yy >> up)) * W + (xx >> up)];
    }
  }
  x3[row * S + i] = out;
}

// Grid: x = one (b, co, y) output row (B·Cout·OH rows), y = chunks of 256 columns of OW.
template <typename T>
__device__ void conv_finish(const float *__restrict__ acc, const T *__restrict__ bias,
                            const T *__restrict__ res, T *__restrict__ out, int Cout, int OH,
                            int OW, int Wp, int has_bias, int has_res) {
  const long long row = blockIdx.x;  // (b·Cout + co)·OH + y
  const int x = blockIdx.y * blockDim.x + threadIdx.x;
  if (x >= OW) return;
  const int y = (int)(row % OH);
  const long long bco = row / OH;
  const int co = (int)(bco % Cout);
  float v = acc[(bco * OH + y) * (long long)Wp + x];
  if (has_bias) v += to_f<T>(bias[co]);
  const long long o = row * OW + x;
  if (has_res) v += to_f<T>(res[o]);
  out[o] = from_f<T>(v);
}

#define CONV_KERNELS(T, SUF)                                                                 \
  extern "C" __global__ void conv_shift_##SUF(const T *x, T *x3, int C, int H, int W, int up, \
                                               int pt, int pl, int Hp, int Wp, long long S,  \
                                               int k) {                                      \
    conv_shift<T>(x, x3, C, H, W, up, pt, pl, Hp, Wp, S, k);                                 \
  }                                                                                          \
  extern "C" __global__ void conv_finish_##SUF(const float *acc, const T *bias, const T *res, \
                                                T *out, int Cout, int OH, int OW, int Wp,     \
                                                int has_bias, int has_res) {                  \
    conv_finish<T>(acc, bias, res, out, Cout, OH, OW, Wp, has_bias, has_res);                \
  }

CONV_KERNELS(float, f32)
CONV_KERNELS(__half, f16)
CONV_KERNELS(__nv_bfloat16, bf16)
