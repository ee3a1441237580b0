#include "kernels/cpu/elementwise.hpp"

#include <cblas.h>
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include <algorithm>

#include "kernels/common/random.hpp"

namespace moeflow::cpu {

// Chunks of a few thousand elements amortise the task overhead for these memory-bound loops.
constexpr int64_t kGrain = 4096;

void sum_arrays(const float* const* addends, int count, int64_t n, float* out) {
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, n, kGrain), [&](const tbb::blocked_range<int64_t>& r) {
    const int64_t b = r.begin();
    const int64_t e = r.end();
    if (count == 0) {
      std::fill(out + b, out + e, 0.0f);
      return;
    }
    if (out != addends[0]) std::copy(addends[0] + b, addends[0] + e, out + b);
    // Addend-outer keeps each pass a contiguous, vectorisable stream; per element the order of
    // additions is still addend order.
    for (int a = 1; a < count; ++a) {
      const float* src = addends[a];
      for (int64_t i = b; i < e; ++i) out[i] += src[i];
    }
  });
}

void fill_uniform(float* dst, int64_t n, uint64_t seed, uint64_t name_hash, float scale, int64_t first) {
  const uint64_t key = rng::stream_key(seed, name_hash);
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, n, kGrain), [&](const tbb::blocked_range<int64_t>& r) {
    for (int64_t i = r.begin(); i < r.end(); ++i) {
      dst[i] = rng::uniform_pm1(key, static_cast<uint64_t>(first + i)) * scale;
    }
  });
}

void use_single_threaded_blas() { openblas_set_num_threads(1); }

}  // namespace moeflow::cpu
