#include "ops/fold_shared_add.hpp"

#include <algorithm>
#include <map>
#include <optional>
#include <set>

#include "graph/error.hpp"
#include "graph/rewrite.hpp"
#include "ops/combine_op.hpp"
#include "ops/fused_experts_op.hpp"

namespace moeflow {

namespace {

bool folds_into(const Node& n) {
  if (n.op->kind() == "combine") {
    const auto* op = dynamic_cast<const CombineOp*>(n.op.get());
    return op != nullptr && op->addends() == 0;
  }
  if (n.op->kind() == "fused_experts") {
    const auto* op = dynamic_cast<const FusedExpertsOp*>(n.op.get());
    return op != nullptr && op->addends() == 0 && !op->shared();
  }
  return false;
}

// Which reduces a fold takes: those adding the shared experts' outputs, or those adding nothing.
enum class ReduceInputs { with_addends, alone };

// The combine (or fused_experts) node whose output reduce `r` adds, where the reduce may be folded into it.
std::optional<NodeId> foldable_combine(const Graph& g, const Node& r, const std::set<std::string>& keep,
                                       ReduceInputs which) {
  if (r.op->kind() != "reduce" || !plain_node(r) || !whole_value(g.value(r.outputs[0]))) return std::nullopt;
  if (which == ReduceInputs::alone ? r.inputs.size() != 1 : r.inputs.size() < 2) return std::nullopt;
  const Value& routed = g.value(r.inputs[0]);
  if (routed.producer == kNoNode) return std::nullopt;
  const Node& c = g.node(routed.producer);
  if (!folds_into(c) || !plain_node(c) || c.chunk != r.chunk) return std::nullopt;
  const auto addends = static_cast<int>(r.inputs.size()) - 1;
  if (addends > std::min(CombineOp::kMaxAddends, FusedExpertsOp::kMaxAddends)) return std::nullopt;
  if (!internal_value(g, r.inputs[0], keep)) return std::nullopt;
  for (ValueId v : r.inputs)
    if (!whole_value(g.value(v))) return std::nullopt;
  return c.id;
}

// g with each reduce of `combine_of` folded into its node: the node, with the reduce's other inputs
// as addends, goes where the reduce was (after every addend's producer) and takes its output.
Graph fold(const Graph& g, const std::map<NodeId, NodeId>& combine_of) {
  std::set<NodeId> dropped;
  for (const auto& [reduce, c] : combine_of) dropped.insert(c);
  return rewrite_graph(g, dropped, [&](const Node& n) -> std::optional<NodeReplacement> {
    const auto it = combine_of.find(n.id);
    if (it == combine_of.end()) return std::nullopt;
    const Node& c = g.node(it->second);
    const int addends = static_cast<int>(n.inputs.size()) - 1;
    std::shared_ptr<const OpSchema> op;
    if (const auto* combine = dynamic_cast<const CombineOp*>(c.op.get())) {
      op = std::make_shared<CombineOp>(combine->top_k(), addends);
    } else {
      const auto& f = static_cast<const FusedExpertsOp&>(*c.op);
      op = std::make_shared<FusedExpertsOp>(f.experts(), f.top_k(), f.intermediate(), std::nullopt, addends);
    }
    NodeReplacement r{c.name, std::move(op), c.inputs};
    r.inputs.insert(r.inputs.end(), n.inputs.begin() + 1, n.inputs.end());
    return r;
  });
}

}  // namespace

std::shared_ptr<const Graph> fold_shared_add_into_combine(const Graph& g, const std::vector<std::string>& keep_values,
                                                          const FoldFilter& accept_fused) {
  if (!g.validated()) fail_input("fold_shared_add: graph '" + g.name() + "' is not validated");
  const std::set<std::string> keep(keep_values.begin(), keep_values.end());
  std::map<NodeId, NodeId> combine_of;  // reduce -> the combine (or fused node) it folds into
  for (const Node& n : g.nodes()) {
    const auto c = foldable_combine(g, n, keep, ReduceInputs::with_addends);
    if (!c) continue;
    const Node& target = g.node(*c);
    if (target.op->kind() == "fused_experts") {
      // Folded only where a kernel runs the fused node with addends: asked of this one fold alone.
      if (!accept_fused) continue;
      const Graph trial = fold(g, {{n.id, *c}});
      if (!accept_fused(trial, trial.node(*trial.find_node(target.name)))) continue;
    }
    combine_of[n.id] = *c;
  }
  if (combine_of.empty()) return nullptr;
  return std::make_shared<const Graph>(fold(g, combine_of));
}

std::shared_ptr<const Graph> fold_lone_reduces(const Graph& g, const std::vector<std::string>& keep_values) {
  if (!g.validated()) fail_input("fold_lone_reduces: graph '" + g.name() + "' is not validated");
  const std::set<std::string> keep(keep_values.begin(), keep_values.end());
  std::map<NodeId, NodeId> combine_of;
  for (const Node& n : g.nodes())
    if (const auto c = foldable_combine(g, n, keep, ReduceInputs::alone)) combine_of[n.id] = *c;
  if (combine_of.empty()) return nullptr;
  return std::make_shared<const Graph>(fold(g, combine_of));
}

}  // namespace moeflow
