// ISA-generic packing + micro-kernel, compiled once per instruction set (gram_isa_*.cpp define
// RANKME_ISA_NS, RANKME_VL, RANKME_MR, RANKME_NJ before including this file). GCC/Clang vector
// extensions let one source lower to AVX-512, AVX2 or SSE2.
#include <cstdint>
#include <cstring>
#include <unistd.h>

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

// AVX2 (16 vector registers): MR=4 rows x 3 column vectors (12 columns, which may straddle two j-panels)
// = 12 accumulators + 3 + 1 operands, where the 4 x 1-panel tile of micro<1> has only 8 accumulators —
// too few to cover the FMA latency on two pipes. bq: the 3 vectors' packed columns (advancing kPanel per
// row r), cq: their columns in C.
static inline void micro43(const double* __restrict ip, const double* __restrict b0, const double* __restrict b1,
                           const double* __restrict b2, int64_t kc, double* c0, double* c1, double* c2,
                           int64_t ldc) {
  vd acc[4][3];
  for (int m = 0; m < 4; ++m)
    for (int v = 0; v < 3; ++v) acc[m][v] = vd{};
  for (int64_t r = 0; r < kc; ++r) {
    const vd x0 = load(b0 + r * kPanel), x1 = load(b1 + r * kPanel), x2 = load(b2 + r * kPanel);
    const double* a = ip + r * kPanel;
    for (int m = 0; m < 4; ++m) {
      const double s = a[m];
      acc[m][0] += s * x0;
      acc[m][1] += s * x1;
      acc[m][2] += s * x2;
    }
  }
  double* cs[3] = {c0, c1, c2};
  for (int m = 0; m < 4; ++m)
    for (int v = 0; v < 3; ++v) {
      double* p = cs[v] + m * ldc;
      store(p, load(p) + acc[m][v]);
    }
}

// AVX2 blocking (measured on Zen 4 with the AVX2 build forced, 9 interleaved rounds of `tiles` on one
// 512-row chunk, % of the FMA peak at d = 256 / 1024 / 2048 / 4096): the 4 x 12 tile reuses each j-panel row
// for only 4 i-rows, so the j-panels stream from L2 twice as often per FMA as with AVX-512's 8 x 24 tile
// and the sweep was L2-bound: 85 / 80 / 74 / 68 % with 1 MiB j-blocks over the whole chunk. Now k-blocks
// of kAvx2KBlock rows (an i-panel's slice is 8 KiB and a 3-panel j-slice 24 KiB: both stay in L1 while the
// two 4-row halves of the i-panel run back to back on the same j-slice) and j-blocks of 3/4 of L2 (768 KiB
// here): 90 / 86 / 79 / 78 %. The accumulation order is fixed by kc alone (k-blocks of the chunk in order),
// so the bits do not depend on the threads' j split.
constexpr int64_t kAvx2KBlock = 128;
// Lines of the next i-slice prefetched per j-triple (a k-block's slice is kAvx2KBlock lines, so 8 triples cover it).
constexpr int kIPrefetchLines = 16;
// j-block bytes: 3/4 of L2 for the AVX2 sweep (see above), 1 MiB for the 8-row tiles.
static int64_t jblock_bytes() {
#if RANKME_VL == 4
  static const int64_t b = [] {
    int64_t l2 = 0;
#if defined(_SC_LEVEL2_CACHE_SIZE)
    l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    if (l2 <= 0) l2 = int64_t(1) << 20;
    return std::min<int64_t>(int64_t(3) << 19, std::max<int64_t>(int64_t(1) << 18, l2 / 4 * 3));
  }();
  return b;
#else
  return int64_t(1) << 20;
#endif
}

