// moeflow: build, plan, run, check, time and draw MoE layers (DESIGN.md, "The command line").
// Exit status: 0 ok; 1 a check failed; 2 bad input; 3 resources.
#include <iostream>
#include <map>
#include <new>

#include "graph/error.hpp"
#include "tools/commands.hpp"

int main(int argc, char** argv) {
  CLI::App app{"moeflow: Mixture-of-Experts layers as dataflow graphs"};
  app.require_subcommand(1);
  const std::map<std::string, moeflow::cli::Command> commands{
      {"run", moeflow::cli::add_run_command(app)},     {"dot", moeflow::cli::add_dot_command(app)},
      {"plan", moeflow::cli::add_plan_command(app)},   {"bench", moeflow::cli::add_bench_command(app)},
      {"trace", moeflow::cli::add_trace_command(app)},
  };
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::cerr << "moeflow: error: " << e.what() << " (see --help)\n";  // one line, like every other error
    return 2;
  }
  try {
    return commands.at(app.get_subcommands().front()->get_name())();
  } catch (const moeflow::Error& e) {
    std::cerr << "moeflow: error: " << e.what() << "\n";
    return e.exit_status();
  } catch (const std::bad_alloc&) {
    std::cerr << "moeflow: error: out of host memory\n";
    return 3;
  } catch (const std::exception& e) {
    std::cerr << "moeflow: error: " << e.what() << "\n";
    return 2;
  }
}
