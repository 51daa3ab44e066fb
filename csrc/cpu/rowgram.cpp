// Driver of the batched row Gram (rankme/rowgram.h): validation, per-thread scratch, item scheduling,
// the choice of kernel per item and the write-back of both triangles.
//
// Schedule: the items with L > 0 are ordered by decreasing L (ties by index) and handed out one at a
// time from an atomic counter, so a thread that gets less of a core takes fewer items and the big ones
// do not end up last. Each item is computed start to finish by one thread, in a fixed order, so the
// bits do not depend on the schedule or the thread count. No more threads start than there are items
// (a single item runs on one thread: its work is not split).
//
// Kernels (per item, by L):
//  * dot (L <= kDotMaxRows): in slices of W features (the item's L x W stored values in L1), register tiles
//    of rows (5 x 5 on AVX-512) upcast their rows' groups of 8 features straight into registers and
//    accumulate every row pair i <= j into per-pair 8-lane vectors (and the row sums in the diagonal
//    tiles); the lanes are summed once per item. Only the L(L+1)/2 useful pairs are computed. With
//    narrower vectors (AVX2, generic) the rows of a sub-slice are first upcast once into an L1 buffer of
//    doubles and the tiles read that (same lanes, same order, same bits).
//  * panel (larger L): blocks of features are packed (upcast, shifted, transposed) into the streaming
//    Gram's 8-row panels and multiplied by its micro-kernel into a per-thread Lp x Lp scratch, which is
//    added into the item's gram block at the end.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "gram_internal.h"
#include "rankme/gram.h"
#include "rankme/rowgram.h"
#include "rankme/threads.h"
#include "rowgram_internal.h"

