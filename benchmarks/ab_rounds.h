// Shared by the same-process A/B drivers (tiles_ab/, gram_ab/): the synthetic float32 input, variants run
// alternately round by round (the order reversed every other round, so neither always runs first after the
// other), and the summary: each variant's median and best, and the median (min, max) of its per-round ratio
// to variant 0. Ratios from the same round survive the host's drift, which moves single numbers by 10-25 %
// on the shared dev VMs.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

namespace ab {

inline void fill(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = float((uint64_t(i) * 2654435761u) % 1000) * 1e-3f;
}

// run(k) times variant k once and returns its rate; res[k][r] is variant k's rate in round r.
template <class Run>
std::vector<std::vector<double>> alternate(std::vector<int> order, int rounds, int nslots, Run&& run) {
  std::vector<std::vector<double>> res(nslots);
  for (int r = 0; r < rounds; ++r) {
    if (r % 2) std::reverse(order.begin(), order.end());
    for (int k : order) res[k].push_back(run(k));
    if (r % 2) std::reverse(order.begin(), order.end());
  }
  return res;
}

struct Summary {
  double median, max, ratio_median, ratio_min, ratio_max;
};
inline Summary summarize(const std::vector<double>& v, const std::vector<double>& v0) {
  std::vector<double> s = v, q;
  std::sort(s.begin(), s.end());
  for (size_t r = 0; r < v.size(); ++r) q.push_back(v[r] / v0[r]);
  std::sort(q.begin(), q.end());
  return {s[s.size() / 2], s.back(), q[q.size() / 2], q.front(), q.back()};
}

}  // namespace ab
