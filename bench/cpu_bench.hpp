#pragma once
// `moeflow bench --backend cpu`: models × T × plans × scopes, each row timed (warm-up, median of
// repeated runs) next to the roofline floor on this machine's measured rates, as JSON rows.
#include <functional>
#include <nlohmann/json.hpp>
#include <ostream>
#include <string>
#include <vector>

#include "scheduler/plan.hpp"

namespace moeflow {

struct BenchOptions {
  std::vector<std::string> models;
  std::vector<std::string> sets;  // --set overrides applied to every model
  std::vector<int64_t> tokens;
  std::vector<Policy> plans;
  std::vector<std::string> scopes;  // "experts", "layer"
  std::vector<int> chunks{1};       // chunk counts (graph/chunk.hpp) measured in turn
  int max_lanes = kDefaultMaxLanes;  // most lanes the concurrent planner opens
  int threads = 1;
  uint64_t seed = 0;
  int warmup = 1;
  int min_runs = 10;
  double budget_s = 1.0;
  int input_sets = 8;  // rotated run by run (DESIGN.md: >= 8, so caches do not hold the touched weights)
};


// Runs the sweep, printing one table line per row to `log`; returns the rows. A model that does not
// fit in memory is reported in `log` and skipped.
// `on_row` (optional) sees each row as soon as it is measured.
std::vector<nlohmann::json> run_cpu_bench(const BenchOptions& options, std::ostream& log,
                                          const std::function<void(const nlohmann::json&)>& on_row = {});

}  // namespace moeflow
