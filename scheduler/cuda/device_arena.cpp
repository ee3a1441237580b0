#include "scheduler/cuda/device_arena.hpp"

#include <cuda_runtime.h>

#include <sstream>

#include "graph/error.hpp"
#include "kernels/cuda/check.cuh"
#include "kernels/cuda/device.hpp"
#include "scheduler/host_memory.hpp"

namespace moeflow {

void require_device_bytes(int device, int64_t bytes, const std::string& what) {
  if (cuda::device_count() <= device) fail_resource(what + ": no CUDA device " + std::to_string(device) + " here");
  int64_t free_bytes = 0, total = 0;
  cuda::device_memory(device, free_bytes, total);
  if (bytes > free_bytes)
    fail_resource(what + " needs " + format_gib(bytes) + " of device memory but " + cuda::device_name(device) + " has " +
                  format_gib(free_bytes) + " free of " + format_gib(total));
}

DeviceArena::DeviceArena(const Plan& plan, Arena arena, int device)
    : plan_(&plan), arena_(arena), bytes_(plan.bytes(arena)) {
  MOEFLOW_CUDA_CHECK(cudaSetDevice(device));
  const std::size_t size = static_cast<std::size_t>(std::max<int64_t>(bytes_, 256));
  void* p = nullptr;
  const cudaError_t status = arena == Arena::host ? cudaMallocHost(&p, size) : cudaMalloc(&p, size);
  if (status != cudaSuccess) {
    cudaGetLastError();
    fail_resource("cannot allocate " + format_gib(bytes_) + " for the " + to_string(arena) + " arena: " +
                  cudaGetErrorString(status));
  }
  base_ = static_cast<std::byte*>(p);
}

DeviceArena::~DeviceArena() {
  if (!base_) return;
  if (arena_ == Arena::host) cudaFreeHost(base_);
  else cudaFree(base_);
}

void* DeviceArena::data(ValueId v) const {
  const Buffer& b = plan_->buffer(v);
  if (b.arena != arena_)
    fail_input("value '" + plan_->graph->value(v).name + "' lives in the " + to_string(b.arena) + " arena, not " +
               to_string(arena_));
  return base_ + b.offset;
}

}  // namespace moeflow