namespace rankme {

namespace {

const RowGramTable& select_rowgram() {
  const std::string isa = gram_isa();  // the streaming Gram's choice (honours RANKME_FAST_DISABLE_AVX512)
#if defined(RANKME_HAVE_X86_VARIANTS)
  if (isa == "avx512") return avx512::rowgram_table;
  if (isa == "avx2") return avx2::rowgram_table;
#endif
  return generic::rowgram_table;
}

const RowGramTable& rowgram_kernels() {
  static const RowGramTable& t = select_rowgram();
  return t;
}

// Items up to this many rows use the dot kernel, longer ones the panel kernel (measured at d=4096 bf16,
// one thread, fused dot kernel. AVX-512: L=24 dot 56 / panel 47 GFLOP/s, L=32 55 / 54, L=40 56 / 50,
// L=48 51 / 58, L=64 53 / 71. AVX2, with the buffered dot kernel (each row upcast once into L1, 3 x 4
// tiles; the register-tile version upcast each row group about L / 2 times), AMD EPYC Zen 3: L=12 dot
// 14 / panel 9, L=16 20 / 16, L=20 18 / 15, L=24 17 / 17, L=32 15 / 22).
constexpr int64_t kDotMaxRows = 40;
constexpr int64_t kDotMaxRowsNarrow = 20;  // 4-wide vectors (AVX2) and the generic build
// Panel kernel: features per packed block (a 512 x 8 panel is 32 KiB, L1-resident while it sweeps).
constexpr int64_t kPanelBlock = 512;

// Dot kernel: features per slice, so that the item's L x W stored values stay around 24 KiB of L1 while
// every tile sweeps them.
int64_t dot_block(int64_t rows, int64_t esz, int64_t want) {
  if (want > 0) return (want + 15) / 16 * 16;  // slices start at multiples of 16 (the bf16 blocks)
  const int64_t w = (int64_t(24576) / std::max<int64_t>(rows * esz, 1)) / 64 * 64;
  return std::min<int64_t>(4096, std::max<int64_t>(64, w));
}

size_t elem_size(DType t) {
  switch (t) {
    case DType::kFloat64: return 8;
    case DType::kFloat32: return 4;
    default: return 2;
  }
}

struct Buf {
  double* p = nullptr;
  bool alloc(size_t n) {
    if (n == 0) return true;
    p = static_cast<double*>(::operator new[](n * sizeof(double), std::align_val_t(64), std::nothrow));
    return p != nullptr;
  }
  Buf() = default;
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  Buf(Buf&& o) noexcept : p(o.p) { o.p = nullptr; }
  ~Buf() {
    if (p) ::operator delete[](p, std::align_val_t(64));
  }
};

struct Scratch {
  Buf vacc, rsum, pack, g, rsh, csh, rs, lg, chol, cpack, piv;
};

// Items above this many rows take the kernels' blocked Cholesky (chol_neg), smaller ones the column loop
// of logdet_item.
constexpr int64_t kCholMinRows = 64;
// Row stride of an L x L buffer that the panel tiles add into: L padded to 8, plus 8 when that is an even number
// of cache lines (rows 4 KiB apart at L = 512 put a tile's 8 rows of C on the same L1 sets: 2.8 -> 1.4 ms
// per blocked factorisation).
int64_t odd_line_stride(int64_t L) {
  const int64_t lp = padded_size(L);
  return (lp / kPanel) % 2 == 0 ? lp + kPanel : lp;
}

// v = m * 2^e with m in [0.5, 1) for a finite v > 0 (frexp without the library call for normal numbers).
inline double split_exp(double v, int64_t* e) {
  uint64_t b;
  std::memcpy(&b, &v, sizeof b);
  const int64_t be = static_cast<int64_t>((b >> 52) & 0x7ff);
  if (be == 0) {  // subnormal
    int ee = 0;
    const double m = std::frexp(v, &ee);
    *e = ee;
    return m;
  }
  *e = be - 1022;
  b = (b & ~(uint64_t(0x7ff) << 52)) | (uint64_t(1022) << 52);
  double m;
  std::memcpy(&m, &b, sizeof m);
  return m;
}

// (1/L) sum ln piv[i] of L > 0 positive finite pivots: their product kept as a mantissa in [0.5, 1) and a binary
// exponent (each pivot split the same way first, so nothing under- or overflows; one rounding per pivot), so
// there is one log per item.
double mean_log(const double* piv, int64_t L) {
  double mant = 1.0;
  int64_t ex = 0;
  for (int64_t i = 0; i < L; ++i) {
    int64_t es = 0, e = 0;
    const double ms = split_exp(piv[i], &es);
    mant = split_exp(mant * ms, &e);  // mant * ms in [0.25, 1)
    ex += es + e;
  }
  return (std::log(mant) + static_cast<double>(ex) * 0.69314718055994530942) / static_cast<double>(L);
}

// ln det(M) / L of M = G - scale r r^T + ridge I (G: L x L at stride ldg, upper triangle read; r null: no term)
// by a Cholesky factorisation in the scratch m (odd_line_stride(L) x padded L); info 0, or 2 (a non-finite
// G_ii or r_i) / 1 (not positive definite) with NaN; the pivots go through piv (L entries) to mean_log.
void logdet_item(const double* g, int64_t ldg, const double* r, int64_t L, double scale, double ridge, double* m,
                 double* cpack, double* piv, const RowGramTable& k, double* out, int64_t* info) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  bool finite = true;
  for (int64_t i = 0; i < L; ++i) {
    finite = finite && std::isfinite(g[i * ldg + i]);
    if (r) finite = finite && std::isfinite(r[i]);
  }
  if (!finite) {
    *out = nan;
    *info = 2;
    return;
  }
  if (L > kCholMinRows) {
    // -M in the upper triangle at a stride of lp (columns [L, padded L) zero), then the blocked factorisation
    const int64_t lp = odd_line_stride(L);
    for (int64_t i = 0; i < L; ++i) {
      double* wi = m + i * lp;
      for (int64_t j = i; j < L; ++j) {
        double v = g[i * ldg + j];
        if (r) v -= scale * r[i] * r[j];
        wi[j] = -v;
      }
      wi[i] -= ridge;
      for (int64_t j = L; j < padded_size(L); ++j) wi[j] = 0.0;
    }
    if (k.chol(m, lp, L, cpack, piv) < L) {
      *out = nan;
      *info = 1;
      return;
    }
    *out = mean_log(piv, L);
    *info = 0;
    return;
  }
  // the upper triangle of M, row-major L x L, then right-looking column by column: pivot s_j, row j times
  // 1 / sqrt(s_j), the rows below less their multiple of it. Each entry gets the same subtractions in the
  // same order as a row-by-row factorisation, but the steps of one column are independent (the row-by-row
  // loop was a chain of dependent divisions: at L = 10, ~0.5 of the ~11 us an EigenScore item takes on Zen 4)
  for (int64_t i = 0; i < L; ++i) {
    for (int64_t j = i; j < L; ++j) {
      double v = g[i * ldg + j];
      if (r) v -= scale * r[i] * r[j];
      m[i * L + j] = v;
    }
    m[i * L + i] += ridge;
  }
  for (int64_t j = 0; j < L; ++j) {
    double* uj = m + j * L;
    const double s = uj[j];
    if (!(s > 0.0) || !std::isfinite(s)) {
      *out = nan;
      *info = 1;
      return;
    }
    piv[j] = s;
    const double u = std::sqrt(s), inv = 1.0 / u;
    uj[j] = u;
    for (int64_t k = j + 1; k < L; ++k) uj[k] *= inv;
    for (int64_t i = j + 1; i < L; ++i) {
      const double c = uj[i];
      double* ui = m + i * L;
      for (int64_t k = i; k < L; ++k) ui[k] -= c * uj[k];
    }
  }
  *out = L > 0 ? mean_log(piv, L) : 0.0;
  *info = 0;
}

}  // namespace

