#pragma once
// A Graphviz document built through libcgraph and written as DOT text. Keeps cgraph's types out of
// every header (graph and plan writers both use it). Output is deterministic: objects are written
// in the order they were added, and callers name them by stable ids, never pointers.
#include <memory>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

namespace moeflow {

using DotAttrs = std::vector<std::pair<std::string, std::string>>;

class DotDocument {
 public:
  explicit DotDocument(const std::string& name);
  ~DotDocument();
  DotDocument(const DotDocument&) = delete;
  DotDocument& operator=(const DotDocument&) = delete;

  // Defaults written as `graph [...]`, `node [...]`, `edge [...]`; call before adding objects.
  void graph_attrs(const DotAttrs& attrs);
  void node_defaults(const DotAttrs& attrs);
  void edge_defaults(const DotAttrs& attrs);
  // A subgraph; a name starting with "cluster_" is drawn as a box.
  void subgraph(const std::string& name, const DotAttrs& attrs);
  // A node, optionally inside a subgraph added before.
  void node(const std::string& name, const DotAttrs& attrs, const std::string& subgraph = "");
  // One edge per (tail, head) pair: adding the pair again merges into the first edge.
  void edge(const std::string& tail, const std::string& head, const DotAttrs& attrs, const std::string& subgraph = "");

  void write(std::ostream& out) const;
  std::string str() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Escapes text for a record label field (`{`, `}`, `|`, `<`, `>` and spaces at the ends are special).
std::string dot_record_escape(const std::string& text);

}  // namespace moeflow
