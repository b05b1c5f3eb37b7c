// Fused attention for head size 64 on Hopper's warpgroup tensor cores (wgmma, sm_90a; built
// for sm_90a when CUDA_COMPUTE_CAP is 90, otherwise its entry points trap and the Rust side
// never launches them). Same contract as flash_attention_wide.cu: two key/value segments read
// in place, f32 softmax in the log2 domain, bf16 P split into P_hi + P_lo.
//
// Block: 2 warpgroups (256 threads), 64 query rows each (128 per block). Per tile of 64 keys,
// each warpgroup issues S = Q·Kᵀ as 4 wgmma.m64n64k16 (Q in registers, K from shared memory)
// and O += P·V as 4 more (P straight from the S registers: wgmma's accumulator layout is
// mma.m16n8k16's C, which is its A layout in pairs; V from shared memory, N-major), the two
// of consecutive tiles in flight together (FlashAttention-3's overlap, below). K/V tiles are
// loaded with cp.async in one of two layouts of wgmma_ops.cuh (template SW, both built):
//   SW = true, 128-byte swizzle: row r of 128 bytes at r·128, its 16-byte chunk c at
//     (c ^ r % 8)·16 — a row's eight cp.async chunks hit distinct banks. K: K-major, SBO
//     1024 B, a k16 step 32 B further; V: N-major, SBO 1024 B (8 keys), a step 2048 B.
//   SW = false, no swizzle: element (r, c) at (r/8)·512 + (c/8)·64 + (r%8)·8 + c%8, so
//     LBO = 128 B and SBO = 1024 B for K (K = head dim), LBO = 1024 B and SBO = 128 B for V
//     (K = keys); a row's chunks are 128 bytes apart, so the loader's lanes take eight rows
//     of one chunk (load_rows_async's COLUMNS_FIRST) instead of one row's eight chunks,
//     which would be an 8-way bank conflict per write.
// Shared memory 40 KB; Q is staged once through two V buffers and read with ldmatrix.
//
// GPU run 10 (H200): 195 TFLOP/s f16 at the UNet's 48×48 level (the mma.sync kernel 125,
// PyTorch's SDPA 247–264, the goal 300), relative error 2.6e-4 against f32. A one-tile-at-a-
// time variant (S, wait, softmax, P·V, wait) passed the host emulation (xtask/gpu/emu) but
// gave wrong outputs on the card (relative error 0.97) and was removed: the emulation is a
// check of the indexing, not a proof.
#include "flash_common.cuh"
#include "wgmma_ops.cuh"

#if defined(KANDINSKY_HOST_EMU) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define KD_HAS_WGMMA 1
#endif

namespace wg {

#ifdef KD_HAS_WGMMA
using flash::BK;
using flash::D;
constexpr int TILE = BK * D;  // elements per K or V tile
constexpr int THREADS = 256;  // 2 warpgroups
constexpr int BQ = 128;       // query rows per block

// Element (r, c) of a tile of 64 columns in the layout SW picks (see the top).
template <bool SW> __device__ __forceinline__ int at(int r, int c) {
  if constexpr (SW) return r * 64 + (((c >> 3) ^ (r & 7)) << 3) + (c & 7);
  else return (r >> 3) * 512 + (c >> 3) * 64 + (r & 7) * 8 + (c & 7);
}
template <bool SW> struct Layout {
  static constexpr bool COLUMNS_FIRST = !SW;  // unswizzled, a row's chunks are 128 bytes apart
  __device__ __forceinline__ static int at(int r, int c) { return wg::at<SW>(r, c); }
};

// Rows [r0, r0 + ROWS) of the two-segment matrix into a tile with cp.async.
template <int ROWS, bool SW, typename T>
__device__ __forceinline__ void load_tile_async(T* tile, const T* a, int la, const T* b, int lb, int r0, int rs) {
  flash::load_rows_async<THREADS, ROWS, Layout<SW>>(tile, a, la, b, lb, r0, rs);
}

// An accumulator fragment (16 rows × 64 of a warp) zeroed; fenced against the asynchronous
// wgmma (see wgmma_fence_operand).
__device__ __forceinline__ void zero(float (&a)[BK / 8][4]) {
#pragma unroll
  for (int j = 0; j < BK / 8; ++j) a[j][0] = a[j][1] = a[j][2] = a[j][3] = 0.f;
}
__device__ __forceinline__ void fence_all(float (&a)[BK / 8][4]) {
#pragma unroll
  for (int j = 0; j < BK / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) wgmma_fence_operand(a[j][e]);
}

// Q as the A fragments of the warp's 16 rows (from `row0` of the staged tile), one per k16
// step (ldmatrix: matrices 0/1 = rows 0–7/8–15 of columns 0–7, 2/3 the same rows of 8–15).
template <bool SW, typename T>
__device__ __forceinline__ void load_q(uint32_t (&qa)[D / 16][4], const T* staged, int row0, int lane) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(qa[kk], staged + at<SW>(row0 + (lane & 15), kk * 16 + (lane >> 4) * 8));
}