[[maybe_unused]] static void tiles_avx2(const double* pack, int64_t kc, int64_t jp0, int64_t jp1, double* g, int64_t ldg) {
  const int64_t pstride = kc * kPanel;
  const int64_t jb = std::max<int64_t>(3, jblock_bytes() / (pstride * 8) / 3 * 3);
  for (int64_t b0 = jp0; b0 < jp1; b0 += jb) {
    const int64_t b1 = std::min(jp1, b0 + jb);
    for (int64_t ipn = 0; ipn < b1; ++ipn) {
      const int64_t js = std::max(b0, ipn);  // upper triangle: j-panel >= i-panel
      if (js >= b1) continue;
      for (int64_t k0 = 0; k0 < kc; k0 += kAvx2KBlock) {
        const int64_t kk = std::min(kAvx2KBlock, kc - k0);
        const double* ik = pack + ipn * pstride + k0 * kPanel;
        // The i-slice the next k-block broadcasts from (this panel's next slice, else the next panel's first),
        // kIPrefetchLines lines per j-triple: once the packed chunk (512 x d doubles) outgrows L2 that slice
        // comes from L3 or DRAM and its first broadcasts stalled the tiles (sweep alone at d = 1024 / 2048:
        // +1-5 %, whole gram_update +3 % on one thread; see RESULTS.md, issue 17).
        const double* inext = nullptr;
        int64_t nnext = 0;
        if (k0 + kAvx2KBlock < kc) {
          inext = ik + kAvx2KBlock * kPanel;
          nnext = std::min(kAvx2KBlock, kc - k0 - kAvx2KBlock);
        } else if (ipn + 1 < b1) {
          inext = pack + (ipn + 1) * pstride;
          nnext = std::min(kAvx2KBlock, kc);
        }
        int64_t ipf = 0;
        int64_t j = js;
        for (; j + 3 <= b1; j += 3) {  // 3 panels = 6 vectors = two 4 x 3-vector tiles, for each 4-row half
          const double* jb3 = pack + j * pstride + k0 * kPanel;
          for (int q = 0; q < kIPrefetchLines && ipf < nnext; ++q, ++ipf) __builtin_prefetch(inext + ipf * kPanel);
          for (int64_t m0 = 0; m0 < kPanel; m0 += 4) {
            double* cj = g + (ipn * kPanel + m0) * ldg + j * kPanel;
            micro43(ik + m0, jb3, jb3 + VL, jb3 + pstride, kk, cj, cj + VL, cj + kPanel, ldg);
            micro43(ik + m0, jb3 + pstride + VL, jb3 + 2 * pstride, jb3 + 2 * pstride + VL, kk, cj + kPanel + VL,
                    cj + 2 * kPanel, cj + 2 * kPanel + VL, ldg);
          }
        }
        for (; j < b1; ++j)
          for (int64_t m0 = 0; m0 < kPanel; m0 += MR)
            micro<1>(ik + m0, pack + j * pstride + k0 * kPanel, pstride, kk, g + (ipn * kPanel + m0) * ldg + j * kPanel,
                     ldg);
      }
    }
  }
}

// Upper-triangle tiles of one packed chunk for j-panels [jp0, jp1).
void tiles(const double* pack, int64_t kc, int64_t np, int64_t jp0, int64_t jp1, double* g, int64_t ldg) {
  const int64_t pstride = kc * kPanel;
  (void)np;
  if constexpr (VL == 4 && MR == 4 && NJ == 3) {
    tiles_avx2(pack, kc, jp0, jp1, g, ldg);
    return;
  }
  // j-blocks sized to stay in L2 while every i-panel (L1) sweeps them.
  const int64_t jb = std::max<int64_t>(NJ, jblock_bytes() / (pstride * 8) / NJ * NJ);
  for (int64_t b0 = jp0; b0 < jp1; b0 += jb) {
    const int64_t b1 = std::min(jp1, b0 + jb);
    for (int64_t ipn = 0; ipn < b1; ++ipn) {
      const int64_t js = std::max(b0, ipn);  // upper triangle: j-panel >= i-panel
      if (js >= b1) continue;
      const double* ipan = pack + ipn * pstride;
      // The next i-panel into L2, spread over this panel's micro-tiles: once the packed chunk outgrows L2 each
      // i-panel came from L3 or DRAM on demand (sweep alone at d = 2048 +2-3 %, d = 1024 neutral; RESULTS.md,
      // issue 17).
      const double* inext = ipn + 1 < b1 ? ipan + pstride : nullptr;
      const int64_t ncalls = std::max<int64_t>(1, (b1 - js) / NJ * (kPanel / MR));
      const int64_t per_call = (kc + ncalls - 1) / ncalls;
      int64_t ipf = 0;
      for (int64_t m0 = 0; m0 < kPanel; m0 += MR) {
        double* crow = g + (ipn * kPanel + m0) * ldg;
        int64_t j = js;
        for (; j + NJ <= b1; j += NJ) {
          if (inext)
            for (int64_t q = 0; q < per_call && ipf < kc; ++q, ++ipf) __builtin_prefetch(inext + ipf * kPanel, 0, 2);
          micro<NJ>(ipan + m0, pack + j * pstride, pstride, kc, crow + j * kPanel, ldg);
        }
        if (NJ >= 3 && VL == 8 && j + 2 <= b1) {  // (AVX2: a 4 x 2-panel tile would spill)
          micro<2>(ipan + m0, pack + j * pstride, pstride, kc, crow + j * kPanel, ldg);
          j += 2;
        }
        for (; j < b1; ++j) micro<1>(ipan + m0, pack + j * pstride, pstride, kc, crow + j * kPanel, ldg);
      }
    }
  }
}

