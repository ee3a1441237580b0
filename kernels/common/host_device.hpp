#pragma once
// Marks functions that must compile for the host and for CUDA devices, so one definition serves
// both backends and they produce the same bits.
#if defined(__CUDACC__)
#define MOEFLOW_HD __host__ __device__ __forceinline__
#else
#define MOEFLOW_HD inline
#endif
