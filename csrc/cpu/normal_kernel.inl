// ISA-generic block kernels of the fused normal operator (included by gram_isa_*.cpp after
// gram_kernel.inl, which defines RANKME_ISA_NS and RANKME_VL). One block: Y = P W, acc += P^T Y, with
// P (b x cols) packed row-major, W (cols x kp) and Y (b x kp), kp a multiple of the vector width.
// Both products keep 16 vector accumulators live: rows x vectors-per-k-row = 16 in Y = P W, and
// columns x vectors-per-k-row = 16 in acc += P^T Y (columns of one cache line of P at a time).
#include "rankme/normal.h"

namespace rankme {
namespace RANKME_ISA_NS {

template <typename T, int NV>
static void block_t(const T* __restrict p, int64_t b, int64_t cols, const T* __restrict w, T* __restrict y,
                    T* __restrict acc) {
  constexpr int L = RANKME_VL * 8 / static_cast<int>(sizeof(T));  // lanes of T per vector
  typedef T vt __attribute__((vector_size(L * sizeof(T))));
  constexpr int kp = NV * L;
  constexpr int RB = 16 / NV;
  auto ld = [](const T* q) { vt v; std::memcpy(&v, q, sizeof v); return v; };
  auto st = [](T* q, vt v) { std::memcpy(q, &v, sizeof v); };
  // Y = P W, RB rows at a time, over column chunks of W small enough to stay in L2 while every row
  // group of the block passes over them (at large d, W itself is megabytes: streaming all of it once
  // per RB rows would make the product L3-bound)
  constexpr int64_t CJ = std::max<int64_t>(64, (int64_t(128) << 10) / (int64_t(kp) * int64_t(sizeof(T))));
  for (int64_t j0 = 0; j0 < cols; j0 += CJ) {
    const int64_t j1 = std::min(cols, j0 + CJ);
    for (int64_t r0 = 0; r0 < b; r0 += RB) {
      const int rn = static_cast<int>(std::min<int64_t>(RB, b - r0));
      vt s[RB][NV];
      for (int i = 0; i < RB; ++i)
        for (int v = 0; v < NV; ++v) s[i][v] = (j0 > 0 && i < rn) ? ld(y + (r0 + i) * kp + v * L) : vt{};
      const T* pr[RB];  // rows past the block's end repeat its last row (computed, never stored)
      for (int i = 0; i < RB; ++i) pr[i] = p + (r0 + (i < rn ? i : rn - 1)) * cols;
      for (int64_t j = j0; j < j1; ++j) {
        vt wv[NV];
        for (int v = 0; v < NV; ++v) wv[v] = ld(w + j * kp + v * L);
        for (int i = 0; i < RB; ++i) {
          const T a = pr[i][j];
          for (int v = 0; v < NV; ++v) s[i][v] += a * wv[v];
        }
      }
      for (int i = 0; i < rn; ++i)
        for (int v = 0; v < NV; ++v) st(y + (r0 + i) * kp + v * L, s[i][v]);
    }
  }
  // acc += P^T Y, JG columns at a time: each Y row loaded once per JG columns
  constexpr int JG = 16 / NV;
  for (int64_t j0 = 0; j0 < cols; j0 += JG) {
    const int jn = static_cast<int>(std::min<int64_t>(JG, cols - j0));
    vt s[JG][NV];
    for (int i = 0; i < JG; ++i)
      for (int v = 0; v < NV; ++v) s[i][v] = vt{};
    for (int64_t r = 0; r < b; ++r) {
      vt yv[NV];
      for (int v = 0; v < NV; ++v) yv[v] = ld(y + r * kp + v * L);
      const T* pr = p + r * cols + j0;
      for (int i = 0; i < JG; ++i) {
        const T a = i < jn ? pr[i] : T(0);
        for (int v = 0; v < NV; ++v) s[i][v] += a * yv[v];
      }
    }
    for (int i = 0; i < jn; ++i)
      for (int v = 0; v < NV; ++v) st(acc + (j0 + i) * kp + v * L, ld(acc + (j0 + i) * kp + v * L) + s[i][v]);
  }
}

template <typename T>
static void block_any(const T* p, int64_t b, int64_t cols, const T* w, int64_t kp, T* y, T* acc) {
  constexpr int L = RANKME_VL * 8 / static_cast<int>(sizeof(T));
  if (kp <= L) block_t<T, 1>(p, b, cols, w, y, acc);
  else if (kp <= 2 * L) block_t<T, 2>(p, b, cols, w, y, acc);
  else block_t<T, 4>(p, b, cols, w, y, acc);
}

extern const NormalTable normal_table = {&block_any<float>, &block_any<double>, RANKME_VL};

}  // namespace RANKME_ISA_NS
}  // namespace rankme
