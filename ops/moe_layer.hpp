#pragma once
// The standard layers built from a config: the full MoE layer, and the experts-only graph whose
// inputs are x, top-k ids and weights (the benchmarks' experts-path scope).
#include <string>

#include "graph/graph.hpp"
#include "ops/model_config.hpp"

namespace moeflow {

struct LayerOptions {
  int64_t max_tokens = 4096;
  DType dtype = DType::f32;  // activations and weights (CPU: f32; CUDA: bf16)
};

// x -> gate -> dispatch -> experts -> combine -> reduce (+ shared expert when the config has one).
Graph build_moe_layer(const MoEConfig& config, const LayerOptions& options = {});
// x, route.ids, route.weights -> dispatch -> experts -> combine.
Graph build_experts_graph(const MoEConfig& config, const LayerOptions& options = {});

// The graph a benchmark or run scope names: "layer" (the whole layer), "experts" (the experts path),
// "routed" (the layer without its shared experts) or "shared" (the shared experts alone). The last
// two time each branch alone, which is what shared-expert overlap is judged against.
Graph build_scope_graph(const MoEConfig& config, const std::string& scope, const LayerOptions& options = {});
inline constexpr const char* kScopes[] = {"layer", "experts", "routed", "shared"};

}  // namespace moeflow
