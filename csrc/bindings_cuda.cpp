// pybind11 module rankme_fast._C_cuda (built only when CMake finds a CUDA compiler).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "rankme/cuda_probe.h"

namespace py = pybind11;

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "rankme_fast CUDA kernels (probe only until the fused Gram lands)";
  m.def("device_count", &rankme::cuda_device_count);
  m.def("runtime_version", &rankme::cuda_runtime_version);
  m.def("selftest", [](double v, int n) {
    std::vector<double> out(n);
    const int e = rankme::cuda_selftest(v, n, out.data());
    if (e != 0) throw std::runtime_error("CUDA selftest failed with cudaError " + std::to_string(e));
    return out;
  });
}
