// Fused attention for head size 64 on Hopper's warpgroup tensor cores (wgmma, sm_90a; built
// for sm_90a when CUDA_COMPUTE_CAP is 90, otherwise its entry points trap and the Rust side
// never launches them). Same contract as flash_attention_wide.cu: two key/value segments read
// in place, f32 softmax in the log2 domain, bf16 P split into P_hi + P_lo.
//
// Block: 2 warpgroups (256 threads), 64 query rows each (128 per block). Per tile of 64 keys,
// each warpgroup issues S = Q·Kᵀ as 4 wgmma.m64n64k16 (Q in registers, K from shared memory),
// waits, runs the online softmax on the accumulator registers, and issues O += P·V as 4 more
// (P straight from the S registers: wgmma's accumulator layout is mma.m16n8k16's C, which is
// its A layout in pairs; V from shared memory, N-major). K/V tiles are double-buffered with
// cp.async in one of two layouts of wgmma_ops.cuh (template SW, both built: a GPU run picks):
//   SW = true, 128-byte swizzle: row r of 128 bytes at r·128, its 16-byte chunk c at
//     (c ^ r % 8)·16 — a row's eight cp.async chunks hit distinct banks. K: K-major, SBO
//     1024 B, a k16 step 32 B further; V: N-major, SBO 1024 B (8 keys), a step 2048 B.
//   SW = false, no swizzle: element (r, c) at (r/8)·512 + (c/8)·64 + (r%8)·8 + c%8, so
//     LBO = 128 B and SBO = 1024 B for K (K = head dim), LBO = 1024 B and SBO = 128 B for V
//     (K = keys); a row's chunks are 128 bytes apart (an 8-way bank conflict per write).
// Shared memory 32 KB; Q is staged once through the second K/V pair and read with ldmatrix.
//
// The kernel the mma.sync kernels could not be: at the UNet's 48×48 level they reach
// 126 TFLOP/s (GPU run 9), PyTorch's SDPA 264, the goal 300. Checked so far only under the
// host emulation (xtask/gpu/emu), which implements wgmma from the PTX ISA's description.
#include <float.h>
#include <math.h>
#include <stdint.h>

#include "wgmma_ops.cuh"

#if defined(KANDINSKY_HOST_EMU) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define KD_HAS_WGMMA 1
#endif

namespace wg {

#ifdef KD_HAS_WGMMA
constexpr int D = 64;         // head size
constexpr int BK = 64;        // keys per tile
constexpr int TILE = BK * D;  // elements per K or V tile
constexpr int THREADS = 256;  // 2 warpgroups
constexpr int BQ = 128;       // query rows per block

// Element (r, c) of a tile of 64 columns in the layout SW picks (see the top).
template <bool SW> __device__ __forceinline__ int at(int r, int c) {
  if constexpr (SW) return r * 64 + (((c >> 3) ^ (r & 7)) << 3) + (c & 7);
  else return (r >> 3) * 512 + (c >> 3) * 64 + (r & 7) * 8 + (c & 7);
}

// Rows [r0, r0 + ROWS) of the two-segment matrix into a tile with cp.async; rows past the end
// are zero.
template <int ROWS, bool SW, typename T>
__device__ __forceinline__ void load_tile_async(T* tile, const T* a, int la, const T* b, int lb, int r0, int rs) {
#pragma unroll
  for (int i = threadIdx.x; i < ROWS * 8; i += THREADS) {
    const int r = i >> 3, c = (i & 7) * 8;
    const int row = r0 + r;
    const bool in_a = row < la, valid = row < la + lb;
    const T* src = in_a ? a + (size_t)row * rs + c : (valid ? b + (size_t)(row - la) * rs + c : a);
    cp_async16(tile + at<SW>(r, c), src, valid);
  }
}

// The block's (b, h) pointers: every tensor's rows of this head, `rs` elements apart.
template <typename T, bool TOKEN_MAJOR>
struct Head {
  const T *q, *k1, *v1, *k2, *v2;
  T* o;
  int rs;
  __device__ __forceinline__ Head(const T* q_, const T* k1_, const T* v1_, int l1, const T* k2_, const T* v2_,
                                  int l2, T* o_, int lq, int heads) {
    const size_t bh = blockIdx.y;
    if constexpr (TOKEN_MAJOR) {
      const size_t b = bh / heads, h = bh % heads;
      rs = heads * D;
      q = q_ + (b * lq * heads + h) * D;
      o = o_ + (b * lq * heads + h) * D;
      k1 = k1_ + (b * l1 * heads + h) * D;
      v1 = v1_ + (b * l1 * heads + h) * D;
      k2 = k2_ + (b * l2 * heads + h) * D;
      v2 = v2_ + (b * l2 * heads + h) * D;
    } else {
      rs = D;
      q = q_ + bh * lq * D;
      o = o_ + bh * lq * D;
      k1 = k1_ + bh * l1 * D;
      v1 = v1_ + bh * l1 * D;
      k2 = k2_ + bh * l2 * D;
      v2 = v2_ + bh * l2 * D;
    }
  }
};

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
__device__ __forceinline__ void issue_s(float (&s)[32], const uint32_t (&qa)[D / 16][4], const T* K) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const uint64_t dk =
        SW ? wgmma_desc(K + kk * 16, 16, 1024, true) : wgmma_desc(K + at<false>(0, kk * 16), 128, 1024, false);
    wgmma_m64n64k16_rs<Mma<T>::split, 0>(s, qa[kk], dk, kk > 0);
  }
}

