#pragma once
// Programmatic dependent launch (Hopper, sm_90): a kernel launched with it may start while the
// previous kernel of its stream still runs, once that kernel has released it; before reading
// anything the previous kernel wrote it waits for that kernel's completion and memory. Without the
// launch attribute, or compiled for an older architecture, both are no-ops (the host launches with
// the attribute only where early_start_supported() says the binary has the wait).
#include <cuda_runtime.h>

#include <array>
#include <atomic>
#include <cstddef>

#include "kernels/cuda/check.cuh"

namespace moeflow::cuda {

// Lets the next kernel of the stream start (where it was launched to start early).
__device__ __forceinline__ void release_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Waits until the previous kernel of the stream has finished and its writes are visible.
__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Whether kKernel may be launched to start early on `device`: the device's programmatic dependent
// launch (compute capability 9.0) and the kernel's sm_90 code, whose wait a binary built for older
// devices lacks (launched early without it, the kernel would read what the previous kernel writes
// before it is written). Asked once per device and kernel (a host may mix architectures).
template <auto kKernel>
bool early_start_supported(int device) {
  constexpr int kDevices = 64;
  static std::array<std::atomic<int>, kDevices> answer{};  // 0: not asked, 1: yes, 2: no
  if (device < 0 || device >= kDevices) return false;
  int known = answer[static_cast<std::size_t>(device)].load(std::memory_order_relaxed);
  if (known == 0) {
    int major = 0;
    MOEFLOW_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    int current = 0;
    MOEFLOW_CUDA_CHECK(cudaGetDevice(&current));
    MOEFLOW_CUDA_CHECK(cudaSetDevice(device));
    cudaFuncAttributes attributes{};
    const cudaError_t asked = cudaFuncGetAttributes(&attributes, kKernel);
    MOEFLOW_CUDA_CHECK(cudaSetDevice(current));
    MOEFLOW_CUDA_CHECK(asked);
    known = major >= 9 && attributes.binaryVersion >= 90 ? 1 : 2;
    answer[static_cast<std::size_t>(device)].store(known, std::memory_order_relaxed);
  }
  return known == 1;
}

// kernel<<<grid, threads, 0, stream>>>(args), allowed to start while the previous kernel of the
// stream runs where `early` (the caller asked early_start_supported()).
template <class Args>
void launch_maybe_early(void (*kernel)(Args), int grid, int threads, cudaStream_t stream, bool early, const Args& args) {
  if (!early) {
    kernel<<<grid, threads, 0, stream>>>(args);
    return;
  }
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(grid));
  config.blockDim = dim3(static_cast<unsigned>(threads));
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  MOEFLOW_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, args));
}

}  // namespace moeflow::cuda
