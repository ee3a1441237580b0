#pragma once
// Checks shared by the ops' infer(): each failure names the node, the value, and both shapes.
#include <string>

#include "graph/error.hpp"
#include "graph/node.hpp"

namespace moeflow {

inline void expect_type(const Node& n, const Value& v, const Shape& shape, DType dtype) {
  if (v.shape() != shape || v.dtype() != dtype)
    fail_input("node '" + n.name + "' (" + n.op->kind() + "): input '" + v.name + "' is " + v.type_str() +
               ", expected " + shape.str() + " " + to_string(dtype));
}

inline void expect_rank(const Node& n, const Value& v, int rank) {
  if (v.shape().rank() != rank)
    fail_input("node '" + n.name + "' (" + n.op->kind() + "): input '" + v.name + "' is " + v.type_str() +
               ", expected rank " + std::to_string(rank));
}

inline void expect_float(const Node& n, const Value& v) {
  if (v.dtype() == DType::i32)
    fail_input("node '" + n.name + "' (" + n.op->kind() + "): input '" + v.name + "' is " + v.type_str() +
               ", expected a floating-point type");
}

// Activations are [T, H]: a symbolic token dimension times a fixed hidden size.
inline void expect_token_rows(const Node& n, const Value& v, int64_t factor = 1) {
  expect_rank(n, v, 2);
  expect_float(n, v);
  if (v.shape()[0] != Dim::tokens(factor) || v.shape()[1].symbolic())
    fail_input("node '" + n.name + "' (" + n.op->kind() + "): input '" + v.name + "' is " + v.type_str() +
               ", expected [" + (factor == 1 ? "T" : std::to_string(factor) + "T") + ",H]");
}

}  // namespace moeflow
