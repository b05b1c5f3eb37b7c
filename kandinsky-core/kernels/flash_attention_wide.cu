// Fused attention for head size 64, the FlashAttention-2 layout of work: each warp owns 32
// query rows (two m16 tiles), so every K and V fragment it loads from shared memory feeds two
// tensor-core products instead of one, and the fragments come in with ldmatrix (four 8×8
// matrices per instruction, V transposed on the way) instead of 32- and 16-bit loads.
// flash_attention_mma.cu, the kernel this one is meant to replace, spends three shared-memory
// wavefronts per mma.sync (16 rows per warp, V gathered 16 bits at a time) and measured
// 126 TFLOP/s at the UNet's 48×48 level on an H200; this one spends one.
//
// Grid (ceil(Lq / (32·WARPS)), B·H), 32·WARPS threads. Shared memory 36 KB: two K and two V
// tiles of 64 keys × 64, rows padded to 72 halves (144 bytes: the eight row addresses of an
// ldmatrix phase fall in distinct banks). Q is staged once through the second K/V pair.
// The key sequence is two segments read in place (the UNet's 32 image tokens, then the
// spatial tokens); softmax in f32 in the log2 domain; bf16 splits P into P_hi + P_lo as the
// other kernels do. Fragment layouts: see flash_attention_mma.cu.
#include <float.h>
#include <math.h>
#include <stdint.h>

#include "warp_ops.cuh"

