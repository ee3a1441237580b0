#include "ops/dispatch_op.hpp"

#include "kernels/cpu/permute.hpp"
#include "ops/kernel_registry.hpp"
#include "ops/op_checks.hpp"

namespace moeflow {

DispatchOp::DispatchOp(int experts, int top_k) : experts_(experts), top_k_(top_k) {
  if (experts_ <= 0 || top_k_ <= 0 || top_k_ > experts_)
    fail_input("dispatch: top_k = " + std::to_string(top_k_) + " must be in [1, experts = " + std::to_string(experts_) + "]");
}

DispatchOp::DispatchOp(int experts, int top_k, Share share) : experts_(experts), top_k_(top_k), share_(share) {
  if (experts_ <= 0 || top_k_ <= 0 || share_.first_expert < 0 || share_.first_expert + experts_ > share_.total_experts ||
      top_k_ > share_.total_experts)
    fail_input("dispatch: experts [" + std::to_string(share_.first_expert) + ", " +
               std::to_string(share_.first_expert + experts_) + ") with top_k = " + std::to_string(top_k_) +
               " are not a share of " + std::to_string(share_.total_experts) + " experts");
}

std::string DispatchOp::summary() const {
  if (shared_out())
    return "permute by expert, experts " + std::to_string(share_.first_expert) + ".." +
           std::to_string(share_.first_expert + experts_ - 1) + " of " + std::to_string(share_.total_experts) +
           " k=" + std::to_string(top_k_);
  return "permute by expert E=" + std::to_string(experts_) + " k=" + std::to_string(top_k_);
}

std::vector<ValueType> DispatchOp::infer(const Node& n, std::span<const Value* const> in) const {
  const Value& x = *in[0];
  expect_token_rows(n, x);
  expect_type(n, *in[1], Shape{Dim::tokens(), Dim::of(top_k_)}, DType::i32);
  const int64_t H = x.shape()[1].fixed;
  return {ValueType{Shape{Dim::tokens(top_k_), Dim::of(H)}, x.dtype(), {}},
          ValueType{Shape{Dim::of(experts_ + 1)}, DType::i32, {}},
          ValueType{Shape{Dim::tokens(), Dim::of(top_k_)}, DType::i32, {}}};
}

Cost DispatchOp::cost(const OpOperands& ops, int64_t tokens) const {
  const double T = static_cast<double>(tokens), k = top_k_;
  const double H = static_cast<double>(ops.inputs[0]->shape()[1].fixed);
  const double b = static_cast<double>(dtype_size(ops.inputs[0]->dtype()));
  return {0.0, b * (T * H + k * T * H) + 4.0 * (2.0 * k * T + experts_ + 1)};
}

void register_dispatch_kernels(KernelRegistry& r) {
  r.add({"dispatch", Backend::cpu, "cpu.permute_rows", 0, cpu_supports_f32, [](const KernelCall& c) {
           const auto& op = static_cast<const DispatchOp&>(*c.node.op);
           const int hidden = static_cast<int>(c.input_value(0).shape()[1].fixed);
           cpu::build_permutation(c.in<int32_t>(1), c.tokens, op.top_k(), op.experts(), c.out<int32_t>(1),
                                  c.out<int32_t>(2), op.share().first_expert, op.shared_out());
           cpu::gather_rows(c.in<float>(0), c.out<int32_t>(2), c.tokens, op.top_k(), hidden, c.out<float>(0));
         },
         {}});
}

}  // namespace moeflow
