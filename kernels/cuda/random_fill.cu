#include <cuda_bf16.h>

#include "kernels/common/random.hpp"
#include "kernels/cuda/check.cuh"
#include "kernels/cuda/random_fill.hpp"

namespace moeflow::cuda {

namespace {

template <class T> __device__ T convert(float v);
template <> __device__ float convert<float>(float v) { return v; }
template <> __device__ uint16_t convert<uint16_t>(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }

// Grid-stride: one launch covers any n, and each element depends only on its index.
template <class T>
__global__ void fill_uniform_kernel(T* dst, int64_t n, uint64_t key, float scale, int64_t first) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = convert<T>(rng::uniform_pm1(key, static_cast<uint64_t>(first + i)) * scale);
}

template <class T> void launch(T* dst, int64_t n, uint64_t seed, uint64_t name_hash, float scale, int64_t first, void* stream) {
  if (n <= 0) return;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 65535 * 8);
  fill_uniform_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, static_cast<cudaStream_t>(stream)>>>(
      dst, n, rng::stream_key(seed, name_hash), scale, first);
  MOEFLOW_CUDA_LAUNCH_CHECK();
}

}  // namespace

void fill_uniform_f32(float* dst, int64_t n, uint64_t seed, uint64_t name_hash, float scale, int64_t first,
                      void* stream) {
  launch(dst, n, seed, name_hash, scale, first, stream);
}

void fill_uniform_bf16(uint16_t* dst, int64_t n, uint64_t seed, uint64_t name_hash, float scale, int64_t first,
                       void* stream) {
  launch(dst, n, seed, name_hash, scale, first, stream);
}

}  // namespace moeflow::cuda
