#pragma once
// Small layers and graph counts shared by the pass tests (fuse, shared add).
#include <string>

#include "graph/graph.hpp"
#include "ops/model_config.hpp"

namespace moeflow::testing_layers {

// qwen1.5-moe-a2.7b at a test size, its shared expert included.
inline const MoEConfig& small_qwen() {
  static const MoEConfig c = load_config("qwen1.5-moe-a2.7b", {"hidden_size=64", "moe_intermediate_size=32",
                                                               "shared_expert_intermediate_size=64"});
  return c;
}

// Nodes of graph g whose op is of kind `kind`.
inline int count_kind(const Graph& g, const std::string& kind) {
  int n = 0;
  for (const Node& node : g.nodes()) n += node.op->kind() == kind;
  return n;
}

}  // namespace moeflow::testing_layers
