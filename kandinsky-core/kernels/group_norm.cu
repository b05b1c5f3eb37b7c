// Fused GroupNorm (+ optional modulation, + optional SiLU) for NCHW tensors, f32 statistics
// and f32 arithmetic for every input type.
//
// Modulation of the normalised value v (channel c of batch b, pixel (y, x)):
//   kind 0: none;
//   kind 1: v·(1 + scale[b, c]) + shift[b, c]  (diffusers' scale_shift time conditioning; scale
//           and shift read through their own batch/channel strides, so the two halves of the
//           time projection are used in place);
//   kind 2: v·scale[b, c, y/fy, x/fx] + shift[…]  (MoVQ's SpatialNorm: contiguous [B, C, mh, mw]
//           maps, nearest-upsampled by fy = H/mh, fx = W/mw on the fly instead of materialised).
//
// Two launches over a grid of (batch·groups)·splits blocks, so even batch 2 × 32 groups fills
// the GPU: `group_norm_stats_*` writes a partial (count, mean, M2) per block (Welford), and
// `group_norm_apply_*` merges its group's `psplits` partials (Chan et al.) and normalises its
// chunk. The partials may also come from the kernel that wrote x (conv.cu's crop kernel or
// `cat_channels_*` below: one per group, psplits = 1), and then the first launch is skipped.
// candle's composite GroupNorm makes about a dozen passes; this makes two reads and a write.
#include "common.cuh"
#include "welford.cuh"

// The 8-wide path (Vec8, common.cuh): taken when a channel's map is a multiple of 8 elements
// (then so are the groups and, rounded by the launcher, the chunks) and the tensors are
// 16-byte aligned; one 2-byte element per thread and iteration reached only ~250 GB/s on an
// H200.

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}

// Block (gs, split): elements [split·chunk, (split+1)·chunk) of group gs (= b·G + g).
template <typename T>
__device__ void stats(const T* __restrict__ x, float* __restrict__ partial, long long group_elems,
                      long long chunk, int splits, int vec8) {
  const int gs = blockIdx.x / splits, split = blockIdx.x % splits;
  const T* xg = x + (long long)gs * group_elems;
  // One group's elements stay below 2^31 (checked by the launcher): 32-bit indices.
  const int lo = (int)((long long)split * chunk), hi = (int)min((long long)lo + chunk, group_elems);
  Welford w{0.f, 0.f, 0.f};
  if (vec8 && aligned16(xg)) {
    for (int i = lo + 8 * threadIdx.x; i < hi; i += 8 * blockDim.x) {
      const Vec8<T> v = *reinterpret_cast<const Vec8<T>*>(xg + i);
#pragma unroll
      for (int e = 0; e < 8; ++e) welford_add(w, to_f(v.v[e]));
    }
  } else {
    for (int i = lo + threadIdx.x; i < hi; i += blockDim.x) welford_add(w, to_f(xg[i]));
  }
  w = block_merge(w);
  if (threadIdx.x == 0) {
    partial[3 * blockIdx.x] = w.n;
    partial[3 * blockIdx.x + 1] = w.mean;
    partial[3 * blockIdx.x + 2] = w.m2;
  }
}

template <typename T>
__device__ void apply(const T* __restrict__ x, const T* __restrict__ gamma, const T* __restrict__ beta,
                      const float* __restrict__ partial, int psplits, T* __restrict__ y,
                      long long group_elems, long long chunk, int splits, int groups, int cpg,
                      long long hw, float eps, int silu,
                      const T* __restrict__ mscale, const T* __restrict__ mshift, int mkind,
                      long long scale_sb, long long scale_sc, long long shift_sb, long long shift_sc,
                      int mh, int mw, int width, int vec8) {
  const int gs = blockIdx.x / splits, split = blockIdx.x % splits;
  __shared__ float s_mean, s_rstd;
  if (threadIdx.x == 0) {
    Welford w{0.f, 0.f, 0.f};
    for (int s = 0; s < psplits; ++s) {
      const float* p = partial + 3 * (gs * psplits + s);
      w = merge(w, Welford{p[0], p[1], p[2]});
    }
    s_mean = w.mean;
    s_rstd = rsqrtf(w.m2 / w.n + eps);
  }
  __syncthreads();
  const float mean = s_mean, rstd = s_rstd;
  const int g = gs % groups, b = gs / groups, channels = groups * cpg;
  // kind 2 geometry: the map is hw / width rows of `width` pixels.
  const int fy = mkind == 2 ? (int)(hw / width) / mh : 1, fx = mkind == 2 ? width / mw : 1;
  const long long base = (long long)gs * group_elems;
  // 32-bit indices and divisions (a group stays below 2^31 elements, checked by the launcher):
  // 64-bit divisions per element made this kernel several times slower than its traffic.
  const int lo = (int)((long long)split * chunk), hi = (int)min((long long)lo + chunk, group_elems);
  const int hw32 = (int)hw;
  if (vec8 && aligned16(x + base) && aligned16(y + base)) {
    for (int i = lo + 8 * threadIdx.x; i < hi; i += 8 * blockDim.x) {
      // The 8 elements share one channel (hw is a multiple of 8).
      const int cl = i / hw32, c = g * cpg + cl;
      // v = (x - mean)·mul + add: the norm's affine and a scale-shift folded per channel.
      float mul = rstd * to_f(gamma[c]);
      float add = to_f(beta[c]);
      if (mkind == 1) {
        const float sc = 1.f + to_f(mscale[b * scale_sb + c * scale_sc]);
        mul *= sc;
        add = add * sc + to_f(mshift[b * shift_sb + c * shift_sc]);
      }
      const Vec8<T> xv = *reinterpret_cast<const Vec8<T>*>(x + base + i);
      Vec8<T> out;
      int row = 0, col = 0;
      if (mkind == 2) {
        const int pix = i - cl * hw32;
        row = pix / width;
        col = pix - row * width;
      }
      const long long mrow = ((long long)b * channels + c) * mh;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        float v = (to_f(xv.v[e]) - mean) * mul + add;
        if (mkind == 2) {
          const long long m = (mrow + row / fy) * mw + col / fx;
          v = v * to_f(mscale[m]) + to_f(mshift[m]);
          if (++col == width) {
            col = 0;
            ++row;
          }
        }
        if (silu) v = v / (1.f + __expf(-v));
        out.v[e] = from_f<T>(v);
      }
      *reinterpret_cast<Vec8<T>*>(y + base + i) = out;
    }
    return;
  }
  for (int i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    const int cl = i / hw32, c = g * cpg + cl;
    float v = (to_f(x[base + i]) - mean) * rstd * to_f(gamma[c]) + to_f(beta[c]);
    if (mkind == 1) {
      v = v * (1.f + to_f(mscale[b * scale_sb + c * scale_sc])) + to_f(mshift[b * shift_sb + c * shift_sc]);
    } else if (mkind == 2) {
      const int pix = i - cl * hw32, row = pix / width, col = pix - row * width;
      const long long m = (((long long)b * channels + c) * mh + row / fy) * mw + col / fx;
      v = v * to_f(mscale[m]) + to_f(mshift[m]);
    }
    if (silu) v = v / (1.f + __expf(-v));
    y[base + i] = from_f<T>(v);
  }
}

