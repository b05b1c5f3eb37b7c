// Host emulation of the CUDA features kandinsky-core's kernels use, so that their index
// arithmetic (fragment layouts, tile offsets, masking, the cp.async and wgmma pipelines) is
// checked on a machine without a GPU. Every thread of a block is a host thread; warp- and
// warpgroup-collective operations (mma.sync, ldmatrix, shuffles, wgmma) exchange their
// operands through slots between two barriers, and compute what the PTX ISA says each lane
// receives. cp.async copies are held back until the cp.async.wait_group that covers them (the
// latest moment the hardware may land them), and a wgmma runs at the wgmma.wait_group that
// covers it, so a read the pipeline does not wait for sees stale data.
//
// Not emulated: timing and the tensor cores' internal rounding (products are summed in f32
// here). What the emulation proves is which values meet which. Beside the values, every
// shared-memory access through cp.async, ldmatrix and st_shared16 is recorded per call site
// and warp instruction, so the shared-memory wavefronts (bank conflicts) and the global
// sectors (coalescing) of each site can be counted: `emu::traffic_report` (a model of the
// hardware's rules, see there; it says nothing about latency).
#pragma once
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <source_location>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Blocks run one after another, so one static array per kernel instantiation is the block's.
#define __shared__ static

struct __half {
  uint16_t x;
};
struct __half2 {
  __half lo, hi;
};
struct __nv_bfloat16 {
  uint16_t x;
};
struct __nv_bfloat162 {
  __nv_bfloat16 lo, hi;
};

inline __half __float2half_rn(float v) {
  _Float16 f = (_Float16)v;
  __half h;
  memcpy(&h.x, &f, 2);
  return h;
}
inline __half __float2half(float v) { return __float2half_rn(v); }
inline float __half2float(__half h) {
  _Float16 f;
  memcpy(&f, &h.x, 2);
  return (float)f;
}
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u;
  memcpy(&u, &v, 4);
  __nv_bfloat16 b;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    b.x = 0x7fc0;  // NaN
  } else {
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    b.x = (uint16_t)(u >> 16);
  }
  return b;
}
inline __nv_bfloat16 __float2bfloat16(float v) { return __float2bfloat16_rn(v); }
inline float __bfloat162float(__nv_bfloat16 b) {
  uint32_t u = (uint32_t)b.x << 16;
  float v;
  memcpy(&v, &u, 4);
  return v;
}
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}

struct EmuDim3 {
  unsigned x, y, z;
};
inline thread_local EmuDim3 threadIdx, blockIdx, blockDim, gridDim;

struct alignas(16) float4 {
  float x, y, z, w;
};
inline float __expf(float v) { return expf(v); }
inline float rsqrtf(float v) { return 1.f / sqrtf(v); }
inline float __frcp_rn(float v) { return 1.f / v; }
// Global-memory ordering: blocks run one after another here, so a fence has nothing to order
// and a load around L1 is a load; the count is atomic (a block's threads run concurrently).
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline float __ldcg(const float* p) { return *p; }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline long long min(long long a, long long b) { return a < b ? a : b; }

namespace emu {

// A reusable barrier that gives up (and aborts the check) instead of hanging when some
// thread never arrives: a collective that not every lane reaches is a kernel bug.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait(const char* what) {
    std::unique_lock<std::mutex> lock(mu_);
    const long gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
      return;
    }
    if (!cv_.wait_for(lock, std::chrono::seconds(120), [&] { return gen_ != gen; })) {
      fprintf(stderr, "emu: %s: not every thread arrived (divergent collective?)\n", what);
      abort();
    }
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int n_, count_ = 0;
  long gen_ = 0;
};

struct Warp {
  Barrier bar{32};
  uint32_t u[32][6];
  float f[32][4];
  const void* p[32];
};

// wgmma's operands: the 128 threads of a warpgroup exchange their A registers and operand
// addresses.
struct WarpGroup {
  Barrier bar{128};
  uint32_t a[128][4];
  const void* b[128];
};

