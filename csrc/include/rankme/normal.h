// Framework-agnostic fused normal operator: raw pointers, sizes, strides -> status (STYLE.md 1).
#pragma once
#include <cstdint>

#include "rankme/gram.h"

namespace rankme {

// out (cols x k, row-major float64) += V^T (V W), V[r, c] = (double)x[r*stride_r + c*stride_c] -
// col_shift[c] (col_shift may be null), W (cols x k, row-major float64): the normal operator
// G W = X^T (X W) of the (shifted) data, reading X once: each block of rows (kNormalBlockBytes of
// packed values, 16..kNormalBlockRows rows) is upcast and packed into a cache-resident buffer,
// multiplied by W, and its transpose applied to the product while it is still in cache. single_precision: the block products run in float32 (float32 sums over at most
// kNormalBlockRows rows), the sums over blocks in float64; otherwise everything is float64.
struct NormalArgs {
  const void* x = nullptr;
  DType dtype = DType::kFloat32;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t stride_r = 0;
  int64_t stride_c = 1;
  const double* col_shift = nullptr;
  const double* w = nullptr;
  int64_t k = 0;
  double* out = nullptr;
  bool single_precision = true;
  int num_threads = 1;
};

constexpr int64_t kNormalBlockRows = 256;
// bytes of the packed row block per thread (it must stay in cache between the block's two products)
constexpr int64_t kNormalBlockBytes = int64_t(2) << 20;

Status normal_apply(const NormalArgs& args);

// *out = sum over rows and columns of V[r, c]^2 in float64 (V as above; w, k, single_precision unused):
// tr(V^T V), one pass over X. Rows are split across threads in a fixed order, so the result depends on
// num_threads only (or the fewer threads the system let start). Non-finite input gives a non-finite sum.
Status sum_squares(const NormalArgs& args, double* out);

}  // namespace rankme
