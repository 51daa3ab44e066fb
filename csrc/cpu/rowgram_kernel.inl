// Per-ISA kernels of the batched row Gram (rowgram.cpp drives them). Included by gram_isa_*.cpp after
// gram_kernel.inl, in the same namespace: it reuses that file's vector type `vd`, load/store, the
// upcasting load8 overloads and the panel micro-kernel `tiles`.
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "gram_internal.h"
#include "rowgram_internal.h"

// Helpers taking or returning 64-byte vectors are always inlined: a call would pass them in memory
// (and, under LTO, trip -Wpsabi) in the AVX2 / generic builds.
#ifndef RANKME_RG_INLINE
#define RANKME_RG_INLINE static inline __attribute__((always_inline))
#endif

namespace rankme {
namespace RANKME_ISA_NS {
namespace rowgram {

// Rows of a register tile of the dot kernel: 5x5 = 25 accumulators + 5 + 1 operands fit in the 32 zmm
// registers (10 rows = 2 tiles of 5: 20 loads per 55 FMAs, measured 10% faster than 4x4 tiles);
// 3x3 = 9 + 3 + 1 in 16 ymm / xmm registers.
constexpr int RT = VL >= 8 ? 5 : 3;
// Software prefetch distance along a row (bytes): rows of short items are too short a run for the
// hardware prefetchers to ramp up (measured 14 -> 11 us per 10 x 4096 bf16 item at 4 KiB).
constexpr int kPrefetchBytes = 4096;

typedef int32_t p8i __attribute__((vector_size(8 * sizeof(int32_t))));
typedef uint64_t p8q __attribute__((vector_size(8 * sizeof(uint64_t))));
typedef int64_t p8l __attribute__((vector_size(8 * sizeof(int64_t))));

// A double-typed unaligned vector store: memcpy would be a char store, which may alias anything (the
// compiler then reloads every pointer it holds in memory, e.g. a lambda's captures, after each store;
// measured 3.2 -> 2.5 cycles per group of 8 in an L1-resident conversion).
typedef double p8du __attribute__((vector_size(8 * sizeof(double)), aligned(8)));
RANKME_RG_INLINE void store8(double* p, p8d v) { *reinterpret_cast<p8du*>(p) = v; }
RANKME_RG_INLINE double sum8(p8d v) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

// Exact IEEE binary16 -> double for 8 values, vectorised and immune to DAZ/FTZ (every intermediate is
// an integer or a normal power of two): |h| = mant * 2^(max(e,1) - 25), Inf/NaN patched in, sign ORed.
RANKME_RG_INLINE p8d cvt8(const Half* s) {
  p8h h;
  std::memcpy(&h, s, sizeof h);
  const p8i v = __builtin_convertvector(h, p8i);
  const p8i e = (v >> 10) & 31;
  const p8i m = v & 0x3ff;
  const p8i mant = m | ((e != 0) & 0x400);
  const p8i ee = e + ((e == 0) & 1);
  const p8q sc = (p8q)((__builtin_convertvector(ee, p8l) + (1023 - 25)) << 52);
  p8d scale;
  std::memcpy(&scale, &sc, sizeof scale);
  const p8d r = __builtin_convertvector(mant, p8d) * scale;
  p8q rb;
  std::memcpy(&rb, &r, sizeof rb);
  const p8q special = (p8q)(__builtin_convertvector(e == 31, p8l));
  const p8q nanm = (p8q)(__builtin_convertvector(m != 0, p8l));
  const p8q inf = {0x7ff0000000000000ull, 0x7ff0000000000000ull, 0x7ff0000000000000ull, 0x7ff0000000000000ull,
                   0x7ff0000000000000ull, 0x7ff0000000000000ull, 0x7ff0000000000000ull, 0x7ff0000000000000ull};
  const p8q qnan = inf | 0x0008000000000000ull;
  rb = (special & ((nanm & qnan) | (~nanm & inf))) | (~special & rb);
  rb |= (p8q)(__builtin_convertvector((v >> 15) & 1, p8l)) << 63;
  p8d out;
  std::memcpy(&out, &rb, sizeof out);
  return out;
}
RANKME_RG_INLINE p8d cvt8(const double* s) { return load8(s); }
RANKME_RG_INLINE p8d cvt8(const float* s) { return load8(s); }
RANKME_RG_INLINE p8d cvt8(const BFloat16* s) {
#if defined(__AVX512F__)
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s));
  const __m512d d = _mm512_cvtps_pd(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
  p8d r;
  std::memcpy(&r, &d, sizeof r);
  return r;
#else
  return load8(s);
#endif
}

// Walks features [f0, f0 + w) of row i in groups of 8 (the last one zero-padded), calling
// put(c, v, n) with v = x - row_shift - col_shift for features f0+c .. f0+c+n-1 (lanes >= n are 0);
// returns the sum of the values when SUM. Group g adds into accumulator g % 4 (four independent
// chains), so contiguous and strided rows give bit-identical values and sums. The shifts are template
// flags: x - 0.0 == x, so skipping an absent shift changes no bits.
template <typename T, bool RS, bool CS, bool SUM, typename Put>
static inline double convert_row(const RowItem& it, int64_t i, int64_t f0, int64_t w, Put&& put) {
  const T* src = static_cast<const T*>(it.x) + i * it.stride_r + f0 * it.stride_c;
  const double rsh = RS ? it.row_shift[i] : 0.0;
  const double* csh = CS ? it.col_shift + f0 : nullptr;
  const int64_t sc = it.stride_c;
  p8d acc[4] = {};
  auto group = [&](int64_t c) __attribute__((always_inline)) {
    p8d v;
    if (sc == 1) {
      v = cvt8(src + c);
    } else {
      for (int l = 0; l < 8; ++l) v[l] = to_double(src[(c + l) * sc]);
    }
    if (RS) v -= rsh;
    if (CS) v -= load8(csh + c);
    return v;
  };
  int64_t c = 0;
  for (; c + 32 <= w; c += 32) {
    if (sc == 1) __builtin_prefetch(src + c + kPrefetchBytes / sizeof(T));
    for (int u = 0; u < 4; ++u) {
      const p8d v = group(c + 8 * u);
      put(c + 8 * u, v, 8);
      if (SUM) acc[u] += v;
    }
  }
  for (; c + 8 <= w; c += 8) {
    const p8d v = group(c);
    put(c, v, 8);
    if (SUM) acc[(c >> 3) & 3] += v;
  }
  if (c < w) {
    const int n = static_cast<int>(w - c);
    p8d v = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int l = 0; l < n; ++l) {
      double t = to_double(src[(c + l) * sc]);
      if (RS) t -= rsh;
      if (CS) t -= csh[c + l];
      v[l] = t;
    }
    put(c, v, n);
    if (SUM) acc[(c >> 3) & 3] += v;
  }
  return SUM ? sum8((acc[0] + acc[1]) + (acc[2] + acc[3])) : 0.0;
}

// Calls f.template operator()<RS, CS, SUM>() for the shifts and row sum the item has.
template <typename F>
static inline void with_flags(const RowItem& it, bool sum, F&& f) {
  const int k = (it.row_shift ? 4 : 0) | (it.col_shift ? 2 : 0) | (sum ? 1 : 0);
  switch (k) {
    case 0: f.template operator()<false, false, false>(); break;
    case 1: f.template operator()<false, false, true>(); break;
    case 2: f.template operator()<false, true, false>(); break;
    case 3: f.template operator()<false, true, true>(); break;
    case 4: f.template operator()<true, false, false>(); break;
    case 5: f.template operator()<true, false, true>(); break;
    case 6: f.template operator()<true, true, false>(); break;
    default: f.template operator()<true, true, true>(); break;
  }
}

template <typename T, bool RS, bool CS, bool SUM>
static void convert_rows(const RowItem& it, int64_t f0, int64_t w, double* __restrict s, int64_t ld,
                         double* row_sum) {
  for (int64_t i = 0; i < it.rows; ++i) {
    double* __restrict dst = s + i * ld;
    const double rs = convert_row<T, RS, CS, SUM>(
        it, i, f0, w, [dst](int64_t c, p8d v, int) __attribute__((always_inline)) { store8(dst + c, v); });
    if (SUM) row_sum[i] += rs;
  }
}

template <typename T>
struct ConvertCall {
  const RowItem& it; int64_t f0, w; double* s; int64_t ld; double* row_sum;
  template <bool RS, bool CS, bool SUM>
  void operator()() const {
    convert_rows<T, RS, CS, SUM>(it, f0, w, s, ld, row_sum);
  }
};

template <typename T>
static void convert_t(const RowItem& it, int64_t f0, int64_t w, double* s, int64_t ld, double* row_sum) {
  with_flags(it, row_sum != nullptr, ConvertCall<T>{it, f0, w, s, ld, row_sum});
}

void convert(const RowItem& it, int64_t f0, int64_t w, double* s, int64_t ld, double* row_sum) {
  switch (it.dtype) {
    case DType::kFloat64: convert_t<double>(it, f0, w, s, ld, row_sum); break;
    case DType::kFloat32: convert_t<float>(it, f0, w, s, ld, row_sum); break;
    case DType::kFloat16: convert_t<Half>(it, f0, w, s, ld, row_sum); break;
    case DType::kBFloat16: convert_t<BFloat16>(it, f0, w, s, ld, row_sum); break;
  }
}

// acc[p][q] (vectors along the features) += rows i0+p . rows j0+q over wp features, for an A x B tile;
// a diagonal tile (i0 == j0, A == B) only for q >= p. The accumulators live in vacc between blocks.
template <int A, int B, bool D>
static inline void dot_tile(const double* __restrict s, int64_t ld, int64_t i0, int64_t j0, int64_t wp,
                            double* __restrict vacc, int64_t rows) {
  vd acc[A][B];
  for (int p = 0; p < A; ++p)
    for (int q = 0; q < B; ++q)
      acc[p][q] = (!D || q >= p) ? load(vacc + ((i0 + p) * rows + j0 + q) * VL) : vd{};
  const double* __restrict pi = s + i0 * ld;
  const double* __restrict pj = s + j0 * ld;
  for (int64_t k = 0; k < wp; k += VL) {
    vd a[A];
    for (int p = 0; p < A; ++p) a[p] = load(pi + p * ld + k);
    if (D) {
      for (int p = 0; p < A; ++p)
        for (int q = p; q < B; ++q) acc[p][q] += a[p] * a[q];
    } else {
      for (int q = 0; q < B; ++q) {
        const vd b = load(pj + q * ld + k);
        for (int p = 0; p < A; ++p) acc[p][q] += a[p] * b;
      }
    }
  }
  for (int p = 0; p < A; ++p)
    for (int q = (D ? p : 0); q < B; ++q) store(vacc + ((i0 + p) * rows + j0 + q) * VL, acc[p][q]);
}

// Tile of a x b rows (1 <= a, b <= RT; a diagonal one when D) with compile-time sizes.
template <int A, bool D>
static inline void dot_tile_b(int b, const double* s, int64_t ld, int64_t i0, int64_t j0, int64_t wp, double* vacc,
                              int64_t rows) {
  if (D) {
    dot_tile<A, A, true>(s, ld, i0, j0, wp, vacc, rows);
    return;
  }
  switch (b) {
    case 1: dot_tile<A, 1, false>(s, ld, i0, j0, wp, vacc, rows); break;
    case 2: dot_tile<A, 2, false>(s, ld, i0, j0, wp, vacc, rows); break;
    case 3: dot_tile<A, 3, false>(s, ld, i0, j0, wp, vacc, rows); break;
    case 4: if constexpr (RT >= 4) dot_tile<A, 4, false>(s, ld, i0, j0, wp, vacc, rows); break;
    default: if constexpr (RT >= 5) dot_tile<A, 5, false>(s, ld, i0, j0, wp, vacc, rows); break;
  }
}

template <bool D>
static inline void dot_tile_ab(int a, int b, const double* s, int64_t ld, int64_t i0, int64_t j0, int64_t wp,
                               double* vacc, int64_t rows) {
  switch (a) {
    case 1: dot_tile_b<1, D>(b, s, ld, i0, j0, wp, vacc, rows); break;
    case 2: dot_tile_b<2, D>(b, s, ld, i0, j0, wp, vacc, rows); break;
    case 3: dot_tile_b<3, D>(b, s, ld, i0, j0, wp, vacc, rows); break;
    case 4: if constexpr (RT >= 4) dot_tile_b<4, D>(b, s, ld, i0, j0, wp, vacc, rows); break;
    default: if constexpr (RT >= 5) dot_tile_b<5, D>(b, s, ld, i0, j0, wp, vacc, rows); break;
  }
}

// Tiles of RT rows (the last one shorter) over the upper triangle of row pairs.
void dot(const double* s, int64_t ld, int64_t rows, int64_t wp, double* vacc) {
  for (int64_t i0 = 0; i0 < rows; i0 += RT) {
    const int a = static_cast<int>(std::min<int64_t>(RT, rows - i0));
    dot_tile_ab<true>(a, a, s, ld, i0, i0, wp, vacc, rows);
    for (int64_t j0 = i0 + RT; j0 < rows; j0 += RT) {
      const int b = static_cast<int>(std::min<int64_t>(RT, rows - j0));
      dot_tile_ab<false>(a, b, s, ld, i0, j0, wp, vacc, rows);
    }
  }
}

typedef int64_t p8idx __attribute__((vector_size(8 * sizeof(int64_t))));

// out[l] = (v[0][l], ..., v[7][l]): an 8x8 transpose in three rounds of two-source shuffles.
RANKME_RG_INLINE void transpose8(const p8d v[8], p8d out[8]) {
  const p8idx lo1 = {0, 8, 2, 10, 4, 12, 6, 14}, hi1 = {1, 9, 3, 11, 5, 13, 7, 15};
  const p8idx lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
  const p8idx lo4 = {0, 1, 2, 3, 8, 9, 10, 11}, hi4 = {4, 5, 6, 7, 12, 13, 14, 15};
  p8d t[8], u[8];
  for (int k = 0; k < 4; ++k) {
    t[2 * k] = __builtin_shuffle(v[2 * k], v[2 * k + 1], lo1);      // rows 2k, 2k+1 at even / odd lanes
    t[2 * k + 1] = __builtin_shuffle(v[2 * k], v[2 * k + 1], hi1);
  }
  for (int k = 0; k < 2; ++k)
    for (int h = 0; h < 2; ++h) {
      u[4 * k + h] = __builtin_shuffle(t[4 * k + h], t[4 * k + 2 + h], lo2);
      u[4 * k + 2 + h] = __builtin_shuffle(t[4 * k + h], t[4 * k + 2 + h], hi2);
    }
  for (int h = 0; h < 4; ++h) {
    out[h] = __builtin_shuffle(u[h], u[4 + h], lo4);
    out[4 + h] = __builtin_shuffle(u[h], u[4 + h], hi4);
  }
}

// One panel of 8 rows (rows >= nr are zero) over features [f0, f0 + w): groups of 8 features of the 8
// rows are upcast (the same values as convert_row), transposed in registers and stored as 8 contiguous
// panel rows; row m's sum runs in its own accumulator (8 independent chains).
template <typename T, bool RS, bool CS, bool SUM>
static void pack_panel(const RowItem& it, int64_t r0, int nr, int64_t f0, int64_t w, double* __restrict dst,
                       double* row_sum) {
  const int64_t sc = it.stride_c;
  const T* src[8];
  double rsh[8];
  for (int m = 0; m < 8; ++m) {
    src[m] = m < nr ? static_cast<const T*>(it.x) + (r0 + m) * it.stride_r + f0 * sc : nullptr;
    rsh[m] = (RS && m < nr) ? it.row_shift[r0 + m] : 0.0;
  }
  const double* csh = CS ? it.col_shift + f0 : nullptr;
  p8d acc[8] = {};
  int64_t c = 0;
  for (; c + 8 <= w; c += 8) {
    p8d v[8], o[8];
    const p8d cv = CS ? load8(csh + c) : p8d{};
    for (int m = 0; m < 8; ++m) {
      if (m < nr) {
        if (sc == 1) {
          if ((c & 31) == 0) __builtin_prefetch(src[m] + c + kPrefetchBytes / sizeof(T));
          v[m] = cvt8(src[m] + c);
        } else {
          for (int l = 0; l < 8; ++l) v[m][l] = to_double(src[m][(c + l) * sc]);
        }
        if (RS) v[m] -= rsh[m];
        if (CS) v[m] -= cv;
        if (SUM) acc[m] += v[m];
      } else {
        v[m] = p8d{};
      }
    }
    transpose8(v, o);
    for (int l = 0; l < 8; ++l) store8(dst + (c + l) * kPanel, o[l]);
  }
  if (c < w) {
    const int n = static_cast<int>(w - c);
    for (int m = 0; m < 8; ++m) {
      p8d v = {0, 0, 0, 0, 0, 0, 0, 0};
      if (m < nr) {
        for (int l = 0; l < n; ++l) {
          double t = to_double(src[m][(c + l) * sc]);
          if (RS) t -= rsh[m];
          if (CS) t -= csh[c + l];
          v[l] = t;
        }
        if (SUM) acc[m] += v;
      }
      for (int l = 0; l < n; ++l) dst[(c + l) * kPanel + m] = v[l];
    }
  }
  if (SUM)
    for (int m = 0; m < nr; ++m) row_sum[r0 + m] += sum8(acc[m]);
}

template <typename T, bool RS, bool CS, bool SUM>
static void pack_rows(const RowItem& it, int64_t f0, int64_t w, double* __restrict pack, double* row_sum) {
  static_assert(kPanel == 8, "panels of 8 rows");
  const int64_t np = (it.rows + kPanel - 1) / kPanel;
  const int64_t pstride = w * kPanel;
  for (int64_t p = 0; p < np; ++p) {
    const int64_t r0 = p * kPanel;
    const int nr = static_cast<int>(std::min<int64_t>(kPanel, it.rows - r0));
    pack_panel<T, RS, CS, SUM>(it, r0, nr, f0, w, pack + p * pstride, row_sum);
  }
}

template <typename T>
struct PackCall {
  const RowItem& it; int64_t f0, w; double* pk; double* row_sum;
  template <bool RS, bool CS, bool SUM>
  void operator()() const {
    pack_rows<T, RS, CS, SUM>(it, f0, w, pk, row_sum);
  }
};

template <typename T>
static void pack_t(const RowItem& it, int64_t f0, int64_t w, double* pk, double* row_sum) {
  with_flags(it, row_sum != nullptr, PackCall<T>{it, f0, w, pk, row_sum});
}

void pack(const RowItem& it, int64_t f0, int64_t w, double* pk, double* row_sum) {
  switch (it.dtype) {
    case DType::kFloat64: pack_t<double>(it, f0, w, pk, row_sum); break;
    case DType::kFloat32: pack_t<float>(it, f0, w, pk, row_sum); break;
    case DType::kFloat16: pack_t<Half>(it, f0, w, pk, row_sum); break;
    case DType::kBFloat16: pack_t<BFloat16>(it, f0, w, pk, row_sum); break;
  }
}

}  // namespace rowgram

extern const RowGramTable rowgram_table = {&rowgram::convert, &rowgram::dot, &rowgram::pack, &tiles, VL};

}  // namespace RANKME_ISA_NS
}  // namespace rankme
