#pragma once
// The experts path of ONE token (decode of a single sequence: T = 1) in one launch. Every block is one
// uniform item of the k choices' weight streams, so no block waits for a whole expert (the two-phase
// fused_decode.hpp kernel's down projection waits for its group's gate/up). Two variants, by how w2 is
// read; both compute an item's act the same way and sum the partials the same way:
//   item (choice j, 16 features of I): act = silu(x·w1ᵀ)·(x·w3ᵀ) for those features;
//   then a partial y from w2 (below);
//   then every block sums a slice of H over all partials in a fixed order (no floating-point
//   atomics: repeated runs give identical bytes), out = Σ_j weight_j · y_j.
// The routed-only launches are cooperative (every block resident at once), which their waits need;
// the w2t variant with a shared expert folded in (below) needs no such guarantee.
//
// w2 as it is stored, [E, H, I] (experts_fused_single_token): an item publishes its act values and,
// with the three neighbouring items of its quad (64 features, running in the same wave), computes the
// partial y over a quarter of H: y[h] += Σ act_f · w2[h, f] for the quad's 64 features f, 128 bytes of
// each of those rows of w2 (whole lines); each quad waits for its four items' act values. Measured
// against the two-phase kernel on the H100 (bench/probes/uniform_decode.cu, bench/NOTES.md):
// qwen1.5 / qwen3 at T=1 34.9 / 36.6 µs against 37.9 / 40.9.
//
// w2 transposed, w2t [E, I, H] (experts_fused_single_token_w2t): an item's 16 features are 16
// contiguous rows of w2t, each all of H, so the item computes its partial y over all of H on its own
// (y[h] = Σ act_f · w2t[f, h]) and stores it straight from its registers: no quad, no wait but the
// final one. The same probe measured it 7% faster than the quads (its cluster_kernel<1>, which staged
// y in shared memory and so stopped at H = 2048: qwen1.5 / qwen3 32.5 / 34.3 µs against 34.9 / 36.6).
// It reads a copy of w2 transposed once when the weights are bound (pack_w2_transposed;
// KernelEntry::packed_weight): a third of the routed experts' weights more device memory.
//
// The w2t variant also runs a layer's shared expert folded in (FusedSingleTokenShared): S / 16 more
// items ahead of the routed ones, each 16 of the shared MLP's S features, weighed by the token's
// sigmoid gate (or 1). Launched to start while the gate still runs (programmatic dependent launch), it
// streams the shared items first and waits for the routing only at its first routed item. Its items
// go in units of consecutive ones, one unit per resident block (qwen1.5: 704 items, 352 units of
// two), each unit's items weighed and added into one partial row, so that the stream is one round and
// the sum has as many rows as units. That launch is not cooperative (blocks start as the gate's leave
// the SMs): blocks take units from a counter, then the sum's slices, and a block that takes a slice
// waits only for units already taken by running blocks, which finish without waiting.
// Pointers are device pointers.
#include <cstdint>
#include <string>

#include "kernels/cuda/lane_context.hpp"

namespace moeflow::cuda {

struct FusedSingleTokenShape {
  int experts = 0, top_k = 0, hidden = 0, intermediate = 0;
  // A shared expert folded in (w2t variant only): its S, a multiple of 16; 0 without one.
  int shared_intermediate = 0;
  bool shared_gated = false;
};

// The folded shared expert's weights: w13 bf16 [2S, H] (gate rows, then up rows), w2t bf16 [S, H]
// (its w2 [H, S] transposed: pack_w2_transposed with one expert), gate bf16 [H] where it is gated,
// else null.
struct FusedSingleTokenShared {
  const uint16_t* w13 = nullptr;
  const uint16_t* w2t = nullptr;
  const uint16_t* gate = nullptr;
};

// Empty when the kernel can run this shape, else why not: H a multiple of 32 (16-byte loads, quarters
// and reduction slices of 8), I a multiple of 64 (quads of 64 features).
std::string fused_single_token_unsupported(const FusedSingleTokenShape& s);

// Scratch: act fp32 [k, I], partials fp32 [k·I/64, H] and room for the counters.
int64_t fused_single_token_workspace_bytes(const FusedSingleTokenShape& s);

// x bf16 [1, H]; ids i32 [1, k] (ids outside [0, E) contribute nothing); weights f32 [1, k];
// w13 bf16 [E, 2I, H] (gate rows, then up rows); w2 bf16 [E, H, I]; out bf16 [1, H].
// tokens: 0 or 1; live_tokens: null, or the run's T (0 or 1) in device memory, read by the kernel.
// Throws Error(bad_input) for unsupported shapes.
void experts_fused_single_token(const LaneContext& ctx, const FusedSingleTokenShape& s, int64_t tokens,
                                const int32_t* live_tokens, const uint16_t* x, const int32_t* ids, const float* weights,
                                const uint16_t* w13, const uint16_t* w2, uint16_t* out, void* workspace);

// The same for the w2t variant: H a multiple of 8 (16-byte loads of w13 and w2t rows, 16-byte
// stores of the partials, reduction slices of 8), I and S multiples of 16 (items of 16 features).
std::string fused_single_token_w2t_unsupported(const FusedSingleTokenShape& s);

// Scratch of the w2t variant: partials fp32 [(S + k·I)/16, H] and room for its counters.
int64_t fused_single_token_w2t_workspace_bytes(const FusedSingleTokenShape& s);

// As experts_fused_single_token, with w2t bf16 [E, I, H] (pack_w2_transposed's copy of w2) in place
// of w2; with a shared expert in the shape (`shared`, its weights), out also holds g · its MLP of x
// (g = σ(x · gate), or 1). `start_early` (folded shared expert only): launched to start while the
// previous kernel of the stream (the gate, which writes ids and weights and releases it:
// dependent_launch.cuh) still runs, where the device allows; nothing that kernel reads or writes may
// share bytes with x, the shared expert's weights or this scratch.
void experts_fused_single_token_w2t(const LaneContext& ctx, const FusedSingleTokenShape& s, int64_t tokens,
                                    const int32_t* live_tokens, const uint16_t* x, const int32_t* ids,
                                    const float* weights, const uint16_t* w13, const uint16_t* w2t, uint16_t* out,
                                    void* workspace, const FusedSingleTokenShared& shared = {},
                                    bool start_early = false);

// w2t[e, i, h] = w2[e, h, i]: w2 bf16 [E, H, I] transposed per expert into w2t bf16 [E, I, H], any
// sizes. Written once, when the weights are bound (KernelEntry::packed_weight), never on a run.
int64_t packed_w2t_bytes(int experts, int hidden, int inter);
void pack_w2_transposed(const uint16_t* w2, int experts, int hidden, int inter, uint16_t* w2t, Stream stream);

}  // namespace moeflow::cuda
