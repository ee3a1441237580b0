#pragma once
// bf16 in device code: scalar conversions and 8-wide (16-byte) pack / unpack, shared by the
// elementwise, permutation and decode kernels.
#include <cuda_bf16.h>

#include <cstdint>

namespace moeflow::cuda {

__device__ __forceinline__ float bf16_bits_to_float(uint16_t b) { return __uint_as_float(static_cast<uint32_t>(b) << 16); }
__device__ __forceinline__ uint16_t float_to_bf16_bits(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
// A bf16 pair's 32 bits (copied by value: reinterpreting a reference into an array of held pairs
// made the compiler keep that array in local memory), and back to two floats with one bit operation
// each (bf16 is an fp32's high half; __bfloat1622float2 spends a byte permute more on the high one).
__device__ __forceinline__ uint32_t bf16x2_bits(__nv_bfloat162 v) {
  uint32_t bits;
  memcpy(&bits, &v, sizeof bits);
  return bits;
}
__device__ __forceinline__ float2 bf16x2_bits_to_float2(uint32_t bits) {
  return make_float2(__uint_as_float(bits << 16), __uint_as_float(bits & 0xffff0000u));
}

__device__ __forceinline__ void unpack8(const uint4& v, float f[8]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

__device__ __forceinline__ uint4 pack8(const float f[8]) {
  uint4 v;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  return v;
}

// silu(g)·u, the CPU MLP's formula (swiglu_mlp.cpp) with the hardware's approximate exp and division
// (__expf, __fdividef: a few fp32 ulps, far inside the bf16 rounding every caller applies next; where
// e^-g overflows, __fdividef gives g / inf = -0, as the exact formula does). Every GPU SwiGLU calls
// this one function (the unfused kernel, the decode kernels, GEMM 1's epilogue), so their bits agree
// with one another. Why approximate: in GEMM 1's epilogue on the 128x256 cooperative tiles these
// instructions run while both consumer warp groups leave the tensor cores idle, and the exact
// expf and division measured 3.5-5% of the whole experts path at qwen T = 4096..8192 (H100,
// bench/NOTES.md "SwiGLU in GEMM 1's epilogue", eighteenth session).
//
// e^-g as __expf computes it (2^(-g·log2 e), the same fp32 constant), but flushing denormals: __expf's
// non-flushing form adds a compare and two predicated multiplies around each MUFU.EX2 (SASS), for
// results below 2^-126, where 1 + e^-g rounds to 1 either way. So the bits are __expf's, with three
// instructions fewer per value in that epilogue.
__device__ __forceinline__ float exp2_approx_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float silu_mul(float g, float u) {
  return __fdividef(g, 1.0f + exp2_approx_ftz(g * -1.4426950408889634f)) * u;
}

}  // namespace moeflow::cuda
