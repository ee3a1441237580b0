#include "graph/builder.hpp"

#include "graph/error.hpp"

namespace moeflow {

GraphBuilder::GraphBuilder(std::string name, int64_t max_tokens) : graph_(std::move(name), max_tokens) {}

ValueId GraphBuilder::input(std::string name, Shape shape, DType dtype, float init_scale) {
  return graph_.add_input(std::move(name), ValueType{std::move(shape), dtype, {}}, ValueRole::input, init_scale);
}

ValueId GraphBuilder::weight(std::string name, Shape shape, DType dtype, float init_scale) {
  if (shape.symbolic()) fail_input("weight '" + name + "' " + shape.str() + " must not depend on the token count");
  return graph_.add_input(std::move(name), ValueType{std::move(shape), dtype, {}}, ValueRole::weight, init_scale);
}

std::vector<ValueId> GraphBuilder::add(std::string name, std::shared_ptr<const OpSchema> op,
                                       std::vector<ValueId> inputs) {
  if (!op) fail_input("node '" + name + "' has no op");
  // Check everything on a detached node first, so a refused node leaves the graph as it was.
  Node probe;
  probe.name = name;
  probe.op = op;
  probe.inputs = inputs;
  std::vector<const Value*> in;
  for (ValueId v : inputs) in.push_back(&graph_.value(v));
  if (static_cast<int>(in.size()) < op->min_inputs() || static_cast<int>(in.size()) > op->max_inputs())
    fail_input("node '" + name + "' (" + op->kind() + ") takes " + std::to_string(op->min_inputs()) + " inputs, got " +
               std::to_string(in.size()));
  for (const Value* v : in)
    if (!v->type) fail_input("node '" + name + "' reads '" + v->name + "', which has no type yet");
  std::vector<Distribution> dists = op->distribute(probe, in);  // first: a Partial input is the deeper mistake
  std::vector<ValueType> types = op->infer(probe, in);
  const std::vector<std::string> suffixes = op->output_names();
  for (const std::string& suffix : suffixes)
    if (graph_.find_value(name + "." + suffix)) fail_input("graph '" + graph_.name() + "': two values are named '" + name + "." + suffix + "'");
  if (graph_.find_node(name)) fail_input("graph '" + graph_.name() + "': two nodes are named '" + name + "'");

  std::vector<ValueId> outputs;
  for (std::size_t i = 0; i < suffixes.size(); ++i) {
    outputs.push_back(graph_.add_value(name + "." + suffixes[i]));
    types.at(i).dist = dists.at(i);
    graph_.mutable_value(outputs.back()).type = types[i];
  }
  graph_.add_node(name, op, std::move(inputs), outputs);
  return outputs;
}

Graph GraphBuilder::finish(std::vector<ValueId> outputs) && {
  for (ValueId v : outputs) graph_.mark_output(v);
  graph_.validate();
  return std::move(graph_);
}

}  // namespace moeflow
