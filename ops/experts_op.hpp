#pragma once
// experts: the grouped SwiGLU MLP of the routed experts over rows grouped by expert.
// Inputs: rows [kT,H], offsets [E+1] i32, w13 [E,2I,H], w2 [E,H,I]. Output: y [kT,H].
// A kernel that needs the offsets on the host reads them through a to_host copy that the planner
// puts in place of input 1.
#include "graph/op_schema.hpp"

namespace moeflow {

class ExpertsOp final : public OpSchema {
 public:
  ExpertsOp(int experts, int top_k, int intermediate);
  // A rank's part of the experts' sum (a share of the experts, or a slice of every expert's I, from
  // the parallel lowering): its output is Partial, owed a sum over the ranks.
  ExpertsOp(int experts, int top_k, int intermediate, bool partial);
  bool partial() const { return partial_; }
  int experts() const { return experts_; }
  int top_k() const { return top_k_; }
  int intermediate() const { return intermediate_; }

  std::string kind() const override { return "experts"; }
  std::string summary() const override;
  std::vector<std::string> output_names() const override { return {"y"}; }
  std::vector<ValueType> infer(const Node& node, std::span<const Value* const> inputs) const override;
  Cost cost(const OpOperands& operands, int64_t tokens) const override;
  bool token_parallel() const override { return true; }
  std::vector<Distribution> distribute(const Node& node, std::span<const Value* const> inputs) const override;
  int min_inputs() const override { return 4; }

 private:
  int experts_, top_k_, intermediate_;
  bool partial_ = false;
};

// Expected number of distinct experts that T tokens with k distinct uniform choices touch.
double expected_touched_experts(double experts, double top_k, double tokens);

}  // namespace moeflow
