#include "graph/rewrite.hpp"

#include <algorithm>
#include <map>

namespace moeflow {

bool plain_node(const Node& n) { return n.after.empty() && n.fixed_rows < 0; }

bool whole_value(const Value& v) { return v.type && v.type->dist.kind == Distribution::Kind::replicated; }

bool internal_value(const Graph& g, ValueId v, const std::set<std::string>& keep) {
  const Value& val = g.value(v);
  const auto& outputs = g.outputs();
  return val.consumers.size() == 1 && !keep.count(val.name) &&
         std::find(outputs.begin(), outputs.end(), v) == outputs.end();
}

Graph rewrite_graph(const Graph& g, const std::set<NodeId>& dropped,
                    const std::function<std::optional<NodeReplacement>(const Node&)>& replace) {
  Graph out(g.name(), g.max_tokens());
  out.set_description(g.description());
  if (g.chunks() > 0) out.set_chunking(g.chunks(), g.chunk_rows());
  std::map<ValueId, ValueId> value_of;
  for (ValueId id : g.graph_inputs()) value_of[id] = out.copy_input(g.value(id));
  std::map<NodeId, NodeId> node_of;
  for (const Node& n : g.nodes()) {  // ids are topological indices
    if (dropped.count(n.id)) continue;
    std::optional<NodeReplacement> r = replace(n);
    std::vector<ValueId> inputs, outputs;
    for (ValueId v : r ? r->inputs : n.inputs) inputs.push_back(value_of.at(v));
    for (ValueId v : n.outputs) {
      outputs.push_back(out.add_value(g.value(v).name));
      value_of[v] = outputs.back();
    }
    const NodeId copy = r ? out.add_node(r->name, r->op, inputs, outputs) : out.add_node(n.name, n.op, inputs, outputs);
    node_of[n.id] = copy;
    if (n.chunk >= 0) out.set_chunk(copy, n.chunk);
    if (n.fixed_rows >= 0) out.set_fixed_rows(copy, n.fixed_rows);
    for (NodeId before : n.after) out.add_order(node_of.at(before), copy);
  }
  for (ValueId v : g.outputs()) out.mark_output(value_of.at(v));
  out.validate();
  return out;
}

}  // namespace moeflow
