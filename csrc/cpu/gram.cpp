// Driver of the streaming Gram: chunking over rows, threading, ISA dispatch.
//
// Two parallel schedules (chosen by the size of G):
//  * private: each thread owns a contiguous row range and its own padded G, reduced at the end. No
//    synchronisation inside the loop; used while the extra copies stay small (<= 16 MiB in all).
//  * shared: all threads pack one chunk together (split by column panels), meet at a barrier, then
//    update disjoint column ranges of the shared G with equal triangle areas.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include "gram_internal.h"
#include "rankme/gram.h"
#include "rankme/threads.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define RANKME_PAUSE() _mm_pause()
#else
#define RANKME_PAUSE() std::this_thread::yield()
#endif

namespace rankme {

const char* status_string(int status) {
  switch (status) {
    case kOk: return "ok";
    case kInvalidArgument: return "invalid argument";
    case kUnsupportedDtype: return "unsupported dtype";
    case kOutOfMemory: return "out of memory";
    default: return "unknown status";
  }
}

static const KernelTable& select_kernels(const char** name) {
#if defined(RANKME_HAVE_X86_VARIANTS)
  __builtin_cpu_init();
  if (!std::getenv("RANKME_FAST_DISABLE_AVX512") && __builtin_cpu_supports("avx512f")) {
    *name = "avx512";
    return avx512::table;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    *name = "avx2";
    return avx2::table;
  }
#endif
  *name = "generic";
  return generic::table;
}

static const KernelTable& kernels(const char** name = nullptr) {
  static const char* isa = nullptr;
  static const KernelTable& t = select_kernels(&isa);
  if (name) *name = isa;
  return t;
}

const NormalTable& normal_kernels() {
  const char* n = nullptr;
  kernels(&n);
#if defined(RANKME_HAVE_X86_VARIANTS)
  if (n == std::string("avx512")) return avx512::normal_table;
  if (n == std::string("avx2")) return avx2::normal_table;
#endif
  return generic::normal_table;
}

const char* gram_isa() {
  const char* n = nullptr;
  kernels(&n);
  return n;
}

namespace {

// Sense-reversing spin barrier; chunks are long enough that spinning is cheaper than a futex.
class SpinBarrier {
 public:
  explicit SpinBarrier(int n) : n_(n), count_(n), gen_(0) {}
  // before any thread waits: the number of threads that actually started
  void reset(int n) {
    n_ = n;
    count_.store(n, std::memory_order_relaxed);
  }
  void wait() {
    const int g = gen_.load(std::memory_order_acquire);
    if (count_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      count_.store(n_, std::memory_order_relaxed);
      gen_.fetch_add(1, std::memory_order_acq_rel);
      return;
    }
    int spins = 0;
    while (gen_.load(std::memory_order_acquire) == g) {
      if (++spins < 4096) RANKME_PAUSE();
      else std::this_thread::yield();
    }
  }

