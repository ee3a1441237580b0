#pragma once
// combine (one process): out_t = Σ_j weight[t,j] · y[slot_of[t,j]] (+ Σ_a addend_a[t]).
// Inputs: y [kT,H], slot_of [T,k] i32, weights [T,k] f32, then `addends` values [T,H] of y's type
// (the shared experts' outputs, folded in by fold_shared_add: ops/fold_shared_add.hpp). Output: out [T,H].
#include "graph/op_schema.hpp"

namespace moeflow {

class CombineOp final : public OpSchema {
 public:
  // Most addends a combine takes (the CUDA kernel passes them by value).
  static constexpr int kMaxAddends = 4;

  explicit CombineOp(int top_k, int addends = 0);
  int top_k() const { return top_k_; }
  int addends() const { return addends_; }

  std::string kind() const override { return "combine"; }
  std::string summary() const override {
    return "weighted_sum k=" + std::to_string(top_k_) + (addends_ > 0 ? " + " + std::to_string(addends_) + " addend(s)" : "");
  }
  std::vector<std::string> output_names() const override { return {"out"}; }
  std::vector<ValueType> infer(const Node& node, std::span<const Value* const> inputs) const override;
  Cost cost(const OpOperands& operands, int64_t tokens) const override;
  bool token_parallel() const override { return true; }
  // Linear in y: Partial rows give a Partial output (the sum over ranks is still owed).
  std::vector<Distribution> distribute(const Node& node, std::span<const Value* const> inputs) const override;
  int min_inputs() const override { return 3 + addends_; }

 private:
  int top_k_;
  int addends_;
};

}  // namespace moeflow
