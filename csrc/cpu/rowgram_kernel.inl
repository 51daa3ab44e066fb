// Per-ISA kernels of the batched row Gram (rowgram.cpp drives them). Included by gram_isa_*.cpp after
// gram_kernel.inl, in the same namespace: it reuses that file's vector type `vd`, load/store, the
// upcasting load8 overloads and the panel micro-kernel `tiles`.
#include <algorithm>
#include <cmath>
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

// Software prefetch distance along a row in the panel packing (bytes): rows of short items are too short a
// run for the hardware prefetchers to ramp up (measured 14 -> 11 us per 10 x 4096 bf16 item at 4 KiB).
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

// bfloat16 on 8-lane vectors (AVX-512) goes 16 features at a time: one 32-byte load, one unpack with zeros
// (the 16-bit values in the high halves are the floats, exact) and one float -> double conversion per half.
// That is a lane order of its own (a 128-bit unpack works within each 128-bit lane): in a block of 16
// features starting at c, half h, lane l holds feature c + kB16Off[h][l] = c + 4h + (l & 3) + 2 (l & 4);
// half 0 is accumulated before half 1, so each lane still sums its features in increasing order. Measured
// on Zen 4, one core, a 10-row item in L1: 87% of the FMA peak against 74% for the zero-extend + shift +
// convert of 8 features (cvt8; no PMU on that host to say which execution port it crowds).
template <typename T>
constexpr bool kB16 = VL == 8 && std::is_same<T, BFloat16>::value;
constexpr int kB16Off[2][8] = {{0, 1, 2, 3, 8, 9, 10, 11}, {4, 5, 6, 7, 12, 13, 14, 15}};
RANKME_RG_INLINE p8d cvt16h(const BFloat16* s, int h) {
#if defined(__AVX512F__)
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s));
  const __m256i z = _mm256_setzero_si256();
  const __m256i u = h ? _mm256_unpackhi_epi16(z, v) : _mm256_unpacklo_epi16(z, v);
  const __m512d d = _mm512_cvtps_pd(_mm256_castsi256_ps(u));
  p8d r;
  std::memcpy(&r, &d, sizeof r);
  return r;
#else
  p8d r;
  for (int l = 0; l < 8; ++l) r[l] = to_double(s[kB16Off[h][l]]);
  return r;
#endif
}
// The column shifts of a 16-feature block in the lane order of half h.
RANKME_RG_INLINE p8d csh16h(const double* p, int h) {
  typedef int64_t idx8 __attribute__((vector_size(8 * sizeof(int64_t))));
  const idx8 lo = {0, 1, 2, 3, 8, 9, 10, 11}, hi = {4, 5, 6, 7, 12, 13, 14, 15};
  const p8d a = load8(p), b = load8(p + 8);
  return h ? __builtin_shuffle(a, b, hi) : __builtin_shuffle(a, b, lo);
}
// Half h of the block of 16 features at c of row `src` (element stride sc; features at or past n are 0),
// upcast, minus the row's shift and (CS) the column shifts: the general path of the lane order above.
template <bool CS>
RANKME_RG_INLINE p8d group16h(const BFloat16* src, int64_t c, int64_t sc, double rsh, const double* csh, int64_t n,
                              int h) {
  p8d v;
  for (int l = 0; l < 8; ++l) {
    const int o = kB16Off[h][l];
    if (o < n) {
      double t = to_double(src[(c + o) * sc]) - rsh;
      if (CS) t -= csh[c + o];
      v[l] = t;
    } else {
      v[l] = 0.0;
    }
  }
  return v;
}

// ---- the dot kernel (short items): upcast fused into register tiles ---------------------------------
//
// Rows are split in blocks of RT; every block pair I <= J is a register tile whose accumulators (one
// 8-lane vector per row pair, lanes along the features) live in vacc between calls. Each tile walks the
// features of the slice [f0, f0 + w) in groups of 8, upcasting (and shifting) its rows' groups straight
// into registers — no buffer of doubles: the item's rows are read as stored (L1-resident when the driver
// sizes the slice), every row group is upcast once per tile that holds the row (RT x RT tiles: 20 upcasts
// per 55 FMAs at L = 10), and row sums run in the diagonal tiles (each row is in exactly one). Lane l of a
// pair's vector holds the sum over the features f ≡ l (mod 8) in increasing order (bfloat16 on AVX-512: the
// features of lane l in its blocks of 16, see kB16), so the bits depend on neither the layout (contiguous or
// strided), the slice width nor the thread.

