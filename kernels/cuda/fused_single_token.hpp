#pragma once
// The experts path of ONE token (decode of a single sequence: T = 1) in one launch, w2 read as it is
// stored. Every block is one uniform item of the k choices' weight streams, so no block waits for a
// whole expert (the two-phase fused_decode.hpp kernel's down projection waits for its group's gate/up):
//   item (choice j, 16 features of I): act = silu(x·w1ᵀ)·(x·w3ᵀ) for those features, published;
//   then, with the three neighbouring items of its quad (64 features, running in the same wave),
//   the partial y over a quarter of H: y[h] += Σ act_f · w2[h, f] for the quad's 64 features f,
//   128 bytes of each of those rows of w2 (whole lines);
//   then every block sums a slice of H over all partials in a fixed order (no floating-point
//   atomics: repeated runs give identical bytes), out = Σ_j weight_j · y_j.
// The launch is cooperative (every block resident at once), which the quad's and the final waits
// need. Measured against the two-phase kernel on the H100 (bench/probes/uniform_decode.cu,
// bench/NOTES.md): qwen1.5 / qwen3 at T=1 34.9 / 36.6 µs against 37.9 / 40.9.
// Pointers are device pointers.
#include <cstdint>
#include <string>

#include "kernels/cuda/lane_context.hpp"

namespace moeflow::cuda {

struct FusedSingleTokenShape {
  int experts = 0, top_k = 0, hidden = 0, intermediate = 0;
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

}  // namespace moeflow::cuda
