#include "ops/layer_builder.hpp"

#include <cmath>
#include <memory>

#include "graph/error.hpp"
#include "ops/combine_op.hpp"
#include "ops/dispatch_op.hpp"
#include "ops/experts_op.hpp"
#include "ops/gate_op.hpp"
#include "ops/reduce_op.hpp"
#include "ops/shared_expert_op.hpp"

namespace moeflow {

namespace {
// DESIGN.md: weights ~ U(±1/√fan_in); the correction bias ~ U(±0.05).
float fan_in_scale(int64_t fan_in) { return 1.0f / std::sqrt(static_cast<float>(fan_in)); }
constexpr float kBiasScale = 0.05f;
}  // namespace

int64_t LayerBuilder::hidden_of(ValueId x) const {
  const Value& v = value(x);
  if (!v.type || v.shape().rank() != 2 || v.shape()[1].symbolic())
    fail_input("value '" + v.name + "' is " + v.type_str() + ", expected [T,H]");
  return v.shape()[1].fixed;
}

Route LayerBuilder::gate(ValueId x, const RoutingRule& rule, const std::string& name) {
  auto op = std::make_shared<GateOp>(rule);
  const int64_t H = hidden_of(x);
  const DType dt = value(x).dtype();
  std::vector<ValueId> in{x, weight(name + ".router", Shape{Dim::of(rule.experts), Dim::of(H)}, dt, fan_in_scale(H))};
  if (rule.use_bias) in.push_back(weight(name + ".bias", Shape{Dim::of(rule.experts)}, DType::f32, kBiasScale));
  std::vector<ValueId> out = add(name, op, in);
  return Route{out[0], out[1], rule.experts, rule.top_k};
}

Route LayerBuilder::route_input(const std::string& prefix, int experts, int top_k) {
  if (top_k <= 0 || top_k > experts)
    fail_input("route '" + prefix + "': top_k = " + std::to_string(top_k) + " must be in [1, experts = " +
               std::to_string(experts) + "]");
  const Shape shape{Dim::tokens(), Dim::of(top_k)};
  Route r{input(prefix + ".ids", shape, DType::i32), input(prefix + ".weights", shape, DType::f32), experts, top_k};
  Value& ids = graph_mutable().mutable_value(r.ids);
  ids.init = ValueInit::expert_ids;
  ids.init_choices = experts;
  graph_mutable().mutable_value(r.weights).init = ValueInit::unit_interval;
  return r;
}

ValueId LayerBuilder::shared_expert(ValueId x, const SharedExpertOptions& o) {
  auto op = std::make_shared<SharedExpertOp>(o.intermediate, o.gated);
  const int64_t H = hidden_of(x), I = o.intermediate;
  const DType dt = value(x).dtype();
  std::vector<ValueId> in{x, weight(o.name + ".w13", Shape{Dim::of(2 * I), Dim::of(H)}, dt, fan_in_scale(H)),
                          weight(o.name + ".w2", Shape{Dim::of(H), Dim::of(I)}, dt, fan_in_scale(I))};
  if (o.gated) in.push_back(weight(o.name + ".gate_w", Shape{Dim::of(1), Dim::of(H)}, dt, fan_in_scale(H)));
  return add(o.name, op, in)[0];
}

Dispatched LayerBuilder::dispatch(ValueId x, const Route& route, const std::string& name) {
  auto op = std::make_shared<DispatchOp>(route.experts, route.top_k);
  std::vector<ValueId> out = add(name, op, {x, route.ids});
  return Dispatched{out[0], out[1], out[2], route.experts, route.top_k};
}

ExpertRows LayerBuilder::experts(const Dispatched& d, const ExpertsOptions& o) {
  auto op = std::make_shared<ExpertsOp>(d.experts, d.top_k, o.intermediate);
  const int64_t H = hidden_of(d.rows), I = o.intermediate, E = d.experts;
  const DType dt = value(d.rows).dtype();
  ValueId w13 = weight(o.name + ".w13", Shape{Dim::of(E), Dim::of(2 * I), Dim::of(H)}, dt, fan_in_scale(H));
  ValueId w2 = weight(o.name + ".w2", Shape{Dim::of(E), Dim::of(H), Dim::of(I)}, dt, fan_in_scale(I));
  return ExpertRows{add(o.name, op, {d.rows, d.offsets, w13, w2})[0], d.slot_of, d.top_k};
}

ValueId LayerBuilder::combine(const ExpertRows& y, const Route& route, const std::string& name) {
  if (y.top_k != route.top_k)
    fail_input("node '" + name + "': expert rows were dispatched with k = " + std::to_string(y.top_k) +
               " but the route has k = " + std::to_string(route.top_k));
  return add(name, std::make_shared<CombineOp>(route.top_k), {y.y, y.slot_of, route.weights})[0];
}

ValueId LayerBuilder::reduce(ValueId routed, const std::vector<ValueId>& shared, const std::string& name) {
  std::vector<ValueId> in{routed};
  in.insert(in.end(), shared.begin(), shared.end());
  return add(name, std::make_shared<ReduceOp>(), in)[0];
}

}  // namespace moeflow
