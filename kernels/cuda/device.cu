#include <atomic>

#include "kernels/cuda/check.cuh"
#include "kernels/cuda/device.hpp"

namespace moeflow::cuda {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error so later calls start clean
    return 0;
  }
  return n;
}

std::string device_name(int device) {
  cudaDeviceProp p{};
  MOEFLOW_CUDA_CHECK(cudaGetDeviceProperties(&p, device));
  return std::string(p.name) + " (sm_" + std::to_string(p.major) + std::to_string(p.minor) + ")";
}

void device_memory(int device, int64_t& free_bytes, int64_t& total_bytes) {
  MOEFLOW_CUDA_CHECK(cudaSetDevice(device));
  size_t f = 0, t = 0;
  MOEFLOW_CUDA_CHECK(cudaMemGetInfo(&f, &t));
  free_bytes = static_cast<int64_t>(f);
  total_bytes = static_cast<int64_t>(t);
}

namespace {

// A device attribute, asked once per device; lanes issued from their own threads may ask at once.
template <cudaDeviceAttr kAttribute>
int cached_attribute(int device) {
  static std::atomic<int> values[64] = {};
  if (device < 0 || device >= 64) fail_input("CUDA device " + std::to_string(device) + " is out of range");
  int n = values[device].load(std::memory_order_relaxed);
  if (n == 0) {
    MOEFLOW_CUDA_CHECK(cudaDeviceGetAttribute(&n, kAttribute, device));
    values[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

}  // namespace

int multiprocessor_count(int device) { return cached_attribute<cudaDevAttrMultiProcessorCount>(device); }

}  // namespace moeflow::cuda
