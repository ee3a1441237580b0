#pragma once
// Device memory for one arena of a plan: one cudaMalloc (pinned cudaMallocHost for Arena::host),
// values at their planned offsets. Free device memory is checked before allocating.
#include <cstdint>
#include <string>

#include "scheduler/plan.hpp"

namespace moeflow {

// Throws Error(resource) naming what needs how much, when `bytes` exceed the device's free memory.
void require_device_bytes(int device, int64_t bytes, const std::string& what);

class DeviceArena {
 public:
  DeviceArena(const Plan& plan, Arena arena, int device);
  ~DeviceArena();
  DeviceArena(const DeviceArena&) = delete;
  DeviceArena& operator=(const DeviceArena&) = delete;

  void* data(ValueId v) const;
  std::byte* base() const { return base_; }
  int64_t bytes() const { return bytes_; }
  Arena arena() const { return arena_; }

 private:
  const Plan* plan_;
  Arena arena_;
  int64_t bytes_;
  std::byte* base_ = nullptr;
};

}  // namespace moeflow
