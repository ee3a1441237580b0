#include "kernels/cpu/random_fill.hpp"

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include <numeric>
#include <vector>

#include "kernels/common/random.hpp"

namespace moeflow::cpu {

void fill_unit_interval(float* dst, int64_t n, uint64_t seed, uint64_t name_hash, int64_t first) {
  const uint64_t key = rng::stream_key(seed, name_hash);
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, n, 1 << 14), [&](const tbb::blocked_range<int64_t>& r) {
    for (int64_t i = r.begin(); i < r.end(); ++i) dst[i] = 0.5f * (rng::uniform_pm1(key, static_cast<uint64_t>(first + i)) + 1.0f);
  });
}

void fill_distinct_ids(int32_t* ids, int64_t tokens, int top_k, int experts, uint64_t seed, uint64_t name_hash,
                       int64_t first_token) {
  const uint64_t key = rng::stream_key(seed, name_hash);
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, tokens, 64), [&](const tbb::blocked_range<int64_t>& r) {
    std::vector<int32_t> pool(static_cast<size_t>(experts));
    for (int64_t t = r.begin(); t < r.end(); ++t) {
      std::iota(pool.begin(), pool.end(), 0);
      for (int j = 0; j < top_k; ++j) {
        const uint64_t bits = rng::mix64(key + static_cast<uint64_t>((first_token + t) * top_k + j + 1) * 0x9e3779b97f4a7c15ull);
        const int pick = j + static_cast<int>(bits % static_cast<uint64_t>(experts - j));
        std::swap(pool[static_cast<size_t>(j)], pool[static_cast<size_t>(pick)]);
        ids[t * top_k + j] = pool[static_cast<size_t>(j)];
      }
    }
  });
}

}  // namespace moeflow::cpu
