#include "scheduler/cost_model.hpp"

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>
#include <tbb/task_arena.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <vector>

#include "kernels/common/random.hpp"
#include "kernels/cpu/elementwise.hpp"
#include "kernels/cpu/calibrate.hpp"

namespace moeflow {

Prediction predict(const Cost& cost, const MachineRates& r, int launches) {
  return {std::max(cost.flops / r.flops_per_s, cost.bytes / r.bytes_per_s), r.overhead_s * std::max(launches, 1)};
}

Prediction predict_transfer(const Cost& cost, const MachineRates& r, int launches) {
  return {cost.bytes / std::min(r.bytes_per_s, r.link_bytes_per_s), r.overhead_s * std::max(launches, 1)};
}

double predict_seconds(const Cost& cost, const MachineRates& r, int launches) {
  return predict(cost, r, launches).total_s();
}

namespace {

template <class F> double median_seconds(int repeats, F&& f) {
  std::vector<double> times;
  for (int i = 0; i < repeats; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    f();
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

}  // namespace

MachineRates measure_cpu_rates(int threads) {
  MachineRates r;
  tbb::task_arena arena(threads);
  arena.execute([&] {
    cpu::use_single_threaded_blas();
    r.flops_per_s = cpu::measure_sgemm_flops();

    const size_t n = 32ull << 20;  // 128 MiB of floats each way: far beyond any cache
    std::vector<float> a(n, 1.0f), b(n);
    const double c = median_seconds(5, [&] {
      tbb::parallel_for(tbb::blocked_range<size_t>(0, n, 1 << 16), [&](const tbb::blocked_range<size_t>& rg) {
        std::memcpy(b.data() + rg.begin(), a.data() + rg.begin(), rg.size() * sizeof(float));
      });
    });
    r.bytes_per_s = 2.0 * static_cast<double>(n * sizeof(float)) / c;
  });
  r.measured = true;
  return r;
}

}  // namespace moeflow
