#pragma once
// A graph copied node by node with some nodes dropped and some replaced: what a rewriting pass
// (ops/fuse_experts.hpp, ops/fold_shared_add.hpp) builds its result with.
#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "graph/graph.hpp"

namespace moeflow {

// What a rewriting pass asks of the nodes and values it would merge:
// a node with no order-only edges and no fixed rows (a rewrite would have to carry those);
bool plain_node(const Node& n);
// a value that is whole on this process (no sum over ranks still owed on it);
bool whole_value(const Value& v);
// an intermediate a merged node may swallow: read by exactly one node, not a graph output, not named
// in `keep` (read after a run).
bool internal_value(const Graph& g, ValueId v, const std::set<std::string>& keep);

// What a node becomes: its name, op and inputs (values of the graph being copied). Its outputs keep
// the original node's values' names.
struct NodeReplacement {
  std::string name;
  std::shared_ptr<const OpSchema> op;
  std::vector<ValueId> inputs;
};

// g copied in its node order (topological), without the nodes in `dropped`, each node for which
// `replace` returns a replacement copied as that; chunk tags, fixed rows, order-only edges, graph
// inputs and outputs carried over. A replacement may read values of dropped nodes only where
// another replacement before it produces them under the same value. Validated.
Graph rewrite_graph(const Graph& g, const std::set<NodeId>& dropped,
                    const std::function<std::optional<NodeReplacement>(const Node&)>& replace);

}  // namespace moeflow
