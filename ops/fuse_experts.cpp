#include "ops/fuse_experts.hpp"

#include <algorithm>
#include <map>
#include <optional>
#include <set>
#include <string_view>

#include "graph/error.hpp"
#include "graph/rewrite.hpp"
#include "ops/combine_op.hpp"
#include "ops/dispatch_op.hpp"
#include "ops/experts_op.hpp"
#include "ops/fused_experts_op.hpp"
#include "ops/shared_expert_op.hpp"

namespace moeflow {

namespace {

struct Chain {
  NodeId dispatch = kNoNode, experts = kNoNode, combine = kNoNode;
  // Where the shared expert is folded in: the shared_expert node and the reduce that adds it (the
  // fused node then takes the reduce's place and output).
  NodeId shared = kNoNode, reduce = kNoNode;
  bool folds_shared() const { return reduce != kNoNode; }
  NodeId anchor() const { return folds_shared() ? reduce : combine; }
};

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
  if (!plain_node(d) || !plain_node(x) || !plain_node(c) || d.chunk != x.chunk || x.chunk != c.chunk) return std::nullopt;
  for (ValueId v : {d.outputs[0], d.outputs[1], d.outputs[2], x.outputs[0]})
    if (!internal_value(g, v, keep)) return std::nullopt;
  return Chain{d.id, x.id, c.id};
}


// The chain with the layer's shared expert folded in, where the combine's output feeds only a reduce
// that adds exactly one shared expert of the same x, every value involved is whole (no sum over ranks
// owed: the reduce is where a Partial one would be paid) and read by nobody else.
std::optional<Chain> with_shared_expert(const Graph& g, Chain ch, const std::set<std::string>& keep) {
  const Node& c = g.node(ch.combine);
  const ValueId routed = c.outputs[0];
  if (!internal_value(g, routed, keep)) return std::nullopt;
  const Node& r = g.node(g.value(routed).consumers[0]);
  if (r.op->kind() != "reduce" || r.inputs.size() != 2 || !plain_node(r) || r.chunk != c.chunk) return std::nullopt;
  const ValueId other = r.inputs[0] == routed ? r.inputs[1] : r.inputs[0];
  const Value& y = g.value(other);
  if (other == routed || y.producer == kNoNode || !internal_value(g, other, keep)) return std::nullopt;
  const Node& s = g.node(y.producer);
  if (s.op->kind() != "shared_expert" || !plain_node(s) || s.chunk != c.chunk) return std::nullopt;
  if (s.inputs[0] != g.node(ch.dispatch).inputs[0]) return std::nullopt;  // the routed experts' x
  if (!whole_value(g.value(routed)) || !whole_value(y) || !whole_value(g.value(r.outputs[0]))) return std::nullopt;
  ch.shared = s.id;
  ch.reduce = r.id;
  return ch;
}

constexpr std::string_view kFusedPrefix = "fused_";
std::string fused_name(const Node& experts) { return std::string(kFusedPrefix) + experts.name; }

// g rebuilt with the given chains fused (each fused node where its combine was, or its reduce).
Graph rebuild(const Graph& g, const std::vector<Chain>& chains) {
  std::map<NodeId, const Chain*> by_anchor;
  std::set<NodeId> dropped;
  for (const Chain& ch : chains) {
    by_anchor[ch.anchor()] = &ch;
    dropped.insert(ch.dispatch);
    dropped.insert(ch.experts);
    if (ch.folds_shared()) {
      dropped.insert(ch.combine);
      dropped.insert(ch.shared);
    }
  }
  return rewrite_graph(g, dropped, [&](const Node& n) -> std::optional<NodeReplacement> {
    const auto it = by_anchor.find(n.id);
    if (it == by_anchor.end()) return std::nullopt;
    const Chain& ch = *it->second;
    const Node& d = g.node(ch.dispatch);
    const Node& x = g.node(ch.experts);
    const Node& c = g.node(ch.combine);
    const auto& eo = static_cast<const ExpertsOp&>(*x.op);
    std::optional<FoldedShared> shared;
    if (ch.folds_shared()) {
      const auto& so = static_cast<const SharedExpertOp&>(*g.node(ch.shared).op);
      shared = FoldedShared{so.intermediate(), so.gated()};
    }
    NodeReplacement r{fused_name(x), std::make_shared<FusedExpertsOp>(eo.experts(), eo.top_k(), eo.intermediate(), shared),
                      {d.inputs[0], d.inputs[1], c.inputs[2], x.inputs[2], x.inputs[3]}};
    if (ch.folds_shared())  // w13, w2 (and the gate's weight) of the shared expert
      for (std::size_t i = 1; i < g.node(ch.shared).inputs.size(); ++i) r.inputs.push_back(g.node(ch.shared).inputs[i]);
    return r;
  });
}

}  // namespace

std::string fused_experts_source(const std::string& fused_node_name) {
  return fused_node_name.rfind(kFusedPrefix, 0) == 0 ? fused_node_name.substr(kFusedPrefix.size()) : fused_node_name;
}

std::shared_ptr<const Graph> fuse_experts_chains(const Graph& g, const FusionFilter& accept,
                                                 const std::vector<std::string>& keep_values, bool fold_shared) {
  if (!g.validated()) fail_input("fuse: graph '" + g.name() + "' is not validated");
  const std::set<std::string> keep(keep_values.begin(), keep_values.end());
  std::vector<Chain> offered;
  for (const Node& n : g.nodes()) {
    auto ch = chain_ending_at(g, n, keep);
    if (!ch) continue;
    if (fold_shared)
      if (auto folded = with_shared_expert(g, *ch, keep)) ch = folded;
    offered.push_back(*ch);
  }
  if (offered.empty()) return nullptr;
  // Offer every chain fused at once, then keep those the filter accepts (their nodes do not depend
  // on one another, so the answer for one does not change with the others). A chain offered with
  // its shared expert and declined is offered again without it.
  std::vector<Chain> accepted;
  for (int round = 0; round < 2 && !offered.empty(); ++round) {
    std::vector<Chain> all_chains = accepted;
    all_chains.insert(all_chains.end(), offered.begin(), offered.end());
    const Graph all = rebuild(g, all_chains);
    std::vector<Chain> again;
    for (const Chain& ch : offered) {
      const auto fused = all.find_node(fused_name(g.node(ch.experts)));
      if (fused && accept(all, all.node(*fused))) accepted.push_back(ch);
      else if (ch.folds_shared()) again.push_back(Chain{ch.dispatch, ch.experts, ch.combine});
    }
    offered = std::move(again);
  }
  if (accepted.empty()) return nullptr;
  return std::make_shared<const Graph>(rebuild(g, accepted));
}

}  // namespace moeflow
