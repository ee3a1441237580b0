#pragma once
// Router on the GPU: scores and top-k selection by a RoutingRule (DESIGN.md "Gate"), one warp per
// token. Same ids as cpu::route_token bit for bit (same tie rule, same comparison values: expf and
// IEEE division as on the host, the softmax sum in the host's sequential order), weights to fp32
// accuracy (the device expf differs from the host's by at most 2 ulp).
// Pointers are device pointers; nothing here synchronises the host.
#include <cstdint>

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

}  // namespace moeflow::cuda
