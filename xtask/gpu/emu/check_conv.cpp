// The normalise-on-read convolution copy (`conv_shift_norm_*`, conv.cu, opt-in
// KANDINSKY_CONV_NORM=1) under the host emulation: GroupNorm statistics from
// `group_norm_stats_*` (group_norm.cu), then the shifted copies written straight from the raw
// map, against the plain `conv_shift_*` (measured on H200s) run on the map normalised in
// double precision and rounded once. Covers no modulation, the UNet's scale-shift read
// through the strides of one time projection, MoVQ's spatial maps in a band of rows of a
// larger map (whole-map statistics), the folded 2× upsampling and a 1×1 convolution.
// Exit status 1 when any case is over its bar. See check.sh.
#include <warp_emu.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <random>
#include <type_traits>
#include <vector>

#include "conv.cu"
#include "emu_types.h"
#include "group_norm.cu"

namespace {

struct Case {
  const char* what;
  int b, c, groups, h, w, k, up;
  int kind;          // 0 none, 1 scale-shift (halves of one projection), 2 spatial
  int silu;
  int hfull, row0;   // the input is rows [row0, row0 + h) of a map of hfull rows
  int mh, mw;        // spatial maps (kind 2)
};

template <typename T>
double run(const Case& cs, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  const int B = cs.b, C = cs.c, W = cs.w, HF = cs.hfull, H = cs.h, k = cs.k, cpg = C / cs.groups;
  const float eps = 1e-5f;
  auto vec = [&](size_t n, float mean, float sd) {
    std::vector<T> v(n);
    for (auto& e : v) e = from_float<T>(mean + sd * nd(rng));
    return v;
  };
  // The whole map (statistics) and its band (the convolution's input), both contiguous.
  std::vector<T> full = vec((size_t)B * C * HF * W, 0.5f, 2.f);
  std::vector<T> band((size_t)B * C * H * W);
  for (int b = 0; b < B; ++b)
    for (int c = 0; c < C; ++c)
      for (int y = 0; y < H; ++y)
        for (int x = 0; x < W; ++x)
          band[(((size_t)b * C + c) * H + y) * W + x] = full[(((size_t)b * C + c) * HF + cs.row0 + y) * W + x];
  std::vector<T> gamma = vec(C, 1.f, 0.3f), beta = vec(C, 0.f, 0.3f);
  // kind 1: one projection [B, 2C], scale = first half, shift = second (strides 2C, 1);
  // kind 2: [B, C, mh, mw] maps.
  std::vector<T> proj = vec((size_t)B * 2 * C, 0.f, 0.5f);
  std::vector<T> mscale = vec((size_t)B * C * cs.mh * cs.mw, 1.f, 0.5f), mshift = vec(mscale.size(), 0.f, 0.5f);

  // Statistics of the whole map as the launcher plans them (3 splits per group).
  const long long hw = (long long)HF * W, ge = (long long)cpg * hw;
  const int splits = 3, vec8 = hw % 8 == 0;
  const long long chunk = vec8 ? ((ge + splits - 1) / splits + 7) / 8 * 8 : (ge + splits - 1) / splits;
  std::vector<float> partial(3 * (size_t)B * cs.groups * splits);
  constexpr bool F16 = std::is_same<T, __half>::value;
  emu::launch({(unsigned)(B * cs.groups * splits), 1, 1}, 64, [&] {
    if constexpr (F16) group_norm_stats_f16(full.data(), partial.data(), ge, chunk, splits, vec8);
    else group_norm_stats_bf16(full.data(), partial.data(), ge, chunk, splits, vec8);
  });

  // Geometry: stride-1, zero padding k/2, the (upsampled) map inside a padded map, each copy's
  // rows the output's width rounded up to 8 (as gpu_conv::Geometry lays out k shifted
  // copies), plus one spare row.
  const int pad = k / 2, hu = H << cs.up, wu = W << cs.up;
  const int Hp = hu + 2 * pad + 1, Wp = (wu + 7) / 8 * 8;
  const long long S = (long long)Hp * Wp;
  const unsigned gy = (unsigned)((S + 8 * 32 - 1) / (8 * 32));
  std::vector<T> x3((size_t)B * k * C * S), x3_ref(x3.size());

  const T* ms = cs.kind == 1 ? proj.data() : mscale.data();
  const T* mt = cs.kind == 1 ? proj.data() + C : mshift.data();
  const long long ssb = cs.kind == 1 ? 2 * C : 0, ssc = cs.kind == 1 ? 1 : 0;
  // Through the entry points, so their argument order is checked too. The band is read in
  // place: its first row inside the whole map, one (b, c) map of HF·W to the next.
  const T* band_in_place = full.data() + (size_t)cs.row0 * W;
  const long long plane = (long long)HF * W;
  emu::launch({(unsigned)(B * k * C), gy, 1}, 32, [&] {
    if constexpr (F16)
      conv_shift_norm_f16(band_in_place, x3.data(), C, H, W, cs.up, pad, pad, Hp, Wp, S, k, gamma.data(), beta.data(),
                          partial.data(), splits, cpg, eps, cs.silu, ms, mt, cs.kind, ssb, ssc, ssb, ssc, cs.mh, cs.mw,
                          cs.row0, HF, plane);
    else
      conv_shift_norm_bf16(band_in_place, x3.data(), C, H, W, cs.up, pad, pad, Hp, Wp, S, k, gamma.data(),
                           beta.data(), partial.data(), splits, cpg, eps, cs.silu, ms, mt, cs.kind, ssb, ssc, ssb, ssc,
                           cs.mh, cs.mw, cs.row0, HF, plane);
  });

  // Reference: the band normalised in double (whole-map statistics), rounded once, copied by
  // the plain kernel.
  std::vector<T> normed(band.size());
  for (int b = 0; b < B; ++b)
    for (int g = 0; g < cs.groups; ++g) {
      double s1 = 0, s2 = 0;
      for (int c = g * cpg; c < (g + 1) * cpg; ++c)
        for (long long i = 0; i < hw; ++i) {
          const double v = to_float(full[((size_t)b * C + c) * hw + i]);
          s1 += v;
          s2 += v * v;
        }
      const double n = (double)ge, mean = s1 / n, var = s2 / n - mean * mean;
      for (int c = g * cpg; c < (g + 1) * cpg; ++c)
        for (int y = 0; y < H; ++y)
          for (int x = 0; x < W; ++x) {
            const size_t i = (((size_t)b * C + c) * H + y) * W + x;
            double v = (to_float(band[i]) - mean) / std::sqrt(var + eps) * to_float(gamma[c]) + to_float(beta[c]);
            if (cs.kind == 1) v = v * (1 + to_float(proj[b * 2 * C + c])) + to_float(proj[b * 2 * C + C + c]);
            if (cs.kind == 2) {
              const size_t m = (((size_t)b * C + c) * cs.mh + (cs.row0 + y) / (HF / cs.mh)) * cs.mw + x / (W / cs.mw);
              v = v * to_float(mscale[m]) + to_float(mshift[m]);
            }
            if (cs.silu) v = v / (1 + std::exp(-v));
            normed[i] = from_float<T>((float)v);
          }
    }
  emu::launch({(unsigned)(B * k * C), gy, 1}, 32, [&] {
    if constexpr (F16)
      conv_shift_f16(normed.data(), x3_ref.data(), C, H, W, cs.up, pad, pad, Hp, Wp, S, k, (long long)H * W);
    else conv_shift_bf16(normed.data(), x3_ref.data(), C, H, W, cs.up, pad, pad, Hp, Wp, S, k, (long long)H * W);
  });

  double max_err = 0, max_ref = 0;
  for (size_t i = 0; i < x3.size(); ++i) {
    const double got = to_float(x3[i]), want = to_float(x3_ref[i]);
    if (std::isnan(got)) return INFINITY;
    max_err = std::max(max_err, std::fabs(got - want));
    max_ref = std::max(max_ref, std::fabs(want));
  }
  return max_err / max_ref;
}

// conv_finish (the cuBLAS path's crop, bias, residual and rounding) against its definition,
// exactly: the 4-element path (OW a multiple of 4, an aligned residual) and the scalar one
// (an odd width; a residual view one element off), with the residual a contiguous map or
// (res_rows > OH) rows [res_row0, res_row0 + OH) of a taller one, read in place. With `groups` > 0 it also leaves the
// output's GroupNorm statistics (blocks of rows as the launcher picks them: dividing a
// group's rows, several blocks per group): those against the output's mean and variance in
// double, then group_norm_apply reading them (one partial per group, its own work split in
// two) against a GroupNorm in double. Returns the wrong elements; `stat_err` the larger
// relative error of the two stages.
struct FinishResult {
  long wrong;
  double stat_err;
};

template <typename T>
FinishResult finish(int B, int C, int OH, int OW, int Wp, int res_offset, int res_rows, int res_row0, bool bias_on,
                    int groups, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  const int rows = B * C * OH;
  DeviceVec<float> acc((size_t)rows * Wp);
  // An offset mean, so that a variance taken as E[x²] − mean² would lose digits.
  for (auto& v : acc) v = 3.f + nd(rng);
  DeviceVec<T> bias(C), res((size_t)B * C * res_rows * OW + res_offset), out((size_t)rows * OW, from_float<T>(NAN));
  for (auto& v : bias) v = from_float<T>(nd(rng));
  for (auto& v : res) v = from_float<T>(nd(rng));
  const T* r = res.data() + res_offset + (size_t)res_row0 * OW;
  auto res_at = [&](int row, int x) { return r[((size_t)(row / OH) * res_rows + row % OH) * OW + x]; };
  // The launcher's block: 4 columns per thread, as many rows as fit in 256 threads, with
  // statistics halved until they divide a group's rows.
  const int quads = (OW + 3) / 4, cpg = groups ? C / groups : 0;
  const unsigned tx = std::clamp((quads + 31) / 32, 1, 8) * 32;
  unsigned ty = 256 / tx;
  while (groups && (cpg * OH) % ty) ty /= 2;
  const int per_group = groups ? cpg * OH / (int)ty : 0, blocks = (rows + ty - 1) / ty;
  DeviceVec<float> stats(3 * (size_t)B * std::max(groups, 1), NAN), partial(3 * (size_t)blocks, NAN);
  DeviceVec<unsigned> done((size_t)B * std::max(groups, 1), 0u);
  emu::launch({(unsigned)blocks, 1, 1}, EmuDim3{tx, ty, 1}, [&] {
    if constexpr (std::is_same<T, __half>::value)
      conv_finish_f16(acc.data(), bias.data(), r, out.data(), rows, C, OH, OW, Wp, bias_on, 1, res_rows,
                      stats.data(), partial.data(), done.data(), per_group);
    else
      conv_finish_bf16(acc.data(), bias.data(), r, out.data(), rows, C, OH, OW, Wp, bias_on, 1, res_rows,
                       stats.data(), partial.data(), done.data(), per_group);
  });
  FinishResult res_{0, 0.0};
  for (int row = 0; row < rows; ++row)
    for (int x = 0; x < OW; ++x) {
      float v = acc[(size_t)row * Wp + x] + (bias_on ? to_float(bias[row / OH % C]) : 0.f);
      v += to_float(res_at(row, x));
      const T want = from_float<T>(v);
      res_.wrong += memcmp(&want, &out[(size_t)row * OW + x], sizeof(T)) != 0;
    }
  if (!groups) return res_;
  // The statistics: count exact, mean and M2 against the stored values in double.
  const long long hw = (long long)OH * OW, ge = (long long)cpg * hw;
  std::vector<double> mean(B * groups), var(B * groups);
  for (int gs = 0; gs < B * groups; ++gs) {
    double s1 = 0;
    for (long long i = 0; i < ge; ++i) s1 += to_float(out[gs * ge + i]);
    const double m = s1 / ge;
    double s2 = 0;
    for (long long i = 0; i < ge; ++i) s2 += (to_float(out[gs * ge + i]) - m) * (to_float(out[gs * ge + i]) - m);
    mean[gs] = m;
    var[gs] = s2 / ge;
    if (stats[3 * gs] != (float)ge) res_.stat_err = INFINITY;
    res_.stat_err = std::max(res_.stat_err, std::fabs(stats[3 * gs + 1] - m) / std::sqrt(var[gs]));
    res_.stat_err = std::max(res_.stat_err, std::fabs(stats[3 * gs + 2] / ge - var[gs]) / var[gs]);
  }
  // The norm reading them: GroupNorm + SiLU, two work splits per group, one partial.
  DeviceVec<T> gamma(C), beta(C), y(out.size());
  for (auto& v : gamma) v = from_float<T>(1.f + 0.3f * nd(rng));
  for (auto& v : beta) v = from_float<T>(0.3f * nd(rng));
  const float eps = 1e-5f;
  const int splits = 2, vec8 = hw % 8 == 0;
  const long long chunk = vec8 ? ((ge + splits - 1) / splits + 7) / 8 * 8 : (ge + splits - 1) / splits;
  emu::launch({(unsigned)(B * groups * splits), 1, 1}, 64, [&] {
    if constexpr (std::is_same<T, __half>::value)
      group_norm_apply_f16(out.data(), gamma.data(), beta.data(), stats.data(), 1, y.data(), ge, chunk, splits,
                           groups, cpg, hw, eps, 1, gamma.data(), gamma.data(), 0, 0, 0, 0, 0, 1, 1, OW, vec8);
    else
      group_norm_apply_bf16(out.data(), gamma.data(), beta.data(), stats.data(), 1, y.data(), ge, chunk, splits,
                            groups, cpg, hw, eps, 1, gamma.data(), gamma.data(), 0, 0, 0, 0, 0, 1, 1, OW, vec8);
  });
  double max_err = 0, max_ref = 0;
  for (int gs = 0; gs < B * groups; ++gs)
    for (long long i = 0; i < ge; ++i) {
      const int c = (int)((gs % groups) * cpg + i / hw);
      double v = (to_float(out[gs * ge + i]) - mean[gs]) / std::sqrt(var[gs] + eps) * to_float(gamma[c]) +
                 to_float(beta[c]);
      v = v / (1 + std::exp(-v));
      const double got = to_float(y[gs * ge + i]);
      if (std::isnan(got)) return {res_.wrong, INFINITY};
      max_err = std::max(max_err, std::fabs(got - v));
      max_ref = std::max(max_ref, std::fabs(v));
    }
  res_.stat_err = std::max(res_.stat_err, max_err / max_ref);
  return res_;
}

// cat_channels (group_norm.cu: the UNet's skip concatenation) against the concatenation,
// exactly, and with `groups` > 0 the statistics it leaves against the output's mean and
// variance in double (a group straddling the two inputs where C1 is not a multiple of the
// channels per group). Three splits per group, 64-thread blocks. Returns the wrong elements;
// `stat_err` the statistics' larger relative error.
template <typename T>
FinishResult cat_check(int B, int c1, int c2, int H, int W, int groups, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  const int C = c1 + c2, G = groups ? groups : 1, cpg = C / G;
  const long long hw = (long long)H * W, ge = (long long)cpg * hw;
  DeviceVec<T> a((size_t)B * c1 * hw), b((size_t)B * c2 * hw), out((size_t)B * C * hw, from_float<T>(NAN));
  for (auto& v : a) v = from_float<T>(2.f + nd(rng));
  for (auto& v : b) v = from_float<T>(-1.f + 0.5f * nd(rng));
  const int splits = 3, vec8 = hw % 8 == 0;
  const long long chunk = vec8 ? ((ge + splits - 1) / splits + 7) / 8 * 8 : (ge + splits - 1) / splits;
  const int per_group = groups ? splits : 0, blocks = B * G * splits;
  DeviceVec<float> stats(3 * (size_t)B * G, NAN), partial(3 * (size_t)blocks, NAN);
  DeviceVec<unsigned> done((size_t)B * G, 0u);
  emu::launch({(unsigned)blocks, 1, 1}, 64, [&] {
    if constexpr (std::is_same<T, __half>::value)
      cat_channels_f16(a.data(), b.data(), out.data(), c1, c2, hw, ge, chunk, splits, cpg, G, vec8, stats.data(),
                       partial.data(), done.data(), per_group);
    else
      cat_channels_bf16(a.data(), b.data(), out.data(), c1, c2, hw, ge, chunk, splits, cpg, G, vec8, stats.data(),
                        partial.data(), done.data(), per_group);
  });
  FinishResult r{0, 0.0};
  for (int bi = 0; bi < B; ++bi)
    for (int c = 0; c < C; ++c)
      for (long long p = 0; p < hw; ++p) {
        const T want = c < c1 ? a[((size_t)bi * c1 + c) * hw + p] : b[((size_t)bi * c2 + c - c1) * hw + p];
        r.wrong += memcmp(&want, &out[((size_t)bi * C + c) * hw + p], sizeof(T)) != 0;
      }
  if (!groups) return r;
  for (int gs = 0; gs < B * G; ++gs) {
    double s1 = 0, s2 = 0;
    for (long long i = 0; i < ge; ++i) s1 += to_float(out[gs * ge + i]);
    const double m = s1 / ge;
    for (long long i = 0; i < ge; ++i) s2 += (to_float(out[gs * ge + i]) - m) * (to_float(out[gs * ge + i]) - m);
    const double var = s2 / ge;
    if (stats[3 * gs] != (float)ge) r.stat_err = INFINITY;
    r.stat_err = std::max(r.stat_err, std::fabs(stats[3 * gs + 1] - m) / std::sqrt(var));
    r.stat_err = std::max(r.stat_err, std::fabs(stats[3 * gs + 2] / ge - var) / var);
  }
  return r;
}

}  // namespace

