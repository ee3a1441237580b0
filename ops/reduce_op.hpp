#pragma once
// reduce: the routed output plus every shared-expert output; the one place a Partial value (a sum
// still owed across ranks) becomes Replicated, so the TP all-reduce happens here exactly once.
// Inputs: one or more [T,H] of one type. Output: out [T,H].
#include "graph/op_schema.hpp"

namespace moeflow {

class ReduceOp final : public OpSchema {
 public:
  std::string kind() const override { return "reduce"; }
  std::string summary() const override { return "sum"; }
  std::vector<std::string> output_names() const override { return {"out"}; }
  std::vector<ValueType> infer(const Node& node, std::span<const Value* const> inputs) const override;
  Cost cost(const OpOperands& operands, int64_t tokens) const override;
  bool token_parallel() const override { return true; }
  std::vector<Distribution> distribute(const Node& node, std::span<const Value* const> inputs) const override;
  int min_inputs() const override { return 1; }
  int max_inputs() const override { return 64; }
};

}  // namespace moeflow
