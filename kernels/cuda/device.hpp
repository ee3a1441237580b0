#pragma once
// What the host asks of the CUDA runtime before choosing the GPU path; no CUDA types here, so any
// host code may include it. Never throws for a missing driver or device: that is an answer (0).
#include <cstdint>
#include <string>

namespace moeflow::cuda {

// Number of usable CUDA devices; 0 when there is no driver, no device, or the runtime fails.
int device_count();
// "NVIDIA H100 80GB HBM3 (sm_90)"; throws Error(resource) when the device does not exist.
std::string device_name(int device);
// Free and total device memory in bytes.
void device_memory(int device, int64_t& free_bytes, int64_t& total_bytes);
// Streaming multiprocessors of the device, asked once per device (kernels size persistent grids by
// it); safe to call from several threads at once. Throws Error(resource) when the device does not exist.
int multiprocessor_count(int device);

}  // namespace moeflow::cuda
