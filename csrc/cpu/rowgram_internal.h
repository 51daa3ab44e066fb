// Shared between the per-ISA row-Gram kernels (rowgram_kernel.inl, compiled once per instruction set
// through gram_isa_*.cpp) and their driver (rowgram.cpp).
#pragma once
#include <cstdint>

#include "gram_internal.h"
#include "rankme/rowgram.h"

namespace rankme {

// One item as the kernels see it: rows [0, rows) of a (rows, cols) matrix with element strides, already
// offset to the item; row_shift (rows) and col_shift (cols) contiguous or null. The streaming Gram's
// argument block (its gram / ldg / col_sum / threads fields are unused here).
using RowItem = GramArgs;

// Software prefetch of the next item's rows (into L2), spread over the current item's work. Rows of short
// items are too short a run for the hardware prefetchers to get up to speed, and bursts of hundreds of lines
// between slices overflow the miss queues (10,000 items of 10 x 4096 bf16, one thread on Zen 4: 143 ms with
// a burst per slice, 123 ms spread). When the next item is one contiguous run (cur < end), the dot kernel's
// fast loops prefetch per_iter lines of it per group of 8 features they sweep, keeping cur in a register;
// the driver's step(n) covers the rest (and strided items) per slice.
struct RowPrefetch {
  const char* base = nullptr;
  int64_t rows = 0, row_bytes = 0, stride_bytes = 0;
  int64_t row = 0, off = 0;
  const char* cur = nullptr;  // the contiguous run's next line and its end (null: not contiguous)
  const char* end = nullptr;
  int64_t per_iter = 0;  // lines per kernel step (0: the kernels do not prefetch)
  int64_t lines() const { return base ? rows * ((row_bytes + 63) / 64) : 0; }
  void step(int64_t n) {
    if (cur) {
      for (; n > 0 && cur < end; --n, cur += 64) __builtin_prefetch(cur, 0, 2);
      return;
    }
    for (; n > 0 && row < rows; --n) {
      __builtin_prefetch(base + row * stride_bytes + off, 0, 2);
      off += 64;
      if (off >= row_bytes) { off = 0; ++row; }
    }
  }
};

using RowFusedFn = void (*)(const RowItem& it, int64_t f0, int64_t w, double* vacc, double* rsum, RowPrefetch* pf);
// Features [f0, f0 + w) packed as the Gram kernel's panels (panel p, feature f, lane m =
// V[8p + m, f0 + f]; lanes of rows >= rows are zero), row_sum[i] += sum of the row's w values.
using RowPackFn = void (*)(const RowItem& it, int64_t f0, int64_t w, double* pack, double* row_sum);

// Blocked Cholesky of the log-determinant epilogue (rowgram_kernel.inl, chol_neg): w holds -M in the upper
// triangle of an L x L matrix at row stride ldw (a multiple of 8; columns [L, round_up(L, 8)) zero), pack has room
// for kCholBlockRows x ldw doubles; writes the pivots to piv and returns L, or the first pivot that is not > 0.
using RowCholFn = int64_t (*)(double* w, int64_t ldw, int64_t L, double* pack, double* piv);
constexpr int64_t kCholBlockRows = 32;  // rows per block of chol_neg (the caller sizes pack by it)

struct RowGramTable {
  RowFusedFn fused;
  RowPackFn pack;
  TilesFn tiles;  // the streaming Gram's upper-triangle tiles (gram_kernel.inl)
  RowCholFn chol;
  int vl_doubles;
};

namespace generic { extern const RowGramTable rowgram_table; }
#if defined(RANKME_HAVE_X86_VARIANTS)
namespace avx2 { extern const RowGramTable rowgram_table; }
namespace avx512 { extern const RowGramTable rowgram_table; }
#endif

}  // namespace rankme
