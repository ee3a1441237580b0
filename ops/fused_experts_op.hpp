#pragma once
// fused_experts: dispatch → experts → combine as one node, what the fuse pass (ops/fuse_experts.hpp)
// makes of that chain where a backend has a kernel that runs it in one piece (the CUDA decode
// kernel: one launch instead of five at T = 1). Same result as the chain:
//   out_t = Σ_j weight[t,j] · SwiGLU-MLP of expert ids[t,j] applied to x_t.
// Inputs: x [T,H], ids [T,k] i32, weights [T,k] f32, w13 [E,2I,H], w2 [E,H,I]. Output: out [T,H].
// Ids outside [0, E) contribute nothing, as in the chain on the GPU, whose permutation gives them no
// slot (the CPU's permutation refuses them as bad input).
//
// With a shared expert folded in (the fuse pass takes the layer's shared_expert and the reduce that
// adds it to the routed output, where a kernel streams both in one launch), the node is the layer's
// whole tail:
//   out_t = Σ_j weight[t,j] · MLP_ids[t,j](x_t) + g_t · MLP_shared(x_t),  g_t = σ(x_t · gate_w) or 1,
// with three (four, gated) more inputs: shared w13 [2S,H], shared w2 [H,S] (and gate_w [1,H]).
//
// With `addends` instead (the shared add folded into the fused node as into a combine,
// ops/fold_shared_add.hpp): that many more inputs [T,H] of x's type, added after the routed sum:
//   out_t = Σ_j weight[t,j] · MLP_ids[t,j](x_t) + Σ_a addend_a[t].
#include <cstddef>
#include <optional>

#include "graph/node.hpp"
#include "graph/op_schema.hpp"

namespace moeflow {

// A shared expert folded into the fused node: its intermediate size S and whether a sigmoid gate
// scales it (Qwen2-MoE).
struct FoldedShared {
  int intermediate = 0;
  bool gated = false;
};

class FusedExpertsOp final : public OpSchema {
 public:
  // Most addends a fused node takes (as a combine: ops/combine_op.hpp).
  static constexpr int kMaxAddends = 4;
  FusedExpertsOp(int experts, int top_k, int intermediate, std::optional<FoldedShared> shared = std::nullopt,
                 int addends = 0);
  int experts() const { return experts_; }
  int top_k() const { return top_k_; }
  int intermediate() const { return intermediate_; }
  const std::optional<FoldedShared>& shared() const { return shared_; }
  int addends() const { return addends_; }  // inputs 5 .. 5 + addends - 1

  std::string kind() const override { return "fused_experts"; }
  std::string summary() const override;
  std::vector<std::string> output_names() const override { return {"out"}; }
  std::vector<ValueType> infer(const Node& node, std::span<const Value* const> inputs) const override;
  // The chain's flops and only the bytes that cross memory in one piece: the touched experts'
  // weights, x, ids, weights and the output (no permuted rows, no y); plus the shared expert's
  // weights and flops where it is folded in, or the addends read.
  Cost cost(const OpOperands& operands, int64_t tokens) const override;
  bool token_parallel() const override { return true; }
  int min_inputs() const override { return shared_ ? (shared_->gated ? 8 : 7) : 5 + addends_; }

 private:
  int experts_, top_k_, intermediate_;
  std::optional<FoldedShared> shared_;
  int addends_;
};

// The routed experts' MLP a node runs, whichever op runs it (experts, or fused_experts after the
// fuse pass): their count, top-k, I, and which input is w13 (w2 follows it). Empty for other ops.
struct RoutedExperts {
  int experts = 0, top_k = 0, intermediate = 0;
  std::size_t w13_input = 0;
};
std::optional<RoutedExperts> routed_experts(const Node& n);

}  // namespace moeflow
