#pragma once
// The fuse pass: each dispatch → experts → combine chain of one process becomes a single
// fused_experts node (ops/fused_experts_op.hpp) where the caller accepts it, typically because a
// kernel of the backend can run the fused node (make_plan asks its registry). The chain's
// intermediates (permuted rows, offsets, slots, y) disappear from the graph, and with them the
// launches and bytes that carried them; the combine's output keeps its name, so inputs bind and
// results read as before.
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "graph/graph.hpp"

namespace moeflow {

// A chain is fused only where: the dispatch serves every expert (not a rank's share), the experts'
// output is not Partial (no sum over ranks owed), each intermediate has exactly one reader of the
// chain and is neither a graph output nor named in `keep_values`, and the three nodes share a
// chunk and carry no fixed rows or order-only edges. `accept` sees the rewritten graph's fused node
// (validated, with its chunk tag) and says whether to keep it.
// With `fold_shared`, a chain whose output only meets one shared expert of the same x in a reduce is
// offered with both folded in (the fused node then replaces the reduce and keeps its output's name,
// ops/fused_experts_op.hpp); where `accept` declines that, the chain alone is offered again.
// Returns the rewritten, validated graph, or null where no chain was fused.
using FusionFilter = std::function<bool(const Graph& fused_graph, const Node& fused_node)>;
// The experts node a fused node was made from (fused nodes are named "fused_" + its name).
std::string fused_experts_source(const std::string& fused_node_name);
std::shared_ptr<const Graph> fuse_experts_chains(const Graph& g, const FusionFilter& accept,
                                                 const std::vector<std::string>& keep_values = {},
                                                 bool fold_shared = true);

}  // namespace moeflow