// Issue O += P · V (4 wgmma, 8 for bf16's two terms; not committed): N-major B, k16 step kk
// starts at key 16kk.
template <typename T, bool SW>
__device__ __forceinline__ void issue_pv(float (&acc)[32], const uint32_t (&pa)[BK / 16][4],
                                         const uint32_t (&pl)[BK / 16][4], const T* V) {
#pragma unroll
  for (int kk = 0; kk < BK / 16; ++kk) {
    // Swizzled: LBO would step to the next 64 dims (there are none).
    const uint64_t dv =
        SW ? wgmma_desc(V + kk * 16 * 64, 8192, 1024, true) : wgmma_desc(V + at<false>(kk * 16, 0), 1024, 128, false);
    wgmma_m64n64k16_rs<Mma<T>::split, 1>(acc, pa[kk], dv, 1);
    if constexpr (Mma<T>::split) wgmma_m64n64k16_rs<Mma<T>::split, 1>(acc, pl[kk], dv, 1);
  }
}

// The online softmax of one tile's scores (keys k0.., s[4j + e]: key 8j + 2t + (e & 1) of
// row g + 8·(e >> 1)): masks keys past `lk`, moves the running max `mx` (log2 domain,
// scaled), returns in `alpha` the factor the output so far must take, updates `sum`, and
// writes P as A fragments (k16 step kk takes n8 blocks 2kk and 2kk + 1; bf16: P_hi, P_lo).
template <typename T>
__device__ __forceinline__ void softmax_tile(float (&s)[32], int k0, int lk, int t, float sl2, float (&mx)[2],
                                             float (&sum)[2], float (&alpha)[2], uint32_t (&pa)[BK / 16][4],
                                             uint32_t (&pl)[BK / 16][4]) {
  if (k0 + BK > lk) {  // keys past the end exist only in the last tile
#pragma unroll
    for (int e = 0; e < 32; ++e)
      if (k0 + (e >> 2) * 8 + 2 * t + (e & 1) >= lk) s[e] = -INFINITY;
  }
  float rsum[2] = {0.f, 0.f};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    // The four lanes of a row hold all 64 keys, at least one of them real.
    float tmax = -FLT_MAX;
#pragma unroll
    for (int j = 0; j < BK / 8; ++j) tmax = fmaxf(tmax, fmaxf(s[4 * j + 2 * r], s[4 * j + 2 * r + 1]));
    tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffff, tmax, 1));
    tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffff, tmax, 2));
    const float m_new = fmaxf(mx[r], tmax * sl2);
    alpha[r] = exp2f(mx[r] - m_new);
    mx[r] = m_new;
  }
