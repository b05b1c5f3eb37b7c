// Fused attention for head size 64, FlashAttention-2 style (f16/bf16 in, f32 accumulation
// and softmax): the scores, probabilities and output of a warp's 16 query rows live in
// registers as mma.sync m16n8k16 fragments; K/V tiles of 64 keys are double-buffered in
// shared memory with cp.async, so the next tile loads while this one is multiplied. The key
// sequence is two segments read in place (the UNet's 32 image tokens, then the spatial
// tokens), as in flash_attention.cu (the WMMA kernel this one is meant to replace: that one
// round-trips scores and output through shared memory and measured 12 TFLOP/s on an H200).
//
// Grid (ceil(Lq / 64), B·H), 128 threads (4 warps × 16 query rows). Shared memory 36 KB:
// two K and two V tiles of 64 × 64, rows padded to 72 halves so that the fragment loads of
// eight consecutive rows hit distinct banks.
//
// Fragment layout of mma.m16n8k16 (PTX ISA), lane = 4·g + t:
//   A (16×16, row-major): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B (16×8, "col"):      b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g)
//   C (16×8, f32):        c0, c1 = (g, 2t..2t+1), c2, c3 = (g+8, 2t..2t+1)
// so the C fragments of two adjacent 8-key score tiles are exactly the A fragment of the
// probabilities for one 16-key step of P·V (no shuffle, no shared memory).
//
// bf16 keeps 8 significant bits: as in the WMMA kernel, P is split into P_hi + P_lo (both
// bf16) and both are multiplied with V.
#include <float.h>
#include <stdint.h>

#include "warp_ops.cuh"

namespace {

constexpr int D = 64;     // head size
constexpr int BQ = 64;    // queries per block
constexpr int BK = 64;    // keys per tile
constexpr int LDS = 72;   // padded row length in shared memory (halves)
constexpr int WARPS = 4;

// Rows [r0, r0 + 64) of the two-segment matrix (a: la rows, then b: lb rows, `rs` elements
// apart) into a padded 64 × 72 tile; rows past the end are zero. 512 16-byte chunks over 128
// threads.
template <typename T>
__device__ __forceinline__ void load_tile_async(T* tile, const T* a, int la, const T* b, int lb, int r0,
                                                int rs) {
#pragma unroll
  for (int i = threadIdx.x; i < 64 * 8; i += WARPS * 32) {
    const int r = i >> 3, c = (i & 7) * 8;
    const int row = r0 + r;
    const bool in_a = row < la, valid = row < la + lb;
    // A valid address even when nothing is read (src-size 0 still takes an address).
    const T* src = in_a ? a + (size_t)row * rs + c : (valid ? b + (size_t)(row - la) * rs + c : a);
    cp_async16(tile + r * LDS + c, src, valid);
  }
}

__device__ __forceinline__ uint32_t ld32(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }

template <typename T>
__device__ __forceinline__ uint32_t pack_raw(T lo, T hi) {
  uint16_t l = *reinterpret_cast<uint16_t*>(&lo), h = *reinterpret_cast<uint16_t*>(&hi);
  return (uint32_t)l | ((uint32_t)h << 16);
}

// TOKEN_MAJOR: every tensor is laid out [B, L, H, 64] (the projections' own layout, so the
// caller needs no head split/merge copies): rows of one head are H·64 elements apart. Otherwise
// [B, H, L, 64] contiguous, as the entry points below have always read them.
template <typename T, bool TOKEN_MAJOR>
__device__ void flash_mma(const T* __restrict__ q, const T* __restrict__ k1, const T* __restrict__ v1, int l1,
                          const T* __restrict__ k2, const T* __restrict__ v2, int l2, T* __restrict__ o,
                          int lq, float scale, int heads) {
  __shared__ __align__(128) T sK[2][BK * LDS];
  __shared__ __align__(128) T sV[2][BK * LDS];

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

  // Q through sV[1] (free until the second key tile), then into A fragments.
  load_tile_async<T>(sV[1], q, lq, q, 0, q0, rs);
  cp_async_commit();
  load_tile_async<T>(sK[0], k1, l1, k2, l2, 0, rs);
  load_tile_async<T>(sV[0], v1, l1, v2, l2, 0, rs);
  cp_async_commit();
  cp_async_wait<1>();
  __syncthreads();
  uint32_t qa[D / 16][4];
  {
    const T* sq = sV[1] + warp * 16 * LDS;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      qa[kk][0] = ld32(sq + g * LDS + kk * 16 + 2 * t);
      qa[kk][1] = ld32(sq + (g + 8) * LDS + kk * 16 + 2 * t);
      qa[kk][2] = ld32(sq + g * LDS + kk * 16 + 8 + 2 * t);
      qa[kk][3] = ld32(sq + (g + 8) * LDS + kk * 16 + 8 + 2 * t);
    }
  }
  __syncthreads();  // everyone has its Q before sV[1] is overwritten

