#pragma once
// What the GPU tests of the fused kernels share: a preset's routed experts path in bf16 at a test size,
// and the kernel a plan runs the routed experts with.
#include <memory>
#include <string>
#include <vector>

#include "graph/graph.hpp"
#include "ops/fused_experts_op.hpp"  // routed_experts
#include "ops/model_config.hpp"
#include "ops/moe_layer.hpp"
#include "scheduler/plan.hpp"

namespace moeflow::testing_gpu {

// The experts path (gate output in, routed experts, combine) of `preset` with `sets`, bf16, up to max_tokens.
inline std::shared_ptr<const Graph> experts_graph(const std::string& preset, const std::vector<std::string>& sets,
                                                  int64_t max_tokens) {
  return std::make_shared<const Graph>(
      build_experts_graph(load_config(preset, sets), {.max_tokens = max_tokens, .dtype = DType::bf16}));
}

// The kernel of the plan's fused_experts node, or of its experts node where the chain stayed.
inline std::string routed_experts_kernel(const Plan& plan) {
  for (const PlanStep& step : plan.steps)
    if (routed_experts(plan.graph->node(step.node))) return step.kernel->name;
  return "(none)";
}

}  // namespace moeflow::testing_gpu
