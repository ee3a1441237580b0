#pragma once
// SwiGLU MLPs: y = (silu(x·W1ᵀ) ⊙ (x·W3ᵀ))·W2ᵀ with w13 = [W1; W3] of shape [2I, H] and w2 [H, I].
// GEMMs through CBLAS, single-threaded per call; oneTBB alone decides the parallelism.
//
// Two phases, so that even one small block of rows keeps every thread busy: (1) per (row block,
// slab of I) the activation silu(x·W1ᵀ) ⊙ x·W3ᵀ into `act`; (2) per (row block, slab of H) the
// down projection act·W2ᵀ. Each output element is computed by exactly one task: deterministic.
// Blocks of up to kSmallRowsMax rows use small_rows_gemm: OpenBLAS's sgemm packs the weights
// first, which for so few rows costs several times the weight read itself (small_rows_gemm.cpp).
#include <cstdint>

namespace moeflow::cpu {

// Floats of `act` workspace the MLPs below need for `rows` rows.
inline int64_t swiglu_workspace_floats(int64_t rows, int intermediate) { return rows * intermediate; }

// Grouped over experts: rows [offsets[E], H] grouped by expert; w13 [E, 2I, H]; w2 [E, H, I];
// out [offsets[E], H]; act [offsets[E], I] workspace. Experts with no rows cost nothing.
void grouped_swiglu_mlp(const float* rows, const int32_t* offsets, int experts, int hidden, int intermediate,
                        const float* w13, const float* w2, float* out, float* act);

// One MLP on every row of x [T, H]; when gate_w [H] is given, each row's output is multiplied by
// sigmoid(x_t · gate_w) (Qwen2-MoE's shared-expert gate). act [T, I] workspace.
void swiglu_mlp(const float* x, int64_t tokens, int hidden, int intermediate, const float* w13, const float* w2,
                const float* gate_w, float* out, float* act);

}  // namespace moeflow::cpu
