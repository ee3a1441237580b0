#pragma once
// combine (one process): out_t = Σ_j weight[t,j] · y[slot_of[t,j]].
// Inputs: y [kT,H], slot_of [T,k] i32, weights [T,k] f32. Output: out [T,H].
#include "graph/op_schema.hpp"

namespace moeflow {

class CombineOp final : public OpSchema {
 public:
  explicit CombineOp(int top_k);
  int top_k() const { return top_k_; }

  std::string kind() const override { return "combine"; }
  std::string summary() const override { return "weighted_sum k=" + std::to_string(top_k_); }
  std::vector<std::string> output_names() const override { return {"out"}; }
  std::vector<ValueType> infer(const Node& node, std::span<const Value* const> inputs) const override;
  Cost cost(const OpOperands& operands, int64_t tokens) const override;
  bool token_parallel() const override { return true; }
  // Linear in y: Partial rows give a Partial output (the sum over ranks is still owed).
  std::vector<Distribution> distribute(const Node& node, std::span<const Value* const> inputs) const override;
  int min_inputs() const override { return 3; }

 private:
  int top_k_;
};

}  // namespace moeflow
