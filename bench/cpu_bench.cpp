#include "bench/cpu_bench.hpp"

#include <algorithm>
#include <iomanip>
#include <map>

#include "bench/cpu_session.hpp"
#include "bench/measure.hpp"
#include "graph/chunk.hpp"
#include "graph/error.hpp"
#include "ops/moe_layer.hpp"

namespace moeflow {

std::vector<nlohmann::json> run_cpu_bench(const BenchOptions& o, std::ostream& log,
                                          const std::function<void(const nlohmann::json&)>& on_row) {
  if (o.tokens.empty() || o.plans.empty() || o.scopes.empty() || o.models.empty())
    fail_input("bench: need at least one model, T, plan and scope");
  for (int64_t t : o.tokens)
    if (t <= 0) fail_input("bench: --tokens " + std::to_string(t) + " must be > 0");
  const int64_t max_tokens = *std::max_element(o.tokens.begin(), o.tokens.end());
  const MachineRates rates = measure_cpu_rates(o.threads);
  const std::string machine = cpu_name(o.threads);
  log << "bench on " << machine << ": measured " << std::fixed << std::setprecision(1) << rates.flops_per_s / 1e9
      << " GFLOP/s (one SGEMM per thread), " << rates.bytes_per_s / 1e9 << " GB/s (copy, read + write)\n";
  log << std::left << std::setw(9) << "scope" << std::setw(20) << "model" << std::setw(7) << "T" << std::setw(4) << "ch" << std::setw(12) << "plan"
      << std::setw(12) << "median us" << std::setw(12) << "floor us" << std::setw(9) << "x floor" << kPrintedRowTailHeader << "\n";
  std::vector<nlohmann::json> rows;
  for (const std::string& model : o.models) {
    const MoEConfig config = load_config(model, o.sets);
    for (const std::string& scope : o.scopes)
    for (const int chunks : o.chunks) {
      LayerOptions lo{.max_tokens = max_tokens, .dtype = DType::f32};
      Graph built = build_scope_graph(config, scope, lo);
      if (chunks > 1) built = chunk_tokens(built, {.chunks = chunks});
      auto graph = std::make_shared<const Graph>(std::move(built));
      // One session per plan; all share the first one's weights.
      std::vector<std::unique_ptr<CpuSession>> sessions;
      try {
        for (Policy p : o.plans) {
          SessionOptions so;
          so.plan.policy = p;
          so.plan.max_lanes = o.max_lanes;
          so.plan.rates = rates;  // the planner's cost model on this machine's measured ceilings
          so.threads = o.threads;
          so.seed = o.seed;
          sessions.push_back(std::make_unique<CpuSession>(graph, so, sessions.empty() ? nullptr : sessions.front().get()));
        }
      } catch (const Error& e) {
        if (e.kind() != ErrorKind::resource) throw;
        log << "skipped " << model << " (" << scope << "): " << e.what() << "\n";
        continue;
      }
      for (int64_t T : o.tokens) {
        std::map<Policy, double> times;
        for (std::size_t i = 0; i < o.plans.size(); ++i) {
          CpuSession& s = *sessions[i];
          s.set_tokens(T, o.input_sets);
          const Timing t = time_runs(
              [&](int run) {
                s.use_input_set(run % o.input_sets);
                return s.run();
              },
              o.warmup, o.min_runs, 1000, o.budget_s);
          times[o.plans[i]] = t.median_s;
          const Floor floor = s.floor(rates);
          std::string kernels;
          for (const PlanStep& step : s.plan().steps) kernels += (kernels.empty() ? "" : ",") + step.kernel->name;
          nlohmann::json row = bench_row(scope, config.name, T, to_string(o.plans[i]), s.plan().lanes.size(),
                                         kernels, t, floor, o.input_sets);
          row["device"] = machine;
          row["gpu"] = nullptr;
          row["overrides"] = o.sets;
          row["chunks"] = chunks;
          if (times.count(Policy::serial)) row["ratio_serial"] = t.median_s / times[Policy::serial];
          log << std::setw(9) << scope << std::setw(20) << config.name << std::setw(7) << T << std::setw(4) << chunks << std::setw(12)
              << to_string(o.plans[i]) << std::setw(12) << std::setprecision(1) << t.median_s * 1e6 << std::setw(12)
              << floor.seconds * 1e6 << std::setw(9) << std::setprecision(2) << t.median_s / floor.seconds
              << printed_row_tail(row)
              << "\n";
          if (on_row) on_row(row);
          rows.push_back(std::move(row));
        }
      }
    }
  }
  return rows;
}

}  // namespace moeflow
