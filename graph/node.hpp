#pragma once
// A node: one op instance applied to input values, producing output values.
#include <memory>
#include <string>
#include <vector>

#include "graph/op_schema.hpp"
#include "graph/value.hpp"

namespace moeflow {

struct Node {
  NodeId id = kNoNode;  // after validation: the node's topological index
  std::string name;     // "experts", "experts·c1"
  std::shared_ptr<const OpSchema> op;
  std::vector<ValueId> inputs;
  std::vector<ValueId> outputs;
  int chunk = -1;         // chunk index, -1 when unchunked
  std::string placement;  // optional hint ("cuda:0", "host")
  // Rows the node works on whatever the run's T (a node of the parallel lowering on gathered rows);
  // -1: the run's T, or its chunk's share.
  int64_t fixed_rows = -1;
  // Order-only predecessors: nodes that must finish first although no value flows from them (the
  // collectives of a multi-rank graph, entered in one order on every rank).
  std::vector<NodeId> after;
};

}  // namespace moeflow
