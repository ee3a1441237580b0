#include "tools/model_flags.hpp"

#include "graph/error.hpp"
#include "ops/moe_layer.hpp"
#include "tools/number_checks.hpp"
#ifdef MOEFLOW_HAVE_CUDA
#include "kernels/cuda/device.hpp"
#endif

namespace moeflow::cli {

void ModelFlags::add_to(CLI::App& app) {
  std::string presets;
  for (const std::string& p : preset_names()) presets += (presets.empty() ? "" : ", ") + p;
  app.add_option("--model", model, "preset: " + presets + " (default " + kDefaultModel + ")");
  app.add_option("--hf-config", hf_config, "a Hugging Face config.json");
  app.add_option("--set", sets, "override a config field: field=value (repeatable)")->take_all();
  app.add_option("--scope", scope,
                 "layer (x -> output), experts (x, top-k ids, weights -> output), routed (layer without shared "
                 "experts) or shared (shared experts alone)")
      ->check(CLI::IsMember({"layer", "experts", "routed", "shared"}));
  auto* n = app.add_option("--chunks", chunks, "split the token dimension into N chunks (sub-DAGs the planner pipelines)")
                ->check(cli::Positive);
  auto* c = app.add_option("--chunk-tokens", chunk_tokens, "split the token dimension into chunks of C tokens")
                ->check(cli::Positive);
  n->excludes(c);
}

MoEConfig ModelFlags::config() const {
  if (!model.empty() && !hf_config.empty()) fail_input("give --model or --hf-config, not both");
  return load_config(!hf_config.empty() ? hf_config : model.empty() ? kDefaultModel : model, sets);
}

void PlanFlags::add_to(CLI::App& app) {
  app.add_option("--plan", plan, "serial | concurrent")->check(CLI::IsMember({"serial", "concurrent"}));
  app.add_option("--backend", backend, "cpu | cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--kernel", kernels, "force a kernel: op=name (repeatable)");
  app.add_option("--max-lanes", max_lanes, "most lanes the concurrent planner opens")->check(cli::Positive);
  app.add_flag("--no-fuse", no_fuse,
               "keep dispatch, experts and combine as three nodes (by default they become one fused_experts node "
               "where the backend has a kernel for it)");
  app.add_flag("--no-fold-shared", no_fold_shared,
               "keep the shared expert (and the reduce adding it) apart from the fused experts node (by default a "
               "kernel that streams both in one launch takes them), and the reduce apart from the combine (by "
               "default the combine adds the shared experts' outputs, and a layer without shared experts ends in "
               "its combine)");
  app.add_flag("--no-early-start", no_early_start,
               "every kernel waits for the previous one of its lane to finish (by default a kernel that can, such as "
               "the fused decode kernel after the one-launch gate, starts while it runs: programmatic dependent launch)");
  app.add_flag("--side-lanes-every-sm", side_lanes_every_sm,
               "every lane's kernels aim at every SM (by default a side lane whose work is at most a quarter of the "
               "plan's, such as the shared expert beside the routed experts, aims at half of them on a GPU, so the "
               "critical lane's next kernels find room)");
  app.add_flag("--no-packed-weights", no_packed_weights,
               "no kernel that reads a weight packed once at bind time (by default GEMM 1 with SwiGLU in its epilogue "
               "reads w13 interleaved, a copy as large as w13, and the one-token kernel w2 transposed, as large as w2; "
               "the CUDA session turns them off by itself where the copies would not fit in device memory)");
  app.add_flag("--no-reuse-memory", no_reuse_memory,
               "give every value its own workspace range (by default buffers share bytes where the plan proves it safe)");
  app.add_option("--tuning-cache", tuning_cache,
                 "kernel choices measured by `moeflow tune` (JSON): preferred where one matches the node, the device "
                 "and T within a factor of two");
  app.add_option("--tuning-device", tuning_device,
                 "the device the cached choices must have been measured on (default: this machine's GPU; 'any': every device's)");
}

static std::string this_machines_gpu() {
#ifdef MOEFLOW_HAVE_CUDA
  if (cuda::device_count() > 0) return cuda::device_name(0);
#endif
  return "";
}

PlanOptions PlanFlags::options() const {
  PlanOptions o;
  o.policy = parse_policy(plan);
#ifndef MOEFLOW_HAVE_CUDA
  if (backend == "cuda") fail_resource("--backend cuda: this build has no CUDA backend (configured without CUDA)");
#endif
  o.backend = backend == "cuda" ? Backend::cuda : Backend::cpu;
  o.max_lanes = max_lanes;
  o.reuse_memory = !no_reuse_memory;
  o.fuse = !no_fuse;
  o.fold_shared = !no_fold_shared;
  o.early_start = !no_early_start;
  o.share_side_lanes = !side_lanes_every_sm;
  o.packed_weights = !no_packed_weights;
  for (const std::string& k : kernels) {
    const auto eq = k.find('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 == k.size())
      fail_input("--kernel '" + k + "': expected op=name, e.g. experts=cpu.grouped_swiglu");
    o.forced_kernels[k.substr(0, eq)] = k.substr(eq + 1);
  }
  if (!tuning_cache.empty()) {
    o.tuning = std::make_shared<const TuningCache>(TuningCache::load(tuning_cache));
    o.tuning_device = tuning_device == "any" ? "" : !tuning_device.empty() ? tuning_device : this_machines_gpu();
  }
  return o;
}

void ParallelFlags::add_to(CLI::App& app, bool with_rank) {
  app.add_option("--dp", dp, "data-parallel ranks (tokens differ across them)")->check(cli::Positive);
  app.add_option("--tp", tp, "tensor-parallel ranks per DP rank (tokens replicated across them)")->check(cli::Positive);
  app.add_flag("--ep", ep, "split the routed experts over all ranks (otherwise every expert's I is split)");
  app.add_option("--dispatch", dispatch, "allgather | topk-allgather | alltoall (default allgather)")
      ->check(CLI::IsMember({"allgather", "topk-allgather", "alltoall"}));
  app.add_option("--tp-dispatch", tp_dispatch,
                 "which TP rank dispatches which rows: slices (sequence-parallel) or leader (TP rank 0)")
      ->check(CLI::IsMember({"slices", "leader"}));
  if (with_rank) app.add_option("--rank", rank, "the rank whose graph to show (0 .. dp*tp-1)")->check(cli::NonNegative);
}

ParallelLayout ParallelFlags::layout(const std::vector<int64_t>& tokens, const MoEConfig& config, int world_size) const {
  ParallelLayout l;
  l.dp = dp;
  l.tp = tp;
  l.ep = ep;
  l.dispatch = parse_dispatch(dispatch.empty() ? "allgather" : dispatch);
  l.tp_dispatch = parse_tp_dispatch(tp_dispatch);
  l.tokens = tokens;
  try {
    if (tokens.empty()) fail_input("--tokens: give one count, or one per DP rank");
    check_layout(l, config, world_size < 0 ? l.world() : world_size);
    if (rank >= l.world())
      fail_input("--rank " + std::to_string(rank) + " outside the " + std::to_string(l.world()) + " ranks of --dp x --tp");
  } catch (Error& e) {
    throw e.raised_on_every_rank();
  }
  return l;
}

std::shared_ptr<const Graph> build_graph(const MoEConfig& config, const std::string& scope, int64_t max_tokens,
                                        Backend backend, const ChunkOptions& chunking) {
  // The CPU computes in f32; the GPU stores bf16 and accumulates in f32.
  LayerOptions o{.max_tokens = max_tokens, .dtype = backend == Backend::cuda ? DType::bf16 : DType::f32};
  Graph g = build_scope_graph(config, scope, o);
  if (chunking.chunks > 0 || chunking.chunk_tokens > 0) g = chunk_tokens(g, chunking);
  return std::make_shared<const Graph>(std::move(g));
}

void check_tokens(int64_t tokens, int64_t max_tokens) {
  if (tokens <= 0) fail_input("--tokens = " + std::to_string(tokens) + " must be > 0");
  if (max_tokens <= 0) fail_input("--max-tokens = " + std::to_string(max_tokens) + " must be > 0");
  if (tokens > max_tokens)
    fail_input("--tokens = " + std::to_string(tokens) + " exceeds --max-tokens = " + std::to_string(max_tokens));
}

}  // namespace moeflow::cli
