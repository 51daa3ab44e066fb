// gram_ab driver (build.sh says how to build and run it): OUT D N THREADS ROUNDS NV [CHUNK_ROWS...] alternates the
// variants' whole gram_update round by round on one N x D float32 matrix.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include "../ab_rounds.h"
extern "C" { double run_v0(const float*, long, long, int, double*, long, double*, long); double run_v1(const float*, long, long, int, double*, long, double*, long);
double run_v2(const float*, long, long, int, double*, long, double*, long); double run_v3(const float*, long, long, int, double*, long, double*, long); }
int main(int argc, char** argv) {
  long d = atol(argv[1]), n = atol(argv[2]); int nt = atoi(argv[3]), rounds = atoi(argv[4]), nv = atoi(argv[5]);
  long kcs[4] = {0, 0, 0, 0}; for (int k = 0; k < nv && 6 + k < argc; ++k) kcs[k] = atol(argv[6 + k]);
  double peak = getenv("PEAK") ? atof(getenv("PEAK")) : 58.3e9;
  float* x = (float*)aligned_alloc(64, (n * d * 4 + 63) / 64 * 64); ab::fill(x, n * d);
  long ldg = (d + 7) / 8 * 8; double* g = (double*)aligned_alloc(64, ldg * ldg * 8); double* cs = (double*)aligned_alloc(64, ldg * 8 + 64);
  double (*f[4])(const float*, long, long, int, double*, long, double*, long) = {run_v0, run_v1, run_v2, run_v3};
  std::vector<int> ord; for (int k = 0; k < nv; ++k) ord.push_back(k);
  auto e = ab::alternate(ord, rounds, nv, [&](int k) {
    memset(g, 0, ldg * ldg * 8); memset(cs, 0, ldg * 8);
    return double(n) * d * d / f[k](x, n, d, nt, g, ldg, cs, kcs[k]) / (peak * nt) * 100;
  });
  for (int k = 0; k < nv; ++k) { const ab::Summary s = ab::summarize(e[k], e[0]);
    printf("d=%ld n=%ld t=%d v%d median %.1f%% max %.1f%% ratio/v0 median %.3f [min %.3f max %.3f]\n", d, n, nt, k, s.median, s.max, s.ratio_median, s.ratio_min, s.ratio_max); }
}
