#include "ops/gate_op.hpp"

#include <sstream>

#include "kernels/cpu/routing.hpp"
#include "ops/kernel_registry.hpp"
#include "ops/op_checks.hpp"

namespace moeflow {

void check_routing_rule(const RoutingRule& r, const std::string& where) {
  auto bad = [&](const std::string& what) { fail_input(where + ": " + what); };
  if (r.experts <= 0) bad("experts = " + std::to_string(r.experts) + " must be > 0");
  if (r.top_k <= 0 || r.top_k > r.experts)
    bad("top_k = " + std::to_string(r.top_k) + " must be in [1, experts = " + std::to_string(r.experts) + "]");
  if (r.method != TopKMethod::greedy) {
    if (r.n_group <= 0 || r.experts % r.n_group != 0)
      bad("n_group = " + std::to_string(r.n_group) + " must divide experts = " + std::to_string(r.experts));
    if (r.topk_group <= 0 || r.topk_group > r.n_group)
      bad("topk_group = " + std::to_string(r.topk_group) + " must be in [1, n_group = " + std::to_string(r.n_group) + "]");
    if (r.top_k > r.topk_group * (r.experts / r.n_group))
      bad("top_k = " + std::to_string(r.top_k) + " exceeds the experts of the " + std::to_string(r.topk_group) +
          " kept groups");
  }
}

GateOp::GateOp(RoutingRule rule) : rule_(rule) { check_routing_rule(rule_, "gate"); }

std::string GateOp::summary() const {
  std::ostringstream s;
  s << "topk_" << to_string(rule_.scoring) << " k=" << rule_.top_k << " E=" << rule_.experts;
  if (rule_.method != TopKMethod::greedy)
    s << " " << to_string(rule_.method) << " groups " << rule_.topk_group << "/" << rule_.n_group;
  if (rule_.renormalize) s << " renorm";
  if (rule_.scale != 1.0f) s << " x" << rule_.scale;
  return s.str();
}

std::vector<ValueType> GateOp::infer(const Node& n, std::span<const Value* const> in) const {
  const Value& x = *in[0];
  expect_token_rows(n, x);
  const int64_t hidden = x.shape()[1].fixed;
  expect_type(n, *in[1], Shape{Dim::of(rule_.experts), Dim::of(hidden)}, x.dtype());
  if (rule_.use_bias) expect_type(n, *in[2], Shape{Dim::of(rule_.experts)}, DType::f32);
  const Dim t = Dim::tokens();
  return {ValueType{Shape{t, Dim::of(rule_.top_k)}, DType::i32, {}},
          ValueType{Shape{t, Dim::of(rule_.top_k)}, DType::f32, {}},
          ValueType{Shape{t, Dim::of(rule_.experts)}, DType::f32, {}}};
}

Cost GateOp::cost(const OpOperands& ops, int64_t tokens) const {
  const double T = static_cast<double>(tokens), E = rule_.experts, k = rule_.top_k;
  const double H = static_cast<double>(ops.inputs[0]->shape()[1].fixed);
  const double act = static_cast<double>(dtype_size(ops.inputs[0]->dtype()));
  return {2.0 * T * H * E + 8.0 * T * E, act * (T * H + E * H) + 4.0 * (T * E + 2.0 * T * k)};
}

void register_gate_kernels(KernelRegistry& r) {
  r.add({"gate", Backend::cpu, "cpu.router_topk", 0, cpu_supports_f32, [](const KernelCall& c) {
           const auto& op = static_cast<const GateOp&>(*c.node.op);
           const int hidden = static_cast<int>(c.input_value(0).shape()[1].fixed);
           float* logits = c.out<float>(2);
           cpu::router_logits(c.in<float>(0), c.in<float>(1), c.tokens, hidden, op.rule().experts, logits);
           cpu::route_tokens(op.rule(), logits, op.rule().use_bias ? c.in<float>(2) : nullptr, c.tokens,
                             c.out<int32_t>(0), c.out<float>(1));
         },
         {}});
}

}  // namespace moeflow
