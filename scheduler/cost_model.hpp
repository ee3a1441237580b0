#pragma once
// Predicts a node's time from its op cost and a machine's two ceilings (the roofline):
// max(flops / rate, bytes / bandwidth) + a fixed per-node overhead. Planners order work by it and
// `run` prints it next to each node's measured time, so a bad prediction is visible.
#include "graph/op_schema.hpp"

namespace moeflow {

struct MachineRates {
  double flops_per_s = 50e9;  // placeholder until measured
  double bytes_per_s = 10e9;
  double overhead_s = 5e-6;   // per node: task dispatch, kernel launch
  bool measured = false;
};

double predict_seconds(const Cost& cost, const MachineRates& rates);

// Measures this machine with `threads` oneTBB threads, medians of a few repetitions: one large
// single-threaded SGEMM per thread (flops) and a parallel 128 MiB copy (bytes read plus written).
// Takes about half a second.
MachineRates measure_cpu_rates(int threads);

}  // namespace moeflow
