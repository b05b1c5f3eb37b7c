// The shifted-GEMM convolution's k GEMMs and its crop as one tensor-core kernel
// (`kandinsky_core::gpu_conv`, opt-in with KANDINSKY_CONV_GEMM=mma until a GPU run has timed
// it). It reads conv.cu's shifted copies X3 [B, k·C, S] and the weight taps [k, Cout, k·C]:
//
//   out[b, co, y, x] = bias[co] (+ res[b, co, y, x])
//                      + Σ_dy Σ_kk taps[dy, co, kk] · X3[b, kk, dy·Wp + y·Wp + x],   x < OW
//
// — the same sums the k cuBLAS GEMMs accumulate, but in registers: no f32 accumulator in
// global memory (written k times, read k − 1 times, then cropped by conv_finish) and one
// launch instead of k + 1. The f32 scratch was 40 % of the convolution's (MoVQ's 768² level:
// ≈ 300 MB), so this is a memory measure as much as a speed one.
//
// Tiles: 128 output channels × 128 positions of the OH·Wp grid per block, 32 of the k·C
// reduction per stage, 3 cp.async stages (48 KB of shared memory); 8 warps, each 64 × 32
// (4 × 4 mma.m16n8k16 tiles, f32 accumulation). Positions past a row's OW columns are
// computed and dropped, as the cuBLAS path crops them. Needs k·C and Wp multiples of 8 (16-byte
// chunks; Wp is by construction), f16 or bf16.
#include "common.cuh"
#include "warp_ops.cuh"

namespace conv_gemm {

constexpr int BM = 128, BN = 128, BK = 32, STAGES = 3, THREADS = 256;

// Two adjacent output elements, for one 4-byte store.
template <typename T> struct alignas(4) Pair { T v[2]; };

// Shared-memory tiles, 16-byte chunks XOR-swizzled so that the eight rows one ldmatrix
// matrix reads fall in distinct banks. A: BM rows of BK elements (4 chunks, rows 64 bytes
// apart: rows r and r + 2 would share banks); B: BK rows of BN elements (16 chunks, rows
// 256 bytes apart: all eight would).
__device__ __forceinline__ int a_at(int r, int c) { return r * BK + ((c ^ ((r >> 1) & 3)) << 3); }
__device__ __forceinline__ int b_at(int r, int c) { return r * BN + ((c ^ (r & 7)) << 3); }

template <typename T>
struct Args {
  const T *x3, *taps, *bias, *res;
  T* out;
  int cout, kc, k, n, wp, oh, ow, has_bias, has_res;
  long long s;
};

// Stage `st` ← reduction step `it` (kernel row dy = it / nkt, chunk kt = it % nkt of k·C).
// Each thread copies two 16-byte chunks of A and two of B; chunks outside the weights or the
// grid are zero-filled (their source is a valid stand-in address).
template <typename T>
__device__ __forceinline__ void load_stage(const Args<T>& p, const T* x3b, T* as, T* bs, int it, int nkt, int m0,
                                           int n0) {
  const int dy = it / nkt, kk0 = (it - dy * nkt) * BK;
#pragma unroll
  for (int i = threadIdx.x; i < BM * BK / 8; i += THREADS) {
    const int r = i >> 2, c = i & 3, co = m0 + r, kk = kk0 + 8 * c;
    const bool ok = co < p.cout && kk < p.kc;
    const T* src = ok ? p.taps + ((long long)dy * p.cout + co) * p.kc + kk : p.taps;
    cp_async16(as + a_at(r, c), src, ok);
  }
#pragma unroll
  for (int i = threadIdx.x; i < BK * BN / 8; i += THREADS) {
    const int r = i >> 4, c = i & 15, kk = kk0 + r, j = n0 + 8 * c;
    const bool ok = kk < p.kc && j < p.n;
    const T* src = ok ? x3b + (long long)kk * p.s + (long long)dy * p.wp + j : x3b;
    cp_async16(bs + b_at(r, c), src, ok);
  }
}

template <typename T>
__device__ void run(const Args<T>& p) {
  __shared__ __align__(16) T as[STAGES][BM * BK];
  __shared__ __align__(16) T bs[STAGES][BK * BN];
  const int n0 = blockIdx.x * BN, m0 = blockIdx.y * BM, b = blockIdx.z;
  const T* x3b = p.x3 + (long long)b * p.kc * p.s;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = (warp & 1) * 64, wn = (warp >> 1) * 32;
  const int nkt = (p.kc + BK - 1) / BK, iters = p.k * nkt;

  float acc[4][4][4];
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;

#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (st < iters) load_stage(p, x3b, as[st], bs[st], st, nkt, m0, n0);
    cp_async_commit();
  }
  for (int it = 0; it < iters; ++it) {
    // Step `it` has landed (the newest STAGES − 2 groups may still be in flight); after the
    // barrier every warp is done with the stage the prefetch below overwrites.
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    const int pre = it + STAGES - 1;
    if (pre < iters) load_stage(p, x3b, as[pre % STAGES], bs[pre % STAGES], pre, nkt, m0, n0);
    cp_async_commit();
    const T* a_s = as[it % STAGES];
    const T* b_s = bs[it % STAGES];
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
      uint32_t af[4][4], bf[4][2];
      // A fragments: lane l addresses row l % 16 of the m16 tile, k chunk 2·ks + l / 16.
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
        ldmatrix_x4(af[mi], a_s + a_at(wm + mi * 16 + (lane & 15), 2 * ks + (lane >> 4)));
      // B fragments, transposed on the way ([k][n] in shared memory): matrix j = l / 8 holds
      // k rows 8·(j & 1) .. + 7 of n8 tile j / 2 of the pair.
#pragma unroll
      for (int pr = 0; pr < 2; ++pr) {
        uint32_t r4[4];
        const int j = lane >> 3;
        ldmatrix_x4_trans(r4, b_s + b_at(16 * ks + 8 * (j & 1) + (lane & 7), (wn + 16 * pr) / 8 + (j >> 1)));
        bf[2 * pr][0] = r4[0];
        bf[2 * pr][1] = r4[1];
        bf[2 * pr + 1][0] = r4[2];
        bf[2 * pr + 1][1] = r4[3];
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) Mma<T>::mma(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
    }
  }
  cp_async_wait<0>();