 private:
  int n_;
  std::atomic<int> count_;
  std::atomic<int> gen_;
};

struct AlignedBuf {
  double* p = nullptr;
  explicit AlignedBuf(size_t n) {
    if (n) p = static_cast<double*>(::operator new[](n * sizeof(double), std::align_val_t(64), std::nothrow));
  }
  ~AlignedBuf() {
    if (p) ::operator delete[](p, std::align_val_t(64));
  }
  AlignedBuf(const AlignedBuf&) = delete;
  AlignedBuf& operator=(const AlignedBuf&) = delete;
};

// Rows per chunk. Every chunk streams the touched half of G through the cache hierarchy once, so
// longer chunks cut that traffic (at d=2048 a 128-row chunk moves 50 GB of G for 200k rows, a 512-row
// one 12.5 GB; measured 2-thread min/median 117/89 -> 133/94 GFLOP/s). 512 rows keep an i-panel
// (512 x 8 doubles = 32 KiB) inside L1, and the packed chunk costs 512 x d x 8 bytes.
constexpr int64_t kChunkRows = 512;

// Partition of j-panels [0, np) into t ranges of equal upper-triangle area (panel j has j+1 tiles).
std::vector<int64_t> triangle_split(int64_t np, int t) {
  std::vector<int64_t> b(t + 1, np);
  b[0] = 0;
  const double total = 0.5 * double(np) * double(np + 1);
  int64_t j = 0;
  double acc = 0.0;
  for (int k = 1; k < t; ++k) {
    const double target = total * k / t;
    while (j < np && acc + double(j + 1) <= target) acc += double(++j);
    b[k] = j;
  }
  return b;
}

}  // namespace

Status gram_update(const GramArgs& a) {
  if (a.rows == 0 && a.cols > 0 && a.gram) return kOk;  // empty chunk: torch hands a null data pointer
  if (!a.x || !a.gram || a.rows < 0 || a.cols <= 0) return kInvalidArgument;
  const int64_t cols_p = padded_size(a.cols);
  if (a.ldg < cols_p) return kInvalidArgument;
  if (static_cast<int>(a.dtype) < 0 || static_cast<int>(a.dtype) > 3) return kUnsupportedDtype;
  const KernelTable& k = kernels();
  const int64_t np = cols_p / kPanel;
  const int64_t kc = a.chunk_rows > 0 ? a.chunk_rows : kChunkRows;
  const int64_t nchunks = (a.rows + kc - 1) / kc;
  int nt = std::min(std::max(1, a.num_threads), kMaxThreads);
  nt = static_cast<int>(std::min<int64_t>(nt, nchunks * np));  // no idle threads on tiny input

  const size_t g_elems = size_t(cols_p) * size_t(a.ldg);
  const bool priv = nt > 1 && (size_t(nt - 1) * g_elems * 8 <= (size_t(16) << 20)) && nchunks >= size_t(nt);

  if (nt == 1 || priv) {
    std::vector<std::vector<double>> colsums;
    std::vector<AlignedBuf*> gs(nt, nullptr);
    std::vector<int> failed(nt, 0);
    colsums.resize(nt);
    auto work = [&](int t, int n) {
      try {
        AlignedBuf packbuf(size_t(kc) * cols_p);
        if (!packbuf.p) { failed[t] = 1; return; }
        double* g = a.gram;
        double* cs = a.col_sum;
        if (t > 0) {
          gs[t] = new (std::nothrow) AlignedBuf(g_elems);
          if (!gs[t] || !gs[t]->p) { failed[t] = 1; return; }
          std::fill(gs[t]->p, gs[t]->p + g_elems, 0.0);
          g = gs[t]->p;
          if (cs) { colsums[t].assign(a.cols, 0.0); cs = colsums[t].data(); }
        }
        const int64_t c0 = nchunks * t / n, c1 = nchunks * (t + 1) / n;
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t r0 = c * kc;
          const int64_t kk = std::min(kc, a.rows - r0);
          k.pack(a, r0, kk, 0, np, packbuf.p, cs);
          k.tiles(packbuf.p, kk, np, 0, np, g, a.ldg);
        }
      } catch (const std::exception&) {  // bad_alloc of a column-sum copy: report, never terminate
        failed[t] = 1;
      }
    };
    // Thread 0 writes into G itself, so G is only final once every thread's copy is added; with fewer
    // threads than asked for (a failed start) the rows are split among those that run.
    const int n = run_threads(nt, [](int) {}, work);
    Status st = kOk;
    for (int t = 0; t < n; ++t) if (failed[t]) st = kOutOfMemory;
    for (int t = 1; t < n; ++t) {
      if (st == kOk) {
        const double* src = gs[t]->p;
        for (int64_t i = 0; i < cols_p; ++i) {
          const int64_t j0 = i / kPanel * kPanel;  // keep the whole diagonal block, cheap and simple
          for (int64_t j = j0; j < cols_p; ++j) a.gram[i * a.ldg + j] += src[i * a.ldg + j];
        }
        if (a.col_sum)
          for (int64_t c = 0; c < a.cols; ++c) a.col_sum[c] += colsums[t][c];
      }
      delete gs[t];
    }
    return st;
  }

  // Shared schedule.
  AlignedBuf packbuf(size_t(kc) * cols_p);
  if (!packbuf.p) return kOutOfMemory;
  std::vector<int64_t> jsplit;
  SpinBarrier bar(nt);
  auto prepare = [&](int n) {  // the panel split and the barrier count follow the threads that started
    jsplit = triangle_split(np, n);
    bar.reset(n);
  };
  auto work = [&](int t, int n) {
    const int64_t p0 = np * t / n, p1 = np * (t + 1) / n;
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t r0 = c * kc;
      const int64_t kk = std::min(kc, a.rows - r0);
      k.pack(a, r0, kk, p0, p1, packbuf.p, a.col_sum);  // disjoint panels -> disjoint col_sum entries
      bar.wait();
      k.tiles(packbuf.p, kk, np, jsplit[t], jsplit[t + 1], a.gram, a.ldg);
      bar.wait();
    }
  };
  run_threads(nt, prepare, work);
  return kOk;
}

}  // namespace rankme
