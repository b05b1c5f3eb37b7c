// The one-kernel convolution GEMM on Hopper's warpgroup tensor cores (wgmma, sm_90a;
// `ConvGemm::Wgmma`, opt-in with KANDINSKY_CONV_GEMM=wgmma). Built for sm_90a when
// CUDA_COMPUTE_CAP is 90; elsewhere its entry points trap and the Rust side never launches
// them. Contract, tiling and epilogue: conv_gemm_common.cuh.
//
// Two warpgroups, each 64 output channels × 128 positions: per 32-wide reduction stage, two
// k16 steps × two wgmma.m64n64k16 (one per 64-position half). The weights go to registers
// with ldmatrix (each warp's 16 channels as mma.m16n8k16's A fragment, wgmma's register-A
// layout); the positions are read by wgmma from shared memory, N-major, in the 128-byte
// swizzled layout of flash_attention_wgmma.cu's V tile (the same descriptors). Each warpgroup
// waits for a stage's four products before the next stage (two blocks per SM keep the tensor
// cores busy meanwhile). 48 KB of shared memory, 64 f32 accumulators per thread.
// `conv_gemm1_wgmma_*` read the one padded copy instead of the shifted ones
// (conv_gemm_common.cuh).
#include <type_traits>

#include "conv_gemm_common.cuh"
#include "wgmma_ops.cuh"

#if defined(KANDINSKY_HOST_EMU) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define KD_CONV_WGMMA 1
#endif

namespace conv_gemm {

#ifdef KD_CONV_WGMMA
constexpr int HALF = BK * 64;  // elements of one 64-position half of a position tile

// Chunk c (of 16) of row r of a position tile: half c / 8, a row of 128 bytes whose 16-byte
// chunks are XORed with the row's index within its 1024-byte block.
__device__ __forceinline__ int bw_at(int r, int c) { return (c >> 3) * HALF + r * 64 + (((c & 7) ^ (r & 7)) << 3); }

// Keeps the compiler from touching the accumulators while a wgmma may be writing them.
__device__ __forceinline__ void fence_acc(float (&acc)[2][8][4]) {
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) wgmma_fence_operand(acc[h][j][e]);
}

struct BwAt {
  __device__ __forceinline__ int operator()(int r, int c) const { return bw_at(r, c); }
};

template <typename T, bool ONE>
__device__ void run_wgmma(const Args<T>& p) {
  constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
  // ONE: two buffers, each filled from registers one step ahead; otherwise the cp.async stages.
  __shared__ __align__(1024) T bs[ONE ? 2 : STAGES][BK * BN];
  __shared__ __align__(16) T as[STAGES][BM * BK];
  const int n0 = blockIdx.x * BN, m0 = blockIdx.y * BM, b = blockIdx.z;
  const T* x3b = p.x3 + (long long)b * (ONE ? p.c : p.kc) * p.s;  // k copies of C rows, or one
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int row0 = (warp >> 2) * 64 + (warp & 3) * 16;  // the warp's first channel in the tile
  const int nkt = (p.kc + BK - 1) / BK, iters = p.k * nkt;

  auto load_stage = [&](int stage, int it) {
    const Step st(it, nkt);
    load_a(p, as[stage], st, m0);
    if constexpr (!ONE) {
#pragma unroll
      for (int i = threadIdx.x; i < BK * BN / 8; i += THREADS) {
        const int r = i >> 4, c = i & 15;
        bool ok;
        const T* src = b_src(p, x3b, st, r, c, n0, ok);
        cp_async16(bs[stage] + bw_at(r, c), src, ok);
      }
    }
  };

  float acc[2][8][4];
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[h][j][0] = acc[h][j][1] = acc[h][j][2] = acc[h][j][3] = 0.f;
  uint32_t af[BK / 16][4];

  BRegs br;
#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (st < iters) load_stage(st, st);
    cp_async_commit();
  }
  if constexpr (ONE) {
    load_b_regs(p, x3b, Step(0, nkt), n0, br);
    store_b(br, bs[0], BwAt{});
  }
  for (int it = 0; it < iters; ++it) {
    cp_async_wait<STAGES - 2>();  // step `it` has landed
    fence_proxy_async();          // cp.async's (and ONE: the stores') writes, visible to wgmma
    // Also: every warpgroup is done with the buffer the prefetch below refills.
    __syncthreads();
    const int pre = it + STAGES - 1;
    if (pre < iters) load_stage(pre % STAGES, pre);
    cp_async_commit();
    if constexpr (ONE) {
      if (it + 1 < iters) load_b_regs(p, x3b, Step(it + 1, nkt), n0, br);
    }
    const T* a_s = as[it % STAGES];
    const T* b_s = bs[ONE ? it & 1 : it % STAGES];
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks)
      ldmatrix_x4(af[ks], a_s + a_at(row0 + (lane & 15), 2 * ks + (lane >> 4)));
    fence_acc(acc);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        wgmma_m64n64k16_rs<kBf16, 1>(&acc[h][0][0], af[ks], wgmma_desc(b_s + h * HALF + ks * 16 * 64, 8192, 1024, true),
                                     1);
    wgmma_commit();
    // Waiting here, not at the next step's top, lets ptxas keep the four products in flight
    // together (a wait across the loop's back edge makes it serialise them, warning C7515).
    wgmma_wait<0>();
    fence_acc(acc);
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks)
#pragma unroll
      for (int i = 0; i < 4; ++i) wgmma_fence_operand(af[ks][i]);
    if constexpr (ONE) {
      // The other buffer, read by the previous step's (waited for) products.
      if (it + 1 < iters) store_b(br, bs[(it + 1) & 1], BwAt{});
    }
  }
  cp_async_wait<0>();

  // Accumulator element e of n8 block j of half h: channel row0 + g + 8·(e >> 1), position
  // 64h + 8j + 2t + (e & 1) (mma.m16n8k16's C layout per warp).
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh)
        store_pair(p, b, m0 + row0 + g + 8 * hh, n0 + 64 * h + 8 * j + 2 * t, acc[h][j][2 * hh],
                   acc[h][j][2 * hh + 1]);
}
#define CONV_GEMM_WGMMA_BODY(T, ONE, P) conv_gemm::run_wgmma<T, ONE>(P);
#else
// Built for an architecture without wgmma: the entry points exist but must never run.
#define CONV_GEMM_WGMMA_BODY(T, ONE, P) \
  (void)P;                                \
  __trap();
#endif

}  // namespace conv_gemm

CONV_GEMM_ENTRY(conv_gemm_wgmma_f16, __half, false, CONV_GEMM_WGMMA_BODY)
CONV_GEMM_ENTRY(conv_gemm_wgmma_bf16, __nv_bfloat16, false, CONV_GEMM_WGMMA_BODY)
CONV_GEMM_ENTRY(conv_gemm1_wgmma_f16, __half, true, CONV_GEMM_WGMMA_BODY)
CONV_GEMM_ENTRY(conv_gemm1_wgmma_bf16, __nv_bfloat16, true, CONV_GEMM_WGMMA_BODY)
