#pragma once
// What every fused experts-path kernel (fused_decode.cu, fused_single_token.cu) reads and writes,
// as the fused_experts op hands it over; each kernel's own arguments extend it with its scratch.
// Pointers are device pointers.
#include <cstdint>

namespace moeflow::cuda {

struct FusedOperands {
  const uint16_t* x = nullptr;        // bf16 [T, H]
  const int32_t* ids = nullptr;       // [T, k]; ids outside [0, E) contribute nothing
  const float* weights = nullptr;     // [T, k]
  const uint16_t* w13 = nullptr;      // bf16 [E, 2I, H]: gate rows, then up rows
  const uint16_t* w2 = nullptr;       // bf16 [E, H, I]
  uint16_t* out = nullptr;            // bf16 [T, H]
  int experts = 0, top_k = 0, hidden = 0, inter = 0;
  const int32_t* live_tokens = nullptr;  // the run's T in device memory, or null
};

}  // namespace moeflow::cuda
