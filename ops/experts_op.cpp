#include "ops/experts_op.hpp"

#include <cmath>

#include "kernels/cpu/swiglu_mlp.hpp"
#include "ops/kernel_registry.hpp"
#include "ops/op_checks.hpp"

namespace moeflow {

double expected_touched_experts(double experts, double top_k, double tokens) {
  return experts * (1.0 - std::pow(1.0 - top_k / experts, tokens));
}

ExpertsOp::ExpertsOp(int experts, int top_k, int intermediate) : ExpertsOp(experts, top_k, intermediate, false) {}

ExpertsOp::ExpertsOp(int experts, int top_k, int intermediate, bool partial)
    : experts_(experts), top_k_(top_k), intermediate_(intermediate), partial_(partial) {
  if (intermediate_ <= 0) fail_input("experts: intermediate size = " + std::to_string(intermediate_) + " must be > 0");
  // A share of the experts may hold fewer than k of them.
  if (experts_ <= 0 || top_k_ <= 0 || (!partial_ && top_k_ > experts_))
    fail_input("experts: top_k = " + std::to_string(top_k_) + " must be in [1, experts = " + std::to_string(experts_) + "]");
}

std::string ExpertsOp::summary() const {
  return "grouped_swiglu E=" + std::to_string(experts_) + " I=" + std::to_string(intermediate_);
}

std::vector<ValueType> ExpertsOp::infer(const Node& n, std::span<const Value* const> in) const {
  const Value& rows = *in[0];
  expect_token_rows(n, rows, top_k_);
  const int64_t H = rows.shape()[1].fixed, I = intermediate_, E = experts_;
  expect_type(n, *in[1], Shape{Dim::of(E + 1)}, DType::i32);
  expect_type(n, *in[2], Shape{Dim::of(E), Dim::of(2 * I), Dim::of(H)}, rows.dtype());
  expect_type(n, *in[3], Shape{Dim::of(E), Dim::of(H), Dim::of(I)}, rows.dtype());
  return {ValueType{rows.shape(), rows.dtype(), {}}};
}

std::vector<Distribution> ExpertsOp::distribute(const Node& node, std::span<const Value* const> inputs) const {
  std::vector<Distribution> d = OpSchema::distribute(node, inputs);
  if (partial_) d[0] = Distribution::partial();
  return d;
}

Cost ExpertsOp::cost(const OpOperands& ops, int64_t tokens) const {
  const double T = static_cast<double>(tokens), k = top_k_, I = intermediate_;
  const double H = static_cast<double>(ops.inputs[0]->shape()[1].fixed);
  const double b = static_cast<double>(dtype_size(ops.inputs[0]->dtype()));
  const double touched = partial_ ? std::min<double>(experts_, k * T) : expected_touched_experts(experts_, k, T);
  return {6.0 * k * T * H * I, b * (touched * 3.0 * H * I + 2.0 * k * T * H)};
}

void register_experts_kernels(KernelRegistry& r) {
  r.add({"experts", Backend::cpu, "cpu.grouped_swiglu", 0, cpu_supports_f32,
         [](const KernelCall& c) {
           const auto& op = static_cast<const ExpertsOp&>(*c.node.op);
           const int hidden = static_cast<int>(c.input_value(0).shape()[1].fixed);
           cpu::grouped_swiglu_mlp(c.in<float>(0), c.in<int32_t>(1), op.experts(), hidden, op.intermediate(),
                                   c.in<float>(2), c.in<float>(3), c.out<float>(0), static_cast<float*>(c.workspace));
         },
         [](const Graph&, const Node& n, int64_t tokens) {
           const auto& op = static_cast<const ExpertsOp&>(*n.op);
           return 4 * cpu::swiglu_workspace_floats(tokens * op.top_k(), op.intermediate());
         }});
}

}  // namespace moeflow
