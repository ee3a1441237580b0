#pragma once
// Everything one CPU run of a graph needs, in the order a user needs it: the plan, a memory check
// before anything large is allocated, random weights and inputs from the seed, the executor, and
// then runs, timings, a trace and the reference check. `moeflow run`, `moeflow bench`, the tests
// and the examples all go through it.
#include <functional>
#include <memory>

#include "bench/measure.hpp"
#include "bench/reference_run.hpp"
#include "scheduler/cpu_executor.hpp"

namespace moeflow {

struct SessionOptions {
  PlanOptions plan;
  int threads = 1;
  uint64_t seed = 0;
  // Fills the weights instead of the random generator (a checkpoint): called with the plan's graph
  // and where each weight's fp32 data goes.
  std::function<void(const Graph&, const std::function<float*(ValueId)>&)> load_weights;
  // This rank's communicators, for a graph lowered for several ranks (ops/lower_parallel.hpp).
  const CommGroups* comm = nullptr;
};

class CpuSession {
 public:
  // Refuses (Error resource) before allocating when weights + inputs + workspace exceed host memory.
  // `share_weights` (a session of the same graph under another plan) lends its weights instead of
  // drawing them again: the weights' layout depends on the graph only.
  CpuSession(std::shared_ptr<const Graph> graph, const SessionOptions& options,
             const CpuSession* share_weights = nullptr);

  // Draws `input_sets` sets of inputs for T tokens (from the seed; the same T gives the same inputs)
  // and selects set 0. Benchmarks rotate over several sets so that caches do not keep the weights
  // of the experts one routing touches from run to run.
  void set_tokens(int64_t tokens, int input_sets = 1);
  void use_input_set(int set);
  int input_sets() const { return static_cast<int>(inputs_.size()); }
  int64_t tokens() const { return tokens_; }
  // One run on the selected input set; returns its wall time in seconds.
  double run(Trace* trace = nullptr);
  // Runs the reference on the last run's inputs and compares with its output.
  CheckReport check(double tolerance) const;
  // Compares another engine's output of this session's tokens (a rank of a multi-rank run) with the
  // reference on this session's inputs; its routing follows this session's last run.
  CheckReport check_against(const float* output, double tolerance) const;
  // The roofline floor, averaged over the input sets (each routes to its own experts). For a whole
  // layer the routing is the gate's, so each set runs once more (untimed) to produce it.
  Floor floor(const MachineRates& rates);

  const Plan& plan() const { return plan_; }
  const Graph& graph() const { return *plan_.graph; }
  const float* output() const { return executor_->output(); }
  const void* value_data(ValueId v) const;
  // A per-run input's buffer, to overwrite what set_tokens drew (tests build routing by hand).
  void* input_data(ValueId v) { return inputs_.at(static_cast<std::size_t>(set_))->data(v); }
  // Bytes the session holds: weights + inputs + workspace.
  static int64_t bytes_needed(const Plan& plan);

 private:
  Plan plan_;
  SessionOptions options_;
  std::shared_ptr<HostArena> weights_;
  std::vector<std::unique_ptr<HostArena>> inputs_;
  int set_ = 0;
  std::unique_ptr<CpuExecutor> executor_;
  int64_t tokens_ = 0;
};

}  // namespace moeflow
