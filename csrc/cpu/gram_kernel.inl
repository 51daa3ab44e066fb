// ISA-generic packing + micro-kernel, compiled once per instruction set (gram_isa_*.cpp define
// RANKME_ISA_NS, RANKME_VL, RANKME_MR, RANKME_NJ before including this file). GCC/Clang vector
// extensions let one source lower to AVX-512, AVX2 or SSE2.
#include <cstdint>
#include <cstring>

#include "rankme/gram.h"
#include "gram_internal.h"

namespace rankme {
namespace RANKME_ISA_NS {

constexpr int VL = RANKME_VL;   // doubles per vector register
constexpr int MR = RANKME_MR;   // rows of a micro-tile (broadcast operand), divides kPanel
constexpr int NJ = RANKME_NJ;   // panels of columns of a micro-tile (vector operand)
constexpr int VPP = static_cast<int>(kPanel) / VL;  // vectors per panel row
typedef double vd __attribute__((vector_size(VL * sizeof(double))));

static inline vd load(const double* p) {
  vd v;
  std::memcpy(&v, p, sizeof(vd));
  return v;
}
static inline void store(double* p, vd v) { std::memcpy(p, &v, sizeof(vd)); }

// C[i0 + m, j0 + c] += sum_r I[r, m] * J[r, c] for m < MR, c < NJ*kPanel.
// ip points at row-offset m0 inside an i-panel (kPanel doubles per row), jp at the first j-panel;
// consecutive j-panels are pstride doubles apart.
template <int nj>
static inline void micro(const double* __restrict ip, const double* __restrict jp, int64_t pstride,
                         int64_t kc, double* __restrict c, int64_t ldc) {
  vd acc[MR][nj * VPP];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < nj * VPP; ++v) acc[m][v] = vd{} ;
  for (int64_t r = 0; r < kc; ++r) {
    vd b[nj * VPP];
    for (int q = 0; q < nj; ++q)
      for (int v = 0; v < VPP; ++v) b[q * VPP + v] = load(jp + q * pstride + r * kPanel + v * VL);
    const double* a = ip + r * kPanel;
    for (int m = 0; m < MR; ++m) {
      const double s = a[m];
      for (int v = 0; v < nj * VPP; ++v) acc[m][v] += s * b[v];
    }
  }
  for (int m = 0; m < MR; ++m) {
    double* row = c + m * ldc;
    for (int v = 0; v < nj * VPP; ++v) store(row + v * VL, load(row + v * VL) + acc[m][v]);
  }
}

// Upper-triangle tiles of one packed chunk for j-panels [jp0, jp1).
void tiles(const double* pack, int64_t kc, int64_t np, int64_t jp0, int64_t jp1, double* g, int64_t ldg) {
  const int64_t pstride = kc * kPanel;
  (void)np;
  // j-blocks sized to stay in L2 while every i-panel (L1) sweeps them.
  const int64_t jb = std::max<int64_t>(NJ, (int64_t(1) << 20) / (pstride * 8) / NJ * NJ);
  for (int64_t b0 = jp0; b0 < jp1; b0 += jb) {
    const int64_t b1 = std::min(jp1, b0 + jb);
    for (int64_t ipn = 0; ipn < b1; ++ipn) {
      const int64_t js = std::max(b0, ipn);  // upper triangle: j-panel >= i-panel
      if (js >= b1) continue;
      const double* ipan = pack + ipn * pstride;
      for (int64_t m0 = 0; m0 < kPanel; m0 += MR) {
        double* crow = g + (ipn * kPanel + m0) * ldg;
        int64_t j = js;
        for (; j + NJ <= b1; j += NJ)
          micro<NJ>(ipan + m0, pack + j * pstride, pstride, kc, crow + j * kPanel, ldg);
        for (; j < b1; ++j) micro<1>(ipan + m0, pack + j * pstride, pstride, kc, crow + j * kPanel, ldg);
      }
    }
  }
}

template <typename T>
static void pack_t(const GramArgs& a, int64_t r0, int64_t kc, int64_t p0, int64_t p1, double* pack,
                   double* colsum) {
  const T* x = static_cast<const T*>(a.x);
  const int64_t pstride = kc * kPanel;
  for (int64_t p = p0; p < p1; ++p) {
    double* dst = pack + p * pstride;
    const int64_t c0 = p * kPanel;
    const int64_t nc = std::min<int64_t>(kPanel, a.cols - c0);
    double cs[kPanel];
    double csh[kPanel];
    for (int c = 0; c < kPanel; ++c) {
      cs[c] = 0.0;
      csh[c] = (a.col_shift && c < nc) ? a.col_shift[c0 + c] : 0.0;
    }
    for (int64_t r = 0; r < kc; ++r) {
      const int64_t gr = r0 + r;
      const T* src = x + gr * a.stride_r + c0 * a.stride_c;
      const double rsh = a.row_shift ? a.row_shift[gr] : 0.0;
      double* d = dst + r * kPanel;
      if (nc == kPanel && a.stride_c == 1) {
        for (int c = 0; c < kPanel; ++c) d[c] = to_double(src[c]) - rsh - csh[c];
      } else {
        for (int c = 0; c < kPanel; ++c)
          d[c] = c < nc ? to_double(src[c * a.stride_c]) - rsh - csh[c] : 0.0;
      }
      for (int c = 0; c < kPanel; ++c) cs[c] += d[c];
    }
    if (colsum)
      for (int64_t c = 0; c < nc; ++c) colsum[c0 + c] += cs[c];
  }
}

void pack(const GramArgs& a, int64_t r0, int64_t kc, int64_t p0, int64_t p1, double* buf, double* colsum) {
  switch (a.dtype) {
    case DType::kFloat64: pack_t<double>(a, r0, kc, p0, p1, buf, colsum); break;
    case DType::kFloat32: pack_t<float>(a, r0, kc, p0, p1, buf, colsum); break;
    case DType::kFloat16: pack_t<Half>(a, r0, kc, p0, p1, buf, colsum); break;
    case DType::kBFloat16: pack_t<BFloat16>(a, r0, kc, p0, p1, buf, colsum); break;
  }
}

const KernelTable table = {&pack, &tiles};

}  // namespace RANKME_ISA_NS
}  // namespace rankme