namespace wide {

constexpr int D = 64;    // head size
constexpr int BK = 64;   // keys per tile
constexpr int LDS = 72;  // padded row length in shared memory (halves)
constexpr int RW = 32;   // query rows per warp

// Rows [r0, r0 + ROWS) of the two-segment matrix (a: la rows, then b: lb rows, `rs` elements
// apart) into a padded ROWS × 72 tile with cp.async; rows past the end are zero.
template <int THREADS, int ROWS, typename T>
__device__ __forceinline__ void load_rows_async(T* tile, const T* a, int la, const T* b, int lb, int r0,
                                                int rs) {
#pragma unroll
  for (int i = threadIdx.x; i < ROWS * 8; i += THREADS) {
    const int r = i >> 3, c = (i & 7) * 8;
    const int row = r0 + r;
    const bool in_a = row < la, valid = row < la + lb;
    // A valid address even when nothing is read (src-size 0 still takes an address).
    const T* src = in_a ? a + (size_t)row * rs + c : (valid ? b + (size_t)(row - la) * rs + c : a);
    cp_async16(tile + r * LDS + c, src, valid);
  }
}

// TOKEN_MAJOR: every tensor [B, L, H, 64] (rows of one head H·64 apart); otherwise
// [B, H, L, 64] contiguous.
template <typename T, bool TOKEN_MAJOR, int WARPS>
__device__ void flash_wide(const T* __restrict__ q, const T* __restrict__ k1, const T* __restrict__ v1, int l1,
                           const T* __restrict__ k2, const T* __restrict__ v2, int l2, T* __restrict__ o,
                           int lq, float scale, int heads) {
  constexpr int BQ = WARPS * RW, THREADS = WARPS * 32;
  static_assert(BQ <= 2 * BK, "Q is staged in the second K/V pair (128 rows)");
  // [buffer][K, V]: buffer 1's K and V tiles are adjacent, the 128 rows Q is staged in.
  __shared__ __align__(128) T smem[2][2][BK * LDS];

  const int bh = blockIdx.y;
  const int q0 = blockIdx.x * BQ;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int lk = l1 + l2;
  int rs = D;
  if constexpr (TOKEN_MAJOR) {
    const size_t b = bh / heads, h = bh % heads;
    rs = heads * D;
    q += (b * lq * heads + h) * D;
    o += (b * lq * heads + h) * D;
    k1 += (b * l1 * heads + h) * D;
    v1 += (b * l1 * heads + h) * D;
    k2 += (b * l2 * heads + h) * D;
    v2 += (b * l2 * heads + h) * D;
  } else {
    q += (size_t)bh * lq * D;
    o += (size_t)bh * lq * D;
    k1 += (size_t)bh * l1 * D;
    v1 += (size_t)bh * l1 * D;
    k2 += (size_t)bh * l2 * D;
    v2 += (size_t)bh * l2 * D;
  }

  load_rows_async<THREADS, BQ>(smem[1][0], q, lq, q, 0, q0, rs);
  cp_async_commit();
  load_rows_async<THREADS, BK>(smem[0][0], k1, l1, k2, l2, 0, rs);
  load_rows_async<THREADS, BK>(smem[0][1], v1, l1, v2, l2, 0, rs);
  cp_async_commit();
  cp_async_wait<1>();
  __syncthreads();
  // Q as A fragments of the warp's two m16 tiles: matrices 0/1 are rows 0–7/8–15 of columns
  // 0–7, matrices 2/3 the same rows of columns 8–15 (a0..a3 of mma.m16n8k16).
  uint32_t qa[2][D / 16][4];
  {
    const T* sq = smem[1][0] + (warp * RW + (lane & 15)) * LDS + (lane >> 4) * 8;
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(qa[m][kk], sq + m * 16 * LDS + kk * 16);
  }
  __syncthreads();  // everyone has its Q before buffer 1 is refilled

  float acc[2][D / 8][4];
#pragma unroll
  for (int m = 0; m < 2; ++m)
#pragma unroll
    for (int j = 0; j < D / 8; ++j) acc[m][j][0] = acc[m][j][1] = acc[m][j][2] = acc[m][j][3] = 0.f;
  // Running max (log2 domain, already scaled) and sum of rows g (index 0) and g + 8 (1) of
  // each m tile.
  float mx[2][2] = {{-FLT_MAX, -FLT_MAX}, {-FLT_MAX, -FLT_MAX}};
  float sum[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
  const float sl2 = scale * 1.4426950408889634f;  // exp(x·scale) = 2^(x·scale·log2 e)

  const int tiles = (lk + BK - 1) / BK;
  for (int it = 0; it < tiles; ++it) {
    const int buf = it & 1;
    if (it + 1 < tiles) {
      load_rows_async<THREADS, BK>(smem[buf ^ 1][0], k1, l1, k2, l2, (it + 1) * BK, rs);
      load_rows_async<THREADS, BK>(smem[buf ^ 1][1], v1, l1, v2, l2, (it + 1) * BK, rs);
    }
    cp_async_commit();
    cp_async_wait<1>();  // this tile's group has landed
    __syncthreads();
    const T* K = smem[buf][0];
    const T* V = smem[buf][1];

    // S = Q · Kᵀ, 8 tiles of 8 keys. One ldmatrix.x4 brings keys j·8.. j·8+7 × 32 dims: the
    // (b0, b1) pairs of two k16 steps.
    float s[2][BK / 8][4];
#pragma unroll
    for (int j = 0; j < BK / 8; ++j) {
      uint32_t kb[2][4];
      const T* kr = K + (j * 8 + (lane & 7)) * LDS + (lane >> 3) * 8;
      ldmatrix_x4(kb[0], kr);
      ldmatrix_x4(kb[1], kr + 32);
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        s[m][j][0] = s[m][j][1] = s[m][j][2] = s[m][j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
          Mma<T>::mma(s[m][j], qa[m][kk], kb[kk >> 1][(kk & 1) * 2], kb[kk >> 1][(kk & 1) * 2 + 1]);
      }
    }
    // Keys past the end exist only in the last tile.
    const int k0 = it * BK;
    if (k0 + BK > lk) {
#pragma unroll
      for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int j = 0; j < BK / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (k0 + j * 8 + 2 * t + (e & 1) >= lk) s[m][j][e] = -INFINITY;
    }
    // Online softmax; the four lanes of a row together hold all 64 keys, at least one real.
    uint32_t pa[2][BK / 16][4], pl[2][BK / 16][4];
#pragma unroll
    for (int m = 0; m < 2; ++m) {
      float alpha[2], rsum[2] = {0.f, 0.f};
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float tmax = -FLT_MAX;
#pragma unroll
        for (int j = 0; j < BK / 8; ++j) tmax = fmaxf(tmax, fmaxf(s[m][j][2 * r], s[m][j][2 * r + 1]));
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffff, tmax, 1));
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffff, tmax, 2));
        const float m_new = fmaxf(mx[m][r], tmax * sl2);
        alpha[r] = exp2f(mx[m][r] - m_new);
        mx[m][r] = m_new;
      }
      // P as A fragments: k16 step kk takes score tiles 2kk and 2kk + 1.
