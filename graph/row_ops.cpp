#include "graph/row_ops.hpp"

#include "graph/error.hpp"
#include "graph/node.hpp"

namespace moeflow {

namespace {

void require_token_rows(const Node& n, const Value& v) {
  if (v.shape().rank() == 0 || !v.shape()[0].symbolic())
    fail_input("node '" + n.name + "' (" + "rows of the token dimension): '" + v.name + "' is " + v.type_str() +
               "; its first dimension must be the token dimension");
}

}  // namespace

std::string SliceRowsOp::summary() const {
  return "rows [" + std::to_string(chunk_ * rows_) + ", " + std::to_string((chunk_ + 1) * rows_) + ") of the tokens";
}

std::vector<ValueType> SliceRowsOp::infer(const Node& n, std::span<const Value* const> in) const {
  require_token_rows(n, *in[0]);
  return {ValueType{in[0]->shape(), in[0]->dtype(), in[0]->type->dist}};
}

Cost SliceRowsOp::cost(const OpOperands& ops, int64_t tokens) const {
  return {0.0, 2.0 * static_cast<double>(ops.inputs[0]->bytes(tokens))};
}

std::string ConcatRowsOp::summary() const {
  return std::to_string(chunks_) + " chunks of " + std::to_string(rows_) + " token rows, in order";
}

std::vector<ValueType> ConcatRowsOp::infer(const Node& n, std::span<const Value* const> in) const {
  for (const Value* v : in) {
    require_token_rows(n, *v);
    if (v->shape() != in[0]->shape() || v->dtype() != in[0]->dtype())
      fail_input("node '" + n.name + "' (concat_rows): '" + v->name + "' is " + v->type_str() + " but '" +
                 in[0]->name + "' is " + in[0]->type_str());
  }
  return {ValueType{in[0]->shape(), in[0]->dtype(), in[0]->type->dist}};
}

Cost ConcatRowsOp::cost(const OpOperands& ops, int64_t tokens) const {
  return {0.0, 2.0 * static_cast<double>(ops.outputs[0]->bytes(tokens))};
}

}  // namespace moeflow
