// Same-process A/B of exact-Gram tile variants (issue 17); built by build.sh next to this file, which says how.
// tiles_ab D REPS ROUNDS NVARIANTS: pack + tiles on one packed 512-row chunk, variants v0..v{N-1} and the AVX-512 kernel, alternated
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include "../ab_rounds.h"
#include "rankme/gram.h"
#include "gram_internal.h"
namespace rankme { namespace v0 { extern const KernelTable table; } namespace v1 { extern const KernelTable table; }
namespace v2 { extern const KernelTable table; } namespace v3 { extern const KernelTable table; } }
using namespace rankme;
int main(int argc, char** argv) {
  int64_t d = atoi(argv[1]); int reps = atoi(argv[2]); int rounds = atoi(argv[3]); int nv = atoi(argv[4]); int64_t kc = 512;
  int64_t np = (d + 7) / 8, cp = np * 8;
  float* x = (float*)aligned_alloc(64, kc * d * 4); ab::fill(x, kc * d);
  double* pk = (double*)aligned_alloc(64, (kc + 2) * cp * 8); double* g = (double*)aligned_alloc(64, cp * cp * 8); memset(g, 0, cp * cp * 8);
  GramArgs a; memset(&a, 0, sizeof a); a.x = x; a.dtype = DType::kFloat32; a.rows = kc; a.cols = d; a.stride_r = d; a.stride_c = 1; a.gram = g; a.ldg = cp;
  const KernelTable* T[5] = {&v0::table, &v1::table, &v2::table, &v3::table, &avx512::table};
  const char* nm[5] = {"v0", "v1", "v2", "v3", "z512"};
  std::vector<int> ks; for (int k = 0; k < nv; ++k) ks.push_back(k); ks.push_back(4);
  auto res = ab::alternate(ks, rounds, 5, [&](int k) {
    T[k]->pack(a, 0, kc, 0, np, pk, nullptr);
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) T[k]->tiles(pk, kc, np, 0, np, g, cp);
    double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return double(reps) * kc * d * (d + 8) / 2 / t / 29.2e9 * 100;
  });
  for (int k : ks) {
    const ab::Summary s = ab::summarize(res[k], res[0]);
    printf("d=%ld %-5s median %.1f%% max %.1f%%  ratio/v0 median %.3f\n", (long)d, nm[k], s.median, s.max, s.ratio_median);
  }
}
