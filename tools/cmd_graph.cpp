// `moeflow dot` and `moeflow plan`: dumps that never allocate weights, so any preset plans anywhere.
#include <fstream>
#include <iostream>

#include "graph/dot.hpp"
#include "bench/multi_rank.hpp"
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
  ParallelFlags parallel;
  std::vector<int64_t> tokens{4096};  // the maximum; with a parallel layout, one per DP rank
  std::string output;

  void add_to(CLI::App& sub) {
    model.add_to(sub);
    parallel.add_to(sub, true);
    sub.add_option("--max-tokens,--tokens", tokens,
                   "maximum tokens the graph is built for (with --dp: one count, or one per DP rank: 5,9)")
        ->delimiter(',');
  }

  // The graph to show: one process's, or with --dp/--tp/--ep/--dispatch one rank's of the layout.
  std::shared_ptr<const Graph> graph(Backend backend) const {
    const MoEConfig config = model.config();
    if (!parallel.requested()) {
      if (tokens.size() != 1) fail_input("--tokens: one count per DP rank needs --dp; otherwise give one");
      check_tokens(tokens[0], tokens[0]);
      return build_graph(config, model.scope, tokens[0], backend, model.chunking());
    }
    const ParallelLayout layout = parallel.layout(tokens, config);
    return rank_graph(config, layout, parallel.rank,
                      {.scope = model.scope, .chunks = model.chunking().chunks, .chunk_tokens = model.chunking().chunk_tokens,
                       .dtype = backend == Backend::cuda ? DType::bf16 : DType::f32});
  }
};

}  // namespace

Command add_dot_command(CLI::App& app) {
  auto flags = std::make_shared<GraphFlags>();
  CLI::App* sub = app.add_subcommand("dot", "write the dataflow graph as Graphviz DOT");
  flags->add_to(*sub);
  sub->add_option("-o,--output", flags->output, "output file (default stdout)");
  return [flags] {
    write_output(flags->output, graph_dot(*flags->graph(Backend::cpu)));
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
  flags->add_to(*sub);
  flags->plan.add_to(*sub);
  sub->add_option("-o,--output", flags->output, "DOT output file (default: none; the summary goes to stdout)");
  sub->add_flag("--memory", flags->memory, "print the buffer table and the peak workspace");
  return [flags] {
    const PlanOptions options = flags->plan.options();
    auto g = flags->graph(options.backend);
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