// Issue S = Q · Kᵀ (4 wgmma, not committed): K-major B, k16 step kk starts at column 16kk
// (swizzled: 32 bytes into row 0 — the hardware swizzles the absolute addresses).
template <typename T, bool SW>
__device__ __forceinline__ void issue_s(float (&s)[BK / 8][4], const uint32_t (&qa)[D / 16][4], const T* K) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const uint64_t dk =
        SW ? wgmma_desc(K + kk * 16, 16, 1024, true) : wgmma_desc(K + at<false>(0, kk * 16), 128, 1024, false);
    wgmma_m64n64k16_rs<Mma<T>::split, 0>(&s[0][0], qa[kk], dk, kk > 0);
  }
}

// Issue O += P · V (4 wgmma, 8 for bf16's two terms; not committed): N-major B, k16 step kk
// starts at key 16kk.
template <typename T, bool SW>
__device__ __forceinline__ void issue_pv(float (&acc)[D / 8][4], const uint32_t (&pa)[BK / 16][4],
                                         const uint32_t (&pl)[BK / 16][4], const T* V) {
#pragma unroll
  for (int kk = 0; kk < BK / 16; ++kk) {
    // Swizzled: LBO would step to the next 64 dims (there are none).
    const uint64_t dv =
        SW ? wgmma_desc(V + kk * 16 * 64, 8192, 1024, true) : wgmma_desc(V + at<false>(kk * 16, 0), 1024, 128, false);
    wgmma_m64n64k16_rs<Mma<T>::split, 1>(&acc[0][0], pa[kk], dv, 1);
    if constexpr (Mma<T>::split) wgmma_m64n64k16_rs<Mma<T>::split, 1>(&acc[0][0], pl[kk], dv, 1);
  }
}

// FlashAttention-3's intra-warpgroup overlap: tile j's S = Q·K_jᵀ and the previous tile's
// O += P·V are in flight together while the warpgroup waits only for S, so tile j's softmax
// runs while the tensor cores multiply P_{j−1}·V_{j−1}; the output is rescaled once that
// product is done. P of the tile in flight and P of the next are separate registers. K in
// two buffers, V in three (V_{j−1} is read during tile j, while V_{j+1} loads).
template <typename T, bool TOKEN_MAJOR, bool SW>
__device__ void flash_wgmma_pipe(const T* __restrict__ q_, const T* __restrict__ k1_, const T* __restrict__ v1_,
                                 int l1, const T* __restrict__ k2_, const T* __restrict__ v2_, int l2,
                                 T* __restrict__ o_, int lq, float scale, int heads) {
  // K tiles 0, 1; V tiles 2, 3, 4 (tile j's V in 2 + j % 3); Q staged first in 3–4.
  __shared__ __align__(1024) T smem[5][TILE];
  const flash::Head<T, TOKEN_MAJOR> hd(q_, k1_, v1_, l1, k2_, v2_, l2, o_, lq, heads);
  const int q0 = blockIdx.x * BQ;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, t = lane & 3;
  const int row0 = (warp >> 2) * 64 + (warp & 3) * 16;
  const int lk = l1 + l2;
  const int tiles = (lk + BK - 1) / BK;

  load_tile_async<BQ, SW>(smem[3], hd.q, lq, hd.q, 0, q0, hd.rs);
  load_tile_async<BK, SW>(smem[0], hd.k1, l1, hd.k2, l2, 0, hd.rs);
  load_tile_async<BK, SW>(smem[2], hd.v1, l1, hd.v2, l2, 0, hd.rs);
  cp_async_commit();
  cp_async_wait<0>();
  fence_proxy_async();
  __syncthreads();
  uint32_t qa[D / 16][4];
  load_q<SW>(qa, smem[3], row0, lane);
  __syncthreads();  // everyone has its Q before tile 3 is refilled
  if (tiles > 1) {
    load_tile_async<BK, SW>(smem[1], hd.k1, l1, hd.k2, l2, BK, hd.rs);
    load_tile_async<BK, SW>(smem[3], hd.v1, l1, hd.v2, l2, BK, hd.rs);
  }
  cp_async_commit();

  const float sl2 = scale * 1.4426950408889634f;
  float mx[2] = {-FLT_MAX, -FLT_MAX}, sum[2] = {0.f, 0.f}, alpha[2];
  uint32_t pa[BK / 16][4], pl[BK / 16][4];
  {
    float s[BK / 8][4];
    zero(s);
    wgmma_fence();
    issue_s<T, SW>(s, qa, smem[0]);
    wgmma_commit();
    wgmma_wait<0>();
    fence_all(s);
    flash::softmax_tile<T>(s, 0, lk, t, sl2, mx, sum, alpha, pa, pl);  // alpha = 0: nothing to rescale
  }
  float acc[BK / 8][4];
  zero(acc);

  for (int j = 1; j < tiles; ++j) {
    cp_async_wait<0>();  // tile j has landed
    fence_proxy_async();
    // Also: every warpgroup is done with K_{j−1} and V_{j−2}, whose buffers refill now.
    __syncthreads();
    if (j + 1 < tiles) {
      load_tile_async<BK, SW>(smem[(j + 1) & 1], hd.k1, l1, hd.k2, l2, (j + 1) * BK, hd.rs);
      load_tile_async<BK, SW>(smem[2 + (j + 1) % 3], hd.v1, l1, hd.v2, l2, (j + 1) * BK, hd.rs);
    }
    cp_async_commit();

    float s[BK / 8][4];
    zero(s);
    wgmma_fence();
    issue_s<T, SW>(s, qa, smem[j & 1]);
    wgmma_commit();
    issue_pv<T, SW>(acc, pa, pl, smem[2 + (j - 1) % 3]);
    wgmma_commit();
    wgmma_wait<1>();  // S_j (P_{j−1}·V_{j−1} may still run)
    fence_all(s);
    uint32_t pn[BK / 16][4], pln[BK / 16][4];
    flash::softmax_tile<T>(s, j * BK, lk, t, sl2, mx, sum, alpha, pn, pln);
    wgmma_wait<0>();
    fence_all(acc);
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        wgmma_fence_operand(pa[kk][i]);  // read by the product until the wait above
        wgmma_fence_operand(pl[kk][i]);
        pa[kk][i] = pn[kk][i];
        pl[kk][i] = pln[kk][i];
      }
    flash::rescale(acc, alpha);
  }
  wgmma_fence();
  issue_pv<T, SW>(acc, pa, pl, smem[2 + (tiles - 1) % 3]);
  wgmma_commit();
  wgmma_wait<0>();
  fence_all(acc);
  flash::store_out<T>(acc, sum, hd.o, hd.rs, q0 + row0 + (lane >> 2), lq, t);
}
#define KD_WGMMA_BODY(F, T, TM, SW, HEADS) wg::F<T, TM, SW>(q, k1, v1, l1, k2, v2, l2, o, lq, scale, HEADS);
#else
// Built for an architecture without wgmma: the entry points exist (one PTX module for every
// card) but must never run.
#define KD_WGMMA_BODY(F, T, TM, SW, HEADS) __trap();
#endif

}  // namespace wg

