// What the 32-rows-per-warp attention kernels share (flash_attention_wide.cu,
// flash_attention_wgmma.cu): the block's head pointers, the cp.async tile loader, the online
// softmax of one 64-key tile held as mma.m16n8k16 C fragments, and the output store. (The
// mma kernel, measured on H200s and still the default, keeps its own copies so that its
// code stays exactly what was measured.)
//
// Fragment layout (mma.m16n8k16's C, and wgmma's accumulator per warp): s[j][e] is row
// g + 8·(e >> 1), column 8j + 2t + (e & 1), lane = 4g + t. P for a k16 step kk of P·V is the
// A fragment made of n8 blocks 2kk and 2kk + 1.
#pragma once
#include <float.h>
#include <math.h>
#include <stdint.h>

#include "warp_ops.cuh"

namespace flash {

constexpr int D = 64;   // head size
constexpr int BK = 64;  // keys per tile

// The block's (b, h) pointers: every tensor's rows of this head, `rs` elements apart.
// TOKEN_MAJOR: [B, L, H, 64] (rows H·64 apart); otherwise [B, H, L, 64] contiguous.
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

// Rows [r0, r0 + ROWS) of the two-segment matrix (a: la rows, then b: lb rows, `rs` elements
// apart) into a tile whose element (r, c) sits at Layout::at(r, c), with cp.async; rows past
// the end are zero. Thread i copies 16-byte chunk i % 8 of row i / 8, or, where
// Layout::COLUMNS_FIRST (a layout keeping a row's chunks 128 bytes apart, which would put the
// eight lanes the hardware serves together in one bank group), chunk (i / 8) % 8 of row
// i % 8 + 8·(i / 64): eight rows of one chunk, contiguous in such a layout, and still whole
// 64-byte pieces of rows per warp on the global side.
template <int THREADS, int ROWS, class Layout, typename T>
__device__ __forceinline__ void load_rows_async(T* tile, const T* a, int la, const T* b, int lb, int r0, int rs) {
#pragma unroll
  for (int i = threadIdx.x; i < ROWS * 8; i += THREADS) {
    const int r = Layout::COLUMNS_FIRST ? (i & 7) + ((i >> 6) << 3) : i >> 3;
    const int c = (Layout::COLUMNS_FIRST ? (i >> 3) & 7 : i & 7) * 8;
    const int row = r0 + r;
    const bool in_a = row < la, valid = row < la + lb;
    // A valid address even when nothing is read (src-size 0 still takes an address).
    const T* src = in_a ? a + (size_t)row * rs + c : (valid ? b + (size_t)(row - la) * rs + c : a);
    cp_async16(tile + Layout::at(r, c), src, valid);
  }
}

// The online softmax of one tile's scores s (keys k0.., 16 rows of a warp): masks keys past
// `lk`, moves the running max `mx` (log2 domain, scaled by sl2 = scale·log2 e), returns in
// `alpha` the factor the output so far must take, updates `sum`, and writes P as A
// fragments (bf16: P_hi in pa, P_lo in pl; 8 significant bits need the second term).
template <typename T>
__device__ __forceinline__ void softmax_tile(float (&s)[BK / 8][4], int k0, int lk, int t, float sl2,
                                             float (&mx)[2], float (&sum)[2], float (&alpha)[2],
                                             uint32_t (&pa)[BK / 16][4], uint32_t (&pl)[BK / 16][4]) {
  if (k0 + BK > lk) {  // keys past the end exist only in the last tile
#pragma unroll
    for (int j = 0; j < BK / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (k0 + j * 8 + 2 * t + (e & 1) >= lk) s[j][e] = -INFINITY;
  }
  float rsum[2] = {0.f, 0.f};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    // The four lanes of a row hold all 64 keys, at least one of them real.
    float tmax = -FLT_MAX;
#pragma unroll
    for (int j = 0; j < BK / 8; ++j) tmax = fmaxf(tmax, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
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
      p[e] = exp2f(fmaf(s[j][e], sl2, -mx[e >> 1]));  // −∞ (masked) → 0
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

// acc (the warp's 16 rows × 64 output columns) times alpha of its row.
__device__ __forceinline__ void rescale(float (&acc)[D / 8][4], const float (&alpha)[2]) {
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
    acc[j][0] *= alpha[0];
    acc[j][1] *= alpha[0];
    acc[j][2] *= alpha[1];
    acc[j][3] *= alpha[1];
  }
}

// acc / sum into output rows `row` and `row` + 8 (those below lq).
template <typename T>
__device__ __forceinline__ void store_out(const float (&acc)[D / 8][4], const float (&sum)[2], T* o, int rs, int row,
                                          int lq, int t) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (row + 8 * r >= lq) continue;
    const float inv = 1.f / sum[r];
    T* orow = o + (size_t)(row + 8 * r) * rs + 2 * t;
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
      *reinterpret_cast<uint32_t*>(orow + j * 8) = Mma<T>::pack(acc[j][2 * r] * inv, acc[j][2 * r + 1] * inv);
  }
}

}  // namespace flash
