#pragma once
// Programmatic dependent launch (Hopper, sm_90): a kernel launched with it may start while the
// previous kernel of its stream still runs, once that kernel has released it; before reading
// anything the previous kernel wrote it waits for that kernel's completion and memory. Without the
// launch attribute, or compiled for an older architecture, both are no-ops (the host launches with
// the attribute only for a binary of sm_90 or later: fused_decode.cu).
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

}  // namespace moeflow::cuda
