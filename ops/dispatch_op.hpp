#pragma once
// dispatch (one process): permute token rows by expert. Expert-major order; within an expert by
// (token, choice). Inputs: x [T,H], ids [T,k] i32. Outputs: rows [kT,H], offsets [E+1] i32
// (first row of each expert), slot_of [T,k] i32 (the row holding each (token, choice)).
// On a rank that owns experts [first_expert, first_expert + E) of a larger set (a Share), choices of
// other experts get no row (slot_of -1): rows beyond offsets[E] are unused.
#include "graph/op_schema.hpp"

namespace moeflow {

class DispatchOp final : public OpSchema {
 public:
  // This rank's share of a larger set of experts (the parallel lowering): ids outside it are skipped.
  struct Share {
    int first_expert = 0;
    int total_experts = 0;
  };
  DispatchOp(int experts, int top_k);
  DispatchOp(int experts, int top_k, Share share);
  int experts() const { return experts_; }
  int top_k() const { return top_k_; }
  bool shared_out() const { return share_.total_experts > 0; }  // a share: some choices may get no row
  const Share& share() const { return share_; }

  std::string kind() const override { return "dispatch"; }
  std::string summary() const override;
  std::vector<std::string> output_names() const override { return {"rows", "offsets", "slot_of"}; }
  std::vector<ValueType> infer(const Node& node, std::span<const Value* const> inputs) const override;
  Cost cost(const OpOperands& operands, int64_t tokens) const override;
  bool token_parallel() const override { return true; }
  int min_inputs() const override { return 2; }

 private:
  int experts_, top_k_;
  Share share_;
};

}  // namespace moeflow
