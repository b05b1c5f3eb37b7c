// The two element-wise halves of the shifted-GEMM convolution (`kandinsky_core::gpu_conv`):
// the k×k stride-1 convolution of an NCHW map as k cuBLAS GEMMs over shifted views of the
// zero-padded input, accumulated in f32 (no im2col matrix).
//
// `conv_shift_*` writes X3 [B, k·C, S]: for each dx in [0, k) a copy of the padded input
// (optionally nearest-upsampled 2×), flattened with row stride Wp, each row shifted left by
// dx columns: X3[b, dx·C + c, y·Wp + x] = padded[b, c, y, x + dx], so that row block dy of
// the GEMM reads padded[b, c, y + dy, x + dx] at dy·Wp + (y·Wp + x). Wp and S are multiples
// of 8 (16-byte aligned views for cuBLAS's tensor-core kernels); Wp needs to cover only the
// output's columns (the shift is already in the copy), and columns past the padded map are
// zero. The one-copy GEMMs (k = 1 copy here) shift by themselves and get Wp ≥ the padded width.
//
// `conv_shift_norm_*` is `conv_shift_*` reading the map through a GroupNorm (+ modulation)
// (+ SiLU): the statistics come from `group_norm_stats_*` (group_norm.cu), each block merges
// its channel's group once and normalises on read, so the normalised map — the convolution's
// input in every ResNet block — is never written and read back.
//
// `conv_finish_*` crops the accumulator [B, Cout, OH·Wp] (f32) to [B, Cout, OH, OW], adds the
// bias and an optional same-shape residual, and rounds once to the output type; optionally it
// also leaves the output's GroupNorm statistics for the norm that reads it next.
#include "common.cuh"
#include "welford.cuh"

// The GroupNorm read by conv_shift_norm: `partial` holds (count, mean, M2) for each of the
// `splits` chunks of each group (b·G + g), as group_norm_stats_* writes them (over the whole
// map, also when the input is a band of its rows); the modulation kinds are group_norm.cu's
// (0 none, 1 per-channel scale-shift through its strides, 2 spatial maps [B, C, mh, mw]
// nearest-upsampled to the whole map's hfull × W, the input being its rows [row0, row0 + H)).
template <typename T>
struct NormIn {
  const T *gamma, *beta, *mscale, *mshift;
  const float *partial;
  int splits, cpg, silu, mkind, mh, mw, row0, hfull;
  float eps;
  long long ssb, ssc, tsb, tsc;
};

// Grid: x = one (b, dx, c) row of X3 (B·k·C rows), y = chunks of 8·blockDim positions of S;
// each thread writes 8 consecutive positions (S is a multiple of 8). x: [B, C, H, W] with
// contiguous rows and `plane` elements from one (b, c) map to the next (H·W for a whole map;
// the larger map's for a band of its rows, read in place); the padded map is [Hp, Wp] with the (upsampled) input at rows
// [pt, pt + H << up), columns [pl, pl + W << up). 32-bit index arithmetic (one map of one
// channel stays far below 2^31 elements), the divisions once per thread.
template <typename T, bool NORM>
__device__ void conv_shift(const T *__restrict__ x, T *__restrict__ x3, int C, int H, int W,
                           int up, int pt, int pl, int Hp, int Wp, long long S, int k,
                           long long plane, NormIn<T> nm) {
  const int row = blockIdx.x;  // (b·k + dx)·C + c
  const int c = row % C, bdx = row / C, dx = bdx % k, b = bdx / k;
  // The channel's normalisation, v = (x − mean)·mul + add, merged once per block (before any
  // thread leaves: the whole block waits on it).
  __shared__ float s_mean, s_mul, s_add;
  if (NORM) {
    if (threadIdx.x == 0) {
      const int gs = b * (C / nm.cpg) + c / nm.cpg;
      Welford w{0.f, 0.f, 0.f};
      for (int sp = 0; sp < nm.splits; ++sp) {
        const float *q = nm.partial + 3 * (gs * nm.splits + sp);
        w = merge(w, Welford{q[0], q[1], q[2]});
      }
      float mul = rsqrtf(w.m2 / w.n + nm.eps) * to_f(nm.gamma[c]);
      float add = to_f(nm.beta[c]);
      if (nm.mkind == 1) {
        const float sc = 1.f + to_f(nm.mscale[b * nm.ssb + c * nm.ssc]);
        mul *= sc;
        add = add * sc + to_f(nm.mshift[b * nm.tsb + c * nm.tsc]);
      }
      s_mean = w.mean;
      s_mul = mul;
      s_add = add;
    }
    __syncthreads();
  }
  const int i0 = 8 * (blockIdx.y * blockDim.x + threadIdx.x);
  if (i0 >= S) return;
  const T *xc = x + ((long long)b * C + c) * plane;
  const int hu = H << up, wu = W << up;
  int r = i0 / Wp, col = i0 - r * Wp;
  Vec8<T> out;
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const int yy = r - pt, xx = col + dx - pl;
    if (r < Hp && yy >= 0 && yy < hu && xx >= 0 && xx < wu) {
      const int sy = yy >> up, sx = xx >> up;
      if (NORM) {
        float v = (to_f(xc[sy * W + sx]) - s_mean) * s_mul + s_add;
        if (nm.mkind == 2) {
          const long long m =
              (((long long)b * C + c) * nm.mh + (nm.row0 + sy) / (nm.hfull / nm.mh)) * nm.mw +
              sx / (W / nm.mw);
          v = v * to_f(nm.mscale[m]) + to_f(nm.mshift[m]);
        }
        if (nm.silu) v = v / (1.f + __expf(-v));
        out.v[e] = from_f<T>(v);
      } else {
        out.v[e] = xc[sy * W + sx];
      }
    } else {
      // The zero padding is applied to the normalised map.
      out.v[e] = from_f<T>(0.f);
    }
    if (++col == Wp) {
      col = 0;
      ++r;
    }
  }
  *reinterpret_cast<Vec8<T> *>(x3 + (long long)row * S + i0) = out;
}

