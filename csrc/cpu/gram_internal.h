// Shared between the per-ISA kernel translation units and the driver.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "rankme/gram.h"

namespace rankme {

struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

static inline double to_double(double v) { return v; }
static inline double to_double(float v) { return static_cast<double>(v); }
static inline double to_double(BFloat16 v) {
  const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
// IEEE binary16 -> double, exact (every half is representable), including subnormals, Inf, NaN.
static inline double to_double(Half v) {
  const uint32_t h = v.bits;
  const uint32_t sign = (h >> 15) & 1u, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  double r;
  if (exp == 0) {
    r = static_cast<double>(man) * (1.0 / 16777216.0);  // man * 2^-24
  } else if (exp == 31) {
    r = man ? __builtin_nan("") : __builtin_inf();
  } else {
    r = static_cast<double>(man | 0x400u) * static_cast<double>(int64_t(1) << exp) * (1.0 / 33554432.0);  // 2^-25
  }
  return sign ? -r : r;
}

using PackFn = void (*)(const GramArgs&, int64_t r0, int64_t kc, int64_t p0, int64_t p1, double* buf,
                        double* colsum);
using TilesFn = void (*)(const double* pack, int64_t kc, int64_t np, int64_t jp0, int64_t jp1, double* g,
                         int64_t ldg);
struct KernelTable {
  PackFn pack;
  TilesFn tiles;
};

// Fused normal operator blocks (normal_kernel.inl): kp = k padded to a multiple of 4 vectors' worth
// of lanes at most; vl_doubles tells the driver the vector width.
using NormalBlockF32 = void (*)(const float* p, int64_t b, int64_t cols, const float* w, int64_t kp, float* y,
                                float* acc);
using NormalBlockF64 = void (*)(const double* p, int64_t b, int64_t cols, const double* w, int64_t kp, double* y,
                                double* acc);
struct NormalTable {
  NormalBlockF32 f32;
  NormalBlockF64 f64;
  int vl_doubles;
};

namespace generic { extern const KernelTable table; extern const NormalTable normal_table; }
#if defined(RANKME_HAVE_X86_VARIANTS)
namespace avx2 { extern const KernelTable table; extern const NormalTable normal_table; }
namespace avx512 { extern const KernelTable table; extern const NormalTable normal_table; }
#endif

// The ISA chosen at run time for this CPU (gram.cpp), shared by both kernels.
const NormalTable& normal_kernels();

}  // namespace rankme