// Rows of a tile: 5 x 5 = 25 accumulators + 5 + 1 operands fit in the 32 zmm registers; with 16 ymm
// registers an 8-lane vector is two, so 2 x 2 tiles (8 + 4 + 2).
constexpr int RT = VL >= 8 ? 5 : 2;
// Software prefetch distance along a row (bytes), for rows read straight from the item.
constexpr int kTilePrefetchBytes = 1024;

// One group of 8 features starting at c of row `src` (element stride sc; the first n <= 8 lanes, the rest 0),
// upcast, minus the row's shift and (CS) the column shifts csh[c ..].
template <typename T, bool CS>
RANKME_RG_INLINE p8d group8(const T* src, int64_t c, int64_t sc, double rsh, const double* csh, int n) {
  p8d v;
  if (n == 8 && sc == 1) {
    v = cvt8(src + c);
  } else {
    v = p8d{0, 0, 0, 0, 0, 0, 0, 0};
    for (int l = 0; l < n; ++l) v[l] = to_double(src[(c + l) * sc]);
  }
  v -= rsh;  // x - 0.0 == x: an absent shift changes no bits
  if (CS) {
    if (n == 8) {
      v -= load8(csh + c);
    } else {
      for (int l = 0; l < n; ++l) v[l] -= csh[c + l];
    }
  }
  if (n < 8)
    for (int l = n; l < 8; ++l) v[l] = 0.0;
  return v;
}

// Tile of rows [i0, i0 + A) x [j0, j0 + B) (diagonal when D: i0 == j0, A == B, pairs q >= p only) over the
// features [f0 + c0, f0 + w) of the slice, any strides and shifts (the general path: strided rows, a row
// shift, the last partial group).
template <typename T, bool CS, int A, int B, bool D>
static void ftile_any(const RowItem& it, int64_t i0, int64_t j0, int64_t f0, int64_t c0, int64_t w,
                      double* __restrict vacc, double* __restrict rsum, int64_t rows) {
  p8d acc[A][B];
  for (int p = 0; p < A; ++p)
    for (int q = 0; q < B; ++q)
      acc[p][q] = (!D || q >= p) ? load8(vacc + ((i0 + p) * rows + j0 + q) * 8) : p8d{};
  p8d rs[A];
  for (int p = 0; p < A; ++p) rs[p] = D ? load8(rsum + (i0 + p) * 8) : p8d{};
  const int64_t sc = it.stride_c;
  const T* base = static_cast<const T*>(it.x) + f0 * sc;
  const double* csh = CS ? it.col_shift + f0 : nullptr;
  auto rsh = [&](int64_t i) { return it.row_shift ? it.row_shift[i] : 0.0; };
  if constexpr (kB16<T>) {
    for (int64_t c = c0; c < w; c += 16)
      for (int h = 0; h < 2; ++h) {
        p8d a[A];
        for (int p = 0; p < A; ++p) a[p] = group16h<CS>(base + (i0 + p) * it.stride_r, c, sc, rsh(i0 + p), csh, w - c, h);
        if (D) {
          for (int p = 0; p < A; ++p) {
            rs[p] += a[p];
            for (int q = p; q < B; ++q) acc[p][q] += a[p] * a[q];
          }
        } else {
          for (int q = 0; q < B; ++q) {
            const p8d bq = group16h<CS>(base + (j0 + q) * it.stride_r, c, sc, rsh(j0 + q), csh, w - c, h);
            for (int p = 0; p < A; ++p) acc[p][q] += a[p] * bq;
          }
        }
      }
    c0 = w;  // the 8-feature loop below has nothing left
  }
  for (int64_t c = c0; c < w; c += 8) {
    const int n = static_cast<int>(std::min<int64_t>(8, w - c));
    p8d a[A];
    for (int p = 0; p < A; ++p) a[p] = group8<T, CS>(base + (i0 + p) * it.stride_r, c, sc, rsh(i0 + p), csh, n);
    if (D) {
      for (int p = 0; p < A; ++p) {
        rs[p] += a[p];
        for (int q = p; q < B; ++q) acc[p][q] += a[p] * a[q];
      }
    } else {
      for (int q = 0; q < B; ++q) {
        const p8d bq = group8<T, CS>(base + (j0 + q) * it.stride_r, c, sc, rsh(j0 + q), csh, n);
        for (int p = 0; p < A; ++p) acc[p][q] += a[p] * bq;
      }
    }
  }
  for (int p = 0; p < A; ++p)
    for (int q = (D ? p : 0); q < B; ++q) store8(vacc + ((i0 + p) * rows + j0 + q) * 8, acc[p][q]);
  if (D)
    for (int p = 0; p < A; ++p) store8(rsum + (i0 + p) * 8, rs[p]);
}

