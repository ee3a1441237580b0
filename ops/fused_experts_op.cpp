#include "ops/fused_experts_op.hpp"

#include "ops/experts_op.hpp"
#include "ops/op_checks.hpp"

namespace moeflow {

FusedExpertsOp::FusedExpertsOp(int experts, int top_k, int intermediate, std::optional<FoldedShared> shared, int addends)
    : experts_(experts), top_k_(top_k), intermediate_(intermediate), shared_(shared), addends_(addends) {
  if (intermediate_ <= 0)
    fail_input("fused_experts: intermediate size = " + std::to_string(intermediate_) + " must be > 0");
  if (experts_ <= 0 || top_k_ <= 0 || top_k_ > experts_)
    fail_input("fused_experts: top_k = " + std::to_string(top_k_) + " must be in [1, experts = " +
               std::to_string(experts_) + "]");
  if (shared_ && shared_->intermediate <= 0)
    fail_input("fused_experts: shared expert intermediate size = " + std::to_string(shared_->intermediate) + " must be > 0");
  if (addends_ < 0 || addends_ > kMaxAddends)
    fail_input("fused_experts: " + std::to_string(addends_) + " addends (0 to " + std::to_string(kMaxAddends) + ")");
  if (shared_ && addends_ > 0)
    fail_input("fused_experts: a folded shared expert and addends at once (the shared add is one or the other)");
}

std::string FusedExpertsOp::summary() const {
  return "dispatch+swiglu+combine E=" + std::to_string(experts_) + " k=" + std::to_string(top_k_) +
         " I=" + std::to_string(intermediate_) +
         (shared_ ? " +shared I=" + std::to_string(shared_->intermediate) + (shared_->gated ? " sigmoid-gated" : "") : "") +
         (addends_ > 0 ? " + " + std::to_string(addends_) + " addend(s)" : "");
}

std::vector<ValueType> FusedExpertsOp::infer(const Node& n, std::span<const Value* const> in) const {
  const Value& x = *in[0];
  expect_token_rows(n, x);
  const int64_t H = x.shape()[1].fixed, I = intermediate_, E = experts_;
  expect_type(n, *in[1], Shape{Dim::tokens(), Dim::of(top_k_)}, DType::i32);
  expect_type(n, *in[2], Shape{Dim::tokens(), Dim::of(top_k_)}, DType::f32);
  expect_type(n, *in[3], Shape{Dim::of(E), Dim::of(2 * I), Dim::of(H)}, x.dtype());
  expect_type(n, *in[4], Shape{Dim::of(E), Dim::of(H), Dim::of(I)}, x.dtype());
  if (shared_) {
    const int64_t S = shared_->intermediate;
    expect_type(n, *in[5], Shape{Dim::of(2 * S), Dim::of(H)}, x.dtype());
    expect_type(n, *in[6], Shape{Dim::of(H), Dim::of(S)}, x.dtype());
    if (shared_->gated) expect_type(n, *in[7], Shape{Dim::of(1), Dim::of(H)}, x.dtype());
  }
  for (int a = 0; a < addends_; ++a) expect_type(n, *in[5 + static_cast<std::size_t>(a)], x.shape(), x.dtype());
  return {ValueType{x.shape(), x.dtype(), {}}};
}

Cost FusedExpertsOp::cost(const OpOperands& ops, int64_t tokens) const {
  const double T = static_cast<double>(tokens), k = top_k_, I = intermediate_;
  const double H = static_cast<double>(ops.inputs[0]->shape()[1].fixed);
  const double b = static_cast<double>(dtype_size(ops.inputs[0]->dtype()));
  const double touched = expected_touched_experts(experts_, k, T);
  Cost c{6.0 * k * T * H * I + 2.0 * k * T * H, b * (touched * 3.0 * H * I + 2.0 * T * H) + 8.0 * k * T};
  if (shared_) {
    const double S = shared_->intermediate;
    c.flops += 6.0 * T * H * S + T * H + (shared_->gated ? 2.0 * T * H : 0.0);
    c.bytes += b * (3.0 * H * S + (shared_->gated ? H : 0.0));
  }
  c.flops += addends_ * T * H;
  c.bytes += b * addends_ * T * H;
  return c;
}

std::optional<RoutedExperts> routed_experts(const Node& n) {
  if (n.op->kind() == "experts") {
    const auto& op = static_cast<const ExpertsOp&>(*n.op);
    return RoutedExperts{op.experts(), op.top_k(), op.intermediate(), 2};
  }
  if (n.op->kind() == "fused_experts") {
    const auto& op = static_cast<const FusedExpertsOp&>(*n.op);
    return RoutedExperts{op.experts(), op.top_k(), op.intermediate(), 3};
  }
  return std::nullopt;
}

}  // namespace moeflow
