#pragma once
// Predicts a node's time from its op cost and a machine's two ceilings (the roofline):
// max(flops / rate, bytes / bandwidth) + a fixed overhead per launch (a kernel on the GPU, a task on
// the host). Planners order work by it, decide from its two parts whether overlapping branches pays
// (two branches bound by the same ceiling only share it; overheads hide behind each other), and
// `run` prints it next to each node's measured time, so a bad prediction is visible.
#include "graph/op_schema.hpp"

namespace moeflow {

struct MachineRates {
  double flops_per_s = 50e9;  // placeholder until measured
  double bytes_per_s = 10e9;
  double overhead_s = 5e-6;   // per launch: task dispatch, kernel launch and its tail
  // True where one kernel with enough work fills the whole machine (a GPU: blocks on every SM), so
  // concurrent kernels only split its ceilings and overlap saves launch latency, not work. False on
  // the host, where one node's oneTBB kernel rarely keeps every core busy to the end and a second
  // lane fills the gaps (measured: 5-7% faster layers at T=64 on 2 cores).
  bool kernels_fill_machine = false;
  // Bytes per second an exchange between ranks moves (NCCL between GPUs): the rate the planner
  // weighs communication at when it decides to leave SMs to it. Measured on 2 × H200 over NVLink
  // (all-to-all at 4096 tokens per rank, 2026-11-23): 96-108 GB/s in the layer.
  double link_bytes_per_s = 100e9;
  bool measured = false;
};

// The part of a node's time bound by a machine ceiling (flops or bytes), which concurrent nodes
// share, and the part that is latency (launches), which they can hide behind each other.
struct Prediction {
  double work_s = 0.0;
  double overhead_s = 0.0;
  double total_s() const { return work_s + overhead_s; }
};

Prediction predict(const Cost& cost, const MachineRates& rates, int launches = 1);
// A transfer between ranks: its bytes cross the link, at the slower of the link and the memory it
// is read from and written to (on a GPU the link, on the host its memory). Its time is its own
// lane's, not a ceiling that compute shares (contended_makespan leaves it out).
Prediction predict_transfer(const Cost& cost, const MachineRates& rates, int launches = 1);
double predict_seconds(const Cost& cost, const MachineRates& rates, int launches = 1);

// Measures this machine with `threads` oneTBB threads, medians of a few repetitions: one large
// single-threaded SGEMM per thread (flops) and a parallel 128 MiB copy (bytes read plus written).
// Takes about half a second.
MachineRates measure_cpu_rates(int threads);

}  // namespace moeflow
