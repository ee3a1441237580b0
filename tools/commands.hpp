#pragma once
// The subcommands of `moeflow`; each registers its flags and returns the exit status of DESIGN.md.
#include <CLI/CLI.hpp>
#include <functional>

namespace moeflow::cli {

using Command = std::function<int()>;

Command add_run_command(CLI::App& app);
Command add_dot_command(CLI::App& app);
Command add_plan_command(CLI::App& app);
Command add_bench_command(CLI::App& app);
Command add_trace_command(CLI::App& app);
Command add_tune_command(CLI::App& app);

}  // namespace moeflow::cli
