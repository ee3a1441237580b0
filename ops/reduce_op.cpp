#include "ops/reduce_op.hpp"

#include "kernels/cpu/elementwise.hpp"
#include "ops/kernel_registry.hpp"
#include "ops/op_checks.hpp"

namespace moeflow {

std::vector<ValueType> ReduceOp::infer(const Node& n, std::span<const Value* const> in) const {
  expect_token_rows(n, *in[0]);
  for (std::size_t i = 1; i < in.size(); ++i) expect_type(n, *in[i], in[0]->shape(), in[0]->dtype());
  return {ValueType{in[0]->shape(), in[0]->dtype(), {}}};
}

// Partial + Partial stays Partial (one sum owed for both). Partial + a whole value would add the
// whole value once per rank when the sum is paid: refused, naming both.
std::vector<Distribution> ReduceOp::distribute(const Node& n, std::span<const Value* const> in) const {
  const Value* partial = nullptr;
  const Value* whole = nullptr;
  for (const Value* v : in) {
    if (!v->type) continue;
    (v->type->dist.kind == Distribution::Kind::partial ? partial : whole) = v;
  }
  if (partial && whole)
    fail_input("node '" + n.name + "' (reduce) adds '" + whole->name + "' (" + whole->type->dist.str() + ") to '" +
               partial->name + "' (partial): the sum over ranks would count '" + whole->name + "' once per rank");
  return {partial ? Distribution::partial() : Distribution::replicated()};
}

Cost ReduceOp::cost(const OpOperands& ops, int64_t tokens) const {
  const double T = static_cast<double>(tokens), n = static_cast<double>(ops.inputs.size());
  const double H = static_cast<double>(ops.inputs[0]->shape()[1].fixed);
  const double b = static_cast<double>(dtype_size(ops.inputs[0]->dtype()));
  return {(n - 1.0) * T * H, b * (n + 1.0) * T * H};
}

void register_reduce_kernels(KernelRegistry& r) {
  KernelEntry sum{"reduce", Backend::cpu, "cpu.sum", 0, cpu_supports_f32, [](const KernelCall& c) {
                     const int64_t n = c.input_value(0).shape().elements(c.tokens);
                     std::vector<const float*> addends;
                     for (std::size_t i = 0; i < c.inputs.size(); ++i) addends.push_back(c.in<float>(i));
                     cpu::sum_arrays(addends.data(), static_cast<int>(addends.size()), n, c.out<float>(0));
                   },
                   {}};
  sum.in_place = {{0, 0}};  // sum_arrays accumulates into the first addend's bytes when out is it
  r.add(std::move(sum));
}

}  // namespace moeflow
