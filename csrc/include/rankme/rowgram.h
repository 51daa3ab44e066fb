// Framework-agnostic batched "short-fat" Gram: for each of a batch of small items, the float64 Gram of
// the item's rows. Raw pointers, sizes, strides -> status; no torch / pybind11 headers (STYLE.md 1).
#pragma once
#include <cstdint>

#include "rankme/gram.h"  // DType, Status

namespace rankme {

// For item b (0 <= b < batch) with L = lengths[b] (n_max when lengths is null):
//   V[i, j] = (double)x[b*stride_b + i*stride_r + j*stride_c] - row_shift[b, i] - col_shift[b, j]
//   for i < L, j < dim (either shift may be null), and
//   gram[b*gram_stride_b + i*ldg + j] += (V V^T)[i, j]   for i, j < L   (both triangles)
//   row_sum[b*row_sum_stride_b + i]  += sum_j V[i, j]    for i < L      (row_sum may be null)
// in float64 with the upcast fused into the kernel (no float64 copy of x is made). Rows i >= L of an
// item are never read (a software prefetch may touch the cache lines just past a row: it cannot fault
// and nothing it fetches is used); entries of gram / row_sum outside [:L] are never written. Any element strides
// of x (in elements, possibly negative or zero); stride_c == 1 is the fast path. row_shift[b, i] is
// row_shift[b*row_shift_stride_b + i*row_shift_stride_r], col_shift[b, j] likewise.
// The gram blocks (and row_sum rows) of different items must not overlap.
//
// Threads: items are handed out dynamically (an atomic counter, biggest items first) to
// min(num_threads, items with L > 0) threads; each item is computed by one thread in a fixed order, so
// the result's bits depend neither on the thread count nor on which thread ran what. A batch smaller
// than the thread count runs on fewer threads (a single item is single-threaded).
// Summation: each item uses one of two kernels, chosen by L (both exact float64 FMA accumulation):
// short items dot products of row pairs with vectors along the features; longer ones the streaming
// Gram's panel micro-kernel over blocks of features. Each gram entry is a sum of d products in some
// fixed order.
//
// Status: kInvalidArgument for null / negative sizes, a null gram without logdet_out, ldg < n_max (gram non-null),
// a null logdet_info with logdet_out, a gram_stride_b that would make the
// blocks overlap (|gram_stride_b| < n_max*ldg when batch > 1), lengths outside [0, n_max] (checked for
// every item before anything is written); kUnsupportedDtype; kOutOfMemory when the per-thread scratch
// cannot be allocated (nothing is written then).
struct RowGramArgs {
  const void* x = nullptr;
  DType dtype = DType::kFloat32;
  int64_t batch = 0;
  int64_t n_max = 0;
  int64_t dim = 0;
  int64_t stride_b = 0;
  int64_t stride_r = 0;
  int64_t stride_c = 1;
  const int64_t* lengths = nullptr;  // contiguous, batch entries; null: all n_max
  const double* row_shift = nullptr;
  int64_t row_shift_stride_b = 0;
  int64_t row_shift_stride_r = 1;
  const double* col_shift = nullptr;
  int64_t col_shift_stride_b = 0;
  int64_t col_shift_stride_c = 1;
  double* gram = nullptr;
  int64_t gram_stride_b = 0;
  int64_t ldg = 0;
  double* row_sum = nullptr;
  int64_t row_sum_stride_b = 0;
  int num_threads = 1;  // <= 0 means 1
  // Tuning / test hooks: 0 = automatic. kernel: 1 forces the row-pair dot kernel, 2 the panel kernel.
  int64_t block_cols = 0;
  int kernel = 0;
  // Optional epilogue (the EigenScore / LLM-Check log-determinant), run by the item's thread right after its
  // Gram: with logdet_out non-null, for item b with its final L x L block G (gram[b] when gram is non-null,
  // else this call's own V V^T, and gram may then be null) and row sums r (this call's):
  //   M = G - logdet_scale * r r^T + logdet_ridge * I,  logdet_out[b] = ln det(M) / L  (Cholesky),
  //   logdet_info[b] = 0; = 2 with logdet_out[b] = NaN when a diagonal entry of G or an entry of r is not
  //   finite (checked first); = 1 with NaN when M is not numerically positive definite (a pivot <= 0 or NaN);
  //   items with L = 0 get 0 and info 0.
  double* logdet_out = nullptr;
  int64_t* logdet_info = nullptr;
  double logdet_scale = 0.0;
  double logdet_ridge = 0.0;
  // Optional: item b's rows start at item_x[b] (batch entries; x and stride_b are then unused, the row and
  // column strides are shared). Lets a ragged list of separately allocated items run in one call, uncopied.
  const void* const* item_x = nullptr;
};

Status row_gram_batch(const RowGramArgs& args);

}  // namespace rankme
