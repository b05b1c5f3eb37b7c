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
#include "flash_common.cuh"

namespace wide {

using flash::BK;
using flash::D;
constexpr int LDS = 72;  // padded row length in shared memory (halves)
constexpr int RW = 32;   // query rows per warp

// Rows of 64 padded to 72 halves (144 bytes): the eight row addresses of an ldmatrix phase
// fall in distinct banks.
struct Padded {
  static constexpr bool COLUMNS_FIRST = false;
  __device__ __forceinline__ static int at(int r, int c) { return r * LDS + c; }
};

template <typename T, bool TOKEN_MAJOR, int WARPS>
__device__ void flash_wide(const T* __restrict__ q_, const T* __restrict__ k1_, const T* __restrict__ v1_, int l1,
                           const T* __restrict__ k2_, const T* __restrict__ v2_, int l2, T* __restrict__ o_, int lq,
                           float scale, int heads) {
  constexpr int BQ = WARPS * RW, THREADS = WARPS * 32;
  static_assert(BQ <= 2 * BK, "Q is staged in the second K/V pair (128 rows)");
  // [buffer][K, V]: buffer 1's K and V tiles are adjacent, the 128 rows Q is staged in.
  __shared__ __align__(128) T smem[2][2][BK * LDS];
  const flash::Head<T, TOKEN_MAJOR> hd(q_, k1_, v1_, l1, k2_, v2_, l2, o_, lq, heads);
  const int q0 = blockIdx.x * BQ;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, t = lane & 3;
  const int lk = l1 + l2;

  flash::load_rows_async<THREADS, BQ, Padded>(smem[1][0], hd.q, lq, hd.q, 0, q0, hd.rs);
  cp_async_commit();
  flash::load_rows_async<THREADS, BK, Padded>(smem[0][0], hd.k1, l1, hd.k2, l2, 0, hd.rs);
  flash::load_rows_async<THREADS, BK, Padded>(smem[0][1], hd.v1, l1, hd.v2, l2, 0, hd.rs);
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
  // Running max (log2 domain, scaled) and sum of rows g (0) and g + 8 (1) of each m tile.
  float mx[2][2] = {{-FLT_MAX, -FLT_MAX}, {-FLT_MAX, -FLT_MAX}};
  float sum[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
  const float sl2 = scale * 1.4426950408889634f;  // exp(x·scale) = 2^(x·scale·log2 e)

  const int tiles = (lk + BK - 1) / BK;
  for (int it = 0; it < tiles; ++it) {
    const int buf = it & 1;
    if (it + 1 < tiles) {
      flash::load_rows_async<THREADS, BK, Padded>(smem[buf ^ 1][0], hd.k1, l1, hd.k2, l2, (it + 1) * BK, hd.rs);
      flash::load_rows_async<THREADS, BK, Padded>(smem[buf ^ 1][1], hd.v1, l1, hd.v2, l2, (it + 1) * BK, hd.rs);
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
    uint32_t pa[2][BK / 16][4], pl[2][BK / 16][4];
#pragma unroll
    for (int m = 0; m < 2; ++m) {
      float alpha[2];
      flash::softmax_tile<T>(s[m], it * BK, lk, t, sl2, mx[m], sum[m], alpha, pa[m], pl[m]);
      flash::rescale(acc[m], alpha);
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
#pragma unroll
  for (int m = 0; m < 2; ++m)
    flash::store_out<T>(acc[m], sum[m], hd.o, hd.rs, q0 + warp * RW + m * 16 + (lane >> 2), lq, t);
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
