#pragma once
// What the probes in bench/probes share (each is one standalone .cu file built by hand on the GPU
// machine): a CUDA status check that stops the probe, the bare read every probe compares with, a
// timing loop, random bf16 operands and a host-to-device upload.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

// Stops the probe where `x` does not return `ok`, naming the call, the status (printed by `describe`,
// a function of the status) and the place. CK for the runtime API, CB for cuBLAS (probes that call it
// include cublas_v2.h first), CU for the driver API (cuda.h included first).
#define PROBE_CHECK(x, ok, describe)                                                                     \
  do {                                                                                                   \
    const auto status_ = (x);                                                                            \
    if (status_ != (ok)) {                                                                               \
      std::printf("%s failed: %s (%s:%d)\n", #x, describe(status_).c_str(), __FILE__, __LINE__);        \
      std::exit(1);                                                                                      \
    }                                                                                                    \
  } while (0)
inline std::string describe_cuda(cudaError_t s) { return cudaGetErrorString(s); }
template <class Status>
std::string describe_code(const char* kind, Status s) {
  return std::string(kind) + " " + std::to_string(static_cast<int>(s));
}
#define CK(x) PROBE_CHECK(x, cudaSuccess, describe_cuda)
#define CB(x) PROBE_CHECK(x, CUBLAS_STATUS_SUCCESS, [](auto s) { return describe_code("cuBLAS status", s); })
#ifdef CUDA_VERSION
#define CU(x) PROBE_CHECK(x, CUDA_SUCCESS, [](auto s) { return describe_code("CUresult", s); })
#endif

// Reads `vecs` 16-byte words once, streaming (no reuse): each thread keeps kUnroll independent loads
// in flight per step of its grid-stride loop; the xor of the words keeps the loads alive.
template <int kUnroll>
__global__ void read_all(const uint4* p, size_t vecs, unsigned* sink) {
  unsigned acc = 0;
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (; i + (kUnroll - 1) * stride < vecs; i += kUnroll * stride) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = __ldcs(p + i + u * stride);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) acc += v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < vecs; i += stride) {
    const uint4 v = __ldcs(p + i);
    acc += v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u) *sink = acc;  // never true on the probes' data
}

// The median of `runs` timed launches (CUDA events around each) after `warmup` untimed ones, in µs.
template <class Launch>
float median_us(Launch launch, int runs = 50, int warmup = 5) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  std::vector<float> t;
  for (int r = 0; r < warmup + runs; ++r) {
    CK(cudaEventRecord(a));
    launch();
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, a, b));
    if (r >= warmup) t.push_back(ms * 1000.0f);
  }
  CK(cudaGetLastError());
  std::sort(t.begin(), t.end());
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return t[t.size() / 2];
}

// Fills n bf16 values (as their bits) with a hash of the index and `seed`, uniform in [-0.125,
// 0.125]. Defined here: each probe is one translation unit.
__global__ void fill_random(uint16_t* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    h ^= h >> 15;
    p[i] = __bfloat16_as_ushort(__float2bfloat16((static_cast<float>(h & 0xffff) / 65535.0f - 0.5f) * 0.25f));
  }
}

// A device copy of v (at least one element allocated), never freed: probes allocate once per point.
template <class T>
T* upload(const std::vector<T>& v) {
  T* p = nullptr;
  CK(cudaMalloc(&p, sizeof(T) * std::max<size_t>(v.size(), 1)));
  CK(cudaMemcpy(p, v.data(), sizeof(T) * v.size(), cudaMemcpyHostToDevice));
  return p;
}
