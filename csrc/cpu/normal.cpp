// Driver of the fused normal operator out += X^T (X W): rows split across threads, each thread packs a
// block of rows (upcast + shift) into a cache-resident buffer and runs every k-group of W over it
// before the next block, so X is read from memory exactly once per application.
#include <algorithm>
#include <new>
#include <thread>
#include <vector>

#include "gram_internal.h"
#include "rankme/normal.h"
#include "rankme/threads.h"

namespace rankme {
namespace {

// Packs rows r0..r0+b-1 (shifted, upcast to T) row-major into p (b x cols).
template <typename In, typename T>
void pack_rows(const NormalArgs& a, int64_t r0, int64_t b, T* p) {
  const In* x = static_cast<const In*>(a.x);
  const int64_t cols = a.cols, sc = a.stride_c;
  const double* shift = a.col_shift;
  for (int64_t r = 0; r < b; ++r) {
    const In* row = x + (r0 + r) * a.stride_r;
    T* dst = p + r * cols;
    if (sc == 1) {  // contiguous rows: the loops vectorise
      if (shift) {
        for (int64_t c = 0; c < cols; ++c) dst[c] = static_cast<T>(to_double(row[c]) - shift[c]);
      } else {
        for (int64_t c = 0; c < cols; ++c) dst[c] = static_cast<T>(to_double(row[c]));
      }
    } else if (shift) {
      for (int64_t c = 0; c < cols; ++c) dst[c] = static_cast<T>(to_double(row[c * sc]) - shift[c]);
    } else {
      for (int64_t c = 0; c < cols; ++c) dst[c] = static_cast<T>(to_double(row[c * sc]));
    }
  }
}

template <typename T>
void pack_any(const NormalArgs& a, int64_t r0, int64_t b, T* p) {
  switch (a.dtype) {
    case DType::kFloat64: pack_rows<double, T>(a, r0, b, p); break;
    case DType::kFloat32: pack_rows<float, T>(a, r0, b, p); break;
    case DType::kFloat16: pack_rows<Half, T>(a, r0, b, p); break;
    case DType::kBFloat16: pack_rows<BFloat16, T>(a, r0, b, p); break;
  }
}

template <typename T>
Status run(const NormalArgs& a, void (*block)(const T*, int64_t, int64_t, const T*, int64_t, T*, T*), int lanes,
           int nthreads) {
  const int64_t cols = a.cols, k = a.k;
  const int64_t kpg = 4 * lanes;  // k-group width: at most 4 vectors per k-row
  const int64_t ngroups = (k + kpg - 1) / kpg;
  // last group padded only to what it needs (1, 2 or 4 vectors)
  std::vector<int64_t> gk(ngroups), gp(ngroups);
  for (int64_t g = 0; g < ngroups; ++g) {
    gk[g] = std::min(kpg, k - g * kpg);
    gp[g] = gk[g] <= lanes ? lanes : gk[g] <= 2 * lanes ? 2 * lanes : 4 * lanes;
  }
  std::vector<std::vector<T>> wg(ngroups);
  for (int64_t g = 0; g < ngroups; ++g) {
    wg[g].assign(size_t(cols * gp[g]), T(0));
    for (int64_t j = 0; j < cols; ++j)
      for (int64_t v = 0; v < gk[g]; ++v) wg[g][j * gp[g] + v] = static_cast<T>(a.w[j * k + g * kpg + v]);
  }
  // Block rows: the packed block (B x cols in T) must stay cache-resident between its two products,
  // so B shrinks with d (at most kNormalBlockRows, the float32 partial-sum length).
  const int64_t B = std::max<int64_t>(
      16, std::min<int64_t>(kNormalBlockRows, kNormalBlockBytes / (cols * static_cast<int64_t>(sizeof(T)))));
  const int64_t nblocks = (a.rows + B - 1) / B;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(std::min(nthreads, kMaxThreads), nblocks)));
  // float32 blocks: each block's sums (<= B rows) join a float64 total; float64 blocks accumulate in
  // place over all of the thread's rows.
  constexpr bool kFlush = sizeof(T) < sizeof(double);
  std::vector<std::vector<double>> outs(nt);
  std::vector<int> failed(nt, 0);
  auto work = [&](int t, int n) {
    try {
      std::vector<T> p(size_t(B * cols)), y(size_t(B * 4 * lanes));
      std::vector<std::vector<T>> acc(ngroups);
      for (int64_t g = 0; g < ngroups; ++g) acc[g].assign(size_t(cols * gp[g]), T(0));
      std::vector<double>& out = outs[t];
      out.assign(size_t(cols * k), 0.0);
      auto flush = [&](int64_t g) {
        for (int64_t j = 0; j < cols; ++j)
          for (int64_t v = 0; v < gk[g]; ++v) out[j * k + g * kpg + v] += static_cast<double>(acc[g][j * gp[g] + v]);
      };
      const int64_t b0 = nblocks * t / n, b1 = nblocks * (t + 1) / n;
      for (int64_t bl = b0; bl < b1; ++bl) {
        const int64_t r0 = bl * B, b = std::min(B, a.rows - r0);
        pack_any<T>(a, r0, b, p.data());
        for (int64_t g = 0; g < ngroups; ++g) {
          if (kFlush) std::fill(acc[g].begin(), acc[g].end(), T(0));
          block(p.data(), b, cols, wg[g].data(), gp[g], y.data(), acc[g].data());
          if (kFlush) flush(g);
        }
      }
      if (!kFlush)
        for (int64_t g = 0; g < ngroups; ++g) flush(g);
    } catch (const std::exception&) {
      failed[t] = 1;
    }
  };
  // fewer threads than asked for (a failed start): the row blocks are split among those that run
  const int n = run_threads(nt, [](int) {}, work);
  for (int t = 0; t < n; ++t)
    if (failed[t]) return kOutOfMemory;
  for (int t = 0; t < n; ++t)
    for (int64_t i = 0; i < cols * k; ++i) a.out[i] += outs[t][i];
  return kOk;
}

