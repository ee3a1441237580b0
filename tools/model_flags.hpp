#pragma once
// Flags shared by run, dot, plan and bench: which model, which graph, which plan.
#include <CLI/CLI.hpp>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "graph/chunk.hpp"
#include "ops/model_config.hpp"
#include "ops/parallel_layout.hpp"
#include "scheduler/plan.hpp"

namespace moeflow::cli {

struct ModelFlags {
  std::string model;
  std::string hf_config;
  std::vector<std::string> sets;
  std::string scope = "layer";  // layer | experts
  int chunks = 0;               // --chunks N (the chunk pass, graph/chunk.hpp); 0: none
  int64_t chunk_tokens = 0;     // --chunk-tokens C

  void add_to(CLI::App& app);
  ChunkOptions chunking() const { return {chunks, chunk_tokens}; }
  // Exactly one of --model / --hf-config (a default preset when neither is given).
  MoEConfig config() const;
};

struct PlanFlags {
  std::string plan = "serial";
  std::string backend = "cpu";
  std::vector<std::string> kernels;  // op=name
  int max_lanes = kDefaultMaxLanes;
  bool no_reuse_memory = false;
  bool no_fuse = false;
  bool no_fold_shared = false;
  bool no_early_start = false;
  bool side_lanes_every_sm = false;
  bool no_packed_weights = false;
  std::string tuning_cache;   // `moeflow tune`'s file
  std::string tuning_device;  // the device its entries must match (default: this machine's GPU, if any)

  void add_to(CLI::App& app);
  PlanOptions options() const;
};

// --dp, --tp, --ep, --dispatch, --tp-dispatch (DESIGN.md, "Parallel layout"); with `with_rank`,
// --rank too (plan and dot show one rank's graph without mpirun).
struct ParallelFlags {
  int dp = 1;
  int tp = 1;
  bool ep = false;
  std::string dispatch;  // empty: allgather
  std::string tp_dispatch = "slices";
  int rank = 0;

  void add_to(CLI::App& app, bool with_rank);
  // Whether any of the flags asks for a multi-rank layout.
  bool requested() const { return dp != 1 || tp != 1 || ep || !dispatch.empty(); }
  // The layout for these token counts (one for every DP rank, or one per DP rank), checked against
  // the model and a world of `world_size` ranks (-1: dp × tp). Errors are raised alike on every rank.
  ParallelLayout layout(const std::vector<int64_t>& tokens, const MoEConfig& config, int world_size = -1) const;
};

// The graph of `scope` for a config at a maximum T, split into chunks when `chunking` asks for it.
std::shared_ptr<const Graph> build_graph(const MoEConfig& config, const std::string& scope, int64_t max_tokens,
                                        Backend backend = Backend::cpu, const ChunkOptions& chunking = {});

// Refuses T <= 0 and T above the maximum, naming both.
void check_tokens(int64_t tokens, int64_t max_tokens);

inline constexpr const char* kDefaultModel = "qwen1.5-moe-a2.7b";

}  // namespace moeflow::cli