// One 16-byte access of one thread to shared memory (and, for cp.async, from global memory),
// with the kernel source line that made it.
enum Kind : int { kCpAsync, kLdmatrix, kStShared };
struct Access {
  const char* file;
  unsigned line;
  Kind kind;
  uintptr_t smem, gmem;  // gmem 0: no global read (not a cp.async, or zero-filled)
};

struct Block {
  explicit Block(int threads)
      : bar(threads),
        warps(new Warp[(threads + 31) / 32]),
        groups(new WarpGroup[(threads + 127) / 128]),
        access(threads) {}
  Barrier bar;
  std::unique_ptr<Warp[]> warps;
  std::unique_ptr<WarpGroup[]> groups;
  std::vector<std::vector<Access>> access;  // per thread, in program order
};

// One issued wgmma, run when a wgmma.wait_group covers it (the accumulator reads as stale
// until then).
struct Wgmma {
  float* d;
  uint32_t a[4];
  uint64_t desc;
  int scale_d, trans_b, bf16, group;
};

struct Copy {
  void* dst;
  const void* src;
  bool valid;
  int group;
};

inline thread_local Block* t_block;
inline thread_local std::vector<Access>* t_access;
inline thread_local int t_lane;
inline thread_local int t_warp;
inline thread_local std::vector<Copy> t_copies;
inline thread_local int t_group;
inline thread_local std::vector<Wgmma> t_wgmma;
inline thread_local int t_wg_group;
inline thread_local std::vector<const void*> t_descs;

inline Warp& warp() { return t_block->warps[t_warp]; }

inline void check_aligned(const void* p, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
    fprintf(stderr, "emu: %s: address %p is not 16-byte aligned\n", what, p);
    abort();
  }
}

// What one access site (kernel label, source line, kind) cost over all its warp instructions.
struct SiteStats {
  uint64_t requests = 0;       // warp instructions
  uint64_t phases = 0;         // groups of 8 lanes the hardware serves together (128 bytes)
  uint64_t wavefronts = 0;     // shared-memory passes those took: == phases when conflict-free
  uint64_t sectors = 0;        // distinct 32-byte global sectors the cp.async sources touched
  uint64_t ideal_sectors = 0;  // the fewest that many 16-byte reads could touch
  uint64_t divergent = 0;      // instructions not every lane of the warp made at that point
};
using SiteKey = std::tuple<std::string, std::string, unsigned, int>;  // label, file, line, kind
struct Traffic {
  std::mutex mu;
  std::string label = "-";
  std::map<std::string, bool> aligned;  // per label: whether its sectors must be ideal
  std::map<SiteKey, SiteStats> sites;
};
inline Traffic& traffic() {
  static Traffic t;
  return t;
}
// Name the kernel the following launches run (the sites are counted per label). `aligned`:
// the shapes put every row the kernel reads on a 32-byte boundary, so its reads must touch
// the fewest sectors; edge-case shapes (odd channel counts) cannot, and are only reported.
inline void traffic_label(const std::string& label, bool aligned = true) {
  std::lock_guard<std::mutex> lock(traffic().mu);
  traffic().label = label;
  traffic().aligned[label] = aligned;
}

inline void record(Kind kind, const void* smem, const void* gmem, const std::source_location& loc) {
  t_access->push_back({loc.file_name(), (unsigned)loc.line(), kind, reinterpret_cast<uintptr_t>(smem),
                       reinterpret_cast<uintptr_t>(gmem)});
}

