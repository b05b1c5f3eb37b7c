// Welford's running (count, mean, M2) and Chan et al.'s merge of two of them: the GroupNorm
// statistics of group_norm.cu, merged again by the normalising prologue of conv.cu and
// produced by conv.cu's crop kernel for the norm that reads its output.
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

__device__ __forceinline__ Welford warp_merge(Welford w) {
  for (int o = 16; o > 0; o >>= 1) {
    Welford other{__shfl_xor_sync(0xffffffff, w.n, o), __shfl_xor_sync(0xffffffff, w.mean, o),
                  __shfl_xor_sync(0xffffffff, w.m2, o)};
    w = merge(w, other);
  }
  return w;
}

// Every thread of the block gets the merge of all threads' values. The block (1-, 2- or
// 3-D) has a multiple of 32 threads, at most 1024; every thread must call it.
__device__ Welford block_merge(Welford w) {
  __shared__ float sn[32], sm[32], s2[32];
  const int tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int lane = tid & 31, warp = tid >> 5, nwarps = (blockDim.x * blockDim.y * blockDim.z) >> 5;
  w = warp_merge(w);
  if (lane == 0) { sn[warp] = w.n; sm[warp] = w.mean; s2[warp] = w.m2; }
  __syncthreads();
  if (warp == 0) {
    Welford r = lane < nwarps ? Welford{sn[lane], sm[lane], s2[lane]} : Welford{0.f, 0.f, 0.f};
    r = warp_merge(r);
    if (lane == 0) { sn[0] = r.n; sm[0] = r.mean; s2[0] = r.m2; }
  }
  __syncthreads();
  Welford r{sn[0], sm[0], s2[0]};
  __syncthreads();
  return r;
}

// Where a kernel leaves the GroupNorm statistics of the map it wrote, for the norm that reads
// it next (the norm's statistics pass is then skipped): `per_group` > 0 blocks per group
// (b·G + g, block `blockIdx.x` in group `blockIdx.x / per_group`), each block inside one
// group. Every block writes (count, mean, M2) of the values it stored (rounded, as the norm
// reads them) to its slot of `partial`; the group's last block to finish (an atomic count in
// `done`, zeroed by the launcher) merges the group's slots in slot order — the same sums
// whichever block comes last — into `stats[b·G + g]`, one partial per group.
struct StatsOut {
  float *stats, *partial;
  unsigned *done;
  int per_group;
};

// Every thread of the block calls it (uniformly: per_group > 0) with the Welford of the
// values it stored.
__device__ void leave_stats(Welford w, StatsOut st) {
  w = block_merge(w);
  const int tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int nthreads = blockDim.x * blockDim.y * blockDim.z;
  const int group = blockIdx.x / st.per_group;
  __shared__ int s_last;
  if (tid == 0) {
    float *p = st.partial + 3ll * blockIdx.x;
    p[0] = w.n;
    p[1] = w.mean;
    p[2] = w.m2;
    // The slot is visible to every block before the count says so.
    __threadfence();
    s_last = atomicAdd(st.done + group, 1u) == (unsigned)st.per_group - 1;
  }
  __syncthreads();
  if (!s_last) return;  // uniform: read from shared memory
  __threadfence();
  Welford m{0.f, 0.f, 0.f};
  const float *q = st.partial + 3ll * group * st.per_group;
  // Around L1 (__ldcg): the other blocks' slots were written on other multiprocessors.
  for (int i = tid; i < st.per_group; i += nthreads)
    m = merge(m, Welford{__ldcg(q + 3 * i), __ldcg(q + 3 * i + 1), __ldcg(q + 3 * i + 2)});
  m = block_merge(m);
  if (tid == 0) {
    st.stats[3 * group] = m.n;
    st.stats[3 * group + 1] = m.mean;
    st.stats[3 * group + 2] = m.m2;
  }
}
