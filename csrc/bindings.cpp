// pybind11 module rankme_fast._C: the only place where Python meets the kernels. Pointers arrive as
// integers from the Python validation layer (rankme_fast/backends/cpu.py), which checks dtype,
// device, sizes and buffer shapes before calling; the GIL is released while the kernel runs.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "rankme/gram.h"
#include "rankme/normal.h"
#include "rankme/rowgram.h"

namespace py = pybind11;

static void gram_update(uintptr_t x, int dtype, int64_t rows, int64_t cols, int64_t stride_r, int64_t stride_c,
                        uintptr_t row_shift, uintptr_t col_shift, uintptr_t gram, int64_t ldg, uintptr_t col_sum,
                        int num_threads, int64_t chunk_rows) {
  rankme::GramArgs a;
  a.x = reinterpret_cast<const void*>(x);
  a.dtype = static_cast<rankme::DType>(dtype);
  a.rows = rows;
  a.cols = cols;
  a.stride_r = stride_r;
  a.stride_c = stride_c;
  a.row_shift = reinterpret_cast<const double*>(row_shift);
  a.col_shift = reinterpret_cast<const double*>(col_shift);
  a.gram = reinterpret_cast<double*>(gram);
  a.ldg = ldg;
  a.col_sum = reinterpret_cast<double*>(col_sum);
  a.num_threads = num_threads;
  a.chunk_rows = chunk_rows;
  rankme::Status st;
  {
    py::gil_scoped_release nogil;
    st = rankme::gram_update(a);
  }
  if (st == rankme::kOutOfMemory) throw std::bad_alloc();
  if (st != rankme::kOk) throw std::invalid_argument(std::string("gram_update: ") + rankme::status_string(st));
}

// The data half of NormalArgs, shared by the normal operator and its trace pass.
static rankme::NormalArgs data_args(uintptr_t x, int dtype, int64_t rows, int64_t cols, int64_t stride_r,
                                    int64_t stride_c, uintptr_t col_shift, int num_threads) {
  rankme::NormalArgs a;
  a.x = reinterpret_cast<const void*>(x);
  a.dtype = static_cast<rankme::DType>(dtype);
  a.rows = rows;
  a.cols = cols;
  a.stride_r = stride_r;
  a.stride_c = stride_c;
  a.col_shift = reinterpret_cast<const double*>(col_shift);
  a.num_threads = num_threads;
  return a;
}

static void normal_apply(uintptr_t x, int dtype, int64_t rows, int64_t cols, int64_t stride_r, int64_t stride_c,
                         uintptr_t col_shift, uintptr_t w, int64_t k, uintptr_t out, bool single_precision,
                         int num_threads) {
  rankme::NormalArgs a = data_args(x, dtype, rows, cols, stride_r, stride_c, col_shift, num_threads);
  a.w = reinterpret_cast<const double*>(w);
  a.k = k;
  a.out = reinterpret_cast<double*>(out);
  a.single_precision = single_precision;
  rankme::Status st;
  {
    py::gil_scoped_release nogil;
    st = rankme::normal_apply(a);
  }
  if (st == rankme::kOutOfMemory) throw std::bad_alloc();
  if (st != rankme::kOk) throw std::invalid_argument(std::string("normal_apply: ") + rankme::status_string(st));
}

static double sum_squares(uintptr_t x, int dtype, int64_t rows, int64_t cols, int64_t stride_r, int64_t stride_c,
                          uintptr_t col_shift, int num_threads) {
  const rankme::NormalArgs a = data_args(x, dtype, rows, cols, stride_r, stride_c, col_shift, num_threads);
  double out = 0.0;
  rankme::Status st;
  {
    py::gil_scoped_release nogil;
    st = rankme::sum_squares(a, &out);
  }
  if (st != rankme::kOk) throw std::invalid_argument(std::string("sum_squares: ") + rankme::status_string(st));
  return out;
}