// The hardware's rules as modelled here: a warp's 16-byte shared-memory accesses (LDS/STS.128,
// cp.async's writes, each 8×8 matrix of ldmatrix) are served 8 lanes at a time; the 8 lanes'
// addresses fall in the 32 banks as 8 groups of four (address bits 4–6), and distinct 16-byte
// addresses in one group take one pass each (the same address is one pass). A cp.async read
// touches the 32-byte sectors of its 16 bytes; ideally a warp's 32 reads touch 16.
inline void count_traffic(Block& blk, int threads) {
  Traffic& tr = traffic();
  std::lock_guard<std::mutex> lock(tr.mu);
  for (int w0 = 0; w0 + 32 <= threads; w0 += 32) {
    const std::vector<Access>& first = blk.access[w0];
    size_t n = first.size();
    for (int l = 1; l < 32; ++l) n = std::min(n, blk.access[w0 + l].size());
    for (size_t i = 0; i < first.size(); ++i) {
      const Access& a0 = first[i];
      SiteStats& st = tr.sites[{tr.label, a0.file, a0.line, (int)a0.kind}];
      bool same = i < n;
      for (int l = 1; l < 32 && same; ++l) {
        const Access& a = blk.access[w0 + l][i];
        same = a.line == a0.line && a.kind == a0.kind && strcmp(a.file, a0.file) == 0;
      }
      if (!same) {
        ++st.divergent;
        continue;
      }
      ++st.requests;
      for (int ph = 0; ph < 4; ++ph) {
        uintptr_t seen[8];
        int count[8] = {0}, nseen = 0, worst = 1;
        for (int l = 8 * ph; l < 8 * ph + 8; ++l) {
          const uintptr_t addr = blk.access[w0 + l][i].smem >> 4;
          bool dup = false;
          for (int j = 0; j < nseen; ++j) dup |= seen[j] == addr;
          if (dup) continue;
          seen[nseen++] = addr;
          worst = std::max(worst, ++count[addr & 7]);
        }
        ++st.phases;
        st.wavefronts += worst;
      }
      if (a0.kind == kCpAsync) {
        std::vector<uintptr_t> sec;
        int reads = 0;
        for (int l = 0; l < 32; ++l) {
          const uintptr_t g = blk.access[w0 + l][i].gmem;
          if (!g) continue;
          ++reads;
          sec.push_back(g >> 5);
          sec.push_back((g + 15) >> 5);
        }
        std::sort(sec.begin(), sec.end());
        st.sectors += std::unique(sec.begin(), sec.end()) - sec.begin();
        st.ideal_sectors += (reads + 1) / 2;
      }
    }
  }
}

// Print every site (wavefronts per phase: 1.00 is conflict-free; sectors against the ideal)
// and return whether every site is conflict-free and never divergent, and every site of an
// aligned label also reads the fewest sectors. Flagged rows end in "<-".
inline bool traffic_report(const char* what) {
  Traffic& tr = traffic();
  std::lock_guard<std::mutex> lock(tr.mu);
  static const char* kinds[] = {"cp.async", "ldmatrix", "st.shared"};
  bool clean = true;
  printf("%-22s %-28s %-9s %9s %10s %13s %9s\n", "traffic: kernel", "site", "kind", "requests", "wavefronts",
         "sectors/ideal", "divergent");
  for (const auto& [key, st] : tr.sites) {
    const auto& [label, file, line, kind] = key;
    const char* base = strrchr(file.c_str(), '/');
    const std::string site = std::string(base ? base + 1 : file.c_str()) + ":" + std::to_string(line);
    const double wf = st.phases ? (double)st.wavefronts / st.phases : 0.0;
    const double sec = st.ideal_sectors ? (double)st.sectors / st.ideal_sectors : 1.0;
    const bool bad = st.wavefronts != st.phases || st.divergent ||
                     (tr.aligned[label] && st.sectors != st.ideal_sectors);
    clean &= !bad;
    printf("%-22s %-28s %-9s %9llu %10.2f %13.2f %9llu%s\n", label.c_str(), site.c_str(), kinds[kind],
           (unsigned long long)st.requests, wf, sec, (unsigned long long)st.divergent, bad ? "  <-" : "");
  }
  printf("traffic of %s: %zu sites, bank conflicts, divergence, sectors of aligned shapes  %s\n", what,
         tr.sites.size(), clean && !tr.sites.empty() ? "ok" : "FAIL");
  return clean && !tr.sites.empty();
}

