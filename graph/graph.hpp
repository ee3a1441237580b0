#pragma once
// The dataflow graph of one layer. Built by GraphBuilder (or, for passes and tests, through the
// low-level add_* calls, which allow any wiring) and then checked by validate(), which renumbers
// nodes in topological order so that a node's id is its topological index.
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "graph/node.hpp"

namespace moeflow {

class Graph {
 public:
  Graph(std::string name, int64_t max_tokens);

  const std::string& name() const { return name_; }
  int64_t max_tokens() const { return max_tokens_; }
  // Free-form facts shown in dumps ("H=2048 E=60 k=4").
  const std::string& description() const { return description_; }
  void set_description(std::string d) { description_ = std::move(d); }

  const std::vector<Node>& nodes() const { return nodes_; }
  const std::vector<Value>& values() const { return values_; }
  const Node& node(NodeId id) const { return nodes_.at(static_cast<std::size_t>(id)); }
  const Value& value(ValueId id) const { return values_.at(static_cast<std::size_t>(id)); }
  Value& mutable_value(ValueId id) { return values_.at(static_cast<std::size_t>(id)); }
  std::optional<ValueId> find_value(std::string_view name) const;
  std::optional<NodeId> find_node(std::string_view name) const;
  const std::vector<ValueId>& outputs() const { return outputs_; }
  // Inputs and weights, in the order they were declared.
  std::vector<ValueId> graph_inputs() const;
  std::vector<const Value*> input_values(const Node& n) const;
  std::vector<const Value*> output_values(const Node& n) const;
  // Nodes that produce an input of n (each once, ascending).
  std::vector<NodeId> predecessors(NodeId n) const;
  bool validated() const { return validated_; }

  // Low-level construction. Names must be unique among values and among nodes.
  ValueId add_input(std::string name, ValueType type, ValueRole role, float init_scale);
  ValueId add_value(std::string name);  // an activation, typed later by inference
  // A graph input of another graph, copied with everything that says where its data comes from
  // (type, role, initialisation, source slice, fixed rows): what passes that rebuild a graph use.
  ValueId copy_input(const Value& from);
  NodeId add_node(std::string name, std::shared_ptr<const OpSchema> op, std::vector<ValueId> inputs,
                  std::vector<ValueId> outputs);
  void mark_output(ValueId v);
  // Node `later` runs after node `earlier` although no value flows between them.
  void add_order(NodeId earlier, NodeId later);
  // Node n works on `rows` token rows whatever the run's T (Node::fixed_rows).
  void set_fixed_rows(NodeId n, int64_t rows);
  // Makes input `index` of node n read `v` instead (passes use it to reroute a value).
  void replace_input(NodeId n, std::size_t index, ValueId v);

  // Chunking (graph/chunk.hpp): a node tagged with a chunk works on that chunk's share of the token
  // rows, at most chunk_rows() of them; untagged nodes work on all of them.
  int64_t chunk_rows() const { return chunk_rows_; }
  int chunks() const { return chunks_; }
  void set_chunking(int chunks, int64_t rows);
  // Tags node n and its outputs with chunk `chunk` (set_chunking first).
  void set_chunk(NodeId n, int chunk);
  // Token rows node n works on when the graph runs `tokens` tokens (0 for an empty chunk).
  int64_t tokens_of(const Node& n, int64_t tokens) const;
  int64_t max_tokens_of(const Node& n) const { return tokens_of(n, max_tokens_); }
  // Checks the graph and infers every activation's type (see validate.hpp).
  void validate();

 private:
  friend void validate_graph(Graph&);
  std::string name_;
  int64_t max_tokens_;
  int chunks_ = 0;
  int64_t chunk_rows_ = 0;
  std::string description_;
  std::vector<Node> nodes_;
  std::vector<Value> values_;
  std::vector<ValueId> outputs_;
  std::map<std::string, ValueId, std::less<>> value_index_;
  std::map<std::string, NodeId, std::less<>> node_index_;
  std::vector<std::string> construction_errors_;  // reported by validate (e.g. a value written twice)
  bool validated_ = false;
};

}  // namespace moeflow