// Batched row Gram: gram[b, :L, :L] += V V^T per item (see csrc/include/rankme/rowgram.h).
static void row_gram_batch(uintptr_t x, int dtype, int64_t batch, int64_t n_max, int64_t dim, int64_t stride_b,
                           int64_t stride_r, int64_t stride_c, uintptr_t lengths, uintptr_t row_shift,
                           int64_t row_shift_stride_b, int64_t row_shift_stride_r, uintptr_t col_shift,
                           int64_t col_shift_stride_b, int64_t col_shift_stride_c, uintptr_t gram,
                           int64_t gram_stride_b, int64_t ldg, uintptr_t row_sum, int64_t row_sum_stride_b,
                           int num_threads, int64_t block_cols, int kernel, uintptr_t logdet_out,
                           uintptr_t logdet_info, double logdet_scale, double logdet_ridge, uintptr_t item_x) {
  rankme::RowGramArgs a;
  a.x = reinterpret_cast<const void*>(x);
  a.dtype = static_cast<rankme::DType>(dtype);
  a.batch = batch;
  a.n_max = n_max;
  a.dim = dim;
  a.stride_b = stride_b;
  a.stride_r = stride_r;
  a.stride_c = stride_c;
  a.lengths = reinterpret_cast<const int64_t*>(lengths);
  a.row_shift = reinterpret_cast<const double*>(row_shift);
  a.row_shift_stride_b = row_shift_stride_b;
  a.row_shift_stride_r = row_shift_stride_r;
  a.col_shift = reinterpret_cast<const double*>(col_shift);
  a.col_shift_stride_b = col_shift_stride_b;
  a.col_shift_stride_c = col_shift_stride_c;
  a.gram = reinterpret_cast<double*>(gram);
  a.gram_stride_b = gram_stride_b;
  a.ldg = ldg;
  a.row_sum = reinterpret_cast<double*>(row_sum);
  a.row_sum_stride_b = row_sum_stride_b;
  a.num_threads = num_threads;
  a.block_cols = block_cols;
  a.kernel = kernel;
  a.logdet_out = reinterpret_cast<double*>(logdet_out);
  a.logdet_info = reinterpret_cast<int64_t*>(logdet_info);
  a.logdet_scale = logdet_scale;
  a.logdet_ridge = logdet_ridge;
  a.item_x = reinterpret_cast<const void* const*>(item_x);
  rankme::Status st;
  {
    py::gil_scoped_release nogil;
    st = rankme::row_gram_batch(a);
  }
  if (st == rankme::kOutOfMemory) throw std::bad_alloc();
  if (st != rankme::kOk) throw std::invalid_argument(std::string("row_gram_batch: ") + rankme::status_string(st));
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "rankme_fast CPU kernels (framework-agnostic; no libtorch)";
  m.def("gram_update", &gram_update, "G += V^T V over row chunks in float64 (see csrc/include/rankme/gram.h)",
        py::arg("x"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("stride_r"), py::arg("stride_c"),
        py::arg("row_shift"), py::arg("col_shift"), py::arg("gram"), py::arg("ldg"), py::arg("col_sum"),
        py::arg("num_threads"), py::arg("chunk_rows") = 0);
  m.def("normal_apply", &normal_apply,
        "out += X^T (X W) reading X once (see csrc/include/rankme/normal.h)", py::arg("x"), py::arg("dtype"),
        py::arg("rows"), py::arg("cols"), py::arg("stride_r"), py::arg("stride_c"), py::arg("col_shift"),
        py::arg("w"), py::arg("k"), py::arg("out"), py::arg("single_precision"), py::arg("num_threads"));
  m.def("sum_squares", &sum_squares, "sum of squares of the (shifted) data in float64, one pass",
        py::arg("x"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("stride_r"), py::arg("stride_c"),
        py::arg("col_shift"), py::arg("num_threads"));
  m.def("row_gram_batch", &row_gram_batch,
        "gram[b, :L, :L] += V V^T per item of a batch, float64 (see csrc/include/rankme/rowgram.h)",
        py::arg("x"), py::arg("dtype"), py::arg("batch"), py::arg("n_max"), py::arg("dim"), py::arg("stride_b"),
        py::arg("stride_r"), py::arg("stride_c"), py::arg("lengths"), py::arg("row_shift"),
        py::arg("row_shift_stride_b"), py::arg("row_shift_stride_r"), py::arg("col_shift"),
        py::arg("col_shift_stride_b"), py::arg("col_shift_stride_c"), py::arg("gram"), py::arg("gram_stride_b"),
        py::arg("ldg"), py::arg("row_sum"), py::arg("row_sum_stride_b"), py::arg("num_threads"),
        py::arg("block_cols") = 0, py::arg("kernel") = 0, py::arg("logdet_out") = 0, py::arg("logdet_info") = 0,
        py::arg("logdet_scale") = 0.0, py::arg("logdet_ridge") = 0.0, py::arg("item_x") = 0);
  m.def("gram_isa", &rankme::gram_isa, "instruction set the Gram kernel dispatches to on this CPU");
  m.def("isa_supported", [](const std::string& isa) { return rankme::isa_supported(isa.c_str()); },
        "whether this CPU and build can run the kernels of isa ('generic', 'avx2', 'avx512')");
  m.attr("PANEL") = rankme::kPanel;
}