// Run `body` as every thread of every block of `grid` (blocks in turn), blocks of `block`
// threads (x fastest, as CUDA numbers them into warps).
template <class F>
void launch(EmuDim3 grid, EmuDim3 block, F body) {
  const int threads = (int)(block.x * block.y * block.z);
  for (unsigned bz = 0; bz < grid.z; ++bz)
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      Block blk(threads);
      std::vector<std::thread> ts;
      for (int tid = 0; tid < threads; ++tid)
        ts.emplace_back([&, tid] {
          threadIdx = {tid % block.x, tid / block.x % block.y, tid / (block.x * block.y)};
          blockIdx = {bx, by, bz};
          blockDim = block;
          gridDim = grid;
          t_block = &blk;
          t_access = &blk.access[tid];
          t_lane = tid & 31;
          t_warp = tid >> 5;
          t_copies.clear();
          t_group = 0;
          t_wgmma.clear();
          t_wg_group = 0;
          t_descs.clear();
          body();
          if (!t_wgmma.empty()) {
            fprintf(stderr, "emu: thread %d ended with %zu wgmma never waited for\n", tid, t_wgmma.size());
            abort();
          }
          if (!t_copies.empty()) {
            fprintf(stderr, "emu: thread %d ended with %zu cp.async copies never waited for\n", tid,
                    t_copies.size());
            abort();
          }
        });
      for (auto& t : ts) t.join();
      count_traffic(blk, threads);
    }
}

template <class F>
void launch(EmuDim3 grid, int threads, F body) {
  launch(grid, EmuDim3{(unsigned)threads, 1, 1}, body);
}

}  // namespace emu

inline void __syncthreads() { emu::t_block->bar.wait("__syncthreads"); }

inline float __shfl_xor_sync(unsigned, float v, int mask) {
  emu::Warp& w = emu::warp();
  w.f[emu::t_lane][0] = v;
  w.bar.wait("shfl");
  const float r = w.f[emu::t_lane ^ mask][0];
  w.bar.wait("shfl");
  return r;
}

inline void cp_async16(void* dst, const void* src, bool valid,
                       const std::source_location loc = std::source_location::current()) {
  emu::check_aligned(dst, "cp.async destination");
  emu::check_aligned(src, "cp.async source");
  emu::record(emu::kCpAsync, dst, valid ? src : nullptr, loc);
  emu::t_copies.push_back({dst, src, valid, emu::t_group});
}
inline void cp_async_commit() { ++emu::t_group; }
// Complete every committed group but the newest N.
template <int N>
void cp_async_wait() {
  const int done_below = emu::t_group - N;
  std::vector<emu::Copy> keep;
  for (const emu::Copy& c : emu::t_copies) {
    if (c.group < done_below) {
      if (c.valid)
        memcpy(c.dst, c.src, 16);
      else
        memset(c.dst, 0, 16);
    } else {
      keep.push_back(c);
    }
  }
  emu::t_copies.swap(keep);
}

namespace emu {
inline uint16_t u16_at(const void* row, int i) {
  uint16_t v;
  memcpy(&v, static_cast<const char*>(row) + 2 * i, 2);
  return v;
}
inline void ldmatrix(uint32_t* r, const void* p, bool trans, const std::source_location& loc) {
  check_aligned(p, "ldmatrix row");
  record(kLdmatrix, p, nullptr, loc);
  Warp& w = warp();
  w.p[t_lane] = p;
  w.bar.wait("ldmatrix");
  const int row = t_lane >> 2, word = t_lane & 3;
  for (int j = 0; j < 4; ++j) {
    uint16_t lo, hi;
    if (trans) {  // elements (2·word, row) and (2·word + 1, row) of matrix j
      lo = u16_at(w.p[8 * j + 2 * word], row);
      hi = u16_at(w.p[8 * j + 2 * word + 1], row);
    } else {  // elements (row, 2·word) and (row, 2·word + 1)
      lo = u16_at(w.p[8 * j + row], 2 * word);
      hi = u16_at(w.p[8 * j + row], 2 * word + 1);
    }
    r[j] = (uint32_t)lo | ((uint32_t)hi << 16);
  }
  w.bar.wait("ldmatrix");
}

// mma.m16n8k16.row.col with f32 accumulation; `cvt` reads one 16-bit element.
inline void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1, float (*cvt)(uint16_t)) {
  Warp& w = warp();
  for (int i = 0; i < 4; ++i) {
    w.u[t_lane][i] = a[i];
    w.f[t_lane][i] = c[i];
  }
  w.u[t_lane][4] = b0;
  w.u[t_lane][5] = b1;
  w.bar.wait("mma");
  auto half_of = [](uint32_t v, int k) { return (uint16_t)(k & 1 ? v >> 16 : v & 0xffff); };
  // A(row, k): lane 4·(row % 8) + (k % 8) / 2, register (row ≥ 8) + 2·(k ≥ 8).
  auto A = [&](int row, int k) {
    return cvt(half_of(w.u[4 * (row & 7) + ((k & 7) >> 1)][(row >> 3) + 2 * (k >> 3)], k));
  };
  // B(k, n): lane 4·n + (k % 8) / 2, register b0 (k < 8) or b1.
  auto B = [&](int k, int n) { return cvt(half_of(w.u[4 * n + ((k & 7) >> 1)][4 + (k >> 3)], k)); };
  const int g = t_lane >> 2, t = t_lane & 3;
  float d[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
    float acc = w.f[t_lane][i];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    d[i] = acc;
  }
  w.bar.wait("mma");
  for (int i = 0; i < 4; ++i) c[i] = d[i];
}
inline float f16_bits(uint16_t v) { return __half2float(__half{v}); }
inline float bf16_bits(uint16_t v) { return __bfloat162float(__nv_bfloat16{v}); }
}  // namespace emu

