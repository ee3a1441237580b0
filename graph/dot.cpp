#include "graph/dot.hpp"

#include <map>
#include <sstream>

#include "graph/dot_document.hpp"
#include "graph/graph.hpp"

namespace moeflow {

namespace {

std::string node_key(const Node& n) { return "n" + std::to_string(n.id); }

std::string human_bytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB"};
  int u = 0;
  while (b >= 1024.0 && u < 3) {
    b /= 1024.0;
    ++u;
  }
  std::ostringstream s;
  s.setf(std::ios::fixed);
  s.precision(u == 0 ? 0 : 1);
  s << b << " " << units[u];
  return s.str();
}

// The part of a value's name after "<node>.", the rest for graph inputs.
// "|moves 12.0 KiB" for a node that moves data between ranks, at its most rows.
std::string moved_bytes(const Graph& g, const Node& n) {
  if (!n.op->communicates()) return "";
  const auto in = g.input_values(n);
  const auto out = g.output_values(n);
  const double bytes = n.op->cost({in, out}, g.max_tokens_of(n)).bytes;
  std::ostringstream o;
  o.setf(std::ios::fixed);
  o.precision(1);
  o << "|moves " << bytes / 1024.0 << " KiB";
  return o.str();
}

std::string edge_label(const Graph& g, const Value& v) {
  std::string name = v.name;
  if (v.producer != kNoNode) {
    const std::string& prefix = g.node(v.producer).name;
    if (name.rfind(prefix + ".", 0) == 0) name = name.substr(prefix.size() + 1);
  }
  return name + " " + human_bytes(static_cast<double>(v.bytes(v.tokens_in(g.max_tokens()))));
}

}  // namespace

void write_graph_dot(const Graph& g, std::ostream& out) { out << graph_dot(g); }

std::string graph_dot(const Graph& g) {
  const int64_t T = g.max_tokens();
  DotDocument doc(g.name());
  std::string label = g.name() + "  T<=" + std::to_string(T);
  if (!g.description().empty()) label += " " + g.description();
  doc.graph_attrs({{"rankdir", "TB"}, {"newrank", "true"}, {"fontname", "Helvetica"}, {"label", label}});
  doc.node_defaults({{"shape", "record"}, {"style", "filled"}, {"fillcolor", "white"}, {"fontname", "Helvetica"},
                     {"fontsize", "10"}, {"label", "\\N"}});
  doc.edge_defaults({{"fontname", "Helvetica"}, {"fontsize", "9"}, {"label", ""}});

  for (const Value& v : g.values()) {
    if (!v.is_graph_input()) continue;
    const char* role = v.role == ValueRole::weight ? "weight" : "input";
    doc.node(v.name, {{"label", "{" + dot_record_escape(v.name) + "|" + role + "|" + v.type_str(T) + "}"},
                      {"fillcolor", "pink"}});
  }
  std::map<int, std::string> clusters;
  for (const Node& n : g.nodes())
    if (n.chunk >= 0 && !clusters.count(n.chunk)) {
      std::string name = "cluster_c" + std::to_string(n.chunk);
      clusters[n.chunk] = name;
      doc.subgraph(name, {{"label", "chunk " + std::to_string(n.chunk)}, {"style", "dashed"}});
    }
  for (const Node& n : g.nodes()) {
    const Value& first = g.value(n.outputs.at(0));
    std::string label = "{" + dot_record_escape(n.name) + "|" + dot_record_escape(n.op->summary()) + "|" +
                        dot_record_escape(edge_label(g, first).substr(0, edge_label(g, first).find(' '))) + " " +
                        first.type_str(T) + moved_bytes(g, n) + "}";
    doc.node(node_key(n), {{"label", label}, {"fillcolor", n.op->fill_color()}},
             n.chunk >= 0 ? clusters[n.chunk] : "");
  }
  for (ValueId id : g.outputs()) {
    const Value& v = g.value(id);
    doc.node("out_" + std::to_string(id),
             {{"label", "{" + dot_record_escape(v.name) + "|output|" + v.type_str(T) + "}"}, {"fillcolor", "palegreen"}});
  }
  for (const Node& n : g.nodes())
    for (ValueId id : n.inputs) {
      const Value& v = g.value(id);
      if (v.is_graph_input()) {
        doc.edge(v.name, node_key(n), {});
      } else {
        doc.edge(node_key(g.node(v.producer)), node_key(n), {{"label", edge_label(g, v)}});
      }
    }
  for (ValueId id : g.outputs()) {
    const Value& v = g.value(id);
    const std::string from = v.is_graph_input() ? v.name : node_key(g.node(v.producer));
    doc.edge(from, "out_" + std::to_string(id), {{"label", edge_label(g, v)}});
  }
  return doc.str();
}

}  // namespace moeflow
