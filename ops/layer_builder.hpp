#pragma once
// GraphBuilder with the MoE ops: build a layer node by node (a custom router, two shared experts)
// with the weights each node needs declared for you, named "<node>.<weight>".
#include <string>
#include <vector>

#include "graph/builder.hpp"
#include "kernels/common/routing_rule.hpp"

namespace moeflow {

// The gate's outputs, and what later nodes need to know of the routing.
struct Route {
  ValueId ids = -1;      // [T,k] i32
  ValueId weights = -1;  // [T,k] f32
  int experts = 0;
  int top_k = 0;
};

struct Dispatched {
  ValueId rows = -1;     // [kT,H], grouped by expert
  ValueId offsets = -1;  // [E+1] i32
  ValueId slot_of = -1;  // [T,k] i32
  int experts = 0;
  int top_k = 0;
};

struct ExpertRows {
  ValueId y = -1;  // [kT,H], in dispatched order
  ValueId slot_of = -1;
  int top_k = 0;
};

struct SharedExpertOptions {
  int intermediate = 0;
  bool gated = false;  // Qwen2-MoE: times sigmoid(x·gate_w)
  std::string name = "shared_expert";
};

struct ExpertsOptions {
  int intermediate = 0;
  std::string name = "experts";
};

class LayerBuilder : public GraphBuilder {
 public:
  using GraphBuilder::GraphBuilder;

  // Declares "<name>.router" [E,H] (and "<name>.bias" [E] when the rule uses one).
  Route gate(ValueId x, const RoutingRule& rule, const std::string& name = "gate");
  // A route given as graph inputs (the experts-only graph of the benchmarks).
  Route route_input(const std::string& prefix, int experts, int top_k);
  ValueId shared_expert(ValueId x, const SharedExpertOptions& options);
  Dispatched dispatch(ValueId x, const Route& route, const std::string& name = "dispatch");
  ExpertRows experts(const Dispatched& rows, const ExpertsOptions& options);
  ValueId combine(const ExpertRows& y, const Route& route, const std::string& name = "combine");
  ValueId reduce(ValueId routed, const std::vector<ValueId>& shared, const std::string& name = "reduce");

 private:
  int64_t hidden_of(ValueId x) const;
};

}  // namespace moeflow
