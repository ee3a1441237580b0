// The device generator gives the host's bits (gpu label: skips cleanly on a machine without a GPU).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "kernels/common/random.hpp"
#include "kernels/cpu/elementwise.hpp"
#include "kernels/cuda/device.hpp"
#include "kernels/cuda/random_fill.hpp"

using namespace moeflow;

namespace {

#define REQUIRE_GPU()                                                     \
  do {                                                                    \
    if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device here"; \
  } while (0)

// Round to nearest even, as __float2bfloat16_rn does (no NaNs occur here).
uint16_t to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

template <class T> std::vector<T> device_fill(int64_t n, int64_t first, bool bf16) {
  void* d = nullptr;
  EXPECT_EQ(cudaMalloc(&d, static_cast<size_t>(n) * sizeof(T)), cudaSuccess);
  const uint64_t key = rng::name_key("experts.w13");
  if (bf16) cuda::fill_uniform_bf16(static_cast<uint16_t*>(d), n, 42, key, 0.125f, first, nullptr);
  else cuda::fill_uniform_f32(static_cast<float*>(d), n, 42, key, 0.125f, first, nullptr);
  std::vector<T> host(static_cast<size_t>(n));
  EXPECT_EQ(cudaMemcpy(host.data(), d, static_cast<size_t>(n) * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
  cudaFree(d);
  return host;
}

}  // namespace

TEST(CudaRandom, DeviceF32BitsEqualHostBits) {
  REQUIRE_GPU();
  const int64_t n = 1 << 20, first = 12345;
  std::vector<float> host(static_cast<size_t>(n));
  cpu::fill_uniform(host.data(), n, 42, rng::name_key("experts.w13"), 0.125f, first);
  const std::vector<float> dev = device_fill<float>(n, first, false);
  EXPECT_EQ(0, std::memcmp(host.data(), dev.data(), host.size() * sizeof(float)));
}

TEST(CudaRandom, DeviceBf16IsTheHostValueRoundedToNearestEven) {
  REQUIRE_GPU();
  const int64_t n = 1 << 18;
  std::vector<float> host(static_cast<size_t>(n));
  cpu::fill_uniform(host.data(), n, 42, rng::name_key("experts.w13"), 0.125f, 0);
  const std::vector<uint16_t> dev = device_fill<uint16_t>(n, 0, true);
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(dev[static_cast<size_t>(i)], to_bf16_bits(host[static_cast<size_t>(i)])) << i;
}

TEST(CudaRandom, DeviceNameAndMemoryAreReported) {
  REQUIRE_GPU();
  EXPECT_FALSE(cuda::device_name(0).empty());
  int64_t free_bytes = 0, total_bytes = 0;
  cuda::device_memory(0, free_bytes, total_bytes);
  EXPECT_GT(total_bytes, 0);
  EXPECT_LE(free_bytes, total_bytes);
}
