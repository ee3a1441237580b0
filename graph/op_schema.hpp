#pragma once
// The interface through which graph passes, planners and writers know an op, without knowing the
// op catalogue (ops/ implements it; graph/ only depends on this). An OpSchema object is one op
// *instance*: it carries the node's attributes (the rule of a gate, the size of an MLP), in the way
// MLIR ops carry attributes behind their interfaces.
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "graph/value.hpp"

namespace moeflow {

struct Node;

// Work of one node at a given T: floating-point operations and the fewest bytes it must move.
struct Cost {
  double flops = 0.0;
  double bytes = 0.0;
};

// Operands of one node: the input values' and output values' descriptions, in node order.
struct OpOperands {
  std::span<const Value* const> inputs;
  std::span<const Value* const> outputs;
};

class OpSchema {
 public:
  virtual ~OpSchema() = default;

  // The op kind ("gate", "experts"): the key kernels are registered under.
  virtual std::string kind() const = 0;
  // One line for dumps, e.g. "noaux_tc sigmoid k=8 groups 4/8".
  virtual std::string summary() const = 0;
  // Suffixes of the output values' names, in order ("ids", "weights").
  virtual std::vector<std::string> output_names() const = 0;
  // Checks the inputs' types and returns the outputs' types. Throws Error(bad_input) naming the
  // node, the offending value and the shapes.
  virtual std::vector<ValueType> infer(const Node& node, std::span<const Value* const> inputs) const = 0;
  // Work at T tokens (the cost model's input).
  virtual Cost cost(const OpOperands& operands, int64_t tokens) const = 0;
  // True when rows of the token dimension are independent (the chunk pass may split them).
  virtual bool token_parallel() const = 0;
  // Distribution rule: how the inputs' distributions map to the outputs'. The default: outputs are
  // replicated when every input is, and a Partial input is refused (the op would use a sum still owed).
  virtual std::vector<Distribution> distribute(const Node& node, std::span<const Value* const> inputs) const;
  // Minimum and maximum number of inputs (a reduce takes any number of addends).
  virtual int min_inputs() const = 0;
  virtual int max_inputs() const { return min_inputs(); }
  // True for ops that move data between ranks (their cost's bytes are what they send and receive;
  // dumps show them).
  virtual bool communicates() const { return false; }
  // Colour of the node in dumps (graph-style.dot: compute white, shared experts light blue, comm gold).
  virtual std::string fill_color() const { return "white"; }
};

}  // namespace moeflow
