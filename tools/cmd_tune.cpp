// `moeflow tune`: measures every experts kernel, and every fused kernel of the dispatch → experts →
// combine chain, that can run each model at each T (the experts path, best of serial and CUDA-graph
// replay), writes the fastest into a tuning cache that plans read (--tuning-cache: a fused kernel
// there means fuse, an experts kernel means keep the chain), and says how far the planner's own
// choice is from it.
#include <iomanip>
#include <iostream>
#include <map>

#ifdef MOEFLOW_HAVE_CUDA
#include "bench/cuda/cuda_bench.hpp"
#include "kernels/cuda/device.hpp"
#endif
#include "graph/error.hpp"
#include "ops/model_config.hpp"
#include "ops/moe_layer.hpp"
#include "scheduler/plan.hpp"
#include "scheduler/tuning_cache.hpp"
#include "tools/commands.hpp"
#include "tools/number_checks.hpp"

namespace moeflow::cli {

#ifdef MOEFLOW_HAVE_CUDA
namespace {

// The kernel the planner runs the experts with, untuned: the fused node's where it fuses the chain.
std::string planned_experts_kernel(const std::shared_ptr<const Graph>& graph) {
  PlanOptions po;
  po.backend = Backend::cuda;
  const Plan plan = make_plan(graph, po);
  for (const PlanStep& step : plan.steps) {
    const std::string& kind = plan.graph->node(step.node).op->kind();
    if (kind == "experts" || kind == "fused_experts") return step.kernel->name;
  }
  fail_input("tune: the experts graph of " + graph->name() + " has no experts node");
}

}  // namespace
#endif

Command add_tune_command(CLI::App& app) {
  struct Flags {
    std::vector<std::string> models{"qwen1.5-moe-a2.7b", "qwen3-30b-a3b", "mixtral-8x7b", "deepseek-v3"};
    std::vector<std::string> sets;
    std::vector<int64_t> tokens{1, 8, 32, 128, 512, 2048, 8192};
    std::vector<std::string> kernels;
    std::string cache = "moeflow_tuning.json";
    int runs = 20;
    int device = 0;
  };
  auto f = std::make_shared<Flags>();
  CLI::App* sub = app.add_subcommand("tune", "measure the experts kernels per model and T; write the fastest to a tuning cache");
  sub->add_option("--models", f->models, "presets or config.json paths, comma-separated")->delimiter(',');
  sub->add_option("--set", f->sets, "override a field of every model: field=value (repeatable)");
  sub->add_option("--tokens", f->tokens, "T values, comma-separated")->delimiter(',')->check(cli::Positive);
  sub->add_option("--kernels", f->kernels, "candidate experts kernels (default: every CUDA experts kernel)")->delimiter(',');
  sub->add_option("--cache", f->cache, "the tuning cache to update (JSON; created if missing)");
  sub->add_option("--runs", f->runs, "timed runs per candidate")->check(cli::Positive);
  sub->add_option("--device", f->device, "CUDA device")->check(cli::NonNegative);
  return [f]() -> int {
#ifdef MOEFLOW_HAVE_CUDA
    if (cuda::device_count() == 0) fail_resource("tune: no CUDA device here");
    TuningCache cache = TuningCache::load(f->cache);  // refuses a malformed file before measuring
    std::vector<std::string> kernels = f->kernels;
    if (kernels.empty())
      for (const char* op : {"experts", "fused_experts"})
        for (const KernelEntry* k : KernelRegistry::builtin().candidates(op, Backend::cuda)) kernels.push_back(k->name);
    CudaBenchOptions o;
    o.sets = f->sets;
    o.plans = {"serial", "graph"};
    o.scopes = {"experts"};
    o.experts_kernels = kernels;
    o.min_runs = f->runs;
    o.device = f->device;
    const std::string device = cuda::device_name(f->device);
    std::cout << "moeflow tune on " << device << ": model, T, fastest kernel, its time, the planner's own choice "
              << "(untuned, fusion included) and its time against the fastest\n";
    for (const std::string& model : f->models) {
      const MoEConfig config = load_config(model, f->sets);
      for (int64_t T : f->tokens) {
        o.models = {model};
        o.tokens = {T};
        std::map<std::string, double> best_of;  // kernel -> fastest plan's median us
        for (const nlohmann::json& row : run_cuda_bench(o, std::clog)) {
          const std::string k = row["experts_kernel"].get<std::string>();
          const double us = row["time_us"].get<double>();
          if (!best_of.count(k) || us < best_of[k]) best_of[k] = us;
        }
        if (best_of.empty()) fail_input("tune: no experts kernel could run " + model + " at T=" + std::to_string(T));
        auto fastest = best_of.begin();
        for (auto it = best_of.begin(); it != best_of.end(); ++it)
          if (it->second < fastest->second) fastest = it;
        const auto graph = std::make_shared<const Graph>(build_experts_graph(config, {.max_tokens = T, .dtype = DType::bf16}));
        const Node* experts = nullptr;
        for (const Node& n : graph->nodes())
          if (n.op->kind() == "experts") experts = &n;
        cache.record({device, tuning_signature(*graph, *experts), T, fastest->first, fastest->second});
        const std::string heuristic = planned_experts_kernel(graph);
        std::cout << "  " << std::left << std::setw(20) << model << std::setw(7) << T << std::setw(34) << fastest->first
                  << std::fixed << std::setprecision(1) << std::setw(11) << fastest->second << std::setw(34) << heuristic
                  << (best_of.count(heuristic) ? std::to_string(best_of[heuristic] / fastest->second).substr(0, 4) + "x"
                                               : std::string("not measured"))
                  << std::endl;
      }
    }
    cache.save(f->cache);
    std::cout << "written: " << f->cache << " (" << cache.entries().size() << " entries)\n";
    return 0;
#else
    fail_resource("tune: this build has no CUDA backend (it measures GPU kernels)");
#endif
  };
}

}  // namespace moeflow::cli