// One group of 8 contiguous features upcast into G = 8 / VL native vectors (lane layout of a p8d).
constexpr int G = 8 / VL;
RANKME_RG_INLINE void split8(p8d v, vd out[G]) { std::memcpy(out, &v, sizeof v); }
template <typename T>
RANKME_RG_INLINE void cvtg(const T* s, vd out[G]) {
  if constexpr (VL == 8) {
    split8(cvt8(s), out);
  } else {
#if defined(__AVX2__) && !defined(__AVX512F__)
    if constexpr (std::is_same<T, BFloat16>::value) {
      // the 16-bit values interleaved with zeros are the floats: one unpack per 4 values, exact
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s));
      const __m128i z = _mm_setzero_si128();
      const __m256d lo = _mm256_cvtps_pd(_mm_castsi128_ps(_mm_unpacklo_epi16(z, h)));
      const __m256d hi = _mm256_cvtps_pd(_mm_castsi128_ps(_mm_unpackhi_epi16(z, h)));
      std::memcpy(&out[0], &lo, sizeof lo);
      std::memcpy(&out[1], &hi, sizeof hi);
      return;
    } else if constexpr (std::is_same<T, float>::value) {
      for (int h = 0; h < 2; ++h) {
        const __m256d d = _mm256_cvtps_pd(_mm_loadu_ps(s + 4 * h));
        std::memcpy(&out[h], &d, sizeof d);
      }
      return;
    } else if constexpr (std::is_same<T, double>::value) {
      for (int h = 0; h < 2; ++h) out[h] = load(s + 4 * h);
      return;
    }
#endif
    split8(cvt8(s), out);
  }
}

