#include "ops/fuse_experts.hpp"

#include <algorithm>
#include <map>
#include <optional>
#include <set>
#include <string_view>

#include "graph/error.hpp"
#include "ops/combine_op.hpp"
#include "ops/dispatch_op.hpp"
#include "ops/experts_op.hpp"
#include "ops/fused_experts_op.hpp"

namespace moeflow {

namespace {

struct Chain {
  NodeId dispatch = kNoNode, experts = kNoNode, combine = kNoNode;
};

bool plain(const Node& n) { return n.after.empty() && n.fixed_rows < 0; }

// The chain that ends at combine node `c`, if it is one the pass may fuse.
std::optional<Chain> chain_ending_at(const Graph& g, const Node& c, const std::set<std::string>& keep) {
  if (c.op->kind() != "combine" || c.inputs.size() != 3) return std::nullopt;
  const Value& y = g.value(c.inputs[0]);
  if (y.producer == kNoNode) return std::nullopt;
  const Node& x = g.node(y.producer);
  if (x.op->kind() != "experts" || static_cast<const ExpertsOp&>(*x.op).partial()) return std::nullopt;
  const Value& rows = g.value(x.inputs[0]);
  if (rows.producer == kNoNode) return std::nullopt;
  const Node& d = g.node(rows.producer);
  if (d.op->kind() != "dispatch" || static_cast<const DispatchOp&>(*d.op).shared_out()) return std::nullopt;
  // dispatch outputs: rows, offsets, slot_of; the experts read the first two, the combine the third.
  if (x.inputs[1] != d.outputs[1] || c.inputs[1] != d.outputs[2]) return std::nullopt;
  if (!plain(d) || !plain(x) || !plain(c) || d.chunk != x.chunk || x.chunk != c.chunk) return std::nullopt;
  const auto& outputs = g.outputs();
  for (ValueId v : {d.outputs[0], d.outputs[1], d.outputs[2], x.outputs[0]}) {
    const Value& val = g.value(v);
    if (val.consumers.size() != 1 || keep.count(val.name) ||
        std::find(outputs.begin(), outputs.end(), v) != outputs.end())
      return std::nullopt;
  }
  return Chain{d.id, x.id, c.id};
}

constexpr std::string_view kFusedPrefix = "fused_";
std::string fused_name(const Node& experts) { return std::string(kFusedPrefix) + experts.name; }

// g rebuilt with the given chains fused (each fused node where its combine was).
Graph rebuild(const Graph& g, const std::vector<Chain>& chains) {
  std::map<NodeId, const Chain*> by_combine;
  std::set<NodeId> dropped;
  for (const Chain& ch : chains) {
    by_combine[ch.combine] = &ch;
    dropped.insert(ch.dispatch);
    dropped.insert(ch.experts);
  }
  Graph out(g.name(), g.max_tokens());
  out.set_description(g.description());
  if (g.chunks() > 0) out.set_chunking(g.chunks(), g.chunk_rows());
  std::map<ValueId, ValueId> value_of;
  for (ValueId id : g.graph_inputs()) value_of[id] = out.copy_input(g.value(id));
  std::map<NodeId, NodeId> node_of;
  for (const Node& n : g.nodes()) {  // ids are topological indices
    if (dropped.count(n.id)) continue;
    std::vector<ValueId> inputs, outputs;
    std::string name = n.name;
    std::shared_ptr<const OpSchema> op = n.op;
    if (auto it = by_combine.find(n.id); it != by_combine.end()) {
      const Node& d = g.node(it->second->dispatch);
      const Node& x = g.node(it->second->experts);
      const auto& eo = static_cast<const ExpertsOp&>(*x.op);
      name = fused_name(x);
      op = std::make_shared<FusedExpertsOp>(eo.experts(), eo.top_k(), eo.intermediate());
      inputs = {value_of.at(d.inputs[0]), value_of.at(d.inputs[1]), value_of.at(n.inputs[2]),
                value_of.at(x.inputs[2]), value_of.at(x.inputs[3])};
    } else {
      for (ValueId v : n.inputs) inputs.push_back(value_of.at(v));
    }
    for (ValueId v : n.outputs) {
      outputs.push_back(out.add_value(g.value(v).name));
      value_of[v] = outputs.back();
    }
    const NodeId copy = out.add_node(name, op, inputs, outputs);
    node_of[n.id] = copy;
    if (n.chunk >= 0) out.set_chunk(copy, n.chunk);
    if (n.fixed_rows >= 0) out.set_fixed_rows(copy, n.fixed_rows);
    for (NodeId before : n.after) out.add_order(node_of.at(before), copy);
  }
  for (ValueId v : g.outputs()) out.mark_output(value_of.at(v));
  out.validate();
  return out;
}

}  // namespace

std::string fused_experts_source(const std::string& fused_node_name) {
  return fused_node_name.rfind(kFusedPrefix, 0) == 0 ? fused_node_name.substr(kFusedPrefix.size()) : fused_node_name;
}

std::shared_ptr<const Graph> fuse_experts_chains(const Graph& g, const FusionFilter& accept,
                                                 const std::vector<std::string>& keep_values) {
  if (!g.validated()) fail_input("fuse: graph '" + g.name() + "' is not validated");
  const std::set<std::string> keep(keep_values.begin(), keep_values.end());
  std::vector<Chain> chains;
  for (const Node& n : g.nodes())
    if (auto ch = chain_ending_at(g, n, keep)) chains.push_back(*ch);
  if (chains.empty()) return nullptr;
  // Offer every chain fused at once, then keep those the filter accepts (their nodes do not depend
  // on one another, so the answer for one does not change with the others).
  const Graph all = rebuild(g, chains);
  std::vector<Chain> accepted;
  for (const Chain& ch : chains) {
    const auto fused = all.find_node(fused_name(g.node(ch.experts)));
    if (fused && accept(all, all.node(*fused))) accepted.push_back(ch);
  }
  if (accepted.empty()) return nullptr;
  if (accepted.size() == chains.size()) return std::make_shared<const Graph>(all);
  return std::make_shared<const Graph>(rebuild(g, accepted));
}

}  // namespace moeflow
