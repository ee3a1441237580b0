#pragma once
// A row count that only the device knows when the work is issued: one captured CUDA graph serves any
// T up to the plan's maximum, so its kernels are launched for the maximum and read how many rows are
// live from device memory (*count · per_count, capped at the launch's bound). No count: the bound is
// the count. No CUDA headers here; live_bound() is for device code (live_rows.cuh).
#include <cstdint>

namespace moeflow::cuda {

struct LiveRows {
  const int32_t* count = nullptr;  // device memory, read by the kernels; null: not live
  int per_count = 1;               // rows per counted unit (top-k rows per token)
};

}  // namespace moeflow::cuda
