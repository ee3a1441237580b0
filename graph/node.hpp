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
};

}  // namespace moeflow
