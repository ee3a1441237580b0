// `moeflow trace run.json --svg timeline.svg`: a measured run as a timeline (`--summary`: where its
// time went, as text). The DOT has fixed
// positions (x = time, one row per lane) and is laid out by Graphviz's `neato -n2`, run as a program:
// moeflow links only libcgraph.
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <sstream>
#include <vector>

#include "graph/dot_document.hpp"
#include "graph/error.hpp"
#include "scheduler/trace.hpp"
#include "tools/commands.hpp"

namespace moeflow::cli {

namespace {

std::string timeline_dot(const Trace& t) {
  double end_us = 1.0;
  for (const TraceEvent& e : t.events) end_us = std::max(end_us, e.start_us + e.duration_us);
  const double width_pt = 1000.0, row_pt = 40.0, scale = width_pt / end_us;
  DotDocument doc("timeline");
  std::ostringstream label;
  label << t.process << "  (" << std::fixed << std::setprecision(1) << end_us << " us)";
  doc.graph_attrs({{"label", label.str()}, {"fontname", "Helvetica"}, {"labelloc", "t"}});
  doc.node_defaults({{"shape", "box"}, {"style", "filled"}, {"fillcolor", "white"}, {"fontname", "Helvetica"},
                     {"fontsize", "8"}, {"fixedsize", "true"}, {"label", "\\N"}, {"pos", ""}, {"width", "1"},
                     {"height", "0.4"}});
  auto pt = [](double v) {
    std::ostringstream o;
    o << std::fixed << std::setprecision(2) << v;
    return o.str();
  };
  for (std::size_t l = 0; l < t.lanes.size(); ++l) {
    const double y = -static_cast<double>(l) * row_pt;
    doc.node("lane" + std::to_string(l), {{"label", t.lanes[l]}, {"shape", "plaintext"}, {"style", ""},
                                          {"pos", pt(-80.0) + "," + pt(y) + "!"}, {"width", "1.6"}});
  }
  int i = 0;
  for (const TraceEvent& e : t.events) {
    const double w = std::max(e.duration_us * scale, 1.0);
    const double x = e.start_us * scale + w / 2.0, y = -static_cast<double>(e.lane) * row_pt;
    const char* color = e.op == "shared_expert" ? "lightblue" : e.op == "experts" ? "palegreen" : "white";
    doc.node("e" + std::to_string(i++), {{"label", e.name}, {"fillcolor", color}, {"pos", pt(x) + "," + pt(y) + "!"},
                                         {"width", pt(w / 72.0)}, {"tooltip", e.name + " " + pt(e.duration_us) + " us"}});
  }
  return doc.str();
}

// Where the time of a run went: its span, each lane's busy time, and per op and kernel the nodes'
// summed durations, largest first (what to compare between two plans of one layer).
std::string trace_summary(const Trace& t) {
  double start = 0.0, end = 0.0;
  if (!t.events.empty()) start = end = t.events.front().start_us;
  std::map<int, double> busy;
  std::map<std::pair<std::string, std::string>, std::pair<int, double>> by_kernel;
  for (const TraceEvent& e : t.events) {
    start = std::min(start, e.start_us);
    end = std::max(end, e.start_us + e.duration_us);
    busy[e.lane] += e.duration_us;
    auto& [count, total] = by_kernel[{e.op, e.kernel}];
    ++count;
    total += e.duration_us;
  }
  const double span = end - start;
  std::ostringstream out;
  out << std::fixed << std::setprecision(1) << t.process << ": span " << span << " us, " << t.events.size() << " nodes\n";
  for (const auto& [lane, us] : busy) {
    const std::string name = lane >= 0 && static_cast<std::size_t>(lane) < t.lanes.size() ? t.lanes[static_cast<std::size_t>(lane)]
                                                                                         : "lane" + std::to_string(lane);
    out << "  " << std::left << std::setw(24) << name << std::right << std::setw(10) << us << " us busy ("
        << (span > 0 ? 100.0 * us / span : 0.0) << "% of the span)\n";
  }
  std::vector<std::pair<std::pair<std::string, std::string>, std::pair<int, double>>> rows(by_kernel.begin(), by_kernel.end());
  std::stable_sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.second.second > b.second.second; });
  out << "  " << std::left << std::setw(16) << "op" << std::setw(34) << "kernel" << std::right << std::setw(6) << "nodes"
      << std::setw(12) << "sum us" << "\n";
  for (const auto& [key, value] : rows)
    out << "  " << std::left << std::setw(16) << key.first << std::setw(34) << key.second << std::right << std::setw(6)
        << value.first << std::setw(12) << value.second << "\n";
  return out.str();
}

}  // namespace

Command add_trace_command(CLI::App& app) {
  struct Flags {
    std::string input, svg, dot;
    bool summary = false;
  };
  auto f = std::make_shared<Flags>();
  CLI::App* sub = app.add_subcommand("trace", "draw a measured run (a --trace JSON) as a timeline");
  sub->add_option("trace", f->input, "a trace written by run --trace")->required();
  sub->add_option("--svg", f->svg, "SVG output (runs Graphviz's neato -n2)");
  sub->add_option("--dot", f->dot, "write the timeline's DOT (fixed positions)");
  sub->add_flag("--summary", f->summary, "print the span, each lane's busy time and the time per op and kernel instead of the DOT");
  return [f] {
    const Trace trace = Trace::read_chrome_json(f->input);
    if (f->summary) std::cout << trace_summary(trace);
    const std::string dot = timeline_dot(trace);
    if (!f->dot.empty()) {
      std::ofstream out(f->dot);
      if (!out) fail_input("cannot write '" + f->dot + "'");
      out << dot;
    }
    if (f->svg.empty() && f->dot.empty() && !f->summary) std::cout << dot;
    if (!f->svg.empty()) {
      const std::string command = "neato -q -n2 -Tsvg -o '" + f->svg + "'";  // -q: nodes narrower than their label are fine
      FILE* pipe = popen(command.c_str(), "w");
      if (!pipe) fail_resource("cannot start '" + command + "'");
      std::fwrite(dot.data(), 1, dot.size(), pipe);
      const int status = pclose(pipe);
      if (status != 0)
        fail_resource("'" + command + "' failed (status " + std::to_string(status) +
                      "); is Graphviz installed (apt-get install graphviz)?");
    }
    return 0;
  };
}

}  // namespace moeflow::cli