// Entry points: flash_wgmma{SUF}_{f16,bf16} take [B, H, L, 64]; flash_wgmma{SUF}_tm_* take
// [B, L, H, 64]. SUF "_pipe" is the 128-byte swizzled layout, "_pipe_ns" the unswizzled one.
#define FLASH_WGMMA_ENTRIES(F, SUF, SW)                                                                              \
  extern "C" __global__ void __launch_bounds__(256)                                                             \
      flash_wgmma##SUF##_f16(const __half* q, const __half* k1, const __half* v1, int l1, const __half* k2,    \
                             const __half* v2, int l2, __half* o, int lq, float scale) {                       \
    KD_WGMMA_BODY(F, __half, false, SW, 1)                                                                         \
  }                                                                                                             \
  extern "C" __global__ void __launch_bounds__(256) flash_wgmma##SUF##_bf16(                                   \
      const __nv_bfloat16* q, const __nv_bfloat16* k1, const __nv_bfloat16* v1, int l1, const __nv_bfloat16* k2, \
      const __nv_bfloat16* v2, int l2, __nv_bfloat16* o, int lq, float scale) {                                 \
    KD_WGMMA_BODY(F, __nv_bfloat16, false, SW, 1)                                                                  \
  }                                                                                                             \
  extern "C" __global__ void __launch_bounds__(256)                                                             \
      flash_wgmma##SUF##_tm_f16(const __half* q, const __half* k1, const __half* v1, int l1, const __half* k2, \
                                const __half* v2, int l2, __half* o, int lq, float scale, int heads) {         \
    KD_WGMMA_BODY(F, __half, true, SW, heads)                                                                      \
  }                                                                                                             \
  extern "C" __global__ void __launch_bounds__(256) flash_wgmma##SUF##_tm_bf16(                                \
      const __nv_bfloat16* q, const __nv_bfloat16* k1, const __nv_bfloat16* v1, int l1, const __nv_bfloat16* k2, \
      const __nv_bfloat16* v2, int l2, __nv_bfloat16* o, int lq, float scale, int heads) {                      \
    KD_WGMMA_BODY(F, __nv_bfloat16, true, SW, heads)                                                               \
  }

FLASH_WGMMA_ENTRIES(flash_wgmma_pipe, _pipe, true)
FLASH_WGMMA_ENTRIES(flash_wgmma_pipe, _pipe_ns, false)
