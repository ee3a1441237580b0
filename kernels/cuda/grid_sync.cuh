#pragma once
// Blocks of one launch handing work to each other through device-memory counters (the fused decode
// kernels): the acquire load a waiting block polls with (it pairs with the writer's __threadfence()
// before its atomicAdd), where such counters live, and how many blocks can be resident at once.
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "kernels/cuda/check.cuh"
#include "kernels/cuda/device.hpp"
#include "kernels/cuda/lane_context.hpp"

namespace moeflow::cuda {

__device__ __forceinline__ int load_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// `words` counters for a kernel that leaves them zero when it ends: the lane's own where they fit
// (no memset: one launch), else `scratch` in the kernel's workspace, zeroed on the lane's stream. A
// kernel that starts while the previous one of the lane runs (`starts_early`) counts in the second
// half of the lane's words, the previous one (which did not start early) in the first.
inline int* launch_counters(const LaneContext& ctx, int words, int* scratch, bool starts_early = false) {
  const int half = ctx.counter_words / 2;
  if (ctx.counters != nullptr && starts_early && words <= half) return ctx.counters + half;
  if (ctx.counters != nullptr && !starts_early && words <= ctx.counter_words) return ctx.counters;
  MOEFLOW_CUDA_CHECK(cudaMemsetAsync(scratch, 0, static_cast<size_t>(words) * sizeof(int), ctx.stream));
  return scratch;
}

// Blocks of `kernel` (`threads` each, no dynamic shared memory) that fit on `device` at once; the
// per-SM occupancy is asked once and kept in `per_sm` (one per kernel).
template <class Kernel>
int resident_blocks(Kernel kernel, int threads, int device, std::atomic<int>& per_sm) {
  int n = per_sm.load(std::memory_order_relaxed);
  if (n == 0) {
    MOEFLOW_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, 0));
    per_sm.store(n, std::memory_order_relaxed);
  }
  return n * multiprocessor_count(device);
}

}  // namespace moeflow::cuda