int main() {
  const Case cases[] = {
      {"3x3, no modulation, SiLU", 2, 8, 2, 6, 6, 3, 0, 0, 1, 6, 0, 1, 1},
      {"3x3, upsampled, scale-shift", 1, 8, 4, 4, 8, 3, 1, 1, 1, 4, 0, 1, 1},
      {"3x3, band of rows, spatial", 1, 4, 2, 4, 8, 3, 0, 2, 0, 8, 3, 4, 4},
      {"3x3, band of rows, spatial+SiLU", 2, 4, 1, 2, 8, 3, 0, 2, 1, 8, 6, 2, 4},
      {"1x1, no modulation, SiLU", 1, 4, 1, 5, 5, 1, 0, 0, 1, 5, 0, 1, 1},
  };
  // Both sides round the same value once (f32 vs double before it): at most one unit in the
  // last place of the largest, f16 5e-4, bf16 4e-3 (a 1 % error inside the SiLU fails).
  bool ok = true;
  uint32_t seed = 1;
  for (const Case& c : cases) {
    const double e16 = run<__half>(c, seed), ebf = run<__nv_bfloat16>(c, seed);
    ++seed;
    const bool pass = e16 <= 5e-4 && ebf <= 4e-3;
    ok &= pass;
    printf("conv_shift_norm  %-32s f16 %.2e  bf16 %.2e  %s\n", c.what, e16, ebf, pass ? "ok" : "FAIL");
    fflush(stdout);
  }
  // One line per case: both types' wrong elements and, where `stats` names them, the
  // statistics' error against its bars.
  auto report = [&](const char* kernel, const char* what, const FinishResult& r16, const FinishResult& rbf,
                    const char* stats, double bar16, double barbf) {
    const bool pass = r16.wrong == 0 && rbf.wrong == 0 && r16.stat_err <= bar16 && rbf.stat_err <= barbf;
    ok &= pass;
    printf("%-16s %-32s f16 %ld wrong  bf16 %ld wrong", kernel, what, r16.wrong, rbf.wrong);
    if (stats) printf("  %s f16 %.2e  bf16 %.2e", stats, r16.stat_err, rbf.stat_err);
    printf("  %s\n", pass ? "ok" : "FAIL");
    fflush(stdout);
  };
  struct FinishCase {
    const char* what;
    int b, c, oh, ow, wp, res_offset, res_rows, res_row0, bias, groups;
  };
  // Statistics: rows of 12 (5 blocks of one row per group), 4-row blocks (3 per group), and
  // 136 columns (64-thread rows, 4-row blocks, 6 per group); plus the crop alone.
  const FinishCase finishes[] = {
      {"12 of 16 columns, 4-wide, stats", 2, 3, 5, 12, 16, 0, 5, 0, 1, 3},
      {"odd width 10 of 16, scalar", 1, 2, 4, 10, 16, 0, 4, 0, 1, 0},
      {"residual one element off, scalar", 1, 2, 3, 8, 8, 1, 3, 0, 0, 0},
      {"2 channels per group, stats", 2, 8, 6, 12, 16, 0, 6, 0, 1, 4},
      {"136 wide, 4-row blocks, stats", 1, 4, 12, 136, 136, 0, 12, 0, 1, 2},
      {"residual: rows 3..8 of 11, 4-wide", 2, 3, 5, 12, 16, 0, 11, 3, 1, 0},
      {"residual: rows 2..6 of 9, scalar", 2, 2, 4, 10, 16, 1, 9, 2, 0, 0},
  };
  // The statistics are f32 Welford merges of the stored values: 1e-5 of the spread; the norm
  // reading them rounds once (f16 5e-4, bf16 4e-3, as above).
  for (const FinishCase& f : finishes) {
    const FinishResult r16 = finish<__half>(f.b, f.c, f.oh, f.ow, f.wp, f.res_offset, f.res_rows, f.res_row0, f.bias,
                                            f.groups, seed),
                       rbf = finish<__nv_bfloat16>(f.b, f.c, f.oh, f.ow, f.wp, f.res_offset, f.res_rows, f.res_row0,
                                                   f.bias, f.groups, seed);
    ++seed;
    report("conv_finish", f.what, r16, rbf, f.groups ? "stats+norm" : nullptr, 5e-4, 4e-3);
  }
  struct CatCase {
    const char* what;
    int b, c1, c2, h, w, groups;
  };
  const CatCase cats[] = {
      {"a group straddling, 8-wide, stats", 2, 5, 3, 4, 4, 4},
      {"15-pixel maps, scalar, stats", 1, 3, 3, 5, 3, 2},
      {"no statistics", 2, 4, 4, 4, 4, 0},
  };
  // The statistics are f32 Welford merges of the copied values: 1e-5 of the spread.
  for (const CatCase& c : cats) {
    const FinishResult r16 = cat_check<__half>(c.b, c.c1, c.c2, c.h, c.w, c.groups, seed),
                       rbf = cat_check<__nv_bfloat16>(c.b, c.c1, c.c2, c.h, c.w, c.groups, seed);
    ++seed;
    report("cat_channels", c.what, r16, rbf, c.groups ? "stats" : nullptr, 1e-5, 1e-5);
  }
  return ok ? 0 : 1;
}
