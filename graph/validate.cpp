#include "graph/validate.hpp"

#include <algorithm>
#include <queue>

#include "graph/error.hpp"
#include "graph/graph.hpp"

namespace moeflow {

namespace {

// Kahn's algorithm, always taking the lowest insertion index that is ready: the order (and so the
// node ids and every dump) depends only on how the graph was built.
std::vector<NodeId> topological_order(const Graph& g) {
  const auto& nodes = g.nodes();
  std::vector<int> pending(nodes.size(), 0);
  for (const Node& n : nodes) pending[static_cast<std::size_t>(n.id)] = static_cast<int>(g.predecessors(n.id).size());
  std::priority_queue<NodeId, std::vector<NodeId>, std::greater<>> ready;
  for (const Node& n : nodes)
    if (pending[static_cast<std::size_t>(n.id)] == 0) ready.push(n.id);
  std::vector<NodeId> order;
  std::vector<std::vector<NodeId>> successors(nodes.size());
  for (const Node& n : nodes)
    for (NodeId p : g.predecessors(n.id)) successors[static_cast<std::size_t>(p)].push_back(n.id);
  while (!ready.empty()) {
    NodeId n = ready.top();
    ready.pop();
    order.push_back(n);
    for (NodeId s : successors[static_cast<std::size_t>(n)])
      if (--pending[static_cast<std::size_t>(s)] == 0) ready.push(s);
  }
  if (order.size() != nodes.size()) {
    std::string stuck;
    for (const Node& n : nodes)
      if (pending[static_cast<std::size_t>(n.id)] > 0) stuck += (stuck.empty() ? "'" : ", '") + n.name + "'";
    fail_input("graph '" + g.name() + "' has a cycle through nodes " + stuck);
  }
  return order;
}

}  // namespace

void validate_graph(Graph& g) {
  if (!g.construction_errors_.empty()) fail_input("graph '" + g.name() + "': " + g.construction_errors_.front());

  for (const Node& n : g.nodes()) {
    const int count = static_cast<int>(n.inputs.size());
    if (count < n.op->min_inputs() || count > n.op->max_inputs())
      fail_input("node '" + n.name + "' (" + n.op->kind() + ") takes " + std::to_string(n.op->min_inputs()) +
                 (n.op->max_inputs() != n.op->min_inputs() ? ".." + std::to_string(n.op->max_inputs()) : "") +
                 " inputs, got " + std::to_string(count));
    if (n.outputs.size() != n.op->output_names().size())
      fail_input("node '" + n.name + "' (" + n.op->kind() + ") writes " + std::to_string(n.op->output_names().size()) +
                 " outputs, got " + std::to_string(n.outputs.size()));
    for (ValueId v : n.inputs) {
      const Value& in = g.value(v);
      if (!in.is_graph_input() && in.producer == kNoNode)
        fail_input("node '" + n.name + "' reads value '" + in.name +
                   "', which no node produces and which is not a graph input (a dangling input)");
    }
  }
  if (g.outputs_.empty()) fail_input("graph '" + g.name() + "' has no output");
  for (ValueId v : g.outputs_)
    if (!g.value(v).is_graph_input() && g.value(v).producer == kNoNode)
      fail_input("graph '" + g.name() + "': output '" + g.value(v).name + "' is never produced");

  // Renumber nodes topologically and rewrite every reference to them.
  const std::vector<NodeId> order = topological_order(g);
  std::vector<NodeId> new_id(order.size());
  for (std::size_t i = 0; i < order.size(); ++i) new_id[static_cast<std::size_t>(order[i])] = static_cast<NodeId>(i);
  std::vector<Node> sorted;
  sorted.reserve(order.size());
  for (NodeId old : order) {
    sorted.push_back(std::move(g.nodes_[static_cast<std::size_t>(old)]));
    sorted.back().id = new_id[static_cast<std::size_t>(old)];
  }
  for (Node& n : sorted)
    for (NodeId& a : n.after) a = new_id[static_cast<std::size_t>(a)];
  g.nodes_ = std::move(sorted);
  for (Value& v : g.values_) {
    if (v.producer != kNoNode) v.producer = new_id[static_cast<std::size_t>(v.producer)];
    for (NodeId& c : v.consumers) c = new_id[static_cast<std::size_t>(c)];
    std::sort(v.consumers.begin(), v.consumers.end());
  }

  // Types in topological order: each node's inputs are typed before it is visited.
  for (Node& n : g.nodes_) {
    std::vector<const Value*> inputs = g.input_values(n);
    std::vector<Distribution> dists = n.op->distribute(n, inputs);
    std::vector<ValueType> types = n.op->infer(n, inputs);
    if (types.size() != n.outputs.size())
      fail_input("node '" + n.name + "': its op inferred " + std::to_string(types.size()) + " outputs for " +
                 std::to_string(n.outputs.size()) + " values");
    for (std::size_t i = 0; i < n.outputs.size(); ++i) {
      Value& out = g.values_[static_cast<std::size_t>(n.outputs[i])];
      types[i].dist = dists.at(i);
      out.type = types[i];
    }
  }
  for (ValueId v : g.outputs_)
    if (g.value(v).type->dist.kind == Distribution::Kind::partial)
      fail_input("graph '" + g.name() + "': output '" + g.value(v).name +
                 "' is Partial (a sum still owed); it must be reduced exactly once");
  g.validated_ = true;
}

}  // namespace moeflow
