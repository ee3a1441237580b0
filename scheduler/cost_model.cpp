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
#include "kernels/cpu/swiglu_mlp.hpp"

namespace moeflow {

double predict_seconds(const Cost& cost, const MachineRates& r) {
  return std::max(cost.flops / r.flops_per_s, cost.bytes / r.bytes_per_s) + r.overhead_s;
}

namespace {

template <class F> double best_seconds(int repeats, F&& f) {
  double best = 1e30;
  for (int i = 0; i < repeats; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

}  // namespace

MachineRates measure_cpu_rates(int threads) {
  MachineRates r;
  tbb::task_arena arena(threads);
  arena.execute([&] {
    cpu::use_single_threaded_blas();
    const int T = 256, H = 1024, I = 512;
    std::vector<float> x(static_cast<size_t>(T) * H), w13(2ull * I * H), w2(static_cast<size_t>(H) * I), y(x.size()),
        act(static_cast<size_t>(cpu::swiglu_workspace_floats(T, I)));
    cpu::fill_uniform(x.data(), static_cast<int64_t>(x.size()), 1, rng::name_key("calib.x"), 1.0f);
    cpu::fill_uniform(w13.data(), static_cast<int64_t>(w13.size()), 1, rng::name_key("calib.w13"), 0.03f);
    cpu::fill_uniform(w2.data(), static_cast<int64_t>(w2.size()), 1, rng::name_key("calib.w2"), 0.04f);
    const double s = best_seconds(3, [&] { cpu::swiglu_mlp(x.data(), T, H, I, w13.data(), w2.data(), nullptr, y.data(), act.data()); });
    r.flops_per_s = 6.0 * T * H * I / s;

    const size_t n = 32ull << 20;  // 128 MiB of floats each way: far beyond any cache
    std::vector<float> a(n, 1.0f), b(n);
    const double c = best_seconds(3, [&] {
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
