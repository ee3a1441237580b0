#pragma once
// `moeflow bench --backend cuda`: presets × T × plans (serial, concurrent, concurrent + CUDA graph) ×
// experts kernels × scopes, each row timed with CUDA events (warm-up, median of >= 50 runs rotating
// over >= 8 input sets) next to the floor of DESIGN.md on the device's measured ceilings.
#include <functional>
#include <nlohmann/json.hpp>
#include <ostream>
#include <string>
#include <vector>

#include "scheduler/plan.hpp"

namespace moeflow {

struct CudaBenchOptions {
  std::vector<std::string> models;
  std::vector<std::string> sets;
  std::vector<int64_t> tokens;
  std::vector<std::string> plans;            // serial | concurrent | graph (concurrent + CUDA graph)
  std::vector<std::string> experts_kernels;  // empty: the planner's choice; else each forced in turn
  std::vector<std::string> scopes;
  std::vector<int> chunks{1};                // chunk counts (graph/chunk.hpp) measured in turn
  int max_lanes = kDefaultMaxLanes;  // most lanes the concurrent planner opens
  bool share_side_lanes = true;      // PlanOptions::share_side_lanes (off: --side-lanes-every-sm)
  bool fold_shared = true;           // PlanOptions::fold_shared (off: --no-fold-shared)
  uint64_t seed = 0;
  int warmup = 3;
  int min_runs = 50;
  int input_sets = 8;
  int device = 0;
};

// `on_row` (optional) sees each row as soon as it is measured.
std::vector<nlohmann::json> run_cuda_bench(const CudaBenchOptions& options, std::ostream& log,
                                          const std::function<void(const nlohmann::json&)>& on_row = {});

}  // namespace moeflow
