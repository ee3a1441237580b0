// `moeflow bench`: the benchmark sweep (bench/cpu_bench.hpp) from the command line.
#include <fstream>
#include <functional>
#include <iostream>
#include <tbb/info.h>

#include "bench/chunk_ratios.hpp"
#include "bench/cpu_bench.hpp"
#include "bench/pass_summary.hpp"
#ifdef MOEFLOW_HAVE_CUDA
#include "bench/cuda/cuda_bench.hpp"
#include "kernels/cuda/device.hpp"
#endif
#include "graph/error.hpp"
#include "kernels/comm/communicator.hpp"
#include "kernels/comm/nccl_communicator.hpp"
#include "tools/commands.hpp"
#include "tools/model_flags.hpp"
#include "tools/number_checks.hpp"
#include "tools/run_ranks.hpp"

namespace moeflow::cli {

Command add_bench_command(CLI::App& app) {
  struct Flags {
    std::vector<std::string> models{"qwen1.5-moe-a2.7b", "qwen3-30b-a3b"};
    std::vector<std::string> sets;
    std::vector<int64_t> tokens{1, 8, 64};
    std::vector<std::string> plans{"serial", "concurrent"};
    std::vector<std::string> experts_kernels;
    int input_sets = 8;
    std::vector<std::string> scope{"both"};
    std::vector<int> chunks{1};
    std::string backend = "cpu";
    int max_lanes = kDefaultMaxLanes;
    bool side_lanes_every_sm = false;
    bool no_fold_shared = false;
    int threads = 0;
    uint64_t seed = 0;
    int min_runs = 10;
    double budget_s = 1.0;
    int passes = 1;
    std::string json;
    ParallelFlags parallel;
    std::vector<std::string> dispatches;
  };
  auto f = std::make_shared<Flags>();
  CLI::App* sub = app.add_subcommand("bench", "time models x T x plans x scopes against the roofline floor");
  sub->add_option("--models", f->models, "presets or config.json paths, comma-separated")->delimiter(',');
  sub->add_option("--set", f->sets, "override a field of every model: field=value (repeatable)");
  sub->add_option("--tokens", f->tokens, "T values, comma-separated")->delimiter(',');
  sub->add_option("--plans", f->plans, "serial,concurrent (and, backend cuda: graph = concurrent + a CUDA graph per T; graph-any = concurrent + one CUDA graph for every T up to the largest --tokens, replayed at each)")
      ->delimiter(',')
      ->check(CLI::IsMember({"serial", "concurrent", "graph", "graph-any"}));
  sub->add_option("--experts-kernels", f->experts_kernels, "experts kernels to force in turn, comma-separated (cuda); 'auto' is the planner's choice (fusion included), a fused kernel (cuda.fused_decode) is forced on the fused node")
      ->delimiter(',');
  sub->add_option("--input-sets", f->input_sets, "input sets the runs rotate over")->check(cli::Positive);
  sub->add_option("--scope", f->scope, "experts | layer | both (= experts,layer) | routed | shared, comma-separated")
      ->delimiter(',')
      ->check(CLI::IsMember({"experts", "layer", "both", "routed", "shared"}));
  sub->add_option("--chunks", f->chunks, "chunk counts to measure in turn, comma-separated (1 = unchunked)")
      ->delimiter(',')
      ->check(cli::Positive);
  sub->add_option("--backend", f->backend, "cpu | cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  sub->add_option("--max-lanes", f->max_lanes, "most lanes the concurrent planner opens (1: the concurrent plan keeps one compute lane, and with ranks its communication lane)")
      ->check(cli::Positive);
  sub->add_flag("--side-lanes-every-sm", f->side_lanes_every_sm,
                "every lane's kernels aim at every SM (cuda; by default a side lane whose work is at most a quarter "
                "of the plan's aims at half of them)");
  sub->add_flag("--no-fold-shared", f->no_fold_shared,
                "keep the shared expert and the reduce adding it apart, and a layer's reduce apart from its "
                "combine (cuda; as `run --no-fold-shared`)");
  sub->add_option("--threads", f->threads, "oneTBB threads (default: every core)")->check(cli::Positive);
  sub->add_option("--seed", f->seed, "seed of the random weights and inputs")->check(cli::NonNegative);
  sub->add_option("--runs", f->min_runs, "timed runs per row at least")->check(cli::Positive);
  sub->add_option("--budget", f->budget_s, "seconds of timed runs per row to aim for")->check(cli::NonNegative);
  sub->add_option("--passes", f->passes, "run the whole sweep this many times over and summarise each point's median over the passes and their spread (drift of the machine then shows as spread, not as a bias against the rows measured last)")
      ->check(cli::Positive);
  sub->add_option("--json", f->json, "write the rows, one JSON object per line, as they are measured (with their pass)");
  f->parallel.add_to(*sub, false);
  sub->add_option("--dispatches", f->dispatches, "dispatch kinds to measure in turn under mpirun (default: all three)")
      ->delimiter(',')
      ->check(CLI::IsMember({"allgather", "topk-allgather", "alltoall"}));
  return [f] {
    if (f->parallel.requested() || !f->dispatches.empty()) {
      RankBenchRequest b;
      b.models = f->models;
      b.sets = f->sets;
      b.tokens = f->tokens;
      for (const std::string& k : f->dispatches.empty() ? std::vector<std::string>{"allgather", "topk-allgather", "alltoall"}
                                                         : f->dispatches)
        b.kinds.push_back(parse_dispatch(k));
      b.chunks = f->chunks;
      for (const std::string& p : f->plans)
        if (p == "graph" || p == "graph-any")
          fail_input("bench with ranks: plan '" + p + "' is refused (the exchanges synchronise with the host)");
      b.plans = f->plans;
      b.json = f->json;
      PlanFlags plan;
      plan.backend = f->backend;
      plan.max_lanes = f->max_lanes;
      plan.side_lanes_every_sm = f->side_lanes_every_sm;
      plan.no_fold_shared = f->no_fold_shared;
      b.base.plan = plan.options();
      if (b.base.plan.backend == Backend::cuda && !comm::have_nccl())
        fail_resource("bench --backend cuda with ranks needs the NCCL transport, and this build has none");
      if (!comm::mpi_started()) fail_input("bench --dp/--tp/--ep: start moeflow under mpirun");
      if (f->passes != 1) fail_input("bench with ranks: --passes is not supported (each point already runs on every rank)");
      b.base.layout = f->parallel.layout({f->tokens.front()}, load_config(f->models.front(), f->sets), comm::mpi_world_size());
      b.base.threads = f->threads > 0 ? f->threads : std::max(1, tbb::info::default_concurrency() / b.base.layout.world());
      b.base.seed = f->seed;
      b.base.runs = f->min_runs;
      b.base.warmup = 2;
      b.base.input_sets = std::max(1, std::min(f->input_sets, 4));
      return bench_ranks(b);
    }
    std::vector<std::string> scopes;
    for (const std::string& sc : f->scope) {
      if (sc == "both") scopes.insert(scopes.end(), {"experts", "layer"});
      else scopes.push_back(sc);
    }
    std::ofstream json_out;
    if (!f->json.empty()) {
      json_out.open(f->json);
      if (!json_out) fail_input("--json: cannot write '" + f->json + "'");
    }
    int pass = 0;
    auto on_row = [&](const nlohmann::json& row) {
      if (!json_out.is_open()) return;
      nlohmann::json with_pass = row;
      if (f->passes > 1) with_pass["pass"] = pass;
      json_out << with_pass.dump() << std::endl;
    };
    // The sweep, set up once; --passes runs it that many times over.
    std::function<std::vector<nlohmann::json>()> sweep;
    if (f->backend == "cuda") {
#ifdef MOEFLOW_HAVE_CUDA
      CudaBenchOptions o;
      o.models = f->models;
      o.sets = f->sets;
      o.tokens = f->tokens;
      o.plans = f->plans;
      o.experts_kernels = f->experts_kernels;
      o.scopes = scopes;
      o.chunks = f->chunks;
      o.max_lanes = f->max_lanes;
      o.share_side_lanes = !f->side_lanes_every_sm;
      o.fold_shared = !f->no_fold_shared;
      o.seed = f->seed;
      o.min_runs = std::max(f->min_runs, 50);
      o.input_sets = std::max(f->input_sets, 8);
      if (cuda::device_count() == 0) fail_resource("bench --backend cuda: no CUDA device here");
      sweep = [o, &on_row] { return run_cuda_bench(o, std::cout, on_row); };
#else
      fail_resource("bench --backend cuda: this build has no CUDA backend");
#endif
    } else {
      for (const std::string& p : f->plans)
        if (p == "graph" || p == "graph-any") fail_input("bench: plan '" + p + "' (CUDA graph replay) needs --backend cuda");
      BenchOptions o;
      o.input_sets = f->input_sets;
      o.models = f->models;
      o.sets = f->sets;
      o.tokens = f->tokens;
      for (const std::string& p : f->plans) o.plans.push_back(parse_policy(p));
      o.scopes = scopes;
      o.chunks = f->chunks;
      o.max_lanes = f->max_lanes;
      o.threads = f->threads > 0 ? f->threads : tbb::info::default_concurrency();
      o.seed = f->seed;
      o.min_runs = f->min_runs;
      o.budget_s = f->budget_s;
      sweep = [o, &on_row] { return run_cpu_bench(o, std::cout, on_row); };
    }
    std::vector<std::vector<nlohmann::json>> passes;
    for (pass = 0; pass < f->passes; ++pass) {
      if (f->passes > 1) std::cout << "== pass " << pass + 1 << " of " << f->passes << "\n";
      passes.push_back(sweep());
    }
    if (f->passes > 1) {
      std::vector<nlohmann::json> all_rows;
      for (const auto& rows : passes) all_rows.insert(all_rows.end(), rows.begin(), rows.end());
      print_pass_summary(summarize_passes(all_rows), std::cout);
    }
    print_chunk_ratios(chunk_ratios(passes), std::cout);
    return 0;
  };
}

}  // namespace moeflow::cli
