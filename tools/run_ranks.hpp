#pragma once
// `moeflow run` under mpirun with a parallel layout: this rank's lowered graph, run and timed in
// step with the other ranks, checked against the one-process reference of its own tokens; rank 0
// prints every rank's figures, and the traces merge into one view (one process row per rank).
#include <cstdint>
#include <string>

#include "graph/chunk.hpp"
#include "ops/model_config.hpp"
#include "ops/parallel_layout.hpp"
#include "scheduler/plan.hpp"

namespace moeflow::cli {

struct RankRunRequest {
  MoEConfig config;
  std::string scope = "layer";
  ChunkOptions chunking;
  PlanOptions plan;
  std::string plan_name;
  ParallelLayout layout;  // checked against the world already
  int threads = 1;
  uint64_t seed = 0;
  std::string trace;  // merged trace (rank 0 writes it)
  bool json = false;
  bool check = false;
  int warmup = 1;
  int runs = 5;  // the same on every rank: every run enters the same collectives
  int input_sets = 1;
};

// Returns the exit status, the same on every rank (1 when any rank's check failed).
int run_ranks(const RankRunRequest& request);

// `moeflow bench` under mpirun: models × tokens per rank × dispatch kinds × chunks × plans, each
// row the layer time (slowest rank), dispatch and combine time and the bytes this rank sent for
// them, next to the transport's own all-to-all of the same bytes in the same run; with a serial and
// a concurrent row of one point, the share of the communication the concurrent plan hid.
struct RankBenchRequest {
  RankRunRequest base;  // plan options, layout (dp, tp, ep, tp dispatch), seed, runs, threads
  std::vector<std::string> models;
  std::vector<std::string> sets;
  std::vector<int64_t> tokens;  // per rank, in turn
  std::vector<DispatchKind> kinds;
  std::vector<int> chunks;
  std::vector<std::string> plans;  // serial, concurrent
  std::string json;                // rows, one JSON object per line (rank 0)
};
int bench_ranks(const RankBenchRequest& request);

}  // namespace moeflow::cli
