#pragma once
// shared_expert: a SwiGLU MLP on every token, optionally times a per-token sigmoid gate (Qwen2-MoE).
// Inputs: x [T,H], w13 [2I,H], w2 [H,I], and gate_w [1,H] when gated. Output: y [T,H].
#include "graph/op_schema.hpp"

namespace moeflow {

class SharedExpertOp final : public OpSchema {
 public:
  SharedExpertOp(int intermediate, bool gated);
  int intermediate() const { return intermediate_; }
  bool gated() const { return gated_; }

  std::string kind() const override { return "shared_expert"; }
  std::string summary() const override;
  std::vector<std::string> output_names() const override { return {"y"}; }
  std::vector<ValueType> infer(const Node& node, std::span<const Value* const> inputs) const override;
  Cost cost(const OpOperands& operands, int64_t tokens) const override;
  bool token_parallel() const override { return true; }
  int min_inputs() const override { return gated_ ? 4 : 3; }
  std::string fill_color() const override { return "lightblue"; }

 private:
  int intermediate_;
  bool gated_;
};

}  // namespace moeflow
