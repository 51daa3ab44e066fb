// Driver of the streaming Gram: chunking over rows, threading, ISA dispatch.
//
// Two parallel schedules (chosen by the size of G), both dynamic (a thread that gets less of a core,
// e.g. beside a data-loader worker, takes less of the work) and both deterministic (the same input
// and thread count give the same bits whichever thread ran what):
//  * private: the chunks are cut into contiguous slots of decreasing size (guided, or rounds of equal
//    slots when the copies would exceed their budget: big ones first, small ones last so the threads
//    finish together); threads take slots in turn from a counter. Slot 0 adds into G itself, every other
//    slot into its own zeroed copy (from a process-wide cache), and the copies are added into G in slot
//    order as the slots complete. Used while the copies stay small (<= 32 MiB in all).
//  * shared: the threads pack each chunk together (pieces of panels), then update disjoint pieces of
//    the shared G (equal triangle areas, several per thread); every element of G is written by one
//    thread per chunk, in chunk order. The pieces are tasks taken in order from one counter (chunk c's
//    packs, its tiles, chunk c + 1's packs, ...) into two packing buffers, each task waiting only for the
//    earlier tasks it reads from, so a thread done with its last tile piece packs the next chunk instead of
//    waiting at a barrier for the other threads' last pieces.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <mutex>
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