// The same for contiguous rows without a row shift over the whole groups [f0, f0 + w8): a branch-free
// loop whose accumulators (G native vectors per pair), operands and row pointers stay in registers.
template <typename T, bool CS, int A, int B, bool D>
static void ftile_fast(const RowItem& it, int64_t i0, int64_t j0, int64_t f0, int64_t w8, double* __restrict vacc,
                       double* __restrict rsum, int64_t rows, RowPrefetch* pf) {
  vd acc[A][B][G];
  for (int p = 0; p < A; ++p)
    for (int q = 0; q < B; ++q)
      for (int g = 0; g < G; ++g)
        acc[p][q][g] = (!D || q >= p) ? load(vacc + ((i0 + p) * rows + j0 + q) * 8 + g * VL) : vd{};
  vd rs[A][G];
  for (int p = 0; p < A; ++p)
    for (int g = 0; g < G; ++g) rs[p][g] = D ? load(rsum + (i0 + p) * 8 + g * VL) : vd{};
  const T* x = static_cast<const T*>(it.x) + f0;
  const int64_t ld = it.stride_r;
  const T* pa = x + i0 * ld;
  const T* pb = x + j0 * ld;
  const double* csh = CS ? it.col_shift + f0 : nullptr;
  // the next item's contiguous run: a line per group of 8 features, two for bfloat16 on AVX-512 (its item is
  // then in L2 by the middle of this one: 10,000 items of 10 x 4096 on 2 threads, about 57 -> 55 ms); what is
  // left (items with few features) is the driver's final step
  const char* pcur = pf && pf->per_iter > 0 ? pf->cur : nullptr;
  const char* const pend = pcur ? pf->end : nullptr;
  if constexpr (kB16<T>) {  // G == 1; w8 is a multiple of 16 here (ftile)
    for (int64_t c = 0; c < w8; c += 16) {
      if ((c & 31) == 0)
        for (int p = 0; p < A; ++p) __builtin_prefetch(pa + p * ld + c + kTilePrefetchBytes / sizeof(T));
      if (pcur < pend) {
        __builtin_prefetch(pcur, 0, 2);
        __builtin_prefetch(pcur + 64, 0, 2);
        __builtin_prefetch(pcur + 128, 0, 2);
        __builtin_prefetch(pcur + 192, 0, 2);
        pcur += 256;
      }
      for (int h = 0; h < 2; ++h) {
        vd cs{};
        if (CS) cs = csh16h(csh + c, h);
        vd a[A];
        for (int p = 0; p < A; ++p) {
          a[p] = cvt16h(pa + p * ld + c, h);
          if (CS) a[p] -= cs;
        }
        if (D) {
          for (int p = 0; p < A; ++p) {
            rs[p][0] += a[p];
            for (int q = p; q < B; ++q) acc[p][q][0] += a[p] * a[q];
          }
        } else {
          for (int q = 0; q < B; ++q) {
            vd bq = cvt16h(pb + q * ld + c, h);
            if (CS) bq -= cs;
            for (int p = 0; p < A; ++p) acc[p][q][0] += a[p] * bq;
          }
        }
      }
    }
  } else
  for (int64_t c = 0; c < w8; c += 8) {
    if ((c & 31) == 0)
      for (int p = 0; p < A; ++p) __builtin_prefetch(pa + p * ld + c + kTilePrefetchBytes / sizeof(T));
    if (pcur < pend) {
      __builtin_prefetch(pcur, 0, 2);
      pcur += 64;
    }
    vd cs[G];
    if (CS)
      for (int g = 0; g < G; ++g) cs[g] = load(csh + c + g * VL);
    vd a[A][G];
    for (int p = 0; p < A; ++p) {
      cvtg(pa + p * ld + c, a[p]);
      if (CS)
        for (int g = 0; g < G; ++g) a[p][g] -= cs[g];
    }
    if (D) {
      for (int p = 0; p < A; ++p)
        for (int g = 0; g < G; ++g) {
          rs[p][g] += a[p][g];
          for (int q = p; q < B; ++q) acc[p][q][g] += a[p][g] * a[q][g];
        }
    } else {
      for (int q = 0; q < B; ++q) {
        vd bq[G];
        cvtg(pb + q * ld + c, bq);
        for (int g = 0; g < G; ++g) {
          if (CS) bq[g] -= cs[g];
          for (int p = 0; p < A; ++p) acc[p][q][g] += a[p][g] * bq[g];
        }
      }
    }
  }
  if (pcur) pf->cur = pcur;
  for (int p = 0; p < A; ++p)
    for (int q = (D ? p : 0); q < B; ++q)
      for (int g = 0; g < G; ++g) store(vacc + ((i0 + p) * rows + j0 + q) * 8 + g * VL, acc[p][q][g]);
  if (D)
    for (int p = 0; p < A; ++p)
      for (int g = 0; g < G; ++g) store(rsum + (i0 + p) * 8 + g * VL, rs[p][g]);
}

template <typename T, bool CS, int A, int B, bool D>
static inline void ftile(const RowItem& it, int64_t i0, int64_t j0, int64_t f0, int64_t w, double* vacc, double* rsum,
                         int64_t rows, RowPrefetch* pf) {
  int64_t c0 = 0;
  if (it.stride_c == 1 && !it.row_shift) {
    c0 = kB16<T> ? w / 16 * 16 : w / 8 * 8;
    if (c0) ftile_fast<T, CS, A, B, D>(it, i0, j0, f0, c0, vacc, rsum, rows, pf);
  }
  if (c0 < w) ftile_any<T, CS, A, B, D>(it, i0, j0, f0, c0, w, vacc, rsum, rows);
}

template <typename T, bool CS, int A>
static inline void ftile_diag(const RowItem& it, int64_t i0, int64_t f0, int64_t w, double* vacc, double* rsum,
                              int64_t rows, RowPrefetch* pf) {
  ftile<T, CS, A, A, true>(it, i0, i0, f0, w, vacc, rsum, rows, pf);
}

