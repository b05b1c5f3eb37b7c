// The tiled transpose (+ addend) of transpose.cu (opt-in KANDINSKY_TILED_TRANSPOSE=1) under
// the host emulation, against the element-by-element definition: it must be exact (a copy,
// or one rounding of a sum that is exact in f32). Shapes with partial tiles on both sides
// and a second batch element. Exit status 1 on any difference. See check.sh.
#include <warp_emu.h>

#include <cstdio>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

#include "emu_types.h"
#include "transpose.cu"

namespace {

template <typename T>
long run(int B, int M, int N, bool add, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<T> x((size_t)B * M * N), y(x.size()), out(x.size(), from_float<T>(NAN));
  for (auto& e : x) e = from_float<T>(nd(rng));
  for (auto& e : y) e = from_float<T>(nd(rng));
  emu::launch({(unsigned)((N + 31) / 32), (unsigned)((M + 31) / 32), (unsigned)B}, 256, [&] {
    if constexpr (std::is_same<T, __half>::value) transpose_add_f16(x.data(), y.data(), out.data(), M, N, add);
    else transpose_add_bf16(x.data(), y.data(), out.data(), M, N, add);
  });
  long wrong = 0;
  for (int b = 0; b < B; ++b)
    for (int n = 0; n < N; ++n)
      for (int m = 0; m < M; ++m) {
        const size_t o = ((size_t)b * N + n) * M + m;
        float want = to_float(x[((size_t)b * M + m) * N + n]);
        if (add) want += to_float(y[o]);
        const T w = from_float<T>(want);
        wrong += memcmp(&w, &out[o], sizeof(T)) != 0;
      }
  return wrong;
}

}  // namespace

int main() {
  struct Case {
    int b, m, n;
    bool add;
  };
  const Case cases[] = {{2, 40, 70, false}, {2, 70, 40, true}, {1, 32, 64, true}};
  bool ok = true;
  uint32_t seed = 5;
  for (const Case& c : cases) {
    const long w16 = run<__half>(c.b, c.m, c.n, c.add, seed), wbf = run<__nv_bfloat16>(c.b, c.m, c.n, c.add, seed);
    ++seed;
    const bool pass = w16 == 0 && wbf == 0;
    ok &= pass;
    printf("transpose_add    [%d, %d, %d]%-10s f16 %ld wrong  bf16 %ld wrong  %s\n", c.b, c.m, c.n,
           c.add ? " + addend" : "", w16, wbf, pass ? "ok" : "FAIL");
    fflush(stdout);
  }
  return ok ? 0 : 1;
}
