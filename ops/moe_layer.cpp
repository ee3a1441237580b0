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

Graph build_moe_layer(const MoEConfig& c, const LayerOptions& o) {
  check_tokens(c, o);
  LayerBuilder b(c.name, o.max_tokens);
  b.describe(describe(c));
  const ValueId x = b.input("x", Shape{Dim::tokens(), Dim::of(c.hidden)}, o.dtype);
  const Route route = b.gate(x, c.routing());
  std::vector<ValueId> shared;
  if (c.has_shared_expert())
    shared.push_back(b.shared_expert(x, {.intermediate = c.shared_intermediate, .gated = c.shared_gate}));
  const Dispatched rows = b.dispatch(x, route);
  const ExpertRows y = b.experts(rows, {.intermediate = c.intermediate});
  const ValueId out = b.reduce(b.combine(y, route), shared);
  return std::move(b).finish({out});
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