#pragma unroll
  for (int j = 0; j < BK / 8; ++j) {
    float p[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      p[e] = exp2f(fmaf(s[4 * j + e], sl2, -mx[e >> 1]));  // −∞ (masked) → 0
      rsum[e >> 1] += p[e];
    }
    const int kk = j >> 1, hi = (j & 1) * 2;
    pa[kk][hi] = Mma<T>::pack(p[0], p[1]);
    pa[kk][hi + 1] = Mma<T>::pack(p[2], p[3]);
    if constexpr (Mma<T>::split) {
      pl[kk][hi] = Mma<T>::pack(p[0] - Mma<T>::round(p[0]), p[1] - Mma<T>::round(p[1]));
      pl[kk][hi + 1] = Mma<T>::pack(p[2] - Mma<T>::round(p[2]), p[3] - Mma<T>::round(p[3]));
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    rsum[r] += __shfl_xor_sync(0xffffffff, rsum[r], 1);
    rsum[r] += __shfl_xor_sync(0xffffffff, rsum[r], 2);
    sum[r] = sum[r] * alpha[r] + rsum[r];
  }
}

// O / sum into the output rows g and g + 8 of the warp (from block row `row0`).
template <typename T>
__device__ __forceinline__ void store_out(const float (&acc)[32], const float (&sum)[2], T* o, int rs, int row, int lq,
                                          int t) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (row + 8 * r >= lq) continue;
    const float inv = 1.f / sum[r];
    T* orow = o + (size_t)(row + 8 * r) * rs + 2 * t;
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
      *reinterpret_cast<uint32_t*>(orow + j * 8) = Mma<T>::pack(acc[4 * j + 2 * r] * inv, acc[4 * j + 2 * r + 1] * inv);
  }
}

// One tile at a time: S, wait, softmax, O += P·V, wait.
template <typename T, bool TOKEN_MAJOR, bool SW>
__device__ void flash_wgmma(const T* __restrict__ q_, const T* __restrict__ k1_, const T* __restrict__ v1_, int l1,
                            const T* __restrict__ k2_, const T* __restrict__ v2_, int l2, T* __restrict__ o_, int lq,
                            float scale, int heads) {
  // [buffer][K, V]; buffer 1's pair (128 rows) stages Q first.
  __shared__ __align__(1024) T smem[2][2][TILE];
  const Head<T, TOKEN_MAJOR> hd(q_, k1_, v1_, l1, k2_, v2_, l2, o_, lq, heads);
  const int q0 = blockIdx.x * BQ;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, t = lane & 3;
  const int row0 = (warp >> 2) * 64 + (warp & 3) * 16;  // the warp's first row in the block
  const int lk = l1 + l2;

  load_tile_async<BQ, SW>(smem[1][0], hd.q, lq, hd.q, 0, q0, hd.rs);
  cp_async_commit();
  load_tile_async<BK, SW>(smem[0][0], hd.k1, l1, hd.k2, l2, 0, hd.rs);
  load_tile_async<BK, SW>(smem[0][1], hd.v1, l1, hd.v2, l2, 0, hd.rs);
  cp_async_commit();
  cp_async_wait<1>();
  __syncthreads();
  uint32_t qa[D / 16][4];
  load_q<SW>(qa, smem[1][0], row0, lane);
  __syncthreads();  // everyone has its Q before buffer 1 is refilled

  float acc[32];
#pragma unroll
  for (int e = 0; e < 32; ++e) acc[e] = 0.f;
  float mx[2] = {-FLT_MAX, -FLT_MAX}, sum[2] = {0.f, 0.f};
  const float sl2 = scale * 1.4426950408889634f;  // exp(x·scale) = 2^(x·scale·log2 e)

  const int tiles = (lk + BK - 1) / BK;
  for (int it = 0; it < tiles; ++it) {
    const int buf = it & 1;
    if (it + 1 < tiles) {
      load_tile_async<BK, SW>(smem[buf ^ 1][0], hd.k1, l1, hd.k2, l2, (it + 1) * BK, hd.rs);
      load_tile_async<BK, SW>(smem[buf ^ 1][1], hd.v1, l1, hd.v2, l2, (it + 1) * BK, hd.rs);
    }
    cp_async_commit();
    cp_async_wait<1>();  // this tile's copies have landed
    fence_proxy_async();
    __syncthreads();

    float s[32];
#pragma unroll
    for (int e = 0; e < 32; ++e) s[e] = 0.f;
    wgmma_fence();
    issue_s<T, SW>(s, qa, smem[buf][0]);
    wgmma_commit();
    wgmma_wait<0>();
#pragma unroll
    for (int e = 0; e < 32; ++e) wgmma_fence_operand(s[e]);

    float alpha[2];
    uint32_t pa[BK / 16][4], pl[BK / 16][4];
    softmax_tile<T>(s, it * BK, lk, t, sl2, mx, sum, alpha, pa, pl);
#pragma unroll
    for (int e = 0; e < 32; ++e) acc[e] *= alpha[(e >> 1) & 1];

    wgmma_fence();
    issue_pv<T, SW>(acc, pa, pl, smem[buf][1]);
    wgmma_commit();
    wgmma_wait<0>();
#pragma unroll
    for (int e = 0; e < 32; ++e) wgmma_fence_operand(acc[e]);
    __syncthreads();  // this buffer is refilled two iterations on
  }
  store_out<T>(acc, sum, hd.o, hd.rs, q0 + row0 + (lane >> 2), lq, t);
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
  const Head<T, TOKEN_MAJOR> hd(q_, k1_, v1_, l1, k2_, v2_, l2, o_, lq, heads);
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
    float s[32];
#pragma unroll
    for (int e = 0; e < 32; ++e) s[e] = 0.f;
    wgmma_fence();
    issue_s<T, SW>(s, qa, smem[0]);
    wgmma_commit();
    wgmma_wait<0>();
#pragma unroll
    for (int e = 0; e < 32; ++e) wgmma_fence_operand(s[e]);
    softmax_tile<T>(s, 0, lk, t, sl2, mx, sum, alpha, pa, pl);  // alpha = 0: nothing to rescale
  }
  float acc[32];
