#include "ops/shared_expert_op.hpp"

#include "kernels/cpu/swiglu_mlp.hpp"
#include "ops/kernel_registry.hpp"
#include "ops/op_checks.hpp"

namespace moeflow {

SharedExpertOp::SharedExpertOp(int intermediate, bool gated) : intermediate_(intermediate), gated_(gated) {
  if (intermediate_ <= 0) fail_input("shared_expert: intermediate size = " + std::to_string(intermediate_) + " must be > 0");
}

std::string SharedExpertOp::summary() const {
  return "swiglu_mlp I=" + std::to_string(intermediate_) + (gated_ ? " sigmoid-gated" : "");
}

std::vector<ValueType> SharedExpertOp::infer(const Node& n, std::span<const Value* const> in) const {
  const Value& x = *in[0];
  expect_token_rows(n, x);
  const int64_t H = x.shape()[1].fixed, I = intermediate_;
  expect_type(n, *in[1], Shape{Dim::of(2 * I), Dim::of(H)}, x.dtype());
  expect_type(n, *in[2], Shape{Dim::of(H), Dim::of(I)}, x.dtype());
  if (gated_) expect_type(n, *in[3], Shape{Dim::of(1), Dim::of(H)}, x.dtype());
  return {ValueType{x.shape(), x.dtype(), {}}};
}

Cost SharedExpertOp::cost(const OpOperands& ops, int64_t tokens) const {
  const double T = static_cast<double>(tokens), I = intermediate_;
  const double H = static_cast<double>(ops.inputs[0]->shape()[1].fixed);
  const double b = static_cast<double>(dtype_size(ops.inputs[0]->dtype()));
  return {6.0 * T * H * I + (gated_ ? 2.0 * T * H : 0.0), b * (3.0 * H * I + 2.0 * T * H)};
}

void register_shared_expert_kernels(KernelRegistry& r) {
  r.add({"shared_expert", Backend::cpu, "cpu.swiglu_mlp", 0, cpu_supports_f32,
         [](const KernelCall& c) {
           const auto& op = static_cast<const SharedExpertOp&>(*c.node.op);
           const int hidden = static_cast<int>(c.input_value(0).shape()[1].fixed);
           cpu::swiglu_mlp(c.in<float>(0), c.tokens, hidden, op.intermediate(), c.in<float>(1), c.in<float>(2),
                           op.gated() ? c.in<float>(3) : nullptr, c.out<float>(0), static_cast<float*>(c.workspace));
         },
         [](const Graph&, const Node& n, int64_t tokens) {
           return 4 * cpu::swiglu_workspace_floats(tokens, static_cast<const SharedExpertOp&>(*n.op).intermediate());
         }});
}

}  // namespace moeflow
