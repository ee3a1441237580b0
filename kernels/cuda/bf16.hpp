#pragma once
// bf16 values cross host headers as their raw 16 bits; device code reinterprets them as
// __nv_bfloat16. Host-side conversions round to nearest even, exactly as __float2bfloat16_rn.
#include <cstdint>
#include <cstring>

namespace moeflow {

using bf16_bits = uint16_t;

inline bf16_bits float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<bf16_bits>((u >> 16) | 0x40u);  // quiet NaN
  return static_cast<bf16_bits>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float bf16_to_float(bf16_bits b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace moeflow