template <typename T, bool CS>
static void fused_t(const RowItem& it, int64_t f0, int64_t w, double* vacc, double* rsum, RowPrefetch* pf) {
  const int64_t rows = it.rows;
  for (int64_t i0 = 0; i0 < rows; i0 += RT) {
    const int a = static_cast<int>(std::min<int64_t>(RT, rows - i0));
    switch (a) {
      case 1: ftile_diag<T, CS, 1>(it, i0, f0, w, vacc, rsum, rows, pf); break;
      case 2: ftile_diag<T, CS, 2>(it, i0, f0, w, vacc, rsum, rows, pf); break;
      case 3: if constexpr (RT >= 3) ftile_diag<T, CS, 3>(it, i0, f0, w, vacc, rsum, rows, pf); break;
      case 4: if constexpr (RT >= 4) ftile_diag<T, CS, 4>(it, i0, f0, w, vacc, rsum, rows, pf); break;
      default: if constexpr (RT >= 5) ftile_diag<T, CS, RT>(it, i0, f0, w, vacc, rsum, rows, pf); break;
    }
    // off-diagonal tiles: the i-block is full (only the last block can be short, and it has none)
    for (int64_t j0 = i0 + RT; j0 < rows; j0 += RT) {
      const int b = static_cast<int>(std::min<int64_t>(RT, rows - j0));
      switch (b) {
        case 1: ftile<T, CS, RT, 1, false>(it, i0, j0, f0, w, vacc, rsum, rows, pf); break;
        case 2: if constexpr (RT >= 2) ftile<T, CS, RT, 2, false>(it, i0, j0, f0, w, vacc, rsum, rows, pf); break;
        case 3: if constexpr (RT >= 3) ftile<T, CS, RT, 3, false>(it, i0, j0, f0, w, vacc, rsum, rows, pf); break;
        case 4: if constexpr (RT >= 4) ftile<T, CS, RT, 4, false>(it, i0, j0, f0, w, vacc, rsum, rows, pf); break;
        default: if constexpr (RT >= 5) ftile<T, CS, RT, RT, false>(it, i0, j0, f0, w, vacc, rsum, rows, pf); break;
      }
    }
  }
}

// ---- the buffered dot kernel (vectors narrower than 8 lanes: AVX2, generic) ---------------------------
//
// With 16 registers the register tiles above are 2 x 2 rows, so every row group is upcast about L / 2
// times (L = 10: 50 upcasts per 55 pair products, each upcast several shuffles and conversions on the
// FP pipes). Here each sub-slice of the item's rows is upcast and shifted once into an L1 buffer of
// doubles, then the pairs are tiles of 3 x 4 rows over the buffer (per vector of lanes 3 + 4 loads and
// 12 FMAs, the same ratio as the panel micro-kernel), the row sums in the diagonal tiles. The lanes, the
// order of the sums in each lane and so the bits are exactly those of the register-tile kernel.
constexpr int64_t kDotBufBytes = 20480;  // the sub-slice of L rows of doubles, in L1 beside the tiles' data
constexpr int NV = 8 / VL;               // native vectors per 8-lane pair accumulator

// The item's rows over features [f, f + sw) of the slice, upcast and shifted into buf (row i at
// buf + i * ldb; lanes past sw of the last group are zero). The row sums are taken later, in the
// diagonal tiles, which read every row once.
template <typename T, bool CS>
static void fill_rows(const RowItem& it, int64_t f, int64_t sw, double* __restrict buf, int64_t ldb) {
  const T* base = static_cast<const T*>(it.x) + f * it.stride_c;
  const double* csh = CS ? it.col_shift + f : nullptr;
  const bool fast = it.stride_c == 1 && !it.row_shift;
  // this row's next sub-slice, one line per 64 bytes read: the rows' short runs (a few lines each, then
  // a jump to the next row) are too short for the hardware prefetchers
  constexpr int64_t kLine = 64 / int64_t(sizeof(T)) >= 8 ? 64 / int64_t(sizeof(T)) : 8;
  for (int64_t i = 0; i < it.rows; ++i) {
    const T* src = base + i * it.stride_r;
    double* dst = buf + i * ldb;
    int64_t c = 0;
    if (fast) {
      for (; c + 8 <= sw; c += 8) {
        if (c % kLine == 0) __builtin_prefetch(src + c + sw);
        vd a[NV];
        cvtg(src + c, a);
        for (int g = 0; g < NV; ++g) {
          if (CS) a[g] -= load(csh + c + g * VL);
          store(dst + c + g * VL, a[g]);
        }
      }
    }
    for (; c < sw; c += 8) {
      const int n = static_cast<int>(std::min<int64_t>(8, sw - c));
      vd a[NV];
      split8(group8<T, CS>(src, c, it.stride_c, it.row_shift ? it.row_shift[i] : 0.0, csh, n), a);
      for (int g = 0; g < NV; ++g) store(dst + c + g * VL, a[g]);
    }
  }
}