// Eight doubles of one panel row, whatever the register width: the compiler splits it as needed.
typedef double p8d __attribute__((vector_size(8 * sizeof(double))));
typedef float p8f __attribute__((vector_size(8 * sizeof(float))));
typedef uint16_t p8h __attribute__((vector_size(8 * sizeof(uint16_t))));
typedef uint32_t p8u __attribute__((vector_size(8 * sizeof(uint32_t))));

// Upcast 8 contiguous values to doubles; vectorised for double, float and bfloat16, exact for all.
static inline p8d load8(const double* s) { p8d v; std::memcpy(&v, s, sizeof v); return v; }
static inline p8d load8(const float* s) { p8f v; std::memcpy(&v, s, sizeof v); return __builtin_convertvector(v, p8d); }
static inline p8d load8(const BFloat16* s) {
  p8h h; std::memcpy(&h, s, sizeof h);
  const p8u u = __builtin_convertvector(h, p8u) << 16;
  p8f f; std::memcpy(&f, &u, sizeof f);
  return __builtin_convertvector(f, p8d);
}
static inline p8d load8(const Half* s) {
  p8d v;
  for (int c = 0; c < 8; ++c) v[c] = to_double(s[c]);
  return v;
}

// Four contiguous values upcast to a 4-wide vector (AVX2 packing), exact for all dtypes.
typedef float p4f __attribute__((vector_size(4 * sizeof(float))));
typedef uint16_t p4h __attribute__((vector_size(4 * sizeof(uint16_t))));
typedef uint32_t p4u __attribute__((vector_size(4 * sizeof(uint32_t))));
typedef double v4d __attribute__((vector_size(4 * sizeof(double))));
static inline vd as_vd(v4d x) { vd v; std::memcpy(&v, &x, sizeof v < sizeof x ? sizeof v : sizeof x); return v; }
static inline vd load4(const double* s) { v4d v; std::memcpy(&v, s, sizeof v); return as_vd(v); }
static inline vd load4(const float* s) { p4f v; std::memcpy(&v, s, sizeof v); return as_vd(__builtin_convertvector(v, v4d)); }
static inline vd load4(const BFloat16* s) {
  p4h h; std::memcpy(&h, s, sizeof h);
  const p4u u = __builtin_convertvector(h, p4u) << 16;
  p4f f; std::memcpy(&f, &u, sizeof f);
  return as_vd(__builtin_convertvector(f, v4d));
}
static inline vd load4(const Half* s) {
  v4d v;
  for (int c = 0; c < 4; ++c) v[c] = to_double(s[c]);
  return as_vd(v);
}

