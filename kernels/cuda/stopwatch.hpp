#pragma once
// Times work queued on a stream with a pair of CUDA events (host code): the work is issued between
// them and the call waits for the second. The events are released on every path.
#include <cuda_runtime.h>

#include "kernels/cuda/check.cuh"

namespace moeflow::cuda {

class Stopwatch {
 public:
  Stopwatch() {
    MOEFLOW_CUDA_CHECK(cudaEventCreate(&start_));
    if (const cudaError_t status = cudaEventCreate(&stop_); status != cudaSuccess) {
      (void)cudaEventDestroy(start_);  // the destructor does not run for a constructor that throws
      MOEFLOW_CUDA_CHECK(status);
    }
  }
  Stopwatch(const Stopwatch&) = delete;
  Stopwatch& operator=(const Stopwatch&) = delete;
  ~Stopwatch() {
    (void)cudaEventDestroy(start_);
    (void)cudaEventDestroy(stop_);
  }

  // Milliseconds between the events around what `work` queues on `stream`.
  template <class F>
  float milliseconds(cudaStream_t stream, F&& work) {
    MOEFLOW_CUDA_CHECK(cudaEventRecord(start_, stream));
    work();
    MOEFLOW_CUDA_CHECK(cudaEventRecord(stop_, stream));
    MOEFLOW_CUDA_CHECK(cudaEventSynchronize(stop_));
    float ms = 0.0f;
    MOEFLOW_CUDA_CHECK(cudaEventElapsedTime(&ms, start_, stop_));
    return ms;
  }

 private:
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
};

}  // namespace moeflow::cuda
