#include "ops/combine_op.hpp"

#include "kernels/cpu/permute.hpp"
#include "ops/kernel_registry.hpp"
#include "ops/op_checks.hpp"

namespace moeflow {

CombineOp::CombineOp(int top_k, int addends) : top_k_(top_k), addends_(addends) {
  if (top_k_ <= 0) fail_input("combine: top_k = " + std::to_string(top_k_) + " must be > 0");
  if (addends_ < 0 || addends_ > kMaxAddends)
    fail_input("combine: " + std::to_string(addends_) + " addends (0 to " + std::to_string(kMaxAddends) + ")");
}

std::vector<ValueType> CombineOp::infer(const Node& n, std::span<const Value* const> in) const {
  const Value& y = *in[0];
  expect_token_rows(n, y, top_k_);
  expect_type(n, *in[1], Shape{Dim::tokens(), Dim::of(top_k_)}, DType::i32);
  expect_type(n, *in[2], Shape{Dim::tokens(), Dim::of(top_k_)}, DType::f32);
  for (int a = 0; a < addends_; ++a) expect_type(n, *in[3 + static_cast<std::size_t>(a)], Shape{Dim::tokens(), y.shape()[1]}, y.dtype());
  return {ValueType{Shape{Dim::tokens(), y.shape()[1]}, y.dtype(), {}}};
}

std::vector<Distribution> CombineOp::distribute(const Node& node, std::span<const Value* const> inputs) const {
  const bool partial = inputs[0]->type && inputs[0]->type->dist.kind == Distribution::Kind::partial;
  std::vector<const Value*> rest(inputs.begin() + 1, inputs.end());
  std::vector<Distribution> d = OpSchema::distribute(node, rest);
  if (partial) d[0] = Distribution::partial();
  return d;
}

Cost CombineOp::cost(const OpOperands& ops, int64_t tokens) const {
  const double T = static_cast<double>(tokens), k = top_k_;
  const double H = static_cast<double>(ops.inputs[0]->shape()[1].fixed);
  const double b = static_cast<double>(dtype_size(ops.inputs[0]->dtype()));
  const double addends = addends_;
  return {2.0 * k * T * H + addends * T * H, b * (k * T * H + T * H + addends * T * H) + 8.0 * k * T};
}

void register_combine_kernels(KernelRegistry& r) {
  KernelEntry weighted_sum{"combine", Backend::cpu, "cpu.weighted_sum", 0, cpu_supports_f32, [](const KernelCall& c) {
           const auto& op = static_cast<const CombineOp&>(*c.node.op);
           const int hidden = static_cast<int>(c.input_value(0).shape()[1].fixed);
           std::vector<const float*> addends;
           for (int a = 0; a < op.addends(); ++a) addends.push_back(c.in<float>(3 + static_cast<std::size_t>(a)));
           cpu::combine_rows(c.in<float>(0), c.in<int32_t>(1), c.in<float>(2), c.tokens, op.top_k(), hidden,
                             c.out<float>(0), addends);
         },
         {}};
  weighted_sum.in_place = {{0, 3}};  // over the first addend, where there is one (a shared expert's output)
  r.add(std::move(weighted_sum));
}

}  // namespace moeflow