#pragma unroll
      for (int j = 0; j < BK / 8; ++j) {
        float p[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          p[e] = exp2f(fmaf(s[m][j][e], sl2, -mx[m][e >> 1]));  // −∞ (masked) → 0
          rsum[e >> 1] += p[e];
        }
        const int kk = j >> 1, hi = (j & 1) * 2;
        pa[m][kk][hi] = Mma<T>::pack(p[0], p[1]);
        pa[m][kk][hi + 1] = Mma<T>::pack(p[2], p[3]);
        if constexpr (Mma<T>::split) {
          pl[m][kk][hi] = Mma<T>::pack(p[0] - Mma<T>::round(p[0]), p[1] - Mma<T>::round(p[1]));
          pl[m][kk][hi + 1] = Mma<T>::pack(p[2] - Mma<T>::round(p[2]), p[3] - Mma<T>::round(p[3]));
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        rsum[r] += __shfl_xor_sync(0xffffffff, rsum[r], 1);
        rsum[r] += __shfl_xor_sync(0xffffffff, rsum[r], 2);
        sum[m][r] = sum[m][r] * alpha[r] + rsum[r];
      }
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        acc[m][j][0] *= alpha[0];
        acc[m][j][1] *= alpha[0];
        acc[m][j][2] *= alpha[1];
        acc[m][j][3] *= alpha[1];
      }
    }
    // O += P · V. One ldmatrix.x4.trans brings keys kk·16.. kk·16+15 × 16 dims: the (b0, b1)
    // pairs of output tiles 2jp and 2jp + 1.
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
#pragma unroll
      for (int jp = 0; jp < D / 16; ++jp) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, V + (kk * 16 + (lane & 15)) * LDS + jp * 16 + (lane >> 4) * 8);
#pragma unroll
        for (int m = 0; m < 2; ++m) {
          Mma<T>::mma(acc[m][2 * jp], pa[m][kk], vb[0], vb[1]);
          Mma<T>::mma(acc[m][2 * jp + 1], pa[m][kk], vb[2], vb[3]);
          if constexpr (Mma<T>::split) {
            Mma<T>::mma(acc[m][2 * jp], pl[m][kk], vb[0], vb[1]);
            Mma<T>::mma(acc[m][2 * jp + 1], pl[m][kk], vb[2], vb[3]);
          }
        }
      }
    }
    __syncthreads();  // this buffer is refilled two iterations on
  }

  // O / sum: rows g and g + 8 of the warp's two m tiles.
#pragma unroll
  for (int m = 0; m < 2; ++m) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = q0 + warp * RW + m * 16 + g + 8 * r;
      if (row >= lq) continue;
      const float inv = 1.f / sum[m][r];
      T* orow = o + (size_t)row * rs + 2 * t;
#pragma unroll
      for (int j = 0; j < D / 8; ++j)
        *reinterpret_cast<uint32_t*>(orow + j * 8) = Mma<T>::pack(acc[m][j][2 * r] * inv, acc[m][j][2 * r + 1] * inv);
    }
  }
}

}  // namespace wide

// Entry points: flash_wide{W}_{f16,bf16} take [B, H, L, 64]; flash_wide{W}_tm_* take
// [B, L, H, 64] (`heads` = H). W warps of 32 query rows per block.
#define FLASH_WIDE_ENTRIES(W)                                                                                    \
  extern "C" __global__ void __launch_bounds__(W * 32)                                                          \
      flash_wide##W##_f16(const __half* q, const __half* k1, const __half* v1, int l1, const __half* k2,        \
                          const __half* v2, int l2, __half* o, int lq, float scale) {                            \
    wide::flash_wide<__half, false, W>(q, k1, v1, l1, k2, v2, l2, o, lq, scale, 1);                              \
  }                                                                                                              \
  extern "C" __global__ void __launch_bounds__(W * 32) flash_wide##W##_bf16(                                    \
      const __nv_bfloat16* q, const __nv_bfloat16* k1, const __nv_bfloat16* v1, int l1, const __nv_bfloat16* k2, \
      const __nv_bfloat16* v2, int l2, __nv_bfloat16* o, int lq, float scale) {                                  \
    wide::flash_wide<__nv_bfloat16, false, W>(q, k1, v1, l1, k2, v2, l2, o, lq, scale, 1);                       \
  }                                                                                                              \
  extern "C" __global__ void __launch_bounds__(W * 32)                                                          \
      flash_wide##W##_tm_f16(const __half* q, const __half* k1, const __half* v1, int l1, const __half* k2,     \
                             const __half* v2, int l2, __half* o, int lq, float scale, int heads) {              \
    wide::flash_wide<__half, true, W>(q, k1, v1, l1, k2, v2, l2, o, lq, scale, heads);                           \
  }                                                                                                              \
  extern "C" __global__ void __launch_bounds__(W * 32) flash_wide##W##_tm_bf16(                                 \
      const __nv_bfloat16* q, const __nv_bfloat16* k1, const __nv_bfloat16* v1, int l1, const __nv_bfloat16* k2, \
      const __nv_bfloat16* v2, int l2, __nv_bfloat16* o, int lq, float scale, int heads) {                       \
    wide::flash_wide<__nv_bfloat16, true, W>(q, k1, v1, l1, k2, v2, l2, o, lq, scale, heads);                    \
  }

FLASH_WIDE_ENTRIES(4)
FLASH_WIDE_ENTRIES(2)
