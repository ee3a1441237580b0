#pragma once
// Evaluates a graph with the plain fp64 reference, op by op, reading the same inputs and weights the
// engine read. Works for any graph built from the MoE ops (a custom router, several shared experts,
// the experts-only graph). Each gate takes the engine's top-k ids where they differ only by near-ties
// (DESIGN.md, "Correctness check").
#include <cstdint>
#include <functional>
#include <vector>

#include "graph/graph.hpp"
#include "tests/reference/reference.hpp"

namespace moeflow {

struct ReferenceResult {
  std::vector<double> output;               // the graph's first output, [T, H]
  reference::RoutingAgreement agreement;    // summed over every gate
};

// graph_data(v): host data of an input or weight. engine_data(v): host data of an engine value
// (read for every gate's ids).
ReferenceResult reference_run(const Graph& g, int64_t tokens, const std::function<const void*(ValueId)>& graph_data,
                              const std::function<const void*(ValueId)>& engine_data);

// The check of DESIGN.md on an engine output against the reference: passes when the relative norm
// error is below `tolerance` and every routing difference was a near-tie.
struct CheckReport {
  reference::Comparison comparison;
  reference::RoutingAgreement agreement;
  double tolerance = 0.0;
  bool pass = false;
};
CheckReport check_output(const float* engine_output, const ReferenceResult& ref, double tolerance);

}  // namespace moeflow
