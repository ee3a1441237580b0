// `moeflow dot` and `moeflow plan`: dumps that never allocate weights, so any preset plans anywhere.
#include <fstream>
#include <iostream>

#include "graph/dot.hpp"
#include "graph/error.hpp"
#include "tools/commands.hpp"
#include "tools/model_flags.hpp"

namespace moeflow::cli {

namespace {

// Writes `text` to `path`, or to stdout when the path is empty or "-".
void write_output(const std::string& path, const std::string& text) {
  if (path.empty() || path == "-") {
    std::cout << text;
    return;
  }
  std::ofstream f(path);
  if (!f) fail_input("cannot write '" + path + "'");
  f << text;
  if (!f) fail_resource("writing '" + path + "' failed");
}

struct GraphFlags {
  ModelFlags model;
  int64_t max_tokens = 4096;
  std::string output;
};

}  // namespace

Command add_dot_command(CLI::App& app) {
  auto flags = std::make_shared<GraphFlags>();
  CLI::App* sub = app.add_subcommand("dot", "write the dataflow graph as Graphviz DOT");
  flags->model.add_to(*sub);
  sub->add_option("--max-tokens,--tokens", flags->max_tokens, "maximum tokens the graph is built for");
  sub->add_option("-o,--output", flags->output, "output file (default stdout)");
  return [flags] {
    check_tokens(flags->max_tokens, flags->max_tokens);
    auto g = build_graph(flags->model.config(), flags->model.scope, flags->max_tokens, Backend::cpu, flags->model.chunking());
    write_output(flags->output, graph_dot(*g));
    return 0;
  };
}

Command add_plan_command(CLI::App& app) {
  struct Flags : GraphFlags {
    PlanFlags plan;
    bool memory = false;
  };
  auto flags = std::make_shared<Flags>();
  CLI::App* sub = app.add_subcommand("plan", "write the schedule (lanes, order, waits, kernels, buffers) as DOT");
  flags->model.add_to(*sub);
  flags->plan.add_to(*sub);
  sub->add_option("--max-tokens,--tokens", flags->max_tokens, "maximum tokens the plan serves");
  sub->add_option("-o,--output", flags->output, "DOT output file (default: none; the summary goes to stdout)");
  sub->add_flag("--memory", flags->memory, "print the buffer table and the peak workspace");
  return [flags] {
    check_tokens(flags->max_tokens, flags->max_tokens);
    const PlanOptions options = flags->plan.options();
    auto g = build_graph(flags->model.config(), flags->model.scope, flags->max_tokens, options.backend, flags->model.chunking());
    // Nominal machine rates (not measured) keep `plan` instant and its output reproducible.
    const Plan plan = make_plan(g, options);
    plan.write_summary(std::cout);
    if (flags->memory) plan.write_memory(std::cout);
    if (!flags->output.empty()) {
      std::ostringstream dot;
      plan.write_dot(dot);
      write_output(flags->output, dot.str());
    }
    return 0;
  };
}

}  // namespace moeflow::cli