inline void ldmatrix_x4(uint32_t* r, const void* p, const std::source_location loc = std::source_location::current()) {
  emu::ldmatrix(r, p, false, loc);
}
inline void ldmatrix_x4_trans(uint32_t* r, const void* p,
                              const std::source_location loc = std::source_location::current()) {
  emu::ldmatrix(r, p, true, loc);
}
// A 16-byte store to shared memory.
template <class V>
void st_shared16(V* p, const V& v, const std::source_location loc = std::source_location::current()) {
  static_assert(sizeof(V) == 16, "st_shared16 stores 16 bytes");
  emu::check_aligned(p, "st.shared.v4");
  emu::record(emu::kStShared, p, nullptr, loc);
  *p = v;
}
inline void mma_f16(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) { emu::mma(c, a, b0, b1, emu::f16_bits); }
inline void mma_bf16(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  emu::mma(c, a, b0, b1, emu::bf16_bits);
}

// ---- wgmma (sm_90a) --------------------------------------------------------------------------
// A descriptor's start-address field holds an index into the thread's table of operand
// addresses (a host pointer does not fit in 14 bits); LBO and SBO are encoded as on the GPU.
inline uint64_t wgmma_desc(const void* p, uint32_t lbo, uint32_t sbo, bool sw128) {
  emu::check_aligned(p, "wgmma operand");
  if (lbo >= (1u << 18) || sbo >= (1u << 18) || lbo % 16 || sbo % 16) {
    fprintf(stderr, "emu: wgmma descriptor: LBO %u / SBO %u do not encode\n", lbo, sbo);
    abort();
  }
  emu::t_descs.push_back(p);
  const uint64_t slot = (emu::t_descs.size() - 1) & 0x3FFF;
  return slot | ((uint64_t)(lbo >> 4) << 16) | ((uint64_t)(sbo >> 4) << 32) | ((uint64_t)(sw128 ? 1 : 0) << 62);
}
inline void wgmma_fence() {}
inline void fence_proxy_async() {}
inline void wgmma_fence_operand(float&) {}
inline void wgmma_fence_operand(uint32_t&) {}
inline void wgmma_commit() { ++emu::t_wg_group; }

