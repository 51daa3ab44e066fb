// Self-test of the native kernels without Python (issue 17: other ISAs), for a cross build run under
// emulation, e.g. on x86-64 for aarch64:
//
//   aarch64-linux-gnu-g++ -std=c++17 -O2 -pthread -Icsrc/include -Icsrc/cpu benchmarks/native_selftest.cpp \
//       csrc/cpu/gram.cpp csrc/cpu/normal.cpp csrc/cpu/rowgram.cpp csrc/cpu/gram_isa_generic.cpp -o selftest
//   qemu-aarch64 -L /usr/aarch64-linux-gnu ./selftest
//
// Streaming Gram (float32 / float64 / bfloat16 / float16 input, with column sums, 1 and 3 threads) and the
// batched row Gram (ragged, both kernels, row sums) against a naive double-precision reference of the same
// upcast values: every entry within 1e-12 relative to the largest (the sums are exact-rounding float64 of
// data whose products are exact). Prints the ISA and "ok", exits 1 on a mismatch.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "rankme/gram.h"
#include "rankme/rowgram.h"

using namespace rankme;

namespace {

uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>(u >> 16);  // truncation: the test uses the stored value either way
}
double from_bf16(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint16_t to_f16(float f) {  // values here are normal and in range: a plain round-to-zero conversion
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const int e = int((u >> 23) & 0xff) - 127 + 15;
  if (e <= 0) return static_cast<uint16_t>(sign);
  return static_cast<uint16_t>(sign | (uint32_t(e) << 10) | ((u >> 13) & 0x3ff));
}
double from_f16(uint16_t h) {
  const int e = (h >> 10) & 31, m = h & 0x3ff;
  const double v = e == 0 ? std::ldexp(m, -24) : std::ldexp(1024 + m, e - 25);
  return (h & 0x8000) ? -v : v;
}

int failures = 0;

void check(const char* what, const std::vector<double>& got, const std::vector<double>& want) {
  double scale = 0, err = 0;
  for (size_t i = 0; i < want.size(); ++i) scale = std::fmax(scale, std::fabs(want[i]));
  for (size_t i = 0; i < want.size(); ++i) err = std::fmax(err, std::fabs(got[i] - want[i]));
  const bool ok = err <= 1e-12 * scale;
  std::printf("%-44s max |err| / max |ref| = %.2e  %s\n", what, scale ? err / scale : err, ok ? "ok" : "FAIL");
  if (!ok) ++failures;
}

void gram_case(DType dt, const char* name, int threads) {
  const int64_t n = 1037, d = 45, dp = (d + 7) / 8 * 8;
  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  std::vector<float> f(n * d);
  for (auto& v : f) v = nd(rng);
  std::vector<double> vals(n * d);
  std::vector<double> f64(n * d);
  std::vector<uint16_t> h(n * d);
  const void* x = nullptr;
  for (int64_t i = 0; i < n * d; ++i) {
    switch (dt) {
      case DType::kFloat64: f64[i] = double(f[i]) * 1.0000001; vals[i] = f64[i]; break;
      case DType::kFloat32: vals[i] = f[i]; break;
      case DType::kBFloat16: h[i] = to_bf16(f[i]); vals[i] = from_bf16(h[i]); break;
      case DType::kFloat16: h[i] = to_f16(f[i]); vals[i] = from_f16(h[i]); break;
    }
  }
  x = dt == DType::kFloat64 ? static_cast<const void*>(f64.data())
      : dt == DType::kFloat32 ? static_cast<const void*>(f.data()) : static_cast<const void*>(h.data());
  std::vector<double> g(dp * dp, 0.0), cs(d, 0.0);
  GramArgs a;
  a.x = x;
  a.dtype = dt;
  a.rows = n;
  a.cols = d;
  a.stride_r = d;
  a.stride_c = 1;
  a.gram = g.data();
  a.ldg = dp;
  a.col_sum = cs.data();
  a.num_threads = threads;
  a.chunk_rows = 100;
  if (gram_update(a) != kOk) {
    std::printf("gram_update failed\n");
    ++failures;
    return;
  }
  std::vector<double> got, want, gs(cs), ws(d, 0.0);
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = i; j < d; ++j) {
      double s = 0;
      for (int64_t r = 0; r < n; ++r) s += vals[r * d + i] * vals[r * d + j];
      want.push_back(s);
      got.push_back(g[i * dp + j]);
    }
  for (int64_t r = 0; r < n; ++r)
    for (int64_t j = 0; j < d; ++j) ws[j] += vals[r * d + j];
  char label[96];
  std::snprintf(label, sizeof label, "gram_update %s, %d thread(s)", name, threads);
  check(label, got, want);
  std::snprintf(label, sizeof label, "gram_update %s column sums", name);
  check(label, gs, ws);
}

void rowgram_case(int kernel) {
  const int64_t B = 5, nmax = 37, d = 203;
  std::mt19937 rng(11);
  std::normal_distribution<float> nd;
  std::vector<float> x(B * nmax * d);
  for (auto& v : x) v = nd(rng);
  std::vector<int64_t> len = {37, 1, 12, 30, 5};
  std::vector<double> g(B * nmax * nmax, 0.0), rs(B * nmax, 0.0);
  RowGramArgs a;
  a.x = x.data();
  a.dtype = DType::kFloat32;
  a.batch = B;
  a.n_max = nmax;
  a.dim = d;
  a.stride_b = nmax * d;
  a.stride_r = d;
  a.stride_c = 1;
  a.lengths = len.data();
  a.gram = g.data();
  a.gram_stride_b = nmax * nmax;
  a.ldg = nmax;
  a.row_sum = rs.data();
  a.row_sum_stride_b = nmax;
  a.num_threads = 2;
  a.kernel = kernel;
  if (row_gram_batch(a) != kOk) {
    std::printf("row_gram_batch failed\n");
    ++failures;
    return;
  }
  std::vector<double> got, want, gr, wr;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < len[b]; ++i) {
      const float* xi = x.data() + (b * nmax + i) * d;
      double s = 0;
      for (int64_t k = 0; k < d; ++k) s += double(xi[k]);
      wr.push_back(s);
      gr.push_back(rs[b * nmax + i]);
      for (int64_t j = 0; j < len[b]; ++j) {
        const float* xj = x.data() + (b * nmax + j) * d;
        double t = 0;
        for (int64_t k = 0; k < d; ++k) t += double(xi[k]) * double(xj[k]);
        want.push_back(t);
        got.push_back(g[(b * nmax + i) * nmax + j]);
      }
    }
  check(kernel == 1 ? "row_gram_batch, dot kernel" : "row_gram_batch, panel kernel", got, want);
  check(kernel == 1 ? "row_gram_batch row sums, dot kernel" : "row_gram_batch row sums, panel kernel", gr, wr);
}

}  // namespace

int main() {
  std::printf("kernel isa: %s\n", gram_isa());
  for (int t : {1, 3}) {
    gram_case(DType::kFloat32, "float32", t);
    gram_case(DType::kFloat64, "float64", t);
    gram_case(DType::kBFloat16, "bfloat16", t);
    gram_case(DType::kFloat16, "float16", t);
  }
  rowgram_case(1);
  rowgram_case(2);
  std::printf(failures ? "FAILED (%d)\n" : "ok\n", failures);
  return failures ? 1 : 0;
}
