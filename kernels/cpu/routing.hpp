#pragma once
// Router: logits = x·Wgᵀ, then scores and top-k selection by a RoutingRule (see DESIGN.md "Gate").
#include <cstdint>

#include "kernels/common/routing_rule.hpp"

namespace moeflow::cpu {

// logits[T, E] = x[T, H] · router[E, H]ᵀ, fp32 (CBLAS, parallel over token blocks).
void router_logits(const float* x, const float* router, int64_t tokens, int hidden, int experts, float* logits);

// Applies `rule` to one token's logits[E]: writes ids[k] (expert indices) and weights[k].
// bias[E] is read only when rule.use_bias. Ties go to the lower expert / group index.
// `scratch` must hold 3 * E floats.
void route_token(const RoutingRule& rule, const float* logits, const float* bias, int32_t* ids, float* weights,
                 float* scratch);

// route_token for every token, oneTBB-parallel. ids/weights are [T, k].
void route_tokens(const RoutingRule& rule, const float* logits, const float* bias, int64_t tokens, int32_t* ids,
                  float* weights);

}  // namespace moeflow::cpu
