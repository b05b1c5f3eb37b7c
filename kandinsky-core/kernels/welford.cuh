// Welford's running (count, mean, M2) and Chan et al.'s merge of two of them: the GroupNorm
// statistics of group_norm.cu, merged again by the normalising prologue of conv.cu.
#pragma once

struct Welford { float n, mean, m2; };

__device__ __forceinline__ void welford_add(Welford& w, float v) {
  w.n += 1.f;
  float d = v - w.mean;
  w.mean += d * __frcp_rn(w.n);
  w.m2 += d * (v - w.mean);
}

__device__ __forceinline__ Welford merge(Welford a, Welford b) {
  float n = a.n + b.n;
  if (n == 0.f) return a;
  float d = b.mean - a.mean;
  float f = b.n / n;
  return {n, a.mean + d * f, a.m2 + b.m2 + d * d * a.n * f};
}
