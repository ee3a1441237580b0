#pragma once
// Every CUDA runtime call is checked; a failure becomes moeflow::Error naming the call and where.
#include <cuda_runtime.h>

#include <string>

#include "graph/error.hpp"

#define MOEFLOW_CUDA_CHECK(call)                                                                          \
  do {                                                                                                    \
    const cudaError_t moeflow_status_ = (call);                                                           \
    if (moeflow_status_ != cudaSuccess) {                                                                 \
      cudaGetLastError(); /* clear it: the caller may handle this error and launch again */             \
      throw ::moeflow::Error(::moeflow::ErrorKind::resource,                                              \
                             std::string(#call) + " failed: " + cudaGetErrorString(moeflow_status_) +     \
                                 " (" __FILE__ ":" + std::to_string(__LINE__) + ")");                     \
    }                                                                                                     \
  } while (0)

// After a launch: the launch's own error (bad configuration), not waiting for the kernel.
#define MOEFLOW_CUDA_LAUNCH_CHECK() MOEFLOW_CUDA_CHECK(cudaGetLastError())
