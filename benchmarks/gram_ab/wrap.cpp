// One variant of gram_update for gram_ab (build.sh compiles it once per tree, with -Drankme=rvN -DWRAPNAME=run_vN):
// times one call on a row-major float32 matrix.
#include <chrono>
#include "rankme/gram.h"
extern "C" double WRAPNAME(const float* x, long n, long d, int nt, double* g, long ldg, double* cs, long kc) {
  rankme::GramArgs a; a.x = x; a.dtype = rankme::DType::kFloat32; a.rows = n; a.cols = d; a.stride_r = d; a.stride_c = 1;
  a.gram = g; a.ldg = ldg; a.col_sum = cs; a.num_threads = nt; if (kc) a.chunk_rows = kc;
  auto t0 = std::chrono::steady_clock::now();
  rankme::gram_update(a);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
