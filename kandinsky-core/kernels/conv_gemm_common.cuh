// What the two one-kernel convolution GEMMs share (conv_gemm.cu with mma.sync,
// conv_gemm_wgmma.cu with Hopper's wgmma): the contract, the tiling, the weight tile's loader
// and layout, and the epilogue. The contract (both kernels): conv.cu's shifted copies X3
// [B, k·C, S] and the weight taps [k, Cout, k·C] give
//
//   out[b, co, y, x] = bias[co] (+ res[b, co, y, x])
//                      + Σ_dy Σ_kk taps[dy, co, kk] · X3[b, kk, dy·Wp + y·Wp + x],   x < OW
//
// — the sums the k cuBLAS GEMMs of the default path accumulate in an f32 buffer, here in
// registers, cropped, biased and rounded in the epilogue. The GEMM's n columns are the
// output's positions (n = OH·OW) where OW is a multiple of 8, the OH × Wp grid otherwise
// (grid_at). Tiles of 128 output channels × 128 columns per block of 256 threads, 32 of the
// k·C reduction per stage, 3 cp.async stages. Needs k·C and Wp multiples of 8 (16-byte
// chunks), f16 or bf16.
//
// ONE (the `conv_gemm1*` entry points): the shifted copies are not made. X3 is then the
// single padded map P [B, C, S] (conv.cu's copy with k = 1, plus 16 elements of slack at the
// end of the buffer) and row kk = dx·C + c of the reduction is read at P[b, c, dy·Wp + dx + j]:
// two aligned 16-byte loads per chunk, shifted by dx elements in registers, stored to shared
// memory one stage ahead (the weights keep their cp.async stages). k ≤ 3. A shift past a
// channel's map reads the next channel's first elements or the slack, and only ever for
// positions past OW, which are dropped.
#pragma once
#include "common.cuh"
#include "warp_ops.cuh"

namespace conv_gemm {

constexpr int BM = 128, BN = 128, BK = 32, STAGES = 3, THREADS = 256;

// Two adjacent output elements, for one 4-byte store.
template <typename T> struct alignas(4) Pair { T v[2]; };

template <typename T>
struct Args {
  const T *x3, *taps, *bias, *res;
  T* out;
  int cout, kc, k, n, wp, oh, ow, has_bias, has_res;
  long long s;
  int c;  // input channels (ONE: row kk of the reduction is tap kk / c, channel kk % c)
};

// 16 bytes in four words (the kernels' own type: no CUDA vector types in the host build).
struct alignas(16) U4 {
  uint32_t w[4];
};

// The weight tile: BM rows of BK elements (64 bytes, 4 chunks of 16), chunk c of row r at
// chunk c ^ ((r >> 1) & 3), so that the eight rows one ldmatrix matrix reads (rows r and
// r + 2 would share banks) fall in distinct banks.
__device__ __forceinline__ int a_at(int r, int c) { return r * BK + ((c ^ ((r >> 1) & 3)) << 3); }

// Column j of the GEMM (positions; 8-aligned chunks) → its index in the OH × Wp grid the
// copies are laid out in. Where OW is a multiple of 8 the columns are the output's positions
// alone (n = OH·OW, a chunk never crosses a row), so no product is spent on the grid's
// columns past OW — which the one-copy kernels' rows, holding the padded width, would have
// (8 / 14 % of the grid at 96 / 48 wide); otherwise the columns are the grid (n = OH·Wp),
// cropped in the epilogue. gpu_conv::Geometry::fused_columns is the host's side.
template <typename T>
__device__ __forceinline__ bool dense(const Args<T>& p) { return (p.ow & 7) == 0; }
template <typename T>
__device__ __forceinline__ int grid_at(const Args<T>& p, int j) {
  if (!dense(p)) return j;
  const int y = j / p.ow;
  return y * p.wp + (j - y * p.ow);
}

// Reduction step `it`: kernel row dy = it / nkt and the first of its BK channels·taps.
struct Step {
  int dy, kk0;
  __device__ __forceinline__ Step(int it, int nkt) : dy(it / nkt), kk0((it - (it / nkt) * nkt) * BK) {}
};

// The weight tile of step `st` with cp.async: two 16-byte chunks per thread, those outside the
// weights zero-filled (their source a valid stand-in address).
template <typename T>
__device__ __forceinline__ void load_a(const Args<T>& p, T* as, Step st, int m0) {
#pragma unroll
  for (int i = threadIdx.x; i < BM * BK / 8; i += THREADS) {
    const int r = i >> 2, c = i & 3, co = m0 + r, kk = st.kk0 + 8 * c;
    const bool ok = co < p.cout && kk < p.kc;
    const T* src = ok ? p.taps + ((long long)st.dy * p.cout + co) * p.kc + kk : p.taps;
    cp_async16(as + a_at(r, c), src, ok);
  }
}

// Chunk (r, c) of the position tile of step `st` (row r of BK, 16-byte chunk c of BN
// positions): its source and whether it exists (zero-filled otherwise).
template <typename T>
__device__ __forceinline__ const T* b_src(const Args<T>& p, const T* x3b, Step st, int r, int c, int n0, bool& ok) {
  const int kk = st.kk0 + r, j = n0 + 8 * c;
  ok = kk < p.kc && j < p.n;
  return ok ? x3b + (long long)kk * p.s + (long long)st.dy * p.wp + grid_at(p, j) : x3b;
}

// ONE: the position tile of a step in registers between its loads and its store to shared
// memory (two chunks per thread: the loads of step it + 1 are in flight while step it
// computes).
struct BRegs {
  U4 lo[2], hi[2];
  int dx[2];
  bool ok[2];
};

template <typename T>
__device__ __forceinline__ void load_b_regs(const Args<T>& p, const T* pb, Step st, int n0, BRegs& br) {
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    const int i = threadIdx.x + q * THREADS, r = i >> 4, kk = st.kk0 + r, j = n0 + 8 * (i & 15);
    br.ok[q] = kk < p.kc && j < p.n;
    if (br.ok[q]) {
      const int dx = kk / p.c, ch = kk - dx * p.c;
      // Aligned: S, Wp and j are multiples of 8; the chunk starts dx elements in.
      const U4* src = reinterpret_cast<const U4*>(pb + (long long)ch * p.s + (long long)st.dy * p.wp + grid_at(p, j));
      br.dx[q] = dx;
      br.lo[q] = src[0];
      br.hi[q] = dx ? src[1] : br.lo[q];
    }
  }
}

