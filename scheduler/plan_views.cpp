// The ways a Plan shows itself: a text summary, the buffer table, and DOT.
#include <algorithm>
#include <iomanip>
#include <sstream>

#include "graph/dot_document.hpp"
#include "scheduler/plan.hpp"

namespace moeflow {

namespace {

std::string mib(int64_t bytes) {
  std::ostringstream o;
  o << std::fixed << std::setprecision(2) << static_cast<double>(bytes) / (1024.0 * 1024.0) << " MiB";
  return o.str();
}

std::string us(double s) {
  std::ostringstream o;
  o << std::fixed << std::setprecision(1) << s * 1e6 << " us";
  return o.str();
}

}  // namespace

void Plan::write_summary(std::ostream& out) const {
  const Graph& g = *graph;
  out << "plan " << g.name() << ": " << to_string(options.policy) << ", backend " << to_string(options.backend) << ", "
      << lanes.size() << " lane(s), T<=" << g.max_tokens() << "\n";
  for (std::size_t l = 0; l < lanes.size(); ++l) out << "  " << lanes[l].name << ": " << lanes[l].why << "\n";
  for (const std::string& note : notes) out << "  note: " << note << "\n";
  // Columns at least as wide as their longest entry and a space, so no name runs into the next one.
  std::size_t node_width = 22, kernel_width = 24;
  for (const PlanStep& s : steps) {
    node_width = std::max(node_width, g.node(s.node).name.size() + 1);
    kernel_width = std::max(kernel_width, s.kernel->name.size() + 1);
  }
  const auto nw = static_cast<int>(node_width), kw = static_cast<int>(kernel_width);
  out << "  " << std::left << std::setw(4) << "#" << std::setw(6) << "lane" << std::setw(nw) << "node" << std::setw(kw)
      << "kernel" << std::setw(14) << "predicted" << "waits / why this kernel\n";
  for (const PlanStep& s : steps) {
    std::string waits;
    for (NodeId w : s.waits) waits += (waits.empty() ? "waits " : ", ") + g.node(w).name;
    out << "  " << std::setw(4) << s.order << std::setw(6) << s.lane << std::setw(nw) << g.node(s.node).name
        << std::setw(kw) << s.kernel->name << std::setw(14) << us(s.predicted_s) << (waits.empty() ? "" : waits + "; ")
        << s.reason << "\n";
  }
  for (std::size_t i = 0; i < packed.size(); ++i) {
    const PackedCopy& c = packed[i];
    int readers = 0;
    for (const PlanStep& s : steps) readers += s.packed == static_cast<int>(i);
    out << "  once, when the weights are bound: " << g.value(c.source).name << " packed as " << c.layout << " ("
        << mib(c.bytes) << "), read by " << readers << " step(s) from " << g.node(c.first_reader).name << " on\n";
  }
  out << "  predicted: " << us(predicted_makespan_s) << " (serial sum " << us(predicted_serial_s) << "); workspace "
      << mib(bytes(Arena::workspace)) << ", weights " << mib(bytes(Arena::weights))
      << (packed.empty() ? std::string() : " (+ " + mib(packed_bytes) + " packed)") << ", inputs "
      << mib(bytes(Arena::inputs)) << "\n";
}

void Plan::write_memory(std::ostream& out) const {
  const Graph& g = *graph;
  out << "buffers of " << g.name() << " at T=" << g.max_tokens()
      << (options.reuse_memory ? " (workspace reused where the plan's order and waits allow)\n"
                               : " (no reuse: every value has its own range)\n");
  out << "  " << std::left << std::setw(10) << "arena" << std::setw(28) << "value" << std::setw(22) << "shape"
      << std::right << std::setw(14) << "offset" << std::setw(14) << "bytes" << "\n";
  for (Arena a : {Arena::inputs, Arena::weights, Arena::workspace, Arena::host})
    for (const Buffer& b : buffers) {
      if (b.arena != a) continue;
      const Value& v = g.value(b.value);
      out << "  " << std::left << std::setw(10) << to_string(a) << std::setw(28) << v.name << std::setw(22)
          << v.type_str(g.max_tokens()) << std::right << std::setw(14) << b.offset << std::setw(14) << b.bytes
          << (b.in_place_of >= 0 ? "  in place over " + g.value(b.in_place_of).name : std::string())
          << (b.is_view() ? "  view: " + std::to_string(b.view_offset) + " bytes into " + g.value(b.view_of).name
                          : std::string())
          << "\n";
    }
  for (const PlanStep& s : steps) {
    if (s.workspace_bytes == 0) continue;
    out << "  " << std::left << std::setw(10) << "workspace" << std::setw(28) << (g.node(s.node).name + " (scratch)")
        << std::setw(22) << s.kernel->name << std::right << std::setw(14) << s.workspace_offset << std::setw(14)
        << s.workspace_bytes << "\n";
  }
  for (const PackedCopy& c : packed)
    out << "  " << std::left << std::setw(10) << "packed" << std::setw(28) << g.value(c.source).name << std::setw(22)
        << "-" << std::right << std::setw(14) << "-" << std::setw(14) << c.bytes
        << "  " << c.layout << ", written once\n";
  if (!packed.empty())
    out << "  " << std::left << std::setw(10) << "packed" << " total " << packed_bytes << " bytes (" << mib(packed_bytes)
        << "): weights in a kernel's own layout, beside the weights\n";
  for (Arena a : {Arena::inputs, Arena::weights, Arena::workspace, Arena::host})
    out << "  " << std::left << std::setw(10) << to_string(a) << " total " << bytes(a) << " bytes (" << mib(bytes(a))
        << ")\n";
  out << "  peak workspace " << bytes(Arena::workspace) << " bytes (" << mib(bytes(Arena::workspace)) << ")\n";
}

void Plan::write_dot(std::ostream& out) const {
  const Graph& g = *graph;
  DotDocument doc(g.name() + ".plan");
  std::ostringstream label;
  label << "plan: " << to_string(options.backend) << " " << to_string(options.policy) << ", " << lanes.size()
        << " lane(s), T<=" << g.max_tokens() << ", workspace " << mib(bytes(Arena::workspace))
        << (packed.empty() ? std::string() : ", packed weights " + mib(packed_bytes))
        << "; #k = issue order, red = cross-lane wait";
  for (const std::string& note : notes) label << "\\n" << note;
  doc.graph_attrs({{"rankdir", "LR"}, {"newrank", "true"}, {"fontname", "Helvetica"}, {"label", label.str()}});
  doc.node_defaults({{"shape", "box"}, {"style", "rounded,filled"}, {"fillcolor", "white"}, {"fontname", "Helvetica"},
                     {"fontsize", "10"}, {"label", "\\N"}});
  doc.edge_defaults({{"fontname", "Helvetica"}, {"fontsize", "9"}, {"label", ""}});
  std::vector<std::vector<const PlanStep*>> per_lane(lanes.size());
  for (const PlanStep& s : steps) per_lane[static_cast<std::size_t>(s.lane)].push_back(&s);
  auto key = [](const PlanStep& s) { return "s" + std::to_string(s.order); };
  for (std::size_t l = 0; l < lanes.size(); ++l) {
    const std::string cluster = "cluster_lane" + std::to_string(l);
    const int percent = static_cast<int>(lanes[l].sm_share * 100 + 0.5);
    const std::string share = percent < 100 ? ", " + std::to_string(percent) + "% of the SMs" : std::string();
    doc.subgraph(cluster, {{"label", std::string(to_string(options.backend)) + " " + lanes[l].name + share},
                           {"color", options.backend == Backend::cuda ? "steelblue" : "gray50"}});
    for (const PlanStep* s : per_lane[l]) {
      const Node& n = g.node(s->node);
      std::string text = "#" + std::to_string(s->order) + " " + n.name;
      // The chunk pass names its nodes `op·cK`; tag only nodes whose name does not say it already.
      const std::string tag = "\u00b7c" + std::to_string(n.chunk);
      if (n.chunk >= 0 && (n.name.size() < tag.size() || n.name.compare(n.name.size() - tag.size(), tag.size(), tag) != 0))
        text += " c" + std::to_string(n.chunk);
      text += "\\n" + s->kernel->name + "\\n" + s->reason + "\\npredicted " + us(s->predicted_s);
      if (n.op->communicates()) text += "\\nmoves " + std::to_string(static_cast<int64_t>(s->cost.bytes / 1024.0 + 0.5)) + " KiB";
      doc.node(key(*s), {{"label", text}, {"fillcolor", n.op->fill_color()}}, cluster);
    }
    for (std::size_t i = 1; i < per_lane[l].size(); ++i)
      doc.edge(key(*per_lane[l][i - 1]), key(*per_lane[l][i]),
               {{"color", "gray70"}, {"arrowhead", "none"}, {"weight", "100"}}, cluster);
  }
  // Packed weights: nodes of their own, run once when the weights are bound, each feeding the steps
  // that read it.
  if (!packed.empty()) {
    doc.subgraph("cluster_bind", {{"label", "once, when the weights are bound"}, {"color", "gray50"}});
    for (std::size_t i = 0; i < packed.size(); ++i)
      doc.node("p" + std::to_string(i),
               {{"label", "pack " + g.value(packed[i].source).name + "\\n" + packed[i].layout + "\\n" + mib(packed[i].bytes)},
                {"fillcolor", "lightyellow"}},
               "cluster_bind");
    for (const PlanStep& s : steps)
      if (s.packed >= 0) doc.edge("p" + std::to_string(s.packed), key(s), {{"color", "goldenrod"}});
  }
  int event = 0;
  for (const PlanStep& s : steps)
    for (NodeId w : s.waits)
      doc.edge(key(step_for(w)), key(s),
               {{"style", "dashed"}, {"color", "red"}, {"label", "ev" + std::to_string(event++)}});
  doc.write(out);
}

}  // namespace moeflow
