#pragma once
// The routed experts' MLP for few rows per expert (decode and small batches), our own kernels:
// each touched expert's w13 and w2 are streamed once per group of up to kDecodeRowsPerPass of its
// rows, with 16-byte loads and fp32 accumulation, SwiGLU applied in registers between the two
// matrix-vector products; untouched experts are never read. The per-expert row offsets stay on the
// device, so there is no host synchronisation and a captured CUDA graph serves any routing.
// Deterministic: every sum runs in a fixed order (no atomics). Pointers are device pointers.
#include <cstdint>

#include "kernels/cuda/lane_context.hpp"

namespace moeflow::cuda {

inline constexpr int kDecodeRowsPerPass = 4;  // most touched experts get 1-3 rows in decode

// 16-byte loads need H and I to be multiples of 8 (weights and rows are bf16, 256-byte aligned).
bool decode_experts_supported(int hidden, int intermediate);

// rows bf16 [R, H], permuted expert-major; offsets [E + 1] (device) as build_permutation writes
// them; w13 bf16 [E, 2I, H] (gate rows, then up rows); w2 bf16 [E, H, I]; act bf16 scratch [R, I];
// y bf16 [R, H]. R = total_rows (this run's T·k); rows at or past offsets[E] (ids outside [0, E))
// get zeros. Throws Error(bad_input) for unsupported shapes.
void experts_decode(const LaneContext& ctx, const uint16_t* rows, const int32_t* offsets, int experts,
                    int64_t total_rows, int hidden, int intermediate, const uint16_t* w13, const uint16_t* w2,
                    uint16_t* act, uint16_t* y);

}  // namespace moeflow::cuda
