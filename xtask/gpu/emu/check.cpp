// Runs the attention kernels of kandinsky-core/kernels under the host emulation of
// warp_emu.h and compares them with attention computed in double precision from the same
// rounded inputs. Exit status 1 when any case is over its bar. See check.sh.
//
// The mma kernel (flash_attention_mma.cu) passed on an H200 (GPU runs 5–9): its passing here
// is the check of the emulation itself (mma.sync fragments, cp.async, shuffles).
#include <warp_emu.h>

#include <algorithm>
#include <cstring>
#include <cstdio>
#include <random>
#include <string>

#include "flash_attention_mma.cu"
#include "flash_attention_wgmma.cu"
#include "emu_types.h"
#include "flash_attention_wide.cu"

namespace {

// 16-byte aligned storage (cp.async and ldmatrix need it).
template <typename T> struct Buf {
  explicit Buf(size_t n) : n(n), p(static_cast<T*>(aligned_alloc(256, ((n * sizeof(T) + 255) / 256) * 256 + 256))) {}
  ~Buf() { free(p); }
  size_t n;
  T* p;
};

struct Case {
  int b, h, lq, l1, l2;
  float qscale;  // large values make the softmax sharp: the running max moves
};

// Entry points of one storage type: head-major, and token-major (with the head count).
template <typename T> struct Entries {
  void (*hm)(const T*, const T*, const T*, int, const T*, const T*, int, T*, int, float);
  void (*tm)(const T*, const T*, const T*, int, const T*, const T*, int, T*, int, float, int);
};

// A kernel under test: its name, its block (query rows, threads) and its entry points.
struct Kernel {
  const char* name;
  int rows, threads;
  Entries<__half> f16;
  Entries<__nv_bfloat16> bf16;
};

#define KD_KERNEL(NAME, ROWS, THREADS, PREFIX) \
  {NAME, ROWS, THREADS, {PREFIX##_f16, PREFIX##_tm_f16}, {PREFIX##_bf16, PREFIX##_tm_bf16}}
const Kernel KERNELS[] = {
    KD_KERNEL("mma", 64, 128, flash_mma),
    KD_KERNEL("wide4", 128, 128, flash_wide4),
    KD_KERNEL("wide2", 64, 64, flash_wide2),
    KD_KERNEL("wgmma-pipe", 128, 256, flash_wgmma_pipe),
    KD_KERNEL("wgmma-pipe-ns", 128, 256, flash_wgmma_pipe_ns),
};
#undef KD_KERNEL

template <typename T>
double run(const Kernel& kernel, bool tm, const Case& c, uint32_t seed) {
  const int D = 64;
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  auto fill = [&](Buf<T>& b, float s) {
    for (size_t i = 0; i < b.n; ++i) b.p[i] = from_float<T>(nd(rng) * s);
  };
  Buf<T> q((size_t)c.b * c.h * c.lq * D), k1((size_t)c.b * c.h * c.l1 * D), v1((size_t)c.b * c.h * c.l1 * D),
      k2((size_t)c.b * c.h * std::max(c.l2, 1) * D), v2((size_t)c.b * c.h * std::max(c.l2, 1) * D),
      o((size_t)c.b * c.h * c.lq * D);
  fill(q, c.qscale);
  fill(k1, 1.f);
  fill(v1, 1.f);
  fill(k2, 1.f);
  fill(v2, 1.f);
  for (size_t i = 0; i < o.n; ++i) o.p[i] = from_float<T>(NAN);
  const float scale = 0.125f;
  // Element (b, h, l, d) of a tensor with `len` rows per head, in the layout under test.
  auto at = [&](const T* base, int len, int b, int h, int l, int d) -> float {
    const size_t i = tm ? (((size_t)b * len + l) * c.h + h) * D + d : (((size_t)b * c.h + h) * len + l) * D + d;
    return to_float(base[i]);
  };

  Entries<T> fns;
  if constexpr (std::is_same<T, __half>::value) fns = kernel.f16;
  else fns = kernel.bf16;
  const EmuDim3 grid{(unsigned)((c.lq + kernel.rows - 1) / kernel.rows), (unsigned)(c.b * c.h), 1};
  emu::traffic_label(std::string(kernel.name) + (tm ? " token-major" : " head-major"));
  emu::launch(grid, kernel.threads, [&] {
    if (tm) fns.tm(q.p, k1.p, v1.p, c.l1, k2.p, v2.p, c.l2, o.p, c.lq, scale, c.h);
    else fns.hm(q.p, k1.p, v1.p, c.l1, k2.p, v2.p, c.l2, o.p, c.lq, scale);
  });

  // Reference in double; relative error = max |out − ref| / max |ref| (NaN counts as ∞).
  double max_err = 0, max_ref = 0;
  const int lk = c.l1 + c.l2;
  std::vector<double> sc(lk), out(D);
  for (int b = 0; b < c.b; ++b)
    for (int h = 0; h < c.h; ++h)
      for (int i = 0; i < c.lq; ++i) {
        double mx = -1e300;
        for (int j = 0; j < lk; ++j) {
          double dot = 0;
          for (int d = 0; d < D; ++d)
            dot += (double)at(q.p, c.lq, b, h, i, d) *
                   (j < c.l1 ? at(k1.p, c.l1, b, h, j, d) : at(k2.p, c.l2, b, h, j - c.l1, d));
          sc[j] = dot * scale;
          mx = std::max(mx, sc[j]);
        }
        double z = 0;
        for (int j = 0; j < lk; ++j) z += (sc[j] = std::exp(sc[j] - mx));
        std::fill(out.begin(), out.end(), 0.0);
        for (int j = 0; j < lk; ++j)
          for (int d = 0; d < D; ++d)
            out[d] += sc[j] / z * (j < c.l1 ? at(v1.p, c.l1, b, h, j, d) : at(v2.p, c.l2, b, h, j - c.l1, d));
        for (int d = 0; d < D; ++d) {
          const double got = at(o.p, c.lq, b, h, i, d);
          const double e = std::fabs(got - out[d]);
          max_err = std::isnan(got) ? INFINITY : std::max(max_err, e);
          max_ref = std::max(max_ref, std::fabs(out[d]));
          if (std::isnan(got)) return INFINITY;
        }
      }
  return max_err / max_ref;
}

}  // namespace

int main(int argc, char** argv) {
  // Shapes that reach every edge: query tiles cut short, the segment boundary inside a key
  // tile, a single segment longer than one tile, several key tiles with a sharp softmax.
  const Case cases[] = {
      {1, 2, 150, 32, 77, 1.f},
      {2, 1, 64, 70, 0, 1.f},
      {1, 1, 130, 32, 200, 12.f},
      {1, 1, 64, 32, 300, 4.f},  // 6 key tiles: every buffer rotation wraps
  };
  std::vector<const Kernel*> kernels;
  for (const Kernel& k : KERNELS) {
    bool picked = argc == 1;
    for (int i = 1; i < argc; ++i) picked |= strcmp(argv[i], k.name) == 0;
    if (picked) kernels.push_back(&k);
  }
  if (kernels.size() != (size_t)(argc == 1 ? std::size(KERNELS) : argc - 1)) {
    fprintf(stderr, "unknown kernel among the arguments\n");
    return 2;
  }
  // The bars of gpu_check and the performance issue: f16 5e-3, bf16 1e-2.
  bool ok = true;
  uint32_t seed = 1;
  for (const Kernel* k : kernels)
    for (int tm = 0; tm < 2; ++tm)
      for (const Case& c : cases) {
        const double e16 = run<__half>(*k, tm, c, seed), e_bf = run<__nv_bfloat16>(*k, tm, c, seed);
        ++seed;
        const bool pass = e16 <= 5e-3 && e_bf <= 1e-2;
        ok &= pass;
        printf("%-13s %-12s b%d h%d lq%-4d keys %d+%-4d q×%-4g  f16 %.2e  bf16 %.2e  %s\n", k->name,
               tm ? "token-major" : "head-major", c.b, c.h, c.lq, c.l1, c.l2, c.qscale, e16, e_bf,
               pass ? "ok" : "FAIL");
        fflush(stdout);
      }
  ok &= emu::traffic_report("the attention kernels");
  return ok ? 0 : 1;
}
