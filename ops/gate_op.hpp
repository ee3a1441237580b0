#pragma once
// gate: router logits = x·Wgᵀ (fp32), scores, top-k selection by a RoutingRule.
// Inputs: x [T,H], router [E,H], and bias [E] f32 when the rule uses one.
// Outputs: ids [T,k] i32, weights [T,k] f32, logits [T,E] f32 (kept: later passes all-gather it).
#include "graph/op_schema.hpp"
#include "kernels/common/routing_rule.hpp"

namespace moeflow {

class GateOp final : public OpSchema {
 public:
  explicit GateOp(RoutingRule rule);
  const RoutingRule& rule() const { return rule_; }

  std::string kind() const override { return "gate"; }
  std::string summary() const override;
  std::vector<std::string> output_names() const override { return {"ids", "weights", "logits"}; }
  std::vector<ValueType> infer(const Node& node, std::span<const Value* const> inputs) const override;
  Cost cost(const OpOperands& operands, int64_t tokens) const override;
  bool token_parallel() const override { return true; }
  int min_inputs() const override { return rule_.use_bias ? 3 : 2; }

 private:
  RoutingRule rule_;
};

// Refuses a rule that cannot route (top-k > experts, groups not dividing experts, ...).
void check_routing_rule(const RoutingRule& rule, const std::string& where);

}  // namespace moeflow