  float acc[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  // Running max and sum of rows g (index 0) and g + 8 (index 1), in the log2 domain.
  float m[2] = {-FLT_MAX, -FLT_MAX}, l[2] = {0.f, 0.f};
  const float sl2 = scale * 1.4426950408889634f;  // exp(x·scale) = 2^(x·scale·log2 e)

  const int tiles = (lk + BK - 1) / BK;
  for (int it = 0; it < tiles; ++it) {
    const int buf = it & 1;
    if (it + 1 < tiles) {
      load_tile_async<T>(sK[buf ^ 1], k1, l1, k2, l2, (it + 1) * BK, rs);
      load_tile_async<T>(sV[buf ^ 1], v1, l1, v2, l2, (it + 1) * BK, rs);
    }
    cp_async_commit();
    cp_async_wait<1>();  // this tile's group has landed
    __syncthreads();
    const T* K = sK[buf];
    const T* V = sV[buf];

    // S = Q · Kᵀ: 8 tiles of 8 keys.
    float s[BK / 8][4];
#pragma unroll
    for (int j = 0; j < BK / 8; ++j) {
      s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
      const T* kr = K + (j * 8 + g) * LDS + 2 * t;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) Mma<T>::mma(s[j], qa[kk], ld32(kr + kk * 16), ld32(kr + kk * 16 + 8));
    }
    // Online softmax over this tile (keys past the end do not exist).
    const int k0 = it * BK;
    float tmax[2] = {-FLT_MAX, -FLT_MAX};
#pragma unroll
    for (int j = 0; j < BK / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = k0 + j * 8 + 2 * t + (e & 1);
        s[j][e] = key < lk ? s[j][e] * sl2 : -FLT_MAX;
        tmax[e >> 1] = fmaxf(tmax[e >> 1], s[j][e]);
      }
    }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffff, tmax[r], 1));
      tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffff, tmax[r], 2));
      const float m_new = fmaxf(m[r], tmax[r]);
      alpha[r] = exp2f(m[r] - m_new);
      m[r] = m_new;
    }
    float rsum[2] = {0.f, 0.f};
    // P as A fragments: 16-key step kk takes score tiles 2kk and 2kk + 1.
    uint32_t pa[BK / 16][4], pl[BK / 16][4];
#pragma unroll
    for (int j = 0; j < BK / 8; ++j) {
      float p[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        p[e] = s[j][e] == -FLT_MAX ? 0.f : exp2f(s[j][e] - m[e >> 1]);
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
      l[r] = l[r] * alpha[r] + rsum[r];
    }
    // O = O·alpha + P · V: 8 output tiles of 8 columns, 4 steps of 16 keys.
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      acc[j][0] *= alpha[0];
      acc[j][1] *= alpha[0];
      acc[j][2] *= alpha[1];
      acc[j][3] *= alpha[1];
      const T* vc = V + j * 8 + g;
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk) {
        const T* vr = vc + (kk * 16 + 2 * t) * LDS;
        const uint32_t b0 = pack_raw<T>(vr[0], vr[LDS]);
        const uint32_t b1 = pack_raw<T>(vr[8 * LDS], vr[9 * LDS]);
        Mma<T>::mma(acc[j], pa[kk], b0, b1);
        if constexpr (Mma<T>::split) Mma<T>::mma(acc[j], pl[kk], b0, b1);
      }
    }
    __syncthreads();  // this buffer is refilled two iterations on
  }

  // O / l, rows g and g + 8 of this warp.
  const float inv[2] = {1.f / l[0], 1.f / l[1]};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = q0 + warp * 16 + g + 8 * r;
    if (row >= lq) continue;
    T* orow = o + (size_t)row * rs + 2 * t;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      *reinterpret_cast<uint32_t*>(orow + j * 8) =
          Mma<T>::pack(acc[j][2 * r] * inv[r], acc[j][2 * r + 1] * inv[r]);
    }
  }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(128) flash_mma_f16(
    const __half* q, const __half* k1, const __half* v1, int l1, const __half* k2, const __half* v2, int l2,
    __half* o, int lq, float scale) {
  flash_mma<__half, false>(q, k1, v1, l1, k2, v2, l2, o, lq, scale, 1);
}

extern "C" __global__ void __launch_bounds__(128) flash_mma_bf16(
    const __nv_bfloat16* q, const __nv_bfloat16* k1, const __nv_bfloat16* v1, int l1, const __nv_bfloat16* k2,
    const __nv_bfloat16* v2, int l2, __nv_bfloat16* o, int lq, float scale) {
  flash_mma<__nv_bfloat16, false>(q, k1, v1, l1, k2, v2, l2, o, lq, scale, 1);
}

// The same with every tensor token-major, [B, L, H, 64] (`heads` = H).
extern "C" __global__ void __launch_bounds__(128) flash_mma_tm_f16(
    const __half* q, const __half* k1, const __half* v1, int l1, const __half* k2, const __half* v2, int l2,
    __half* o, int lq, float scale, int heads) {
  flash_mma<__half, true>(q, k1, v1, l1, k2, v2, l2, o, lq, scale, heads);
}

extern "C" __global__ void __launch_bounds__(128) flash_mma_tm_bf16(
    const __nv_bfloat16* q, const __nv_bfloat16* k1, const __nv_bfloat16* v1, int l1, const __nv_bfloat16* k2,
    const __nv_bfloat16* v2, int l2, __nv_bfloat16* o, int lq, float scale, int heads) {
  flash_mma<__nv_bfloat16, true>(q, k1, v1, l1, k2, v2, l2, o, lq, scale, heads);
}
