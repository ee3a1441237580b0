#include "bench/cuda/cuda_bench.hpp"

#include <algorithm>
#include <iomanip>
#include <map>

#include "bench/cuda/cuda_session.hpp"
#include "graph/error.hpp"
#include "kernels/cuda/device.hpp"
#include "ops/moe_layer.hpp"

namespace moeflow {

std::vector<nlohmann::json> run_cuda_bench(const CudaBenchOptions& o, std::ostream& log,
                                          const std::function<void(const nlohmann::json&)>& on_row) {
  if (o.tokens.empty() || o.plans.empty() || o.scopes.empty() || o.models.empty())
    fail_input("bench: need at least one model, T, plan and scope");
  const int64_t max_tokens = *std::max_element(o.tokens.begin(), o.tokens.end());
  const std::string gpu = cuda::device_name(o.device);
  const MachineRates rates = measure_cuda_rates(o.device);
  log << "bench on " << gpu << ": measured " << std::fixed << std::setprecision(1) << rates.flops_per_s / 1e12
      << " TFLOP/s (cuBLAS bf16 8192^3), " << rates.bytes_per_s / 1e12 << " TB/s (2 GiB copy, read + write)\n";
  log << std::left << std::setw(8) << "scope" << std::setw(19) << "model" << std::setw(6) << "T" << std::setw(12) << "plan"
      << std::setw(30) << "experts kernel" << std::setw(11) << "median us" << std::setw(10) << "floor us" << std::setw(9)
      << "x floor" << "x serial\n";
  std::vector<nlohmann::json> rows;
  const std::vector<std::string> kernels = o.experts_kernels.empty() ? std::vector<std::string>{""} : o.experts_kernels;
  for (const std::string& model : o.models) {
    const MoEConfig config = load_config(model, o.sets);
    for (const std::string& scope : o.scopes) {
      LayerOptions lo{.max_tokens = max_tokens, .dtype = DType::bf16};
      auto graph = std::make_shared<const Graph>(scope == "experts" ? build_experts_graph(config, lo)
                                                                    : build_moe_layer(config, lo));
      // One session per (plan, kernel); all share the first one's weights.
      struct Variant {
        std::string plan, kernel;
        std::unique_ptr<CudaSession> session;
      };
      std::vector<Variant> variants;
      for (const std::string& kernel : kernels)
        for (const std::string& plan : o.plans) {
          CudaSessionOptions so;
          so.plan.policy = plan == "serial" ? Policy::serial : Policy::concurrent;
          so.plan.capturable = plan == "graph";
          so.plan.device = o.device;
          if (!kernel.empty()) so.plan.forced_kernels["experts"] = kernel;
          so.seed = o.seed;
          try {
            variants.push_back({plan, kernel, std::make_unique<CudaSession>(graph, so, variants.empty() ? nullptr : variants.front().session.get())});
          } catch (const Error& e) {
            log << "skipped " << model << " " << scope << " " << plan << " " << (kernel.empty() ? "auto" : kernel) << ": "
                << e.what() << "\n";
          }
        }
      for (int64_t T : o.tokens) {
        std::map<std::string, double> serial_time;  // by kernel
        for (Variant& v : variants) {
          CudaSession& s = *v.session;
          s.set_tokens(T, o.input_sets);
          const bool graph_replay = v.plan == "graph";
          const Timing t = time_runs(
              [&](int run) {
                s.use_input_set(run % o.input_sets);
                if (!graph_replay) return s.run();
                s.capture();  // per set: a graph holds its set's buffers; replay() times the replay alone
                return s.replay();
              },
              o.warmup, o.min_runs, o.min_runs, 0.0);
          const Floor floor = s.floor(rates);
          std::string kernel_names;
          std::string experts_kernel;
          for (const PlanStep& step : s.plan().steps) {
            kernel_names += (kernel_names.empty() ? "" : ",") + step.kernel->name;
            if (s.graph().node(step.node).op->kind() == "experts") experts_kernel = step.kernel->name;
          }
          if (v.plan == "serial") serial_time[v.kernel] = t.median_s;
          nlohmann::json row{{"scope", scope},
                             {"preset", config.name},
                             {"T", T},
                             {"plan", v.plan == "graph" ? "concurrent+cuda_graph" : v.plan},
                             {"lanes", s.plan().lanes.size()},
                             {"kernels", kernel_names},
                             {"experts_kernel", experts_kernel},
                             {"time_us", t.median_s * 1e6},
                             {"min_us", t.min_s * 1e6},
                             {"runs", t.runs},
                             {"input_sets", o.input_sets},
                             {"floor_us", floor.seconds * 1e6},
                             {"ratio_floor", t.median_s / floor.seconds},
                             {"ratio_serial", nullptr},
                             {"tflops", floor.flops / t.median_s / 1e12},
                             {"gbps", floor.bytes / t.median_s / 1e9},
                             {"touched_experts", floor.touched_experts},
                             {"gpu", gpu}};
          if (serial_time.count(v.kernel)) row["ratio_serial"] = t.median_s / serial_time[v.kernel];
          log << std::setw(8) << scope << std::setw(19) << config.name << std::setw(6) << T << std::setw(12)
              << (v.plan == "graph" ? "conc+graph" : v.plan) << std::setw(30) << experts_kernel << std::setw(11)
              << std::setprecision(1) << t.median_s * 1e6 << std::setw(10) << floor.seconds * 1e6 << std::setw(9)
              << std::setprecision(2) << t.median_s / floor.seconds
              << (row["ratio_serial"].is_null() ? std::string("-") : std::to_string(row["ratio_serial"].get<double>()))
              << std::endl;
          if (on_row) on_row(row);
          rows.push_back(std::move(row));
        }
      }
    }
  }
  return rows;
}

}  // namespace moeflow
