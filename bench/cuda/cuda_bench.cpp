#include "bench/cuda/cuda_bench.hpp"

#include <algorithm>
#include <iomanip>
#include <map>

#include "bench/cuda/cuda_session.hpp"
#include "bench/measure.hpp"
#include "graph/chunk.hpp"
#include "graph/error.hpp"
#include "kernels/cuda/device.hpp"
#include "ops/fused_experts_op.hpp"
#include "ops/kernel_registry.hpp"
#include "ops/moe_layer.hpp"

namespace moeflow {

std::vector<nlohmann::json> run_cuda_bench(const CudaBenchOptions& o, std::ostream& log,
                                          const std::function<void(const nlohmann::json&)>& on_row) {
  if (o.tokens.empty() || o.plans.empty() || o.scopes.empty() || o.models.empty())
    fail_input("bench: need at least one model, T, plan and scope");
  const std::string gpu = cuda::device_name(o.device);
  const MachineRates rates = measure_cuda_rates(o.device);
  log << "bench on " << gpu << ": measured " << std::fixed << std::setprecision(1) << rates.flops_per_s / 1e12
      << " TFLOP/s (cuBLAS bf16 8192^3), " << rates.bytes_per_s / 1e12 << " TB/s (2 GiB copy, read + write)\n";
  log << std::left << std::setw(8) << "scope" << std::setw(19) << "model" << std::setw(6) << "T" << std::setw(4) << "ch" << std::setw(12) << "plan"
      << std::setw(30) << "experts kernel" << std::setw(11) << "median us" << std::setw(10) << "floor us" << std::setw(9)
      << "x floor" << kPrintedRowTailHeader << "\n";
  std::vector<nlohmann::json> rows;
  // "" (or "auto" in the list): the planner's own choice, fusion included.
  std::vector<std::string> kernels = o.experts_kernels.empty() ? std::vector<std::string>{""} : o.experts_kernels;
  for (std::string& k : kernels)
    if (k == "auto") k.clear();
  for (const std::string& model : o.models) {
    const MoEConfig config = load_config(model, o.sets);
    for (const std::string& scope : o.scopes) {
      // One graph and plan per T (best plan per point; a plan's kernels are chosen for its maximum
      // T); every session shares the weights of the first, drawn once.
      for (const int chunks : o.chunks) {
      std::unique_ptr<CudaSession> owner;
      auto build = [&](int64_t max_tokens) {
        LayerOptions lo{.max_tokens = max_tokens, .dtype = DType::bf16};
        Graph g = build_scope_graph(config, scope, lo);
        if (chunks > 1) g = chunk_tokens(g, {.chunks = chunks});
        return std::make_shared<const Graph>(std::move(g));
      };
      {
        CudaSessionOptions so;
        so.plan.device = o.device;
        so.seed = o.seed;
        owner = std::make_unique<CudaSession>(build(1), so);
      }
      // The last model's sessions were freed and this one's weights drawn: no point measured until
      // the device's bandwidth is back (settle_device_bandwidth).
      if (const double waited = settle_device_bandwidth(o.device, rates.bytes_per_s); waited > 0.0)
        log << "settled " << std::setprecision(1) << waited << " s before " << model << " " << scope
            << ": the device copied below " << std::setprecision(2) << kSettledShare
            << " of its ceiling after the last sessions' memory was freed\n";
      const int64_t most = *std::max_element(o.tokens.begin(), o.tokens.end());
      for (int64_t T : o.tokens) {
        auto graph = build(T);
        std::shared_ptr<const Graph> graph_for_most;  // graph-any: one graph for the sweep's largest T
        std::map<std::string, double> serial_time;  // by kernel
        for (const std::string& kernel : kernels)
          for (const std::string& plan : o.plans) {
            CudaSessionOptions so;
            so.plan.policy = plan == "serial" ? Policy::serial : Policy::concurrent;
            so.plan.max_lanes = o.max_lanes;
            so.plan.share_side_lanes = o.share_side_lanes;
            so.plan.fold_shared = o.fold_shared;
            // graph-any: captured once for every T up to the sweep's largest (its plan and kernels
            // are chosen for that T), replayed at this one.
            const bool any_tokens = plan == "graph-any";
            const bool graph_replay = plan == "graph" || any_tokens;
            so.plan.capturable = graph_replay;
            so.plan.device = o.device;
            so.plan.rates = rates;  // the planner's cost model on this GPU's measured ceilings
            const bool has_experts = scope != "shared";
            // A fused kernel (ops/fuse_experts.hpp) is forced on the fused node, any other (or an unknown
            // name, which the planner then refuses by name) on the experts node.
            if (!kernel.empty() && has_experts) {
              const KernelEntry* entry = KernelRegistry::builtin().find(kernel, Backend::cuda);
              so.plan.forced_kernels[entry ? entry->op_kind : "experts"] = kernel;
            }
            if (!has_experts && kernel != kernels.front()) continue;  // no experts node: one run per plan
            so.seed = o.seed;
            std::unique_ptr<CudaSession> session;
            try {
              if (any_tokens && !graph_for_most) graph_for_most = build(most);
              session = std::make_unique<CudaSession>(any_tokens ? graph_for_most : graph, so, owner.get());
            } catch (const Error& e) {
              log << "skipped " << model << " " << scope << " T=" << T << " " << plan << " "
                  << (kernel.empty() ? "auto" : kernel) << ": " << e.what() << "\n";
              continue;
            }
            CudaSession& s = *session;
            s.set_tokens(T, o.input_sets);
            const Timing t = time_runs(
                [&](int run) {
                  s.use_input_set(run % o.input_sets);
                  if (!graph_replay) return s.run();
                  // Per set: a graph holds its set's buffers; replay() times the replay alone.
                  if (any_tokens) s.capture_any_tokens();
                  else s.capture();
                  return s.replay();
                },
                o.warmup, o.min_runs, o.min_runs, 0.0);
            const Floor floor = s.floor(rates);
            std::string kernel_names, experts_kernel;
            for (const PlanStep& step : s.plan().steps) {
              kernel_names += (kernel_names.empty() ? "" : ",") + step.kernel->name;
              if (routed_experts(s.graph().node(step.node))) experts_kernel = step.kernel->name;
            }
            if (plan == "serial") serial_time[kernel] = t.median_s;
            const std::string plan_name = any_tokens ? "concurrent+cuda_graph_any_t" : graph_replay ? "concurrent+cuda_graph" : plan;
            nlohmann::json row = bench_row(scope, config.name, T, plan_name,
                                           s.plan().lanes.size(), kernel_names, t, floor, o.input_sets);
            row["experts_kernel"] = experts_kernel;
            row["experts_kernel_asked"] = kernel.empty() ? "auto" : kernel;  // --experts-kernels (what tells rows apart)
            row["chunks"] = chunks;
            row["gpu"] = gpu;
            // The share of the SMs each lane aimed at (the planner halves a side lane's with room to stretch).
            nlohmann::json shares = nlohmann::json::array();
            for (const Lane& lane : s.plan().lanes) shares.push_back(lane.sm_share);
            row["lane_sm_shares"] = shares;
            if (serial_time.count(kernel)) row["ratio_serial"] = t.median_s / serial_time[kernel];
            log << std::setw(8) << scope << std::setw(19) << config.name << std::setw(6) << T << std::setw(4) << chunks
                << std::setw(12) << (any_tokens ? "graph-any" : graph_replay ? "conc+graph" : plan) << std::setw(30) << experts_kernel << std::setw(11)
                << std::setprecision(1) << t.median_s * 1e6 << std::setw(10) << floor.seconds * 1e6 << std::setw(9)
                << std::setprecision(2) << t.median_s / floor.seconds
                << printed_row_tail(row)
                << std::endl;
            if (on_row) on_row(row);
            rows.push_back(std::move(row));
          }
      }
      }
    }
  }
  return rows;
}

}  // namespace moeflow
