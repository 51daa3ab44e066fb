// Framework-agnostic CUDA Gram kernels: raw device pointers, sizes, strides, a stream -> status.
// No torch / pybind11 headers here (STYLE.md 1).
#pragma once
#include <cstdint>

#include "rankme/gram.h"

namespace rankme {

enum class CudaGramMode : int {
  kExactFp64 = 0,  // float64 tiles, DMMA (wmma m8n8k4 double): every product and sum in float64
  kFast = 1,       // bf16/fp16 tensor cores as given (unshifted) or 3xTF32, fp32 accumulators
                   // flushed into float64 every kFastFold row blocks
};

constexpr int kCudaTile = 64;      // output tile BM = BN; the Gram buffer is padded to a multiple
constexpr int kCudaFastFold = 16;  // row blocks per fp32 accumulation segment in fast mode

inline int64_t cuda_padded_size(int64_t n) { return (n + kCudaTile - 1) / kCudaTile * kCudaTile; }

// G[tile (tile_i[t], tile_j[t])] += V[:, I]^T V[:, J] for the n_tiles listed tiles (callers list the
// upper triangle, tile_i <= tile_j), V[r, c] = (double)x[r*stride_r + c*stride_c] - row_shift[r]
// - col_shift[c] (either shift may be null). Rows are split into `splits` ranges of rows_per_split
// rows; each (tile, split) block writes its float64 partial to `workspace`
// (splits * n_tiles * kCudaTile^2 doubles) and a second kernel sums the partials in a fixed order
// into G (deterministic). col_sum (optional, length cols) += sum_r V[r, c], reduced through
// `col_workspace` (splits * cols doubles; needed only with col_sum). G is row-major, ldg >=
// cuda_padded_size(cols), with cuda_padded_size(cols) rows. `scale` (a power of two) multiplies V
// before the fast mode's fp32 products and is divided out in float64. `stream` is a cudaStream_t.
struct CudaGramArgs {
  const void* x = nullptr;
  DType dtype = DType::kFloat32;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t stride_r = 0;
  int64_t stride_c = 1;
  const double* row_shift = nullptr;
  const double* col_shift = nullptr;
  double* gram = nullptr;
  int64_t ldg = 0;
  double* col_sum = nullptr;
  const int32_t* tile_i = nullptr;
  const int32_t* tile_j = nullptr;
  int n_tiles = 0;
  int splits = 1;
  int64_t rows_per_split = 0;
  double* workspace = nullptr;
  double* col_workspace = nullptr;
  CudaGramMode mode = CudaGramMode::kExactFp64;
  double scale = 1.0;
  void* stream = nullptr;
};

// Returns kOk, kInvalidArgument / kUnsupportedDtype for bad arguments, or 100 + cudaError_t when a
// launch fails.
int cuda_gram_update(const CudaGramArgs& args);

}  // namespace rankme
