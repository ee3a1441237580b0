#include "ops/moe_layer.hpp"

#include "graph/error.hpp"
#include "ops/layer_builder.hpp"

namespace moeflow {

namespace {

std::string describe(const MoEConfig& c) {
  std::string d = "H=" + std::to_string(c.hidden) + " I=" + std::to_string(c.intermediate) +
                  " E=" + std::to_string(c.experts) + " k=" + std::to_string(c.top_k);
  if (c.has_shared_expert()) d += " shared I=" + std::to_string(c.shared_intermediate);
  return d;
}

void check_tokens(const MoEConfig& c, const LayerOptions& o) {
  if (o.max_tokens <= 0)
    fail_input(c.name + ": maximum tokens = " + std::to_string(o.max_tokens) + " must be > 0");
}

}  // namespace

namespace {

enum class Branches { all, routed, shared };

Graph build_layer(const MoEConfig& c, const LayerOptions& o, Branches branches, const std::string& name) {
  check_tokens(c, o);
  if (branches == Branches::shared && !c.has_shared_expert())
    fail_input(c.name + ": scope 'shared' needs a shared expert, and this model has none");
  LayerBuilder b(name, o.max_tokens);
  b.describe(describe(c));
  const ValueId x = b.input("x", Shape{Dim::tokens(), Dim::of(c.hidden)}, o.dtype);
  Route route;
  if (branches != Branches::shared) route = b.gate(x, c.routing());
  std::vector<ValueId> shared;
  if (c.has_shared_expert() && branches != Branches::routed)
    shared.push_back(b.shared_expert(x, {.intermediate = c.shared_intermediate, .gated = c.shared_gate}));
  if (branches == Branches::shared) return std::move(b).finish({shared.front()});
  const ExpertRows y = b.experts(b.dispatch(x, route), {.intermediate = c.intermediate});
  const ValueId out = b.reduce(b.combine(y, route), shared);
  return std::move(b).finish({out});
}

}  // namespace

Graph build_moe_layer(const MoEConfig& c, const LayerOptions& o) { return build_layer(c, o, Branches::all, c.name); }

Graph build_scope_graph(const MoEConfig& c, const std::string& scope, const LayerOptions& o) {
  if (scope == "layer") return build_moe_layer(c, o);
  if (scope == "experts") return build_experts_graph(c, o);
  if (scope == "routed") return build_layer(c, o, Branches::routed, c.name + ".routed");
  if (scope == "shared") return build_layer(c, o, Branches::shared, c.name + ".shared");
  fail_input("unknown scope '" + scope + "': expected layer, experts, routed or shared");
}

Graph build_experts_graph(const MoEConfig& c, const LayerOptions& o) {
  check_tokens(c, o);
  LayerBuilder b(c.name + ".experts_path", o.max_tokens);
  b.describe(describe(c));
  const ValueId x = b.input("x", Shape{Dim::tokens(), Dim::of(c.hidden)}, o.dtype);
  const Route route = b.route_input("route", c.experts, c.top_k);
  const ExpertRows y = b.experts(b.dispatch(x, route), {.intermediate = c.intermediate});
  return std::move(b).finish({b.combine(y, route)});
}

}  // namespace moeflow
