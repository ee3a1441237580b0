#include "graph/graph.hpp"

#include <algorithm>

#include "graph/error.hpp"
#include "graph/validate.hpp"

namespace moeflow {

std::string Value::type_str() const {
  if (!type) return "?";
  return type->shape.str() + " " + to_string(type->dtype);
}

std::string Value::type_str(int64_t tokens) const {
  if (!type) return "?";
  return type->shape.str(fixed_rows >= 0 ? fixed_rows : tokens) + " " + to_string(type->dtype);
}

std::vector<Distribution> OpSchema::distribute(const Node& node, std::span<const Value* const> inputs) const {
  for (const Value* v : inputs)
    if (v->type && v->type->dist.kind == Distribution::Kind::partial)
      fail_input("node '" + node.name + "' (" + kind() + ") reads value '" + v->name +
                 "' which is Partial (a sum still owed): reduce it first");
  return std::vector<Distribution>(output_names().size(), Distribution::replicated());
}

Graph::Graph(std::string name, int64_t max_tokens) : name_(std::move(name)), max_tokens_(max_tokens) {
  if (max_tokens_ <= 0)
    fail_input("graph '" + name_ + "': maximum tokens must be > 0, got " + std::to_string(max_tokens_));
}

void Graph::set_chunking(int chunks, int64_t rows) {
  if (chunks < 1 || rows < 1) fail_input("graph '" + name_ + "': chunking needs chunks >= 1 and rows >= 1");
  chunks_ = chunks;
  chunk_rows_ = rows;
}

void Graph::set_chunk(NodeId n, int chunk) {
  if (chunk < 0 || chunk >= chunks_)
    fail_input("graph '" + name_ + "': chunk " + std::to_string(chunk) + " of " + std::to_string(chunks_));
  Node& node = nodes_.at(static_cast<std::size_t>(n));
  node.chunk = chunk;
  for (ValueId v : node.outputs) {
    values_.at(static_cast<std::size_t>(v)).chunk = chunk;
    values_.at(static_cast<std::size_t>(v)).chunk_rows = chunk_rows_;
  }
}

void Graph::add_order(NodeId earlier, NodeId later) {
  if (earlier == later || earlier < 0 || later < 0 || earlier >= static_cast<NodeId>(nodes_.size()) ||
      later >= static_cast<NodeId>(nodes_.size()))
    fail_input("graph '" + name_ + "': order edge " + std::to_string(earlier) + " -> " + std::to_string(later) +
               " names no two distinct nodes");
  nodes_[static_cast<std::size_t>(later)].after.push_back(earlier);
  validated_ = false;
}

void Graph::set_fixed_rows(NodeId n, int64_t rows) {
  if (rows < 0) fail_input("graph '" + name_ + "': fixed rows of node " + std::to_string(n) + " must be >= 0");
  nodes_.at(static_cast<std::size_t>(n)).fixed_rows = rows;
}

int64_t Graph::tokens_of(const Node& n, int64_t tokens) const {
  if (n.fixed_rows >= 0) return n.fixed_rows;
  if (n.chunk < 0) return tokens;
  const int64_t first = n.chunk * chunk_rows_;
  return std::clamp<int64_t>(tokens - first, 0, chunk_rows_);
}

std::optional<ValueId> Graph::find_value(std::string_view name) const {
  auto it = value_index_.find(name);
  if (it == value_index_.end()) return std::nullopt;
  return it->second;
}

std::optional<NodeId> Graph::find_node(std::string_view name) const {
  for (const Node& n : nodes_)
    if (n.name == name) return n.id;
  return std::nullopt;
}

std::vector<ValueId> Graph::graph_inputs() const {
  std::vector<ValueId> ids;
  for (const Value& v : values_)
    if (v.is_graph_input()) ids.push_back(v.id);
  return ids;
}

std::vector<const Value*> Graph::input_values(const Node& n) const {
  std::vector<const Value*> vs;
  for (ValueId id : n.inputs) vs.push_back(&value(id));
  return vs;
}

std::vector<const Value*> Graph::output_values(const Node& n) const {
  std::vector<const Value*> vs;
  for (ValueId id : n.outputs) vs.push_back(&value(id));
  return vs;
}

std::vector<NodeId> Graph::predecessors(NodeId n) const {
  std::vector<NodeId> preds;
  for (ValueId v : node(n).inputs)
    if (value(v).producer != kNoNode) preds.push_back(value(v).producer);
  for (NodeId a : node(n).after) preds.push_back(a);
  std::sort(preds.begin(), preds.end());
  preds.erase(std::unique(preds.begin(), preds.end()), preds.end());
  return preds;
}

ValueId Graph::add_input(std::string name, ValueType type, ValueRole role, float init_scale) {
  ValueId id = add_value(std::move(name));
  Value& v = values_.back();
  v.role = role;
  v.type = std::move(type);
  v.init_scale = init_scale;
  return id;
}

ValueId Graph::copy_input(const Value& from) {
  if (!from.is_graph_input() || !from.type)
    fail_input("graph '" + name_ + "': '" + from.name + "' is not a typed graph input, so it cannot be copied as one");
  const ValueId id = add_input(from.name, *from.type, from.role, from.init_scale);
  Value& v = values_.back();
  v.init = from.init;
  v.init_choices = from.init_choices;
  v.source = from.source;
  v.fixed_rows = from.fixed_rows;
  return id;
}

ValueId Graph::add_value(std::string name) {
  if (name.empty()) fail_input("graph '" + name_ + "': a value needs a name");
  if (value_index_.count(name)) fail_input("graph '" + name_ + "': two values are named '" + name + "'");
  validated_ = false;
  Value v;
  v.id = static_cast<ValueId>(values_.size());
  v.name = std::move(name);
  value_index_.emplace(v.name, v.id);
  values_.push_back(std::move(v));
  return values_.back().id;
}

NodeId Graph::add_node(std::string name, std::shared_ptr<const OpSchema> op, std::vector<ValueId> inputs,
                       std::vector<ValueId> outputs) {
  if (!op) fail_input("node '" + name + "' has no op");
  if (node_index_.count(name)) fail_input("graph '" + name_ + "': two nodes are named '" + name + "'");
  validated_ = false;
  Node n;
  n.id = static_cast<NodeId>(nodes_.size());
  n.name = std::move(name);
  n.op = std::move(op);
  for (ValueId v : inputs) value(v);  // throws std::out_of_range on a bad id before anything changes
  for (ValueId v : outputs) {
    Value& out = values_.at(static_cast<std::size_t>(v));
    if (out.is_graph_input())
      construction_errors_.push_back("node '" + n.name + "' writes value '" + out.name + "', which is a graph input");
    else if (out.producer != kNoNode)
      construction_errors_.push_back("value '" + out.name + "' is written twice (by '" + node(out.producer).name +
                                     "' and '" + n.name + "'): values are single-assignment");
    else
      out.producer = n.id;
  }
  for (ValueId v : inputs) values_[static_cast<std::size_t>(v)].consumers.push_back(n.id);
  n.inputs = std::move(inputs);
  n.outputs = std::move(outputs);
  node_index_.emplace(n.name, n.id);
  nodes_.push_back(std::move(n));
  return nodes_.back().id;
}

void Graph::mark_output(ValueId v) {
  value(v);
  if (std::find(outputs_.begin(), outputs_.end(), v) == outputs_.end()) outputs_.push_back(v);
  validated_ = false;
}

void Graph::replace_input(NodeId n, std::size_t index, ValueId v) {
  Node& node = nodes_.at(static_cast<std::size_t>(n));
  Value& old = values_.at(static_cast<std::size_t>(node.inputs.at(index)));
  auto it = std::find(old.consumers.begin(), old.consumers.end(), n);
  if (it != old.consumers.end()) old.consumers.erase(it);
  node.inputs[index] = v;
  values_.at(static_cast<std::size_t>(v)).consumers.push_back(n);
  validated_ = false;
}

void Graph::validate() { validate_graph(*this); }

}  // namespace moeflow
