// Fused streaming Gram on NVIDIA GPUs (sm_80+): upper-triangular 64x64 tiles, rows split across
// blocks, upcast + shift while staging tiles in shared memory (no converted copy of X), column sums
// fused into the diagonal tiles, float64 partials reduced in a fixed order.
//
// Exact mode: float64 tiles and DMMA (wmma m8n8k4 double) -> every product and sum is float64, the
// DESIGN section-3 contract. Fast mode: bf16/fp16 fed to the tensor cores as they are (unshifted
// input) or 3xTF32 (big*big + big*small + small*big, ~fp32 products) for float32/shifted input;
// fp32 accumulators are flushed into float64 every kCudaFastFold row blocks.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include "rankme/gram_cuda.h"

namespace rankme {
namespace {

using namespace nvcuda;

constexpr int BM = kCudaTile;
constexpr int kThreads = 128;  // 4 warps, each owns a 32x32 quarter of the tile

__device__ __forceinline__ double to_double(double v) { return v; }
__device__ __forceinline__ double to_double(float v) { return static_cast<double>(v); }
__device__ __forceinline__ double to_double(__half v) { return static_cast<double>(__half2float(v)); }
__device__ __forceinline__ double to_double(__nv_bfloat16 v) { return static_cast<double>(__bfloat162float(v)); }

struct Params {
  const void* x;
  int64_t rows, cols, sr, sc;
  const double* rs;
  const double* cs;
  const int32_t* ti;
  const int32_t* tj;
  int n_tiles;
  int64_t rows_per_split;
  double* ws;
  double* cws;
  double scale;
};

// V[r, c] in float64 (0 outside the matrix or past row_end).
template <typename T>
__device__ __forceinline__ double load_v(const Params& p, int64_t r, int64_t c, int64_t row_end) {
  if (r >= row_end || c >= p.cols) return 0.0;
  double v = to_double(static_cast<const T*>(p.x)[r * p.sr + c * p.sc]);
  if (p.rs) v -= p.rs[r];
  if (p.cs) v -= p.cs[c];
  return v;
}

__device__ __forceinline__ void row_range(const Params& p, int64_t* begin, int64_t* end) {
  *begin = static_cast<int64_t>(blockIdx.y) * p.rows_per_split;
  *end = min(*begin + p.rows_per_split, p.rows);
}

// ------------------------------------------------------------------------------ exact: DMMA fp64
template <typename T>
__global__ void __launch_bounds__(kThreads) gram_exact_kernel(Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int BK = 16;
  constexpr int LD = BM + 2;  // wmma: ldm a multiple of 16 bytes, fragment pointers 32-byte aligned (66 * 8 * 4 = 2112 = 66 * 32)
  __shared__ __align__(128) double sa[BK][LD];
  __shared__ __align__(128) double sb[BK][LD];
  const int t = blockIdx.x;
  const int64_t i0 = static_cast<int64_t>(p.ti[t]) * BM, j0 = static_cast<int64_t>(p.tj[t]) * BM;
  const bool diag = p.ti[t] == p.tj[t];
  const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
  int64_t r_begin, r_end;
  row_range(p, &r_begin, &r_end);

  wmma::fragment<wmma::accumulator, 8, 8, 4, double> acc[4][4];
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) wmma::fill_fragment(acc[i][j], 0.0);
  double csum = 0.0;

