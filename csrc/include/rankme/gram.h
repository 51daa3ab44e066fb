// Framework-agnostic streaming Gram kernel: raw pointers, sizes, strides -> status.
// No torch / pybind11 headers here (STYLE.md 1).
#pragma once
#include <cstdint>

namespace rankme {

enum class DType : int { kFloat64 = 0, kFloat32 = 1, kFloat16 = 2, kBFloat16 = 3 };

enum Status : int {
  kOk = 0,
  kInvalidArgument = 1,
  kUnsupportedDtype = 2,
  kOutOfMemory = 3,
};

const char* status_string(int status);

// Panel width of the packed operand: the Gram buffer must be padded to a multiple of it.
constexpr int64_t kPanel = 8;
inline int64_t padded_size(int64_t n) { return (n + kPanel - 1) / kPanel * kPanel; }

// G += V^T V, where V[r, c] = (double)x[r*stride_r + c*stride_c] - row_shift[r] - col_shift[c]
// (either shift may be null), computed in float64 with the upcast fused into packing: no float64
// copy of x is ever made. Only the upper triangle (i <= j) of G is meaningful on return; entries of
// the 8x8 diagonal blocks below the diagonal are written too. G is row-major with leading dimension
// ldg >= padded_size(cols) and must have padded_size(cols) rows; its padding stays zero.
// col_sum (optional, length cols) gets += sum_r V[r, c].
// num_threads <= 0 means 1. Strides are in elements and may be negative.
struct GramArgs {
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
  int num_threads = 1;
  int64_t chunk_rows = 0;  // 0: choose automatically
};

Status gram_update(const GramArgs& args);

// Name of the instruction set the kernel dispatches to on this CPU ("avx512", "avx2", "generic").
const char* gram_isa();

// Whether this CPU and build can run the kernels of ``isa`` ("generic", "avx2", "avx512").
bool isa_supported(const char* isa);

}  // namespace rankme
