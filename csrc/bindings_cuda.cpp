// pybind11 module rankme_fast._C_cuda (built only when CMake finds a CUDA compiler). Pointers arrive
// as integers from the one validation layer, rankme_fast/backends/cuda.py (STYLE.md 2).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "rankme/cuda_probe.h"
#include "rankme/gram_cuda.h"

namespace py = pybind11;

namespace {
template <typename T>
T* ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }
}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "rankme_fast CUDA kernels: fused streaming Gram (exact DMMA float64, fast tensor-core modes)";
  m.def("device_count", &rankme::cuda_device_count);
  m.def("runtime_version", &rankme::cuda_runtime_version);
  m.def("selftest", [](double v, int n) {
    std::vector<double> out(n);
    const int e = rankme::cuda_selftest(v, n, out.data());
    if (e != 0) throw std::runtime_error("CUDA selftest failed with cudaError " + std::to_string(e));
    return out;
  });
  m.attr("TILE") = rankme::kCudaTile;
  m.def(
      "gram_update",
      [](std::uintptr_t x, int dtype, int64_t rows, int64_t cols, int64_t sr, int64_t sc, std::uintptr_t row_shift,
         std::uintptr_t col_shift, std::uintptr_t gram, int64_t ldg, std::uintptr_t col_sum, std::uintptr_t tile_i,
         std::uintptr_t tile_j, int n_tiles, int splits, int64_t rows_per_split, std::uintptr_t workspace,
         std::uintptr_t col_workspace, int mode, double scale, std::uintptr_t stream) {
        rankme::CudaGramArgs a;
        a.x = ptr<const void>(x);
        a.dtype = static_cast<rankme::DType>(dtype);
        a.rows = rows;
        a.cols = cols;
        a.stride_r = sr;
        a.stride_c = sc;
        a.row_shift = ptr<const double>(row_shift);
        a.col_shift = ptr<const double>(col_shift);
        a.gram = ptr<double>(gram);
        a.ldg = ldg;
        a.col_sum = ptr<double>(col_sum);
        a.tile_i = ptr<const int32_t>(tile_i);
        a.tile_j = ptr<const int32_t>(tile_j);
        a.n_tiles = n_tiles;
        a.splits = splits;
        a.rows_per_split = rows_per_split;
        a.workspace = ptr<double>(workspace);
        a.col_workspace = ptr<double>(col_workspace);
        a.mode = static_cast<rankme::CudaGramMode>(mode);
        a.scale = scale;
        a.stream = reinterpret_cast<void*>(stream);
        int st;
        {
          py::gil_scoped_release release;
          st = rankme::cuda_gram_update(a);
        }
        if (st != rankme::kOk) {
          std::string why = st >= 100 ? "CUDA error " + std::to_string(st - 100)
                            : st == rankme::kUnsupportedDtype ? "unsupported dtype" : "invalid argument";
          throw std::runtime_error("rankme_fast CUDA gram_update failed: " + why);
        }
      },
      "G += V^T V on the GPU (see csrc/include/rankme/gram_cuda.h)");
}