// Elements [dx, dx + 8) of the 16 in lo, hi (dx ≤ 2), zero where the chunk does not exist,
// into chunk (i & 15) of row i >> 4 at AT(r, c).
template <typename T, class At>
__device__ __forceinline__ void store_b(const BRegs& br, T* bs, At at) {
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    const int i = threadIdx.x + q * THREADS;
    U4 out{{0u, 0u, 0u, 0u}};
    if (br.ok[q]) {
      const uint32_t w[5] = {br.lo[q].w[0], br.lo[q].w[1], br.lo[q].w[2], br.lo[q].w[3], br.hi[q].w[0]};
      const int dx = br.dx[q];
#pragma unroll
      for (int e = 0; e < 4; ++e)
        out.w[e] = dx == 0 ? w[e] : dx == 1 ? (w[e] >> 16) | (w[e + 1] << 16) : w[e + 1];
    }
    st_shared16(reinterpret_cast<U4*>(bs + at(i >> 4, i & 15)), out);
  }
}

// Output row `co`, GEMM columns j and j + 1 (j even) of batch b: kept where inside the map's
// OW columns, plus bias and residual, rounded once. Stored as one pair where OW is even (then
// both or neither are inside, and 4-byte aligned).
template <typename T>
__device__ __forceinline__ void store_pair(const Args<T>& p, int b, int co, int j, float v0, float v1) {
  if (co >= p.cout || j >= p.n) return;
  const int stride = dense(p) ? p.ow : p.wp;
  const int y = j / stride, x = j - y * stride;
  if (x >= p.ow) return;
  const float bv = p.has_bias ? to_f<T>(p.bias[co]) : 0.f;
  v0 += bv;
  v1 += bv;
  const long long o = ((long long)b * p.cout + co) * p.oh * p.ow + (long long)y * p.ow + x;
  if ((p.ow & 1) == 0) {
    if (p.has_res) {
      v0 += to_f<T>(p.res[o]);
      v1 += to_f<T>(p.res[o + 1]);
    }
    Pair<T> pv;
    pv.v[0] = from_f<T>(v0);
    pv.v[1] = from_f<T>(v1);
    *reinterpret_cast<Pair<T>*>(p.out + o) = pv;
  } else {
    if (p.has_res) v0 += to_f<T>(p.res[o]);
    p.out[o] = from_f<T>(v0);
    if (x + 1 < p.ow) {
      if (p.has_res) v1 += to_f<T>(p.res[o + 1]);
      p.out[o + 1] = from_f<T>(v1);
    }
  }
}

}  // namespace conv_gemm

// Entry point NAME running BODY(T, ONE, args): grid x = position tiles of the
// OH·Wp grid, y = output-channel tiles, z = batch; 256 threads. Without a bias or a residual
// the kernel never reads those pointers.
#define CONV_GEMM_ENTRY(NAME, T, ONE, BODY)                                                                   \
  extern "C" __global__ void __launch_bounds__(conv_gemm::THREADS, 2)                                        \
      NAME(const T* x3, const T* taps, const T* bias, const T* res, T* out, int cout, int kc, int k, int n,   \
           int wp, int oh, int ow, long long s, int has_bias, int has_res, int c) {                           \
    const conv_gemm::Args<T> p{x3, taps, bias, res, out, cout, kc, k, n, wp, oh, ow, has_bias, has_res, s, c}; \
    BODY(T, ONE, p)                                                                                           \
  }