Status row_gram_batch(const RowGramArgs& a) {
  if (a.batch < 0 || a.n_max < 0 || a.dim < 0) return kInvalidArgument;
  if (static_cast<int>(a.dtype) < 0 || static_cast<int>(a.dtype) > 3) return kUnsupportedDtype;
  if (a.kernel < 0 || a.kernel > 2 || a.block_cols < 0) return kInvalidArgument;
  const bool logdet = a.logdet_out != nullptr;
  if (logdet && (!a.logdet_info || a.dim == 0)) return kInvalidArgument;
  if (a.batch == 0) return kOk;
  if (a.n_max == 0) {  // every item is empty
    if (logdet)
      for (int64_t b = 0; b < a.batch; ++b) a.logdet_out[b] = 0.0, a.logdet_info[b] = 0;
    return kOk;
  }
  if (!a.gram && !logdet) return kInvalidArgument;
  if (a.gram && a.ldg < a.n_max) return kInvalidArgument;
  const int64_t block_span = (a.n_max - 1) * a.ldg + a.n_max;  // elements one gram block reaches
  if (a.gram && a.batch > 1 && std::llabs(a.gram_stride_b) < block_span) return kInvalidArgument;
  if (a.row_sum && a.batch > 1 && std::llabs(a.row_sum_stride_b) < a.n_max) return kInvalidArgument;
  if (a.lengths)
    for (int64_t b = 0; b < a.batch; ++b)
      if (a.lengths[b] < 0 || a.lengths[b] > a.n_max) return kInvalidArgument;
  if (a.dim == 0) return kOk;  // V has no columns: nothing to add
  if (!a.x && !a.item_x) return kInvalidArgument;
  auto item_base = [&](int64_t b) {
    return a.item_x ? static_cast<const char*>(a.item_x[b])
                    : static_cast<const char*>(a.x) + b * a.stride_b * static_cast<int64_t>(elem_size(a.dtype));
  };
  if (a.item_x)
    for (int64_t b = 0; b < a.batch; ++b)
      if (!a.item_x[b] && (a.lengths ? a.lengths[b] : a.n_max) > 0) return kInvalidArgument;

  const RowGramTable& k = rowgram_kernels();
  const int64_t dot_max = k.vl_doubles >= 8 ? kDotMaxRows : kDotMaxRowsNarrow;
  auto use_dot = [&](int64_t L) { return a.kernel == 1 || (a.kernel == 0 && L <= dot_max); };

  try {
    // items with rows, biggest first (ties by index): the order is fixed, only who takes what varies
    std::vector<std::pair<int64_t, int64_t>> items;  // (-L, b)
    items.reserve(static_cast<size_t>(a.batch));
    int64_t max_dot = 0, max_panel = 0, max_len = 0;
    for (int64_t b = 0; b < a.batch; ++b) {
      const int64_t L = a.lengths ? a.lengths[b] : a.n_max;
      if (L == 0) {
        if (logdet) a.logdet_out[b] = 0.0, a.logdet_info[b] = 0;
        continue;
      }
      items.emplace_back(-L, b);
      max_len = std::max(max_len, L);
      if (use_dot(L)) max_dot = std::max(max_dot, L);
      else max_panel = std::max(max_panel, L);
    }
    if (items.empty()) return kOk;
    std::sort(items.begin(), items.end());
    const int64_t nitems = static_cast<int64_t>(items.size());

    const int64_t wpn = a.block_cols > 0 ? a.block_cols : kPanelBlock;
    const int64_t lp = padded_size(max_panel);
    const bool need_csh = a.col_shift && a.col_shift_stride_c != 1;

    int nt = std::min(std::max(1, a.num_threads), kMaxThreads);
    nt = static_cast<int>(std::min<int64_t>(nt, nitems));

    std::vector<Scratch> scratch;
    bool oom = false;
    auto prepare = [&](int n) {
      scratch.resize(static_cast<size_t>(n));
      for (Scratch& sc : scratch) {
        bool ok = true;
        if (max_dot)
          ok = ok && sc.vacc.alloc(size_t(max_dot) * size_t(max_dot) * 8) && sc.rsum.alloc(size_t(max_dot) * 8);
        if (max_panel) ok = ok && sc.pack.alloc(size_t(wpn) * size_t(lp)) && sc.g.alloc(size_t(lp) * size_t(odd_line_stride(max_panel)));
        if (a.row_shift) ok = ok && sc.rsh.alloc(size_t(max_len));
        if (need_csh) ok = ok && sc.csh.alloc(size_t(a.dim));
        if (a.row_sum || logdet) ok = ok && sc.rs.alloc(size_t(max_len));
        if (logdet) ok = ok && sc.chol.alloc(size_t(odd_line_stride(max_len)) * size_t(padded_size(max_len)));
        if (logdet) ok = ok && sc.piv.alloc(size_t(max_len));
        if (logdet && max_len > kCholMinRows)
          ok = ok && sc.cpack.alloc(size_t(kCholBlockRows) * size_t(padded_size(max_len)));
        if (logdet && !a.gram && max_dot) ok = ok && sc.lg.alloc(size_t(max_dot) * size_t(max_dot));
        if (!ok) oom = true;
      }
    };

    std::atomic<int64_t> next{0};
    const size_t esz = elem_size(a.dtype);
    auto work = [&](int t, int) {
      if (oom) return;
      Scratch& sc = scratch[static_cast<size_t>(t)];
      // One item of lookahead: the next item is claimed when this one starts, so its rows can be
      // prefetched while this one computes (the claim order, not the schedule, changes; every item
      // is still computed by one thread).
      int64_t qn = next.fetch_add(1, std::memory_order_relaxed);
      while (qn < nitems) {
        const int64_t q = qn;
        qn = next.fetch_add(1, std::memory_order_relaxed);
        RowPrefetch pf;
        if (qn < nitems && a.stride_c == 1) {
          const int64_t bn = items[static_cast<size_t>(qn)].second;
          pf.base = item_base(bn);
          pf.rows = -items[static_cast<size_t>(qn)].first;
          pf.row_bytes = a.dim * static_cast<int64_t>(esz);
          pf.stride_bytes = a.stride_r * static_cast<int64_t>(esz);
          if (pf.stride_bytes == pf.row_bytes || pf.rows == 1) {  // one contiguous run
            pf.cur = pf.base;
            pf.end = pf.base + pf.rows * pf.row_bytes;
          }
        }
        const int64_t L = -items[static_cast<size_t>(q)].first;
        const int64_t b = items[static_cast<size_t>(q)].second;
        RowItem it;
        it.x = item_base(b);
        it.dtype = a.dtype;
        it.rows = L;
        it.cols = a.dim;
        it.stride_r = a.stride_r;
        it.stride_c = a.stride_c;
        if (a.row_shift) {
          const double* r = a.row_shift + b * a.row_shift_stride_b;
          for (int64_t i = 0; i < L; ++i) sc.rsh.p[i] = r[i * a.row_shift_stride_r];
          it.row_shift = sc.rsh.p;
        }
        if (a.col_shift) {
          const double* c = a.col_shift + b * a.col_shift_stride_b;
          if (need_csh) {
            for (int64_t j = 0; j < a.dim; ++j) sc.csh.p[j] = c[j * a.col_shift_stride_c];
            it.col_shift = sc.csh.p;
          } else {
            it.col_shift = c;
          }
        }
        double* rs = nullptr;
        if (a.row_sum || logdet) {
          rs = sc.rs.p;
          std::fill(rs, rs + L, 0.0);
        }
        // the item's block: gram[b], or (logdet without gram) this thread's zeroed L x L scratch — for the
        // panel kernel its own scratch, whose upper triangle is all the factorisation reads
        int64_t ldg = a.gram ? a.ldg : L;
        double* gb = a.gram ? a.gram + b * a.gram_stride_b : sc.lg.p;
        if (!a.gram && use_dot(L)) std::fill(gb, gb + L * L, 0.0);
        if (use_dot(L)) {
          const int64_t w = dot_block(L, static_cast<int64_t>(esz), a.block_cols);
          double* vacc = sc.vacc.p;
          double* rsum = sc.rsum.p;
          for (int64_t i = 0; i < L; ++i) std::fill(vacc + (i * L + i) * 8, vacc + (i * L + L) * 8, 0.0);
          std::fill(rsum, rsum + L * 8, 0.0);
          // the kernels' steps: one per group of 8 features per tile (about nb (nb + 1) / 2 tiles of rt rows)
          const int64_t rt = k.vl_doubles >= 8 ? 5 : 3, nb = (L + rt - 1) / rt;
          const int64_t steps = std::max<int64_t>(1, (a.dim + 7) / 8 * (nb * (nb + 1) / 2));
          pf.per_iter = (pf.lines() + steps - 1) / steps;
          const int64_t per_slice = pf.cur ? 0 : pf.lines() / std::max<int64_t>(1, (a.dim + w - 1) / w) + 1;
          for (int64_t f0 = 0; f0 < a.dim; f0 += w) {
            pf.step(per_slice);  // strided items: a burst per slice
            k.fused(it, f0, std::min(w, a.dim - f0), vacc, rsum, &pf);
          }
          pf.step(pf.lines());  // what the kernels' steps did not reach
          for (int64_t i = 0; i < L; ++i) {
            for (int64_t j = i; j < L; ++j) {
              const double* v = vacc + (i * L + j) * 8;
              const double s = ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
              gb[i * ldg + j] += s;
              if (j != i) gb[j * ldg + i] += s;
            }
          }
          if (rs)
            for (int64_t i = 0; i < L; ++i) {
              const double* v = rsum + i * 8;
              rs[i] += ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
            }
        } else {
          const int64_t np = padded_size(L) / kPanel, ldl = odd_line_stride(L);
          double* g = sc.g.p;
          for (int64_t i = 0; i < np * kPanel; ++i) std::fill(g + i * ldl + i / kPanel * kPanel, g + i * ldl + np * kPanel, 0.0);
          for (int64_t f0 = 0; f0 < a.dim; f0 += wpn) {
            const int64_t ww = std::min(wpn, a.dim - f0);
            k.pack(it, f0, ww, sc.pack.p, rs);
            k.tiles(sc.pack.p, ww, np, 0, np, g, ldl);
          }
          if (!a.gram) {  // logdet only: factorised straight from the upper triangle here
            gb = g;
            ldg = ldl;
          } else {
            for (int64_t i = 0; i < L; ++i) {
              gb[i * ldg + i] += g[i * ldl + i];
              for (int64_t j = i + 1; j < L; ++j) {
                const double s = g[i * ldl + j];
                gb[i * ldg + j] += s;
                gb[j * ldg + i] += s;
              }
            }
          }
        }
        const double* rfin = rs;  // the item's final row sums (with row_sum's prior contents)
        if (a.row_sum) {
          double* out = a.row_sum + b * a.row_sum_stride_b;
          for (int64_t i = 0; i < L; ++i) out[i] += rs[i];
          rfin = out;
        }
        if (logdet)
          logdet_item(gb, ldg, a.logdet_scale != 0.0 ? rfin : nullptr, L, a.logdet_scale, a.logdet_ridge, sc.chol.p,
                      sc.cpack.p, sc.piv.p, k, a.logdet_out + b, a.logdet_info + b);
      }
    };
    run_threads(nt, prepare, work);
    if (oom) return kOutOfMemory;
  } catch (const std::bad_alloc&) {  // the item list or the scratch table: nothing was written
    return kOutOfMemory;
  }
  return kOk;
}

}  // namespace rankme