template <typename In>
double sum_squares_rows(const NormalArgs& a, int64_t r0, int64_t r1) {
  const In* x = static_cast<const In*>(a.x);
  double total = 0.0;
  for (int64_t r = r0; r < r1; ++r) {
    const In* row = x + r * a.stride_r;
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // independent chains: the loop vectorises
    int64_t c = 0;
    if (a.stride_c == 1 && !a.col_shift) {
      for (; c + 8 <= a.cols; c += 8)
        for (int i = 0; i < 8; ++i) {
          const double v = to_double(row[c + i]);
          acc[i] += v * v;
        }
    }
    for (; c < a.cols; ++c) {
      const double v = to_double(row[c * a.stride_c]) - (a.col_shift ? a.col_shift[c] : 0.0);
      acc[c % 8] += v * v;
    }
    total += ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  }
  return total;
}

}  // namespace

Status sum_squares(const NormalArgs& a, double* out) {
  if (a.rows < 0 || a.cols <= 0 || !out || (a.rows > 0 && !a.x)) return kInvalidArgument;
  if (static_cast<int>(a.dtype) < 0 || static_cast<int>(a.dtype) > 3) return kUnsupportedDtype;
  const int nt = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(std::min(std::max(1, a.num_threads), kMaxThreads), a.rows)));
  std::vector<double> part(nt, 0.0);
  auto work = [&](int t, int n) {
    const int64_t r0 = a.rows * t / n, r1 = a.rows * (t + 1) / n;
    switch (a.dtype) {
      case DType::kFloat64: part[t] = sum_squares_rows<double>(a, r0, r1); break;
      case DType::kFloat32: part[t] = sum_squares_rows<float>(a, r0, r1); break;
      case DType::kFloat16: part[t] = sum_squares_rows<Half>(a, r0, r1); break;
      case DType::kBFloat16: part[t] = sum_squares_rows<BFloat16>(a, r0, r1); break;
    }
  };
  // the sum depends on the number of threads that started (a failed start: fewer), not on the schedule
  const int n = run_threads(nt, [](int) {}, work);
  double total = 0.0;
  for (int t = 0; t < n; ++t) total += part[t];
  *out = total;
  return kOk;
}

Status normal_apply(const NormalArgs& a) {
  if (a.rows < 0 || a.cols <= 0 || a.k <= 0 || !a.w || !a.out || (a.rows > 0 && !a.x)) return kInvalidArgument;
  if (static_cast<int>(a.dtype) < 0 || static_cast<int>(a.dtype) > 3) return kUnsupportedDtype;
  if (a.rows == 0) return kOk;
  const NormalTable& nt = normal_kernels();
  const int threads = std::max(1, a.num_threads);
  if (a.single_precision) return run<float>(a, nt.f32, nt.vl_doubles * 2, threads);
  return run<double>(a, nt.f64, nt.vl_doubles, threads);
}

}  // namespace rankme