  for (int64_t k0 = r_begin; k0 < r_end; k0 += BK) {
    for (int e = threadIdx.x; e < BK * BM; e += kThreads) {
      const int r = e / BM, c = e % BM;
      sa[r][c] = load_v<T>(p, k0 + r, i0 + c, r_end);
      sb[r][c] = diag ? sa[r][c] : load_v<T>(p, k0 + r, j0 + c, r_end);
    }
    __syncthreads();
    if (diag && threadIdx.x < BM)
      for (int r = 0; r < BK; ++r) csum += sa[r][threadIdx.x];
    for (int kk = 0; kk < BK; kk += 4) {
      wmma::fragment<wmma::matrix_a, 8, 8, 4, double, wmma::col_major> fa[4];
      wmma::fragment<wmma::matrix_b, 8, 8, 4, double, wmma::row_major> fb[4];
      for (int i = 0; i < 4; ++i) wmma::load_matrix_sync(fa[i], &sa[kk][wm * 32 + i * 8], LD);
      for (int j = 0; j < 4; ++j) wmma::load_matrix_sync(fb[j], &sb[kk][wn * 32 + j * 8], LD);
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }
  double* out = p.ws + (static_cast<int64_t>(blockIdx.y) * p.n_tiles + t) * BM * BM;
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j)
      wmma::store_matrix_sync(out + (wm * 32 + i * 8) * BM + wn * 32 + j * 8, acc[i][j], BM, wmma::mem_row_major);
  if (diag && p.cws && threadIdx.x < BM && i0 + threadIdx.x < p.cols)
    p.cws[static_cast<int64_t>(blockIdx.y) * p.cols + i0 + threadIdx.x] = csum;
#endif
}

// ------------------------------------------------------------------------------ fast
// Each warp accumulates its 32x32 quarter in 2x2 fp32 fragments (16x16) and flushes them into 32
// float64 registers per lane every kCudaFastFold row blocks.
template <typename Frag>
__device__ __forceinline__ void flush(Frag (&acc)[2][2], float* scratch, double (&acc64)[32], int lane) {
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(scratch + i * 16 * 32 + j * 16, acc[i][j], 32, wmma::mem_row_major);
      wmma::fill_fragment(acc[i][j], 0.0f);
    }
  __syncwarp();
  for (int e = 0; e < 32; ++e) acc64[e] += static_cast<double>(scratch[e * 32 + lane]);
  __syncwarp();
}

__device__ __forceinline__ void store_quarter(const Params& p, int t, int wm, int wn, const double (&acc64)[32],
                                              int lane, double inv_scale2) {
  double* out = p.ws + (static_cast<int64_t>(blockIdx.y) * p.n_tiles + t) * BM * BM;
  for (int e = 0; e < 32; ++e) out[(wm * 32 + e) * BM + wn * 32 + lane] = acc64[e] * inv_scale2;
}

// bf16/fp16 input without shifts: tiles staged in their own type, m16n16k16, fp32 accumulators.
template <typename T>
__global__ void __launch_bounds__(kThreads) gram_fast16_kernel(Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int BK = 32;
  constexpr int LD = BM + 8;  // 16-byte multiple for 16-bit types
  __shared__ __align__(128) T sa[BK][LD];
  __shared__ __align__(128) T sb[BK][LD];
  __shared__ __align__(128) float scratch[4][32 * 32];
  const int t = blockIdx.x;
  const int64_t i0 = static_cast<int64_t>(p.ti[t]) * BM, j0 = static_cast<int64_t>(p.tj[t]) * BM;
  const bool diag = p.ti[t] == p.tj[t];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wm = warp / 2, wn = warp % 2;
  int64_t r_begin, r_end;
  row_range(p, &r_begin, &r_end);
  const T* x = static_cast<const T*>(p.x);
  const float sc = static_cast<float>(p.scale);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  double acc64[32];
  for (int e = 0; e < 32; ++e) acc64[e] = 0.0;
  double csum = 0.0;
  int step = 0;

  for (int64_t k0 = r_begin; k0 < r_end; k0 += BK) {
    for (int e = threadIdx.x; e < BK * BM; e += kThreads) {
      const int r = e / BM, c = e % BM;
      const int64_t gr = k0 + r;
      const bool in_r = gr < r_end;
      const float va = (in_r && i0 + c < p.cols) ? static_cast<float>(to_double(x[gr * p.sr + (i0 + c) * p.sc])) : 0.f;
      const float vb = (in_r && j0 + c < p.cols) ? static_cast<float>(to_double(x[gr * p.sr + (j0 + c) * p.sc])) : 0.f;
      sa[r][c] = T(va * sc);  // power-of-two scale: exact
      sb[r][c] = T(vb * sc);
    }
    __syncthreads();
    if (diag && p.cws && threadIdx.x < BM)
      for (int r = 0; r < BK; ++r) csum += to_double(sa[r][threadIdx.x]) / p.scale;
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &sa[kk][wm * 32 + i * 16], LD);
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &sb[kk][wn * 32 + j * 16], LD);
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
    if (++step % kCudaFastFold == 0) flush(acc, scratch[warp], acc64, lane);
  }
  flush(acc, scratch[warp], acc64, lane);
  store_quarter(p, t, wm, wn, acc64, lane, 1.0 / (p.scale * p.scale));
  if (diag && p.cws && threadIdx.x < BM && i0 + threadIdx.x < p.cols)
    p.cws[static_cast<int64_t>(blockIdx.y) * p.cols + i0 + threadIdx.x] = csum;
