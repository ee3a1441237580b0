#pragma once
// Element-wise and row-wise bf16 kernels of the layer (activation, shared-expert gate, reduce,
// conversions): fp32 arithmetic, one rounding to bf16 per output, deterministic.
// Pointers are device pointers unless said otherwise; nothing here synchronises the host.
#include <cstdint>

#include "kernels/cuda/lane_context.hpp"
#include "kernels/cuda/live_rows.hpp"

namespace moeflow::cuda {

// act[r, i] = silu(h[r, i]) · h[r, I + i]; h bf16 [rows, 2I] ([gate | up] per row), act bf16 [rows, I].
// With a live count, `rows` is the bound and rows past the live ones are left as they are.
void swiglu(const uint16_t* h, int64_t rows, int intermediate, uint16_t* act, Stream stream, LiveRows live = {});

// y[t, :] *= sigmoid(x[t, :] · gate_w) in place; x, y bf16 [T, H], gate_w bf16 [H]. The dot is fp32
// with a fixed reduction order (one block per token), so reruns give the same bits.
void scale_rows_by_sigmoid_gate(const uint16_t* x, const uint16_t* gate_w, int64_t tokens, int hidden, uint16_t* y,
                                Stream stream);

// Most addends sum_rows takes.
inline constexpr int kSumRowsMaxAddends = 8;

// out[i] = Σ_a addends[a][i], fp32 in addend order, one rounding. `addends` is a HOST array of
// `count` device pointers (0 <= count <= 8; 0 writes zeros). out may alias addends[0].
void sum_rows(const uint16_t* const* addends, int count, int64_t elements, uint16_t* out, Stream stream);

// Round to nearest even (as __float2bfloat16_rn); and the exact widening back.
void convert_f32_to_bf16(const float* in, int64_t n, uint16_t* out, Stream stream);
void convert_bf16_to_f32(const uint16_t* in, int64_t n, float* out, Stream stream);

}  // namespace moeflow::cuda
