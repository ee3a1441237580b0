#include "ops/to_host_op.hpp"

#include "graph/error.hpp"
#include "graph/node.hpp"

namespace moeflow {

std::vector<ValueType> ToHostOp::infer(const Node& n, std::span<const Value* const> in) const {
  if (in[0]->shape().symbolic())
    fail_input("node '" + n.name + "' (to_host): '" + in[0]->name + "' is " + in[0]->type_str() +
               "; only values of a fixed size are copied to the host");
  ValueType t{in[0]->shape(), in[0]->dtype(), {}};
  t.host_memory = true;
  return {t};
}

Cost ToHostOp::cost(const OpOperands& ops, int64_t tokens) const {
  return {0.0, static_cast<double>(ops.inputs[0]->bytes(tokens))};
}

}  // namespace moeflow