#endif
}

// float32 / float64 / shifted input: V staged as (big, small) tf32 pairs, 3 products per step.
template <typename T>
__global__ void __launch_bounds__(kThreads) gram_fast_tf32_kernel(Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int BK = 16;
  constexpr int LD = BM + 4;
  __shared__ __align__(128) float sa_hi[BK][LD], sa_lo[BK][LD], sb_hi[BK][LD], sb_lo[BK][LD];
  __shared__ __align__(128) float scratch[4][32 * 32];
  const int t = blockIdx.x;
  const int64_t i0 = static_cast<int64_t>(p.ti[t]) * BM, j0 = static_cast<int64_t>(p.tj[t]) * BM;
  const bool diag = p.ti[t] == p.tj[t];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wm = warp / 2, wn = warp % 2;
  int64_t r_begin, r_end;
  row_range(p, &r_begin, &r_end);

  wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc[2][2];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  double acc64[32];
  for (int e = 0; e < 32; ++e) acc64[e] = 0.0;
  double csum = 0.0;
  int step = 0;

  for (int64_t k0 = r_begin; k0 < r_end; k0 += BK) {
    for (int e = threadIdx.x; e < BK * BM; e += kThreads) {
      const int r = e / BM, c = e % BM;
      const double va = load_v<T>(p, k0 + r, i0 + c, r_end);
      const double vb = diag ? va : load_v<T>(p, k0 + r, j0 + c, r_end);
      const float fa = static_cast<float>(va * p.scale), fb = static_cast<float>(vb * p.scale);
      const float ha = wmma::__float_to_tf32(fa), hb = wmma::__float_to_tf32(fb);
      sa_hi[r][c] = ha;
      sa_lo[r][c] = wmma::__float_to_tf32(fa - ha);
      sb_hi[r][c] = hb;
      sb_lo[r][c] = wmma::__float_to_tf32(fb - hb);
    }
    __syncthreads();
    if (diag && p.cws && threadIdx.x < BM)
      for (int r = 0; r < BK; ++r) csum += load_v<T>(p, k0 + r, i0 + threadIdx.x, r_end);
    for (int kk = 0; kk < BK; kk += 8) {
      wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::col_major> ah[2], al[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> bh[2], bl[2];
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(ah[i], &sa_hi[kk][wm * 32 + i * 16], LD);
        wmma::load_matrix_sync(al[i], &sa_lo[kk][wm * 32 + i * 16], LD);
      }
      for (int j = 0; j < 2; ++j) {
        wmma::load_matrix_sync(bh[j], &sb_hi[kk][wn * 32 + j * 16], LD);
        wmma::load_matrix_sync(bl[j], &sb_lo[kk][wn * 32 + j * 16], LD);
      }
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) {
          wmma::mma_sync(acc[i][j], al[i], bh[j], acc[i][j]);  // small terms first
          wmma::mma_sync(acc[i][j], ah[i], bl[j], acc[i][j]);
          wmma::mma_sync(acc[i][j], ah[i], bh[j], acc[i][j]);
        }
    }
    __syncthreads();
    if (++step % kCudaFastFold == 0) flush(acc, scratch[warp], acc64, lane);
  }
  flush(acc, scratch[warp], acc64, lane);
  store_quarter(p, t, wm, wn, acc64, lane, 1.0 / (p.scale * p.scale));
  if (diag && p.cws && threadIdx.x < BM && i0 + threadIdx.x < p.cols)
    p.cws[static_cast<int64_t>(blockIdx.y) * p.cols + i0 + threadIdx.x] = csum;
#endif
}

