#pragma once
// Device side of live_rows.hpp.
#include <cstdint>

#include "kernels/cuda/live_rows.hpp"

namespace moeflow::cuda {

__device__ __forceinline__ int64_t live_bound(LiveRows live, int64_t bound) {
  if (live.count == nullptr) return bound;
  const int64_t n = static_cast<int64_t>(*live.count) * live.per_count;
  return n < bound ? (n > 0 ? n : 0) : bound;
}

}  // namespace moeflow::cuda