// Pairs of rows [i0, i0 + A) x [j0, j0 + B) (D: the diagonal block, i0 == j0, pairs q >= p, and the rows'
// sums) over the buffer's ldb (a multiple of 8) features, one native vector of lanes at a time.
template <int A, int B, bool D>
static void btile(const double* __restrict buf, int64_t ldb, int64_t i0, int64_t j0,
                  double* __restrict vacc, double* __restrict rsum, int64_t rows, RowPrefetch* pf) {
  for (int g = 0; g < NV; ++g) {
    vd acc[A][B];
    for (int p = 0; p < A; ++p)
      for (int q = 0; q < B; ++q)
        acc[p][q] = (!D || q >= p) ? load(vacc + ((i0 + p) * rows + j0 + q) * 8 + g * VL) : vd{};
    vd rs[A];
    for (int p = 0; p < A; ++p) rs[p] = D ? load(rsum + (i0 + p) * 8 + g * VL) : vd{};
    const double* pa = buf + i0 * ldb + g * VL;
    const double* pb = buf + j0 * ldb + g * VL;
    for (int64_t c = 0; c < ldb; c += 8) {
      if (pf && g == 0) pf->step(pf->per_iter);
      vd a[A];
      for (int p = 0; p < A; ++p) a[p] = load(pa + p * ldb + c);
      if (D) {
        for (int p = 0; p < A; ++p) {
          rs[p] += a[p];
          for (int q = p; q < B; ++q) acc[p][q] += a[p] * a[q];
        }
      } else {
        for (int q = 0; q < B; ++q) {
          const vd b = load(pb + q * ldb + c);
          for (int p = 0; p < A; ++p) acc[p][q] += a[p] * b;
        }
      }
    }
    for (int p = 0; p < A; ++p)
      for (int q = (D ? p : 0); q < B; ++q) store(vacc + ((i0 + p) * rows + j0 + q) * 8 + g * VL, acc[p][q]);
    if (D)
      for (int p = 0; p < A; ++p) store(rsum + (i0 + p) * 8 + g * VL, rs[p]);
  }
}

template <typename T, bool CS>
static void fused_buffered(const RowItem& it, int64_t f0, int64_t w, double* vacc, double* rsum, RowPrefetch* pf) {
  constexpr int BA = 3, BB = 4;
  alignas(64) double buf[kDotBufBytes / sizeof(double)];
  const int64_t rows = it.rows;
  const int64_t sw_max = std::max<int64_t>(8, int64_t(kDotBufBytes / sizeof(double)) / rows / 8 * 8);
  for (int64_t s0 = 0; s0 < w; s0 += sw_max) {
    const int64_t sw = std::min(sw_max, w - s0);
    const int64_t ldb = (sw + 7) / 8 * 8;
    fill_rows<T, CS>(it, f0 + s0, sw, buf, ldb);
    for (int64_t i0 = 0; i0 < rows; i0 += BA) {
      switch (std::min<int64_t>(BA, rows - i0)) {
        case 1: btile<1, 1, true>(buf, ldb, i0, i0, vacc, rsum, rows, pf); break;
        case 2: btile<2, 2, true>(buf, ldb, i0, i0, vacc, rsum, rows, pf); break;
        default: btile<BA, BA, true>(buf, ldb, i0, i0, vacc, rsum, rows, pf); break;
      }
      for (int64_t j0 = i0 + BA; j0 < rows; j0 += BB) {  // the i-block is full: only the last can be short
        switch (std::min<int64_t>(BB, rows - j0)) {
          case 1: btile<BA, 1, false>(buf, ldb, i0, j0, vacc, rsum, rows, pf); break;
          case 2: btile<BA, 2, false>(buf, ldb, i0, j0, vacc, rsum, rows, pf); break;
          case 3: btile<BA, 3, false>(buf, ldb, i0, j0, vacc, rsum, rows, pf); break;
          default: btile<BA, BB, false>(buf, ldb, i0, j0, vacc, rsum, rows, pf); break;
        }
      }
    }
  }
}