// G[tile t] += sum over splits of the partials (fixed order: deterministic); col_sum likewise.
__global__ void reduce_tiles_kernel(const double* ws, int splits, int n_tiles, const int32_t* ti, const int32_t* tj,
                                    double* gram, int64_t ldg) {
  const int t = blockIdx.x;
  const int64_t i0 = static_cast<int64_t>(ti[t]) * BM, j0 = static_cast<int64_t>(tj[t]) * BM;
  for (int e = threadIdx.x; e < BM * BM; e += blockDim.x) {
    double s = 0.0;
    for (int sp = 0; sp < splits; ++sp) s += ws[(static_cast<int64_t>(sp) * n_tiles + t) * BM * BM + e];
    gram[(i0 + e / BM) * ldg + j0 + e % BM] += s;
  }
}

__global__ void reduce_cols_kernel(const double* cws, int splits, int64_t cols, double* col_sum) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  double s = 0.0;
  for (int sp = 0; sp < splits; ++sp) s += cws[sp * cols + c];
  col_sum[c] += s;
}

template <typename T>
cudaError_t launch_partials(const CudaGramArgs& a, const Params& p, cudaStream_t st) {
  const dim3 grid(a.n_tiles, a.splits);
  if (a.mode == CudaGramMode::kExactFp64) {
    gram_exact_kernel<T><<<grid, kThreads, 0, st>>>(p);
  } else {
    gram_fast_tf32_kernel<T><<<grid, kThreads, 0, st>>>(p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_fast16(const Params& p, const CudaGramArgs& a, cudaStream_t st) {
  gram_fast16_kernel<T><<<dim3(a.n_tiles, a.splits), kThreads, 0, st>>>(p);
  return cudaGetLastError();
}

}  // namespace

int cuda_gram_update(const CudaGramArgs& a) {
  if (a.rows < 0 || a.cols < 1 || a.gram == nullptr || a.ldg < cuda_padded_size(a.cols) || a.n_tiles < 1 ||
      a.splits < 1 || a.rows_per_split < 1 || a.workspace == nullptr || a.tile_i == nullptr ||
      a.tile_j == nullptr || (a.col_sum != nullptr && a.col_workspace == nullptr) ||
      static_cast<int64_t>(a.splits) * a.rows_per_split < a.rows || !(a.scale > 0.0))
    return kInvalidArgument;
  if (a.rows == 0) return kOk;
  if (a.x == nullptr) return kInvalidArgument;
  const cudaStream_t st = static_cast<cudaStream_t>(a.stream);
  Params p{a.x, a.rows, a.cols, a.stride_r, a.stride_c, a.row_shift, a.col_shift, a.tile_i, a.tile_j,
           a.n_tiles, a.rows_per_split, a.workspace, a.col_sum ? a.col_workspace : nullptr, a.scale};
  if (a.col_sum) {
    const cudaError_t e = cudaMemsetAsync(a.col_workspace, 0, sizeof(double) * a.splits * a.cols, st);
    if (e != cudaSuccess) return 100 + static_cast<int>(e);
  }
  const bool native16 = a.mode == CudaGramMode::kFast && a.row_shift == nullptr && a.col_shift == nullptr;
  cudaError_t e = cudaSuccess;
  switch (a.dtype) {
    case DType::kFloat64: e = launch_partials<double>(a, p, st); break;
    case DType::kFloat32: e = launch_partials<float>(a, p, st); break;
    case DType::kFloat16: e = native16 ? launch_fast16<__half>(p, a, st) : launch_partials<__half>(a, p, st); break;
    case DType::kBFloat16:
      e = native16 ? launch_fast16<__nv_bfloat16>(p, a, st) : launch_partials<__nv_bfloat16>(a, p, st);
      break;
    default: return kUnsupportedDtype;
  }
  if (e != cudaSuccess) return 100 + static_cast<int>(e);
  reduce_tiles_kernel<<<a.n_tiles, 256, 0, st>>>(a.workspace, a.splits, a.n_tiles, a.tile_i, a.tile_j, a.gram, a.ldg);
  if (a.col_sum)
    reduce_cols_kernel<<<static_cast<unsigned>((a.cols + 255) / 256), 256, 0, st>>>(a.col_workspace, a.splits,
                                                                                    a.cols, a.col_sum);
  e = cudaGetLastError();
  return e == cudaSuccess ? kOk : 100 + static_cast<int>(e);
}

}  // namespace rankme
