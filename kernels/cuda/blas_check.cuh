#pragma once
// Every cuBLAS call is checked; a failure becomes moeflow::Error(resource) naming the status, the
// call and where, as MOEFLOW_CUDA_CHECK does for the runtime.
#include <cublas_v2.h>

#include <string>

#include "graph/error.hpp"

#define MOEFLOW_CUBLAS_CHECK(call)                                                                        \
  do {                                                                                                    \
    const cublasStatus_t moeflow_blas_status_ = (call);                                                   \
    if (moeflow_blas_status_ != CUBLAS_STATUS_SUCCESS)                                                    \
      throw ::moeflow::Error(::moeflow::ErrorKind::resource,                                              \
                             std::string(#call) + " failed: " + cublasGetStatusName(moeflow_blas_status_) + \
                                 " (" + cublasGetStatusString(moeflow_blas_status_) + ") (" __FILE__ ":" + \
                                 std::to_string(__LINE__) + ")");                                         \
  } while (0)
