// The shifted-GEMM convolution's k GEMMs and its crop as one tensor-core kernel, mma.sync
// (`kandinsky_core::gpu_conv::ConvGemm::Mma`, opt-in with KANDINSKY_CONV_GEMM=mma until a GPU
// run has timed it); the contract and tiling in conv_gemm_common.cuh. No f32 accumulator in
// global memory (written k times, read k − 1 times, then cropped by conv_finish) and one
// launch instead of k + 1. The f32 scratch was 40 % of the convolution's (MoVQ's 768² level:
// ≈ 300 MB), so this is a memory measure as much as a speed one.
//
// 8 warps, each 64 output channels × 32 positions (4 × 4 mma.m16n8k16 tiles, f32
// accumulation); the weight tile read with ldmatrix, the position tile with ldmatrix.trans.
// 48 KB of shared memory, 121 registers (sm_90), two blocks per SM. `conv_gemm1_*` read the
// one padded copy instead of the shifted ones (conv_gemm_common.cuh).
#include "conv_gemm_common.cuh"

namespace conv_gemm {

// The position tile: BK rows of BN elements (256 bytes, 16 chunks), chunk c of row r at
// c ^ (r & 7) (the eight rows of an ldmatrix matrix would all share banks).
__device__ __forceinline__ int b_at(int r, int c) { return r * BN + ((c ^ (r & 7)) << 3); }

template <typename T>
__device__ __forceinline__ void load_stage(const Args<T>& p, const T* x3b, T* as, T* bs, int it, int nkt, int m0,
                                           int n0) {
  const Step st(it, nkt);
  load_a(p, as, st, m0);
#pragma unroll
  for (int i = threadIdx.x; i < BK * BN / 8; i += THREADS) {
    const int r = i >> 4, c = i & 15;
    bool ok;
    const T* src = b_src(p, x3b, st, r, c, n0, ok);
    cp_async16(bs + b_at(r, c), src, ok);
  }
}

struct BAt {
  __device__ __forceinline__ int operator()(int r, int c) const { return b_at(r, c); }
};

template <typename T, bool ONE>
__device__ void run(const Args<T>& p) {
  __shared__ __align__(16) T as[STAGES][BM * BK];
  // ONE: two buffers, each filled from registers one step ahead; otherwise the cp.async stages.
  __shared__ __align__(16) T bs[ONE ? 2 : STAGES][BK * BN];
  const int n0 = blockIdx.x * BN, m0 = blockIdx.y * BM, b = blockIdx.z;
  const T* x3b = p.x3 + (long long)b * (ONE ? p.c : p.kc) * p.s;  // k copies of C rows, or one
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

  BRegs br;
#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (st < iters) {
      if constexpr (ONE) load_a(p, as[st], Step(st, nkt), m0);
      else load_stage(p, x3b, as[st], bs[st], st, nkt, m0, n0);
    }
    cp_async_commit();
  }
  if constexpr (ONE) {
    load_b_regs(p, x3b, Step(0, nkt), n0, br);
    store_b(br, bs[0], BAt{});
  }
  for (int it = 0; it < iters; ++it) {
    // Step `it` has landed (the newest STAGES − 2 groups may still be in flight); after the
    // barrier every warp is done with the stage the prefetch below overwrites (ONE: and with
    // the buffer the registers are stored to at the end of this step).
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    const int pre = it + STAGES - 1;
    if (pre < iters) {
      if constexpr (ONE) load_a(p, as[pre % STAGES], Step(pre, nkt), m0);
      else load_stage(p, x3b, as[pre % STAGES], bs[pre % STAGES], pre, nkt, m0, n0);
    }
    cp_async_commit();
    if constexpr (ONE) {
      if (it + 1 < iters) load_b_regs(p, x3b, Step(it + 1, nkt), n0, br);
    }
    const T* a_s = as[it % STAGES];
    const T* b_s = bs[ONE ? it & 1 : it % STAGES];
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
    if constexpr (ONE) {
      if (it + 1 < iters) store_b(br, bs[(it + 1) & 1], BAt{});
    }
  }
  cp_async_wait<0>();

  // C fragment element e of tile (mi, ni): row g + 8·(e >> 1), column 2t + (e & 1).
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
        store_pair(p, b, m0 + wm + mi * 16 + g + 8 * h, n0 + wn + ni * 8 + 2 * t, acc[mi][ni][2 * h],
                   acc[mi][ni][2 * h + 1]);
}

}  // namespace conv_gemm

#define CONV_GEMM_MMA_BODY(T, ONE, P) conv_gemm::run<T, ONE>(P);
CONV_GEMM_ENTRY(conv_gemm_f16, __half, false, CONV_GEMM_MMA_BODY)
CONV_GEMM_ENTRY(conv_gemm_bf16, __nv_bfloat16, false, CONV_GEMM_MMA_BODY)
CONV_GEMM_ENTRY(conv_gemm1_f16, __half, true, CONV_GEMM_MMA_BODY)
CONV_GEMM_ENTRY(conv_gemm1_bf16, __nv_bfloat16, true, CONV_GEMM_MMA_BODY)
