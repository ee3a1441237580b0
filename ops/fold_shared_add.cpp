#include "ops/fold_shared_add.hpp"

#include <map>
#include <set>

#include "graph/error.hpp"
#include "graph/rewrite.hpp"
#include "ops/combine_op.hpp"

namespace moeflow {

namespace {

// The combine node whose output reduce `r` adds, where the reduce may be folded into it.
std::optional<NodeId> foldable_combine(const Graph& g, const Node& r, const std::set<std::string>& keep) {
  if (r.op->kind() != "reduce" || r.inputs.size() < 2 || !plain_node(r) || !whole_value(g.value(r.outputs[0]))) return std::nullopt;
  const Value& routed = g.value(r.inputs[0]);
  if (routed.producer == kNoNode) return std::nullopt;
  const Node& c = g.node(routed.producer);
  if (c.op->kind() != "combine" || !plain_node(c) || c.chunk != r.chunk) return std::nullopt;
  const auto* op = dynamic_cast<const CombineOp*>(c.op.get());
  if (op == nullptr || op->addends() > 0) return std::nullopt;
  const auto addends = static_cast<int>(r.inputs.size()) - 1;
  if (addends > CombineOp::kMaxAddends) return std::nullopt;
  if (!internal_value(g, r.inputs[0], keep)) return std::nullopt;
  for (ValueId v : r.inputs)
    if (!whole_value(g.value(v))) return std::nullopt;
  return c.id;
}

}  // namespace

std::shared_ptr<const Graph> fold_shared_add_into_combine(const Graph& g, const std::vector<std::string>& keep_values) {
  if (!g.validated()) fail_input("fold_shared_add: graph '" + g.name() + "' is not validated");
  const std::set<std::string> keep(keep_values.begin(), keep_values.end());
  std::map<NodeId, NodeId> combine_of;  // reduce -> the combine it folds into
  std::set<NodeId> dropped;
  for (const Node& n : g.nodes())
    if (auto c = foldable_combine(g, n, keep)) {
      combine_of[n.id] = *c;
      dropped.insert(*c);
    }
  if (combine_of.empty()) return nullptr;
  // The folded combine goes where its reduce was: after every addend's producer.
  return std::make_shared<const Graph>(rewrite_graph(g, dropped, [&](const Node& n) -> std::optional<NodeReplacement> {
    const auto it = combine_of.find(n.id);
    if (it == combine_of.end()) return std::nullopt;
    const Node& c = g.node(it->second);
    const auto& op = static_cast<const CombineOp&>(*c.op);
    NodeReplacement r{c.name, std::make_shared<CombineOp>(op.top_k(), static_cast<int>(n.inputs.size()) - 1), c.inputs};
    r.inputs.insert(r.inputs.end(), n.inputs.begin() + 1, n.inputs.end());
    return r;
  }));
}

}  // namespace moeflow