  // Epilogue: C fragment element e of tile (mi, ni) is row g + 8·(e >> 1), column
  // 2t + (e & 1) (lane 4g + t); keep the columns inside the map, add bias and residual,
  // round once. Pairs of columns are stored together where OW is even (then both or neither
  // are inside, and 4-byte aligned).
  const int g = lane >> 2, t = lane & 3;
  const bool pairs = (p.ow & 1) == 0;
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int co = m0 + wm + mi * 16 + g + 8 * h;
      if (co >= p.cout) continue;
      const float bv = p.has_bias ? to_f<T>(p.bias[co]) : 0.f;
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const int j = n0 + wn + ni * 8 + 2 * t;
        if (j >= p.n) continue;
        const int y = j / p.wp, x = j - y * p.wp;
        if (x >= p.ow) continue;
        const long long o = ((long long)b * p.cout + co) * p.oh * p.ow + (long long)y * p.ow + x;
        float v0 = acc[mi][ni][2 * h] + bv, v1 = acc[mi][ni][2 * h + 1] + bv;
        if (pairs) {
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
    }
}

}  // namespace conv_gemm

// Grid: x = position tiles of the OH·Wp grid, y = output-channel tiles, z = batch; 256
// threads. Without a bias or a residual the kernel never reads those pointers.
#define CONV_GEMM_KERNEL(T, SUF)                                                                              \
  extern "C" __global__ void __launch_bounds__(conv_gemm::THREADS, 2)                                        \
      conv_gemm_##SUF(const T* x3, const T* taps, const T* bias, const T* res, T* out, int cout, int kc, int k,  \
                      int n, int wp, int oh, int ow, long long s, int has_bias, int has_res) {              \
    conv_gemm::run<T>(                                                                                       \
        conv_gemm::Args<T>{x3, taps, bias, res, out, cout, kc, k, n, wp, oh, ow, has_bias, has_res, s});     \
  }

CONV_GEMM_KERNEL(__half, f16)
CONV_GEMM_KERNEL(__nv_bfloat16, bf16)
