#include "kernels/cpu/calibrate.hpp"

#include <cblas.h>
#include <tbb/parallel_for.h>
#include <tbb/task_arena.h>

#include <algorithm>
#include <chrono>
#include <vector>

#include "kernels/common/random.hpp"

namespace moeflow::cpu {

double measure_sgemm_flops() {
  constexpr int n = 768;  // large enough for OpenBLAS's peak, small enough to take ~50 ms
  const int threads = tbb::this_task_arena::max_concurrency();
  std::vector<std::vector<float>> a(static_cast<size_t>(threads)), c(static_cast<size_t>(threads));
  const uint64_t key = rng::stream_key(1, rng::name_key("calibrate.sgemm"));
  for (auto& m : a) {
    m.resize(2ull * n * n);
    for (size_t i = 0; i < m.size(); ++i) m[i] = rng::uniform_pm1(key, i);
  }
  for (auto& m : c) m.resize(static_cast<size_t>(n) * n);
  std::vector<double> rates;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    tbb::parallel_for(0, threads, [&](int t) {
      const float* x = a[static_cast<size_t>(t)].data();
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1.0f, x, n, x + static_cast<size_t>(n) * n, n, 0.0f,
                  c[static_cast<size_t>(t)].data(), n);
    });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    rates.push_back(2.0 * n * n * static_cast<double>(n) * threads / s);
  }
  std::sort(rates.begin(), rates.end());
  return rates[rates.size() / 2];
}

}  // namespace moeflow::cpu
