#pragma once
// Counter-based random numbers keyed by (seed, tensor name, flat index): any element of any tensor
// can be regenerated alone, on any rank, thread or device, and always gives the same bits. That is
// what lets each rank or GPU build its own slice of the weights without shipping them.
#include <cstdint>
#include <string_view>

#include "kernels/common/host_device.hpp"

namespace moeflow::rng {

// FNV-1a over the tensor's name; computed on the host, passed to kernels as a number.
constexpr uint64_t name_key(std::string_view name) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (char c : name) {
    h ^= static_cast<unsigned char>(c);
    h *= 0x100000001b3ull;
  }
  return h;
}

// SplitMix64's finaliser: a bijection with full avalanche, so neighbouring counters decorrelate.
MOEFLOW_HD uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

MOEFLOW_HD uint64_t stream_key(uint64_t seed, uint64_t name_hash) { return mix64(seed ^ mix64(name_hash)); }

// Uniform in [-1, 1) with 24 random bits: exactly representable in fp32 and never exactly 0
// except at one of 2^24 counters (an odd multiple of 2^-24 is used, so 0 never occurs).
MOEFLOW_HD float uniform_pm1(uint64_t key, uint64_t index) {
  const uint64_t bits = mix64(key + (index + 1) * 0x9e3779b97f4a7c15ull);
  const int32_t r = static_cast<int32_t>(bits >> 40);  // [0, 2^24)
  return static_cast<float>(2 * r - 16777215) * (1.0f / 16777216.0f);
}

}  // namespace moeflow::rng