template <typename T>
static void fused_dt(const RowItem& it, int64_t f0, int64_t w, double* vacc, double* rsum, RowPrefetch* pf) {
  if (VL < 8 && it.rows * 8 * int64_t(sizeof(double)) <= kDotBufBytes) {  // a sub-slice of >= 8 features fits
    if (it.col_shift) fused_buffered<T, true>(it, f0, w, vacc, rsum, pf);
    else fused_buffered<T, false>(it, f0, w, vacc, rsum, pf);
    return;
  }
  if (it.col_shift) fused_t<T, true>(it, f0, w, vacc, rsum, pf);
  else fused_t<T, false>(it, f0, w, vacc, rsum, pf);
}

void fused(const RowItem& it, int64_t f0, int64_t w, double* vacc, double* rsum, RowPrefetch* pf) {
  switch (it.dtype) {
    case DType::kFloat64: fused_dt<double>(it, f0, w, vacc, rsum, pf); break;
    case DType::kFloat32: fused_dt<float>(it, f0, w, vacc, rsum, pf); break;
    case DType::kFloat16: fused_dt<Half>(it, f0, w, vacc, rsum, pf); break;
    case DType::kBFloat16: fused_dt<BFloat16>(it, f0, w, vacc, rsum, pf); break;
  }
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
#if defined(__AVX2__) && !defined(__AVX512F__)
  // 16 ymm registers: an 8-wide vector of this build lives in memory (GCC stores and reloads every piece),
  // so panels of contiguous rows go through 4 x 4 transposes of 4-wide halves; the same values and the
  // same per-lane sums as the general loop below.
  if (sc == 1) {
    alignas(32) double sums[8][8] = {};
    for (; c + 8 <= w; c += 8) {
      vd csl = vd{}, csh4 = vd{};
      if (CS) {
        csl = load(csh + c);
        csh4 = load(csh + c + 4);
      }
      for (int h = 0; h < 2; ++h) {  // rows 4h .. 4h + 3
        __m256d lo[4], hi[4];
        for (int k = 0; k < 4; ++k) {
          const int m = 4 * h + k;
          vd g[2] = {vd{}, vd{}};
          if (m >= nr) {  // rows beyond the item: zero lanes of the panel
            std::memcpy(&lo[k], &g[0], sizeof lo[k]);
            std::memcpy(&hi[k], &g[1], sizeof hi[k]);
            continue;
          }
          if ((c & 31) == 0) __builtin_prefetch(src[m] + c + kPrefetchBytes / sizeof(T));
          cvtg(src[m] + c, g);
          if (RS) {
            g[0] -= rsh[m];
            g[1] -= rsh[m];
          }
          if (CS) {
            g[0] -= csl;
            g[1] -= csh4;
          }
          if (SUM) {
            store(&sums[m][0], load(&sums[m][0]) + g[0]);
            store(&sums[m][4], load(&sums[m][4]) + g[1]);
          }
          std::memcpy(&lo[k], &g[0], sizeof lo[k]);
          std::memcpy(&hi[k], &g[1], sizeof hi[k]);
        }
        for (int half = 0; half < 2; ++half) {  // features c + 4 half .. + 3
          const __m256d* r = half ? hi : lo;
          const __m256d t0 = _mm256_unpacklo_pd(r[0], r[1]), t1 = _mm256_unpackhi_pd(r[0], r[1]);
          const __m256d t2 = _mm256_unpacklo_pd(r[2], r[3]), t3 = _mm256_unpackhi_pd(r[2], r[3]);
          double* out = dst + (c + 4 * half) * kPanel + 4 * h;
          _mm256_storeu_pd(out, _mm256_permute2f128_pd(t0, t2, 0x20));
          _mm256_storeu_pd(out + kPanel, _mm256_permute2f128_pd(t1, t3, 0x20));
          _mm256_storeu_pd(out + 2 * kPanel, _mm256_permute2f128_pd(t0, t2, 0x31));
          _mm256_storeu_pd(out + 3 * kPanel, _mm256_permute2f128_pd(t1, t3, 0x31));
        }
      }
    }
    if (SUM)
      for (int m = 0; m < nr; ++m) std::memcpy(&acc[m], sums[m], sizeof acc[m]);
  }
#endif
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

// ---- the log-determinant epilogue's blocked Cholesky (items of more than kCholMinRows rows) ------------
//
// M = U^T U (U upper) right-looking, kCholBlockRows rows at a time, on a row-major buffer (row stride ldw a
// multiple of 8) whose upper triangle holds -M on entry (zeros in columns [L, round_up(L, 8))). For a block of
// rows [k0, e): the rows are turned back into M and factorised row by row — pivot, the row divided by its
// root, the block's later rows less that row times their entry (vector AXPYs) — first on the diagonal block,
// then on the block's columns right of it, kCholSolveCols at a time (so those rows stay in L1; each entry
// sees the same operations in the same order either way); the trailing upper triangle, still -M', then gets
// X^T X of X = U[k0:e, e:L] from the streaming Gram's own tiles: -M' + X^T X = -(M' - X^T X), an addition,
// so the tiles need no sign. The pivots s_t = U_tt^2 go out in order through piv (frexp'ed by the caller as
// in the unblocked code). Returns the first t whose pivot is not > 0 and finite, or L.
// Measured on Zen 4 (one thread, AVX-512, whole factorisation at L = 128 / 256 / 512 against torch's
// batched Cholesky, MKL per matrix: 0.05 / 0.2 / 1.3 ms vs 0.11 / 0.46 / 4.4 ms); blocks of 32 rows beat 64,
// 96 and 128 (more of the work in the tiles' GEMM, less in the AXPYs).
constexpr int64_t kCholSolveCols = 64;
RANKME_RG_INLINE void axpy_neg(double* __restrict y, const double* __restrict x, double c, int64_t n) {
  int64_t j = 0;
  const vd cv = vd{} + c;
  for (; j + 2 * VL <= n; j += 2 * VL) {
    store(y + j, load(y + j) - cv * load(x + j));
    store(y + j + VL, load(y + j + VL) - cv * load(x + j + VL));
  }
  for (; j + VL <= n; j += VL) store(y + j, load(y + j) - cv * load(x + j));
  for (; j < n; ++j) y[j] -= c * x[j];
}

int64_t chol_neg(double* w, int64_t ldw, int64_t L, double* pack, double* piv) {
  for (int64_t k0 = 0; k0 < L; k0 += kCholBlockRows) {
    const int64_t e = std::min(L, k0 + kCholBlockRows);
    for (int64_t i = k0; i < e; ++i) {
      double* wi = w + i * ldw;
      for (int64_t j = i; j < L; ++j) wi[j] = -wi[j];
    }
    for (int64_t t = k0; t < e; ++t) {  // the diagonal block
      double* wt = w + t * ldw;
      const double s = wt[t];
      piv[t] = s;
      if (!(s > 0.0) || !std::isfinite(s)) return t;
      const double u = std::sqrt(s);
      wt[t] = u;
      for (int64_t j = t + 1; j < e; ++j) wt[j] /= u;
      for (int64_t t2 = t + 1; t2 < e; ++t2) axpy_neg(w + t2 * ldw + t2, wt + t2, wt[t2], e - t2);
    }
    if (e >= L) break;
    // the block's columns right of it, kCholSolveCols at a time (the block's rows of them stay in L1): the
    // same operations per entry, in the same order, as whole-row sweeps
    for (int64_t c = e; c < L; c += kCholSolveCols) {
      const int64_t n = std::min(kCholSolveCols, L - c);
      for (int64_t t = k0; t < e; ++t) {
        double* wt = w + t * ldw;
        const double u = wt[t];
        for (int64_t j = c; j < c + n; ++j) wt[j] /= u;
        for (int64_t t2 = t + 1; t2 < e; ++t2) axpy_neg(w + t2 * ldw + c, wt + c, wt[t2], n);
      }
    }
    // X = rows [k0, e), columns [e, L) of U, packed by the streaming Gram's own packing (zero past L)
    const int64_t kc = e - k0, np = (L - e + kPanel - 1) / kPanel;
    GramArgs xa;
    xa.x = w + e;
    xa.dtype = DType::kFloat64;
    xa.rows = L;
    xa.cols = L - e;
    xa.stride_r = ldw;
    xa.stride_c = 1;
    RANKME_ISA_NS::pack(xa, k0, kc, 0, np, pack, nullptr);
    tiles(pack, kc, np, 0, np, w + e * ldw + e, ldw);
  }
  return L;
}

}  // namespace rowgram

extern const RowGramTable rowgram_table = {&rowgram::fused, &rowgram::pack, &tiles, &rowgram::chol_neg, VL};

}  // namespace RANKME_ISA_NS
}  // namespace rankme