namespace emu {
// D[64 × 64] (+)= A[64 × 16] · B[16 × 64] for the calling thread's warpgroup, every thread
// computing its own 32 accumulators: warp w holds rows 16w.., d[4j + i] is row g + 8·(i / 2),
// column 8j + 2t + i % 2 (mma.m16n8k16's C layout per n8 block); A as mma.m16n8k16's A.
inline void wgmma_run(const Wgmma& op) {
  const int tid = threadIdx.x;
  WarpGroup& wg = t_block->groups[tid / 128];
  const int me = tid % 128;
  const size_t slot = op.desc & 0x3FFF;
  if (slot >= t_descs.size()) {
    fprintf(stderr, "emu: wgmma descriptor does not come from wgmma_desc\n");
    abort();
  }
  const char* base = static_cast<const char*>(t_descs[slot]);
  for (int i = 0; i < 4; ++i) wg.a[me][i] = op.a[i];
  wg.b[me] = base;
  wg.bar.wait("wgmma");
  for (int i = 0; i < 128; ++i)
    if (wg.b[i] != base) {
      fprintf(stderr, "emu: wgmma descriptor differs across the warpgroup (thread %d vs %d)\n", i, me);
      abort();
    }
  const uint32_t lbo = ((op.desc >> 16) & 0x3FFF) << 4, sbo = ((op.desc >> 32) & 0x3FFF) << 4;
  auto cvt = [&](uint16_t v) { return op.bf16 ? bf16_bits(v) : f16_bits(v); };
  auto half_of = [](uint32_t v, int k) { return (uint16_t)(k & 1 ? v >> 16 : v & 0xffff); };
  auto A = [&](int row, int k) {
    const int owner = (row / 16) * 32 + 4 * (row & 7) + ((k & 7) >> 1);
    return cvt(half_of(wg.a[owner][((row & 15) >> 3) + 2 * (k >> 3)], k));
  };
  const int swizzle = (int)(op.desc >> 62);
  if (swizzle > 1) {
    fprintf(stderr, "emu: wgmma swizzle mode %d is not emulated\n", swizzle);
    abort();
  }
  // Canonical layouts (T = 8 two-byte elements per 16 bytes), byte offsets:
  //   none: K-major ((8,m),(T,2k)):((T,SBO),(1,LBO)); N-major ((T,1,m),(8,k)):((1,T,SBO),(T,LBO));
  //   128B: K-major ((8,m),(T,2k)):((8T,SBO),(1,T)); N-major ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO)),
  // then the 128-byte swizzle on the absolute address: bits [4, 7) ^= bits [7, 10).
  auto B = [&](int k, int n) {
    size_t off;
    if (swizzle == 0 && op.trans_b)
      off = (size_t)(n % 8) * 2 + (size_t)(n / 8) * sbo + (size_t)(k % 8) * 16 + (size_t)(k / 8) * lbo;
    else if (swizzle == 0)
      off = (size_t)(n % 8) * 16 + (size_t)(n / 8) * sbo + (size_t)(k % 8) * 2 + (size_t)(k / 8) * lbo;
    else if (op.trans_b)
      off = (size_t)(n % 8) * 2 + (size_t)(n / 8 % 8) * 16 + (size_t)(n / 64) * lbo + (size_t)(k % 8) * 128 +
            (size_t)(k / 8) * sbo;
    else
      off = (size_t)(n % 8) * 128 + (size_t)(n / 8) * sbo + (size_t)(k % 8) * 2 + (size_t)(k / 8) * 16;
    uintptr_t addr = reinterpret_cast<uintptr_t>(base) + off;
    if (swizzle == 1) addr ^= ((addr >> 7) & 7) << 4;
    return cvt(u16_at(reinterpret_cast<const void*>(addr), 0));
  };
  const int w = me / 32, lane = me % 32, g = lane >> 2, t = lane & 3;
  float d[32];
  for (int j = 0; j < 8; ++j)
    for (int i = 0; i < 4; ++i) {
      const int row = 16 * w + g + 8 * (i >> 1), col = 8 * j + 2 * t + (i & 1);
      float acc = op.scale_d ? op.d[4 * j + i] : 0.f;
      for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
      d[4 * j + i] = acc;
    }
  wg.bar.wait("wgmma");
  for (int e = 0; e < 32; ++e) op.d[e] = d[e];
}
}  // namespace emu

// Complete every committed wgmma group but the newest N.
template <int N>
void wgmma_wait() {
  const int done_below = emu::t_wg_group - N;
  std::vector<emu::Wgmma> keep;
  for (const emu::Wgmma& op : emu::t_wgmma) {
    if (op.group < done_below)
      emu::wgmma_run(op);
    else
      keep.push_back(op);
  }
  emu::t_wgmma.swap(keep);
}

template <bool BF16, int TRANS_B>
void wgmma_m64n64k16_rs(float* d, const uint32_t* a, uint64_t desc, int scale_d) {
  emu::t_wgmma.push_back({d, {a[0], a[1], a[2], a[3]}, desc, scale_d, TRANS_B, BF16, emu::t_wg_group});
}
