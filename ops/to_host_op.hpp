#pragma once
// to_host: copies a small device value (an expert's row offsets) into pinned host memory and waits
// for it. Kernels that need sizes on the host (cuBLAS's per-expert loop and grouped GEMMs) read it.
// The planner inserts it where such a kernel is chosen, so the host synchronisation is a node of
// its own in the plan and its DOT, and a plan containing one is refused for CUDA-graph capture.
#include "graph/op_schema.hpp"

namespace moeflow {

class ToHostOp final : public OpSchema {
 public:
  std::string kind() const override { return "to_host"; }
  std::string summary() const override { return "device -> pinned host, then wait (host sync)"; }
  std::vector<std::string> output_names() const override { return {"host"}; }
  std::vector<ValueType> infer(const Node& node, std::span<const Value* const> inputs) const override;
  Cost cost(const OpOperands& operands, int64_t tokens) const override;
  bool token_parallel() const override { return false; }
  int min_inputs() const override { return 1; }
  std::string fill_color() const override { return "orange"; }
};

}  // namespace moeflow