// One load per cache line of the chunk's rows [r0, r0 + kc), columns of panels [p0, p1), in address order,
// before the pack reads them a panel at a time: the hardware prefetchers then stream them in at the
// sequential rate and the panel passes hit the cache (reading the rows a panel at a time straight from
// DRAM runs at ~7 GB/s on Zen 4, where a sequential read runs at ~20). Measured on Zen 4, float32, the whole
// gram_update, 3 alternated pairs each, % of the FMA peak without -> with: d = 128 74 -> 80 (1 thread),
// 71 -> 77 (2); d = 256 83 -> 86, 80 -> 84; d = 512 87 -> 87, 83 -> 85; d = 1024 neutral on 1 thread and a
// point worse on 2 (the pack is ~3 % of the time there), so only up to kTouchMaxCols columns.
// Contiguous columns only.
constexpr int64_t kTouchMaxCols = 512;
template <typename T>
static void touch_rows(const GramArgs& a, int64_t r0, int64_t kc, int64_t p0, int64_t p1) {
  if (a.stride_c != 1 || a.cols > kTouchMaxCols) return;
  const int64_t c0 = p0 * kPanel, c1 = std::min<int64_t>(p1 * kPanel, a.cols);
  if (c1 <= c0) return;
  const T* x = static_cast<const T*>(a.x);
  uint64_t sink = 0;
  for (int64_t r = 0; r < kc; ++r) {
    const T* row = x + (r0 + r) * a.stride_r;
    // one byte of every cache line that the row's [c0, c1) touches
    const char* lo = reinterpret_cast<const char*>(row + c0);
    const uintptr_t first = reinterpret_cast<uintptr_t>(lo) & ~uintptr_t(63);
    for (uintptr_t ln = first; ln < reinterpret_cast<uintptr_t>(row + c1); ln += 64) {
      const char* e = reinterpret_cast<const char*>(ln);
      sink += static_cast<unsigned char>(*(e < lo ? lo : e));  // one byte inside [row + c0, row + c1)
    }
  }
  asm volatile("" : : "r"(sink));
}

template <typename T>
static void pack_t(const GramArgs& a, int64_t r0, int64_t kc, int64_t p0, int64_t p1, double* __restrict pack,
                   double* colsum) {
  static_assert(kPanel == 8, "pack assumes 8-wide panels");
  const T* x = static_cast<const T*>(a.x);
  const int64_t pstride = kc * kPanel;
  touch_rows<T>(a, r0, kc, p0, p1);
  for (int64_t p = p0; p < p1; ++p) {
    double* __restrict dst = pack + p * pstride;
    const int64_t c0 = p * kPanel;
    const int64_t nc = std::min<int64_t>(kPanel, a.cols - c0);
    p8d csh = {0, 0, 0, 0, 0, 0, 0, 0};
    if (a.col_shift)
      for (int64_t c = 0; c < nc; ++c) csh[c] = a.col_shift[c0 + c];
    p8d cs = {0, 0, 0, 0, 0, 0, 0, 0};
    const T* src = x + r0 * a.stride_r + c0 * a.stride_c;
    if (nc == kPanel && a.stride_c == 1 && VL == 4) {
      // 16 ymm registers: two 4-wide halves (GCC keeps a 64-byte vector of an AVX2 build in memory, with
      // a store and reload of every piece)
      vd c0, c1, s0 = vd{}, s1 = vd{};
      std::memcpy(&c0, &csh, sizeof c0);
      std::memcpy(&c1, reinterpret_cast<const char*>(&csh) + sizeof c0, sizeof c1);
      for (int64_t r = 0; r < kc; ++r, src += a.stride_r) {
        vd v0 = load4(src) - c0, v1 = load4(src + 4) - c1;
        if (a.row_shift) {
          v0 -= a.row_shift[r0 + r];
          v1 -= a.row_shift[r0 + r];
        }
        store(dst + r * kPanel, v0);
        store(dst + r * kPanel + 4, v1);
        s0 += v0;
        s1 += v1;
      }
      std::memcpy(&cs, &s0, sizeof s0);
      std::memcpy(reinterpret_cast<char*>(&cs) + sizeof s0, &s1, sizeof s1);
    } else if (nc == kPanel && a.stride_c == 1) {
      for (int64_t r = 0; r < kc; ++r, src += a.stride_r) {
        p8d v = load8(src) - csh;
        if (a.row_shift) v -= a.row_shift[r0 + r];
        std::memcpy(dst + r * kPanel, &v, sizeof v);
        cs += v;
      }
    } else {
      for (int64_t r = 0; r < kc; ++r, src += a.stride_r) {
        p8d v = {0, 0, 0, 0, 0, 0, 0, 0};
        const double rsh = a.row_shift ? a.row_shift[r0 + r] : 0.0;
        for (int64_t c = 0; c < nc; ++c) v[c] = to_double(src[c * a.stride_c]) - rsh - csh[c];
        std::memcpy(dst + r * kPanel, &v, sizeof v);
        cs += v;
      }
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

extern const KernelTable table = {&pack, &tiles};

}  // namespace RANKME_ISA_NS
}  // namespace rankme