// Block (tx, ty): ty output rows (b, co, y) of OW columns, each thread 4 consecutive columns
// (one aligned float4 of the accumulator: rows start at multiples of Wp, a multiple of 8).
// The four results are stored (and the residual read) as one 4-element access where the
// four are inside the row and the addresses aligned (OW a multiple of 4, a residual view
// starting on a 4-element boundary): a quarter of the store instructions, and whole 32-byte
// sectors per warp instead of 8-byte pieces of them. Same sums, same rounding either way.
// The residual has `res_rows` rows per (b, co) map (OH, or the larger map's for a band of its
// rows, read in place). With `st.per_group` > 0 it also leaves the output's GroupNorm statistics (welford.cuh's
// StatsOut; the launcher makes ty divide a group's cpg·OH rows, so each block lies in one
// group).
template <typename T>
__device__ void conv_finish(const float *__restrict__ acc, const T *__restrict__ bias,
                            const T *__restrict__ res, T *__restrict__ out, int rows, int Cout,
                            int OH, int OW, int Wp, int has_bias, int has_res, int res_rows,
                            StatsOut st) {
  const int row = blockIdx.x * blockDim.y + threadIdx.y;  // (b·Cout + co)·OH + y
  Welford w{0.f, 0.f, 0.f};
  // Not an early return: with statistics every thread of the block takes part in the merge.
  if (row < rows) {
    const int co = (row / OH) % Cout;
    const float bv = has_bias ? to_f<T>(bias[co]) : 0.f;
    const float *a = acc + (long long)row * Wp;
    const long long o = (long long)row * OW;
    const long long ro = ((long long)(row / OH) * res_rows + row % OH) * OW;
    constexpr unsigned long long kVec = sizeof(Vec4<T>) - 1;
    const bool vec = (reinterpret_cast<unsigned long long>(out + o) & kVec) == 0 &&
                     (!has_res || (reinterpret_cast<unsigned long long>(res + ro) & kVec) == 0) &&
                     (OW & 3) == 0;
    for (int x = 4 * threadIdx.x; x < OW; x += 4 * blockDim.x) {
      const float4 v = *reinterpret_cast<const float4 *>(a + x);
      const float vs[4] = {v.x, v.y, v.z, v.w};
      if (vec) {  // x + 3 < OW: OW and x are multiples of 4
        Vec4<T> rv, ov;
        if (has_res) rv = *reinterpret_cast<const Vec4<T> *>(res + ro + x);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float r = vs[e] + bv;
          if (has_res) r += to_f<T>(rv.v[e]);
          ov.v[e] = from_f<T>(r);
          if (st.per_group) welford_add(w, to_f<T>(ov.v[e]));
        }
        *reinterpret_cast<Vec4<T> *>(out + o + x) = ov;
        continue;
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (x + e < OW) {
          float r = vs[e] + bv;
          if (has_res) r += to_f<T>(res[ro + x + e]);
          const T y = from_f<T>(r);
          out[o + x + e] = y;
          if (st.per_group) welford_add(w, to_f<T>(y));
        }
      }
    }
  }
  if (st.per_group) leave_stats(w, st);  // uniform: a kernel argument
}

#define CONV_KERNELS(T, SUF)                                                                 \
  extern "C" __global__ void conv_shift_##SUF(const T *x, T *x3, int C, int H, int W, int up, \
                                               int pt, int pl, int Hp, int Wp, long long S,  \
                                               int k, long long plane) {                     \
    conv_shift<T, false>(x, x3, C, H, W, up, pt, pl, Hp, Wp, S, k, plane, NormIn<T>{});      \
  }                                                                                          \
  extern "C" __global__ void conv_shift_norm_##SUF(                                          \
      const T *x, T *x3, int C, int H, int W, int up, int pt, int pl, int Hp, int Wp,        \
      long long S, int k, const T *gamma, const T *beta, const float *partial, int splits,   \
      int cpg, float eps, int silu, const T *mscale, const T *mshift, int mkind,             \
      long long ssb, long long ssc, long long tsb, long long tsc, int mh, int mw, int row0,  \
      int hfull, long long plane) {                                                          \
    conv_shift<T, true>(x, x3, C, H, W, up, pt, pl, Hp, Wp, S, k, plane,                     \
                        NormIn<T>{gamma, beta, mscale, mshift, partial, splits, cpg, silu,   \
                                  mkind, mh, mw, row0, hfull, eps, ssb, ssc, tsb, tsc});     \
  }                                                                                          \
  extern "C" __global__ void conv_finish_##SUF(                                              \
      const float *acc, const T *bias, const T *res, T *out, int rows, int Cout, int OH,     \
      int OW, int Wp, int has_bias, int has_res, int res_rows, float *stats, float *partial, \
      unsigned *done, int per_group) {                                                       \
    conv_finish<T>(acc, bias, res, out, rows, Cout, OH, OW, Wp, has_bias, has_res, res_rows, \
                   StatsOut{stats, partial, done, per_group});                               \
  }

CONV_KERNELS(float, f32)
CONV_KERNELS(__half, f16)
CONV_KERNELS(__nv_bfloat16, bf16)