// The channel concatenation out [B, C1 + C2, hw] of a [B, C1, hw] and b [B, C2, hw] (the
// UNet's skip connections), over the grid and chunks of group_norm_stats' plan for the
// output's `groups` groups, so that each block copies part of one group; with
// `st.per_group` (= splits) > 0 it also leaves the output's statistics (welford.cuh's
// StatsOut) for the ResNet norm that reads the concatenation next. A group may straddle the
// two inputs: each 8-element chunk lies in one channel (hw a multiple of 8 on the 8-wide
// path), so in one input.
template <typename T>
__device__ void cat_channels(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out,
                             int c1, int c2, long long hw, long long group_elems, long long chunk,
                             int splits, int cpg, int groups, int vec8, StatsOut st) {
  const int gs = blockIdx.x / splits, split = blockIdx.x % splits;
  const int bi = gs / groups, g = gs % groups;
  // 32-bit indices inside a group (below 2^31 elements, checked by the launcher).
  const int lo = (int)((long long)split * chunk), hi = (int)min((long long)lo + chunk, group_elems);
  const int hw32 = (int)hw;
  T* og = out + (long long)gs * group_elems;
  // Input channel c of the concatenation: a's channel c, or b's channel c − C1.
  auto src = [&](int c) -> const T* {
    return c < c1 ? a + ((long long)bi * c1 + c) * hw : b + ((long long)bi * c2 + (c - c1)) * hw;
  };
  Welford w{0.f, 0.f, 0.f};
  if (vec8 && aligned16(a) && aligned16(b) && aligned16(og)) {
    for (int i = lo + 8 * threadIdx.x; i < hi; i += 8 * blockDim.x) {
      const int cl = i / hw32;
      const Vec8<T> v = *reinterpret_cast<const Vec8<T>*>(src(g * cpg + cl) + (i - cl * hw32));
      *reinterpret_cast<Vec8<T>*>(og + i) = v;
      if (st.per_group) {
#pragma unroll
        for (int e = 0; e < 8; ++e) welford_add(w, to_f(v.v[e]));
      }
    }
  } else {
    for (int i = lo + threadIdx.x; i < hi; i += blockDim.x) {
      const int cl = i / hw32;
      const T v = src(g * cpg + cl)[i - cl * hw32];
      og[i] = v;
      if (st.per_group) welford_add(w, to_f(v));
    }
  }
  if (st.per_group) leave_stats(w, st);  // uniform: a kernel argument
}

#define GN_KERNELS(T, SUF)                                                                        \
  extern "C" __global__ void group_norm_stats_##SUF(const T* x, float* partial, long long ge,     \
                                                    long long chunk, int splits, int vec8) {      \
    stats<T>(x, partial, ge, chunk, splits, vec8);                                                \
  }                                                                                               \
  extern "C" __global__ void group_norm_apply_##SUF(                                              \
      const T* x, const T* gamma, const T* beta, const float* partial, int psplits, T* y,         \
      long long ge, long long chunk, int splits, int groups, int cpg, long long hw, float eps,     \
      int silu, const T* mscale, const T* mshift, int mkind, long long ssb, long long ssc,        \
      long long tsb, long long tsc, int mh, int mw, int width, int vec8) {                        \
    apply<T>(x, gamma, beta, partial, psplits, y, ge, chunk, splits, groups, cpg, hw, eps, silu,  \
             mscale, mshift, mkind, ssb, ssc, tsb, tsc, mh, mw, width, vec8);                     \
  }                                                                                               \
  extern "C" __global__ void cat_channels_##SUF(                                                  \
      const T* a, const T* b, T* out, int c1, int c2, long long hw, long long ge, long long chunk, \
      int splits, int cpg, int groups, int vec8, float* stats, float* partial, unsigned* done,    \
      int per_group) {                                                                            \
    cat_channels<T>(a, b, out, c1, c2, hw, ge, chunk, splits, cpg, groups, vec8,                   \
                    StatsOut{stats, partial, done, per_group});                                   \
  }

GN_KERNELS(float, f32)
GN_KERNELS(__half, f16)
GN_KERNELS(__nv_bfloat16, bf16)
