#pragma once
// Adds nodes one by one; edges follow from the values passed (as in ggml). Each node's outputs are
// typed as soon as it is added, so a mistake is reported at the line that made it. finish()
// validates the whole graph.
#include <memory>
#include <string>
#include <vector>

#include "graph/graph.hpp"

namespace moeflow {

class GraphBuilder {
 public:
  GraphBuilder(std::string name, int64_t max_tokens);

  // A per-run input (x, or ids/weights of an experts-only graph); random data U(-1,1)·init_scale.
  ValueId input(std::string name, Shape shape, DType dtype, float init_scale = 1.0f);
  // A weight, bound once; random data U(-1,1)·init_scale (1/√fan_in for matrices).
  ValueId weight(std::string name, Shape shape, DType dtype, float init_scale);
  // Adds node `name` applying `op` to `inputs`; returns its outputs, named "<name>.<suffix>".
  std::vector<ValueId> add(std::string name, std::shared_ptr<const OpSchema> op, std::vector<ValueId> inputs);

  const Value& value(ValueId id) const { return graph_.value(id); }
  const Graph& graph() const { return graph_; }
  int64_t max_tokens() const { return graph_.max_tokens(); }
  void describe(std::string description) { graph_.set_description(std::move(description)); }

  // Marks the outputs and validates; throws Error(bad_input) when the graph is not sound.
  Graph finish(std::vector<ValueId> outputs) &&;

 protected:
  Graph& graph_mutable() { return graph_; }

 private:
  Graph graph_;
};

}  // namespace moeflow