bool isa_supported(const char* isa) {
  const std::string v = isa ? isa : "";
  if (v == "generic") return true;
#if defined(RANKME_HAVE_X86_VARIANTS)
  __builtin_cpu_init();
  if (v == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (v == "avx512") return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
#endif
  return false;
}

// RANKME_FAST_ISA=generic|avx2|avx512 forces a kernel (the Python loader refuses a value the CPU or the
// build lacks before any kernel runs; an unsupported one is ignored here, never executed);
// RANKME_FAST_DISABLE_AVX512 (older) skips AVX-512 in the automatic choice.
static const KernelTable& select_kernels(const char** name) {
  const char* forced = std::getenv("RANKME_FAST_ISA");
  const std::string f = forced ? forced : "";
  if (f == "generic") {
    *name = "generic";
    return generic::table;
  }
#if defined(RANKME_HAVE_X86_VARIANTS)
  if (f == "avx2" && isa_supported("avx2")) {
    *name = "avx2";
    return avx2::table;
  }
  if (f == "avx512" && isa_supported("avx512")) {
    *name = "avx512";
    return avx512::table;
  }
  if (!std::getenv("RANKME_FAST_DISABLE_AVX512") && isa_supported("avx512")) {
    *name = "avx512";
    return avx512::table;
  }
  if (isa_supported("avx2")) {
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

// Process-wide cache of the private schedule's 64-byte aligned scratch (G copies, packing buffers): a
// streaming caller (score, the accumulator) calls the kernel once per ~64 MiB chunk, and allocating
// them afresh each call costs page faults on megabytes (at d = 1024, 2 threads, 16384-row calls: ~10 ms
// of a ~180 ms call with the serial fold below). Copies come back zeroed where the tiles write, tagged
// with that layout, so a call of the same shape skips zeroing them. At most kCacheBytes are kept.
class ScratchCache {
 public:
  struct Block {
    double* p = nullptr;
    size_t elems = 0;
    int64_t clean_cols = -1, clean_ld = -1;  // the layout whose tile region is all zero, or -1
  };
  Block get(size_t elems) {
    {
      std::lock_guard<std::mutex> l(m_);
      size_t best = free_.size();
      for (size_t i = 0; i < free_.size(); ++i)
        if (free_[i].elems >= elems && (best == free_.size() || free_[i].elems < free_[best].elems)) best = i;
      if (best < free_.size()) {
        Block b = free_[best];
        free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(best));
        bytes_ -= b.elems * sizeof(double);
        return b;
      }
    }
    Block b;
    b.p = static_cast<double*>(::operator new[](elems * sizeof(double), std::align_val_t(64), std::nothrow));
    b.elems = b.p ? elems : 0;
    return b;
  }
  // Back into the cache; clean_cols / clean_ld: the layout whose tile region the caller left all zero
  // (-1: nothing known), so no block keeps a tag from an earlier use.
  void put(Block b, int64_t clean_cols = -1, int64_t clean_ld = -1) {
    if (!b.p) return;
    b.clean_cols = clean_cols;
    b.clean_ld = clean_ld;
    const size_t nb = b.elems * sizeof(double);
    std::vector<Block> evict;
    {
      std::lock_guard<std::mutex> l(m_);
      if (nb <= kCacheBytes) {
        // the oldest blocks make room: after calls of another shape (many small copies of a d = 256 call, say)
        // the cache holds the current shape's blocks, not the stale ones (which made every later d = 1024
        // call allocate and fault in its 8 MiB copies afresh: 2 threads 83 -> 73 % of the FMA peak)
        size_t k = 0;
        while (bytes_ + nb > kCacheBytes && k < free_.size()) {
          bytes_ -= free_[k].elems * sizeof(double);
          evict.push_back(free_[k++]);
        }
        free_.erase(free_.begin(), free_.begin() + static_cast<std::ptrdiff_t>(k));
        free_.push_back(b);
        bytes_ += nb;
        b = Block();
      }
    }
    for (Block& e : evict) ::operator delete[](e.p, std::align_val_t(64));
    if (b.p) ::operator delete[](b.p, std::align_val_t(64));
  }

 private:
  static constexpr size_t kCacheBytes = size_t(40) << 20;
  std::mutex m_;
  std::vector<Block> free_;
  size_t bytes_ = 0;
};

ScratchCache& scratch_cache() {
  static ScratchCache* c = new ScratchCache();  // never destroyed: no teardown order with exiting threads
  return *c;
}

// Returns a cache block on every path out of a worker.
struct CachedBuf {
  ScratchCache::Block b;
  explicit CachedBuf(size_t n) : b(scratch_cache().get(n)) {}
  ~CachedBuf() { scratch_cache().put(b); }
  CachedBuf(const CachedBuf&) = delete;
  CachedBuf& operator=(const CachedBuf&) = delete;
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

// Guided slots over [0, nchunks): each slot is ceil(remaining / (2 t)) chunks but at least `least`,
// so the first t slots hold about 40% of the rows and the last ones a few chunks each. Returns the
// slot boundaries (size = slots + 1).
std::vector<int64_t> guided_slots(int64_t nchunks, int t, int64_t least) {
  std::vector<int64_t> b{0};
  int64_t r0 = 0;
  while (r0 < nchunks) {
    const int64_t rem = nchunks - r0;
    const int64_t sz = std::min(rem, std::max(least, (rem + 2 * t - 1) / (2 * t)));
    r0 += sz;
    b.push_back(r0);
  }
  return b;
}

// Private-schedule slots within a memory budget for the copies (slot 0 needs none).
std::vector<int64_t> private_slots(int64_t nchunks, int t, size_t g_bytes) {
  const size_t budget = size_t(32) << 20;
  const int64_t max_slots = std::max<int64_t>(t, int64_t(budget / std::max<size_t>(g_bytes, 1)) + 1);
  // Slots shrink down to one chunk: a thread idles at the end for at most about one chunk. (A minimum of
  // nchunks / (8 t) chunks, used before, let the last slot run alone for up to that many chunks: on Zen 4 at
  // d = 256, 2 threads, 82-85 % of the FMA peak against 86-88 % now, and two separate one-thread processes
  // 86-88 %.) The number of slots is still bounded by the copies' budget below.
  std::vector<int64_t> b = guided_slots(nchunks, t, 1);
  if (int64_t(b.size()) - 1 <= max_slots) return b;
  // Too many copies for the budget (d of ~700 and up on 2 threads): rounds of t equal slots, each round
  // 3/4 of the chunks left and the last round all of them, so threads of equal speed finish together
  // and the last slots are small. (Guided slots with a larger minimum, used before, left the last slot
  // at ~1/9 of the work and one thread idle for most of it: at d = 1024, 75 chunks on 2 threads, slots
  // of 19, 16, 16, 16, 8 chunks end 35 : 40; rounds give 28, 28, 9, 10: 37 : 38.)
  const int64_t rounds = std::max<int64_t>(1, max_slots / t);
  b.assign(1, 0);
  int64_t r0 = 0;
  for (int64_t r = 0; r < rounds && r0 < nchunks; ++r) {
    const int64_t rem = nchunks - r0;
    const int64_t take = r + 1 == rounds ? rem : std::min<int64_t>(rem, std::max<int64_t>(t, rem * 3 / 4));
    for (int k = 1; k <= t; ++k) {
      const int64_t e = r0 + take * k / t;
      if (e > b.back()) b.push_back(e);
    }
    r0 += take;
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
  const size_t g_bytes = g_elems * sizeof(double);
  const bool priv = nt > 1 && (size_t(nt - 1) * g_bytes <= (size_t(16) << 20)) && nchunks >= int64_t(nt);

  if (nt == 1 || priv) {
    const std::vector<int64_t> slot = nt == 1 ? std::vector<int64_t>{0, nchunks} : private_slots(nchunks, nt, g_bytes);
    const int64_t nslots = int64_t(slot.size()) - 1;
    std::vector<std::vector<double>> colsums(nslots);
    std::vector<ScratchCache::Block> gs(nslots);
    std::vector<char> failed(nslots, 0), done(nslots, 0);
    std::atomic<int64_t> next{0};
    // Slot 0 adds into G itself; every other slot into its own copy, added into G in slot order
    // (G += copy_1, then copy_2, ...: the bits do not depend on who ran what). The adding is done by
    // whichever thread finishes a slot while its predecessors are all in, as the slots complete, so it
    // overlaps the other threads' work instead of trailing it; the copy is zeroed on the way and goes
    // back to the cache clean. fold_next: the first slot not yet in G; one thread folds at a time.
    std::mutex fold_m;
    bool folding = false;
    int64_t fold_next = 0;
    auto fold = [&](int64_t s) {
      if (s == 0 || failed[s]) return;
      double* src = gs[s].p;
      for (int64_t i = 0; i < cols_p; ++i) {
        const int64_t j0 = i / kPanel * kPanel;  // keep the whole diagonal block, cheap and simple
        double* gr = a.gram + i * a.ldg;
        double* sr = src + i * a.ldg;
        for (int64_t j = j0; j < cols_p; ++j) {
          gr[j] += sr[j];
          sr[j] = 0.0;
        }
      }
      if (a.col_sum)
        for (int64_t c = 0; c < a.cols; ++c) a.col_sum[c] += colsums[s][c];
      scratch_cache().put(gs[s], cols_p, a.ldg);
      gs[s] = ScratchCache::Block();
    };
    auto finish = [&](int64_t s) {
      int64_t k;
      {
        std::lock_guard<std::mutex> l(fold_m);
        done[s] = 1;
        if (folding) return;  // the folding thread will see it
        folding = true;
        k = fold_next;
      }
      for (;;) {
        {
          std::lock_guard<std::mutex> l(fold_m);
          if (k >= nslots || !done[k]) {
            folding = false;
            return;
          }
        }
        fold(k);
        std::lock_guard<std::mutex> l(fold_m);
        fold_next = ++k;
      }
    };
    auto work = [&](int, int) {
      CachedBuf packbuf(size_t(kc) * cols_p);
      for (int64_t s; (s = next.fetch_add(1, std::memory_order_relaxed)) < nslots;) {
        try {
          if (!packbuf.b.p) { failed[s] = 1; finish(s); continue; }
          double* g = a.gram;
          double* cs = a.col_sum;
          if (s > 0) {
            gs[s] = scratch_cache().get(g_elems);
            if (!gs[s].p) { failed[s] = 1; finish(s); continue; }
            g = gs[s].p;
            if (gs[s].clean_cols != cols_p || gs[s].clean_ld != a.ldg)
              for (int64_t i = 0; i < cols_p; ++i) {  // the part the tiles write and the fold reads
                const int64_t j0 = i / kPanel * kPanel;
                std::fill(g + i * a.ldg + j0, g + i * a.ldg + cols_p, 0.0);
              }
            if (cs) { colsums[s].assign(a.cols, 0.0); cs = colsums[s].data(); }
          }
          for (int64_t c = slot[s]; c < slot[s + 1]; ++c) {
            const int64_t r0 = c * kc;
            const int64_t kk = std::min(kc, a.rows - r0);
            k.pack(a, r0, kk, 0, np, packbuf.b.p, cs);
            k.tiles(packbuf.b.p, kk, np, 0, np, g, a.ldg);
          }
        } catch (const std::exception&) {  // bad_alloc of a column-sum copy: report, never terminate
          failed[s] = 1;
        }
        finish(s);
      }
    };
    // with fewer threads than asked for (a failed start) the same slots run on fewer threads
    run_threads(nt, [](int) {}, work);
    Status st = kOk;
    for (int64_t s = 0; s < nslots; ++s) {
      if (failed[s]) st = kOutOfMemory;
      scratch_cache().put(gs[s]);  // not folded (only after a failure): back to the cache, not clean
    }
    return st;
  }

  // Shared schedule. Pieces: panels to pack and triangle pieces of G to update, several per thread so a
  // thread with less of a core takes fewer. Task t of the counter is piece t % (2 p) of chunk t / (2 p): its
  // p packs, then its p tile pieces.
  //  * A pack of chunk c waits for chunk c - 1's packs (the column sums add in chunk order, and packs_done
  //    counts whole chunks: >= (c + 1) p means chunk c is packed) and for chunk c - 2's tiles (they read the
  //    buffer it fills).
  //  * A tile piece waits for its chunk's packs and for the same piece of chunk c - 1 (G in chunk order).
  // Every task waits only for earlier ones, all already taken, so the earliest unfinished one always runs.
  // (With a barrier after each chunk's tiles instead, the thread that drew the shorter last pieces idled:
  // on Zen 4 at d = 2048, 2 threads, 1-9 % of a call.)
  const size_t pack_elems = size_t(kc) * cols_p;
  CachedBuf packbuf_c((nchunks > 1 ? 2 : 1) * pack_elems);  // one chunk: one buffer
  if (!packbuf_c.b.p) return kOutOfMemory;
  double* const packs[2] = {packbuf_c.b.p, nchunks > 1 ? packbuf_c.b.p + pack_elems : packbuf_c.b.p};
  std::vector<int64_t> jsplit, psplit;
  int64_t pieces = 0;
  std::atomic<int64_t> next_task{0}, packs_done{0};
  std::unique_ptr<std::atomic<int64_t>[]> tiles_done;  // per piece: the chunks whose tiles of it are in G
  auto prepare = [&](int n) {  // the pieces follow the threads that started
    pieces = std::min<int64_t>(np, 4 * int64_t(n));
    jsplit = triangle_split(np, static_cast<int>(pieces));
    psplit.resize(pieces + 1);
    for (int64_t i = 0; i <= pieces; ++i) psplit[i] = np * i / pieces;
    tiles_done.reset(new std::atomic<int64_t>[pieces]);
    for (int64_t i = 0; i < pieces; ++i) tiles_done[i].store(0, std::memory_order_relaxed);
  };
  // Spins briefly, then yields the core (another process may need it to finish the task waited for).
  auto wait_until = [](auto&& ready) {
    for (int spins = 0; !ready();)
      if (++spins < 4096) RANKME_PAUSE();
      else std::this_thread::yield();
  };
  auto work = [&](int, int) {
    const int64_t per_chunk = 2 * pieces;
    for (int64_t t; (t = next_task.fetch_add(1, std::memory_order_relaxed)) < nchunks * per_chunk;) {
      const int64_t c = t / per_chunk, q = t % per_chunk;
      const int64_t r0 = c * kc;
      const int64_t kk = std::min(kc, a.rows - r0);
      double* const pk = packs[c & 1];
      if (q < pieces) {
        wait_until([&] {
          if (packs_done.load(std::memory_order_acquire) < c * pieces) return false;
          for (int64_t i = 0; i < pieces; ++i)
            if (tiles_done[i].load(std::memory_order_acquire) < c - 1) return false;
          return true;
        });
        k.pack(a, r0, kk, psplit[q], psplit[q + 1], pk, a.col_sum);  // disjoint panels, col_sum entries
        packs_done.fetch_add(1, std::memory_order_acq_rel);
      } else {
        const int64_t p = q - pieces;
        wait_until([&] {
          return packs_done.load(std::memory_order_acquire) >= (c + 1) * pieces &&
                 tiles_done[p].load(std::memory_order_acquire) >= c;
        });
        k.tiles(pk, kk, np, jsplit[p], jsplit[p + 1], a.gram, a.ldg);
        tiles_done[p].store(c + 1, std::memory_order_release);
      }
    }
  };
  run_threads(nt, prepare, work);
  return kOk;
}

}  // namespace rankme
