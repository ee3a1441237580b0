#pragma once
// The whole experts path for decode-sized batches in ONE kernel launch: no permutation, no permuted
// copy of x, no separate combine. Each block derives the (expert, group of up to kFusedRowsPerGroup
// choices) work list itself from the top-k ids (a few hundred integers), then works through
//   phase 1: (group, 16 features of I): act = silu(x·w1ᵀ)·(x·w3ᵀ), x rows read straight from x;
//   phase 2: (group, 32 features of H): y = act·w2ᵀ (fp32), each weight row streamed once per group;
//   combine: the block that finishes the last group of a 32-feature slice of H sums
//            out[t] = Σ_j weight[t,j] · y[(t,j)] over j in order, so the result is deterministic
//            (integer counters decide who sums; no floating-point atomics).
// Blocks take items from one counter, every phase-1 item before any phase-2 item; a phase-2 item
// waits for its group's phase 1 (prefetching its weights into L2 meanwhile), which only running
// blocks hold, so no wait can deadlock. Why one launch: at T = 1 the touched experts' weights take
// ~25 µs to stream while five launches (permutation, row scatter, two GEMVs, combine) cost ~10 µs more. Where
// the chain's two decode kernels stream faster, the planner keeps the chain (huge_experts() in
// ops/cuda/cuda_kernels.cpp).
// Pointers are device pointers.
#include <cstdint>
#include <string>

#include "kernels/cuda/lane_context.hpp"

namespace moeflow::cuda {

inline constexpr int kFusedMaxPairs = 256;      // T·k the one block's work list is built for
inline constexpr int kFusedRowsPerGroup = 4;    // choices of one expert sharing a weight stream

struct FusedDecodeShape {
  int experts = 0, top_k = 0, hidden = 0, intermediate = 0;
  int64_t max_tokens = 0;  // what launches and scratch are sized for
  // A shared expert folded in (ops/fused_experts_op.hpp): its S, a multiple of I, so that it runs as
  // S / I more choices per token, each part an expert of I features whose weight is the token's
  // sigmoid gate (or 1). 0 without one.
  int shared_intermediate = 0;
  bool shared_gated = false;
};

// The folded shared expert's weights: w13 bf16 [2S, H] (gate rows, then up rows), w2 bf16 [H, S],
// gate bf16 [1, H] where it is gated, else null.
struct FusedSharedWeights {
  const uint16_t* w13 = nullptr;
  const uint16_t* w2 = nullptr;
  const uint16_t* gate = nullptr;
};

// Empty when the kernel can run this shape, else why not (16-byte loads need H and I multiples of 8;
// T·k at most kFusedMaxPairs). Whether it pays is the planner's question (ops/cuda/cuda_kernels.cpp).
std::string fused_decode_unsupported(const FusedDecodeShape& s);

// Scratch: act bf16 [T·k', I], y fp32 [T·k', H] (k' = k + S / I choices per token) and room for the
// counters, at the shape's maximum T.
// The counters live in the lane's LaneContext::counters where it has them (the kernel leaves them
// zero: one launch); else in this scratch, zeroed by a memset before the kernel (two launches).
int64_t fused_decode_workspace_bytes(const FusedDecodeShape& s);

// x bf16 [T, H]; ids i32 [T, k] (ids outside [0, E) contribute nothing); weights f32 [T, k];
// w13 bf16 [E, 2I, H] (gate rows, then up rows); w2 bf16 [E, H, I]; out bf16 [T, H].
// live_tokens: null, or the run's T in device memory (read by the kernel; T <= max_tokens), so one
// captured graph serves any T. With a shared expert in the shape, out also holds g_t · its MLP of
// x_t (`shared`). `start_early`: launched to start while the previous kernel of the stream (the one
// writing ids and weights, which must release it: dependent_launch.cuh) still runs, where the device
// allows; the shared expert's gate/up work runs before the kernel waits for the routing. Nothing the
// previous kernel reads or writes may share bytes with x, the shared weights or this scratch.
// Throws Error(bad_input) for unsupported shapes.
void experts_fused_decode(const LaneContext& ctx, const FusedDecodeShape& s, int64_t tokens, const int32_t* live_tokens,
                          const uint16_t* x, const int32_t* ids, const float* weights, const uint16_t* w13,
                          const uint16_t* w2, uint16_t* out, void* workspace, const FusedSharedWeights& shared = {},
                          bool start_early = false);

}  // namespace moeflow::cuda