#pragma unroll
  for (int e = 0; e < 32; ++e) acc[e] = 0.f;

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

    float s[32];
#pragma unroll
    for (int e = 0; e < 32; ++e) s[e] = 0.f;
    wgmma_fence();
    issue_s<T, SW>(s, qa, smem[j & 1]);
    wgmma_commit();
    issue_pv<T, SW>(acc, pa, pl, smem[2 + (j - 1) % 3]);
    wgmma_commit();
    wgmma_wait<1>();  // S_j (P_{j−1}·V_{j−1} may still run)
#pragma unroll
    for (int e = 0; e < 32; ++e) wgmma_fence_operand(s[e]);
    uint32_t pn[BK / 16][4], pln[BK / 16][4];
    softmax_tile<T>(s, j * BK, lk, t, sl2, mx, sum, alpha, pn, pln);
    wgmma_wait<0>();
#pragma unroll
    for (int e = 0; e < 32; ++e) wgmma_fence_operand(acc[e]);
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        wgmma_fence_operand(pa[kk][i]);  // read by the product until the wait above
        wgmma_fence_operand(pl[kk][i]);
        pa[kk][i] = pn[kk][i];
        pl[kk][i] = pln[kk][i];
      }
#pragma unroll
    for (int e = 0; e < 32; ++e) acc[e] *= alpha[(e >> 1) & 1];
  }
  wgmma_fence();
  issue_pv<T, SW>(acc, pa, pl, smem[2 + (tiles - 1) % 3]);
  wgmma_commit();
  wgmma_wait<0>();
#pragma unroll
  for (int e = 0; e < 32; ++e) wgmma_fence_operand(acc[e]);
  store_out<T>(acc, sum, hd.o, hd.rs, q0 + row0 + (lane >> 2), lq, t);
}
#define KD_WGMMA_BODY(F, T, TM, SW, HEADS) wg::F<T, TM, SW>(q, k1, v1, l1, k2, v2, l2, o, lq, scale, HEADS);
#else
// Built for an architecture without wgmma: the entry points exist (one PTX module for every
// card) but must never run.
#define KD_WGMMA_BODY(F, T, TM, SW, HEADS) __trap();
#endif

}  // namespace wg

// Entry points: flash_wgmma{SUF}_{f16,bf16} take [B, H, L, 64]; flash_wgmma{SUF}_tm_* take
// [B, L, H, 64]. SUF "" is the 128-byte swizzled layout, "_ns" the unswizzled one; "_pipe"
// and "_pipe_ns" the same with FlashAttention-3's intra-warpgroup overlap.
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

FLASH_WGMMA_ENTRIES(flash_wgmma, , true)
FLASH_WGMMA_ENTRIES(flash_wgmma, _ns, false)
FLASH_WGMMA_ENTRIES(flash_wgmma_pipe, _pipe, true)
FLASH_WGMMA_ENTRIES(flash_wgmma_pipe, _pipe_ns, false)
