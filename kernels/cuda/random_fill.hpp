#pragma once
// The counter-based generator of kernels/common/random.hpp on the device: the same bits as on the
// host for the same (seed, name, index), so weights are drawn where they live and never cross PCIe.
// Pointers are device pointers; `stream` is a cudaStream_t (null: the default stream).
#include <cstdint>

namespace moeflow::cuda {

// dst[i] = U(-1,1)·scale at flat indices [first, first + n), fp32.
void fill_uniform_f32(float* dst, int64_t n, uint64_t seed, uint64_t name_hash, float scale, int64_t first,
                      void* stream);
// The same values rounded to bf16 (round to nearest even), stored as raw bf16 bits.
void fill_uniform_bf16(uint16_t* dst, int64_t n, uint64_t seed, uint64_t name_hash, float scale, int64_t first,
                       void* stream);

}  // namespace moeflow::cuda
