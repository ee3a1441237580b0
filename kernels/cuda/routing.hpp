#pragma once
// Router on the GPU: scores and top-k selection by a RoutingRule (DESIGN.md "Gate"), one warp per
// token. Same ids as cpu::route_token bit for bit (same tie rule, same comparison values: expf and
// IEEE division as on the host, the softmax sum in the host's sequential order), weights to fp32
// accuracy (the device expf differs from the host's by at most 2 ulp).
// Pointers are device pointers; nothing here synchronises the host.
#include <cstdint>
#include <string>

#include "kernels/common/routing_rule.hpp"
#include "kernels/cuda/lane_context.hpp"

namespace moeflow::cuda {

// Largest rule the kernel takes (experts per lane and chosen ids per lane of one warp).
inline constexpr int kRouteMaxExperts = 512;
inline constexpr int kRouteMaxTopK = 32;

// logits [T, E] fp32; bias [E] (read iff rule.use_bias, must then be non-null); ids and weights
// [T, k]. ids are in descending order of the choice score (ties: lower index first). T = 0 launches
// nothing. Throws Error(bad_input) for an inconsistent rule or one beyond the limits above.
void route_tokens(const RoutingRule& rule, const float* logits, const float* bias, int64_t tokens, int32_t* ids,
                  float* weights, Stream stream);

// A few tokens: the logits and the routing in ONE launch (no cuBLAS). logits[t, e] = x_t · gate_w_e
// in fp32 from bf16 (x [T, H], gate_w [E, H]), written as route_tokens would read them; then ids and
// weights exactly as route_tokens gives for those logits. Sums run in a fixed order (reruns give the
// same bits), in another order than cuBLAS's, so logits may differ from its in the last bits.
// Up to 4 tokens: measured on the H100 (gate node of a CUDA-graph replay, GPU clock stamps), it took
// 14.8 / 10.6 / 7.1 µs at T=1 against cuBLAS + routing kernel's 18.0 / 12.6 / 11.1 (deepseek-v3 /
// qwen3 / mixtral), but 25.8 / 16.0 / 13.2 against 18.4 / 12.6 / 10.3 at T=8, where every block
// re-reads all the tokens' rows from L2; whole layers were even at T=4.
inline constexpr int kRouteSmallMaxTokens = 4;
// Whether the one-launch router takes this rule, H and maximum T (else why not, in *why).
bool route_small_supported(const RoutingRule& rule, int hidden, int64_t max_tokens, std::string* why = nullptr);
// Scratch for its counter where the lane has none (LaneContext::counters).
int64_t route_small_workspace_bytes();
void route_tokens_small(const LaneContext& ctx, const RoutingRule& rule, const uint16_t* x, const uint16_t* gate_w,
                        int hidden, int64_t tokens, const float* bias, float* logits, int32_t* ids, float* weights,
                        void* workspace);

}  // namespace moeflow::cuda
