#include "kernels/cuda/timestamp.hpp"

#include <cuda_runtime.h>

#include "kernels/cuda/check.cuh"

namespace moeflow::cuda {

namespace {

__global__ void global_time_kernel(unsigned long long* slot) {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  *slot = t;
}

}  // namespace

void record_global_time(uint64_t* slot, Stream s) {
  global_time_kernel<<<1, 1, 0, s>>>(reinterpret_cast<unsigned long long*>(slot));
  MOEFLOW_CUDA_LAUNCH_CHECK();
}

}  // namespace moeflow::cuda
