// `moeflow run`: build, plan, run, time, check and trace one layer.
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <nlohmann/json.hpp>
#include <tbb/info.h>

#include "bench/cpu_session.hpp"
#include "ops/hf_weights.hpp"
#ifdef MOEFLOW_HAVE_CUDA
#include "bench/cuda/cuda_session.hpp"
#include "kernels/cuda/device.hpp"
#endif
#include "graph/error.hpp"
#include "tools/commands.hpp"
#include "kernels/comm/communicator.hpp"
#include "kernels/comm/nccl_communicator.hpp"
#include "tools/model_flags.hpp"
#include "tools/number_checks.hpp"
#include "tools/run_ranks.hpp"

namespace moeflow::cli {

namespace {

struct RunFlags {
  ModelFlags model;
  PlanFlags plan;
  ParallelFlags parallel;
  std::vector<int64_t> token_list{64};  // --tokens: one count, or one per DP rank under mpirun
  int64_t tokens = 64;
  int64_t max_tokens = 0;  // 0: = tokens
  int threads = 0;         // 0: every core
  uint64_t seed = 0;
  std::string trace;
  bool json = false;
  bool check = false;
  int warmup = 1;
  int min_runs = 5;
  double budget_s = 2.0;
  int input_sets = 8;
  bool cuda_graph = false;
  std::string weights;  // a safetensors file or checkpoint folder
  int layer = 0;
};

// The config.json beside a checkpoint: in the folder given, or beside the file given.
std::string checkpoint_config_path(const std::string& weights) {
  namespace fs = std::filesystem;
  const fs::path p(weights);
  return ((fs::is_directory(p) ? p : p.parent_path()) / "config.json").string();
}

// What one `run` measured, whichever backend ran it.
struct Measured {
  std::string device;
  MachineRates rates;
  Timing timing;
  Floor floor;
  Trace trace;
  CheckReport report;
  std::shared_ptr<const Plan> plan;
  double graph_launch_us = -1.0;  // host-side cost of one CUDA-graph launch (--cuda-graph)
};

// Warm-up and timed runs rotating over the input sets (CUDA-graph replays with --cuda-graph), the
// floor over those sets, then one traced run and the check on the inputs of --seed itself.
template <class Session>
Measured measure(Session& session, const RunFlags& f, const MachineRates& rates, double tolerance) {
  Measured m;
  m.rates = rates;
  session.set_tokens(f.tokens, f.input_sets);
  m.timing = time_runs(
      [&](int run) {
        session.use_input_set(run % f.input_sets);
        if constexpr (requires { session.capture(); }) {
          if (f.cuda_graph) {
            // A graph holds the buffers of the set it was captured on: recapture per set to keep
            // the rotation. Capture is host work; replay() times the replay alone, with events.
            session.capture();
            return session.replay();
          }
        }
        return session.run();
      },
      f.warmup, f.min_runs, 200, f.budget_s);
  m.floor = session.floor(rates);
  session.use_input_set(0);
  if constexpr (requires { session.capture(); }) {
    if (f.cuda_graph) {
      session.capture();
      m.graph_launch_us = session.replay_launch_seconds(50) * 1e6;
    }
  }
  m.trace.process = "moeflow " + f.plan.backend + " " + session.graph().name() + " " + f.plan.plan + " T=" +
                    std::to_string(f.tokens);
  bool traced = false;
  if constexpr (requires { session.capture(); }) {
    if (f.cuda_graph) {  // the traced run is a replay too, stamped by the GPU clock node by node
      m.trace.process += " (CUDA graph, clock stamps)";
      session.capture(true);
      session.replay(&m.trace);
      traced = true;
    }
  }
  if (!traced) session.run(&m.trace);
  if (f.check) m.report = session.check(tolerance);
  m.plan = std::make_shared<const Plan>(session.plan());
  return m;
}

std::string fixed(double v, int digits) {
  std::ostringstream o;
  o << std::fixed << std::setprecision(digits) << v;
  return o.str();
}

std::string sci(double v) {
  std::ostringstream o;
  o << std::scientific << std::setprecision(3) << v;
  return o.str();
}

int run_on_ranks(const RunFlags& f) {
  RankRunRequest q;
  q.config = f.model.config();
  if (!f.weights.empty()) fail_input("--weights: multi-rank runs draw their weights from the seed (no checkpoint yet)");
  if (f.cuda_graph) fail_input("--cuda-graph: multi-rank plans hold host synchronisations (counts of the exchanges)");
  q.plan = f.plan.options();
  if (q.plan.backend == Backend::cuda && !comm::have_nccl())
    fail_resource("--backend cuda with ranks needs the NCCL transport, and this build has none (NCCL not found)");
  // Checked on every rank alike before any collective; the world's size comes from mpirun.
  q.layout = f.parallel.layout(f.token_list, q.config, comm::mpi_started() ? comm::mpi_world_size() : -1);
  if (!comm::mpi_started())
    fail_input("--dp/--tp/--ep/--dispatch run on several ranks: start moeflow under mpirun, e.g. mpirun -np " +
               std::to_string(q.layout.world()) + " moeflow run --dp " + std::to_string(q.layout.dp) + " ...");
  q.scope = f.model.scope;
  q.chunking = f.model.chunking();
  q.plan_name = f.plan.plan;
  // Ranks share the machine's cores unless told otherwise.
  q.threads = f.threads > 0 ? f.threads : std::max(1, tbb::info::default_concurrency() / q.layout.world());
  q.seed = f.seed;
  q.trace = f.trace;
  q.json = f.json;
  q.check = f.check;
  q.warmup = f.warmup;
  q.runs = f.min_runs;
  q.input_sets = f.input_sets;
  return run_ranks(q);
}

}  // namespace

Command add_run_command(CLI::App& app) {
  auto f = std::make_shared<RunFlags>();
  CLI::App* sub = app.add_subcommand("run", "run a layer: time it, and with --check compare with the fp64 reference");
  f->model.add_to(*sub);
  f->plan.add_to(*sub);
  f->parallel.add_to(*sub, false);
  sub->add_option("--tokens", f->token_list, "tokens T of this run (under mpirun: one T, or one per DP rank: 5,9)")
      ->delimiter(',');
  sub->add_option("--max-tokens", f->max_tokens, "maximum T the graph and plan are built for (default: --tokens)");
  sub->add_option("--threads", f->threads, "oneTBB threads (default: every core)")->check(cli::Positive);
  sub->add_option("--seed", f->seed, "seed of the random weights and inputs")->check(cli::NonNegative);
  sub->add_option("--trace", f->trace, "write the last run as Chrome-trace JSON (Perfetto)");
  sub->add_flag("--json", f->json, "print the result as JSON");
  sub->add_flag("--check", f->check, "compare with the fp64 reference; exit 1 on failure");
  sub->add_option("--warmup", f->warmup, "untimed runs first")->check(cli::NonNegative);
  sub->add_option("--runs", f->min_runs, "timed runs at least (more while --budget lasts, up to 200)")
      ->check(cli::Positive);
  sub->add_option("--budget", f->budget_s, "seconds of timed runs to aim for")->check(cli::NonNegative);
  sub->add_option("--input-sets", f->input_sets, "input sets the timed runs rotate over (caches do not keep the touched weights)")
      ->check(cli::Positive);
  sub->add_flag("--cuda-graph", f->cuda_graph, "capture the plan as a CUDA graph and time its replays (backend cuda)");
  sub->add_option("--weights", f->weights,
                  "load layer --layer's MoE weights from a Hugging Face safetensors file or checkpoint folder "
                  "(config: --hf-config, else the folder's config.json)");
  sub->add_option("--layer", f->layer, "the layer --weights reads")->check(cli::NonNegative);
  return [f] {
    if (f->parallel.requested()) return run_on_ranks(*f);
    if (f->token_list.size() != 1)
      fail_input("--tokens gives " + std::to_string(f->token_list.size()) +
                 " counts; one per DP rank needs --dp under mpirun, otherwise give one");
    f->tokens = f->token_list[0];
    const int64_t max_tokens = f->max_tokens > 0 ? f->max_tokens : f->tokens;
    if (f->max_tokens < 0) fail_input("--max-tokens = " + std::to_string(f->max_tokens) + " must be > 0");
    check_tokens(f->tokens, max_tokens);
    if (!f->weights.empty() && f->model.model.empty() && f->model.hf_config.empty())
      f->model.hf_config = checkpoint_config_path(f->weights);
    const MoEConfig config = f->model.config();
    PlanOptions plan_options = f->plan.options();
    if (!f->weights.empty() && f->model.scope != "layer") fail_input("--weights needs --scope layer");
    if (f->cuda_graph && plan_options.backend != Backend::cuda) fail_input("--cuda-graph needs --backend cuda");
    plan_options.capturable = f->cuda_graph;
    // The checkpoint opens (and is validated) before anything is allocated; the session loads it.
    const WeightLoader load_weights = f->weights.empty() ? WeightLoader{} : hf_layer_loader(config, f->weights, f->layer);
    auto graph = build_graph(config, f->model.scope, max_tokens, plan_options.backend, f->model.chunking());
    const int threads = f->threads > 0 ? f->threads : tbb::info::default_concurrency();
    Measured m;
    if (plan_options.backend == Backend::cuda) {
#ifdef MOEFLOW_HAVE_CUDA
      if (cuda::device_count() <= plan_options.device)
        fail_resource("--backend cuda: no CUDA device " + std::to_string(plan_options.device) + " here");
      // The planner weighs lanes and kernels on this GPU's measured ceilings.
      const MachineRates rates = measure_cuda_rates(plan_options.device);
      CudaSessionOptions options;
      options.plan = plan_options;
      options.plan.rates = rates;
      options.seed = f->seed;
      options.load_weights = load_weights;
      CudaSession session(graph, options);
      m = measure(session, *f, rates, 1e-2);
      m.device = cuda::device_name(plan_options.device);
#endif
    } else {
      const MachineRates rates = measure_cpu_rates(threads);
      SessionOptions options;
      options.plan = plan_options;
      options.plan.rates = rates;
      options.threads = threads;
      options.seed = f->seed;
      options.load_weights = load_weights;
      // The session refuses a model too large for the machine before allocating anything.
      CpuSession session(graph, options);
      m = measure(session, *f, rates, 1e-5);
      m.device = cpu_name(threads);
    }
    const MachineRates& rates = m.rates;
    const Timing& timing = m.timing;
    const Floor& floor = m.floor;
    const Trace& trace = m.trace;
    const CheckReport& report = m.report;
    if (!f->trace.empty()) {
      std::ofstream out(f->trace);
      if (!out) fail_input("--trace: cannot write '" + f->trace + "'");
      trace.write_chrome_json(out);
    }
    const Plan& plan = *m.plan;
    const Graph& g = *plan.graph;
    double predicted_total = 0.0;
    nlohmann::json nodes = nlohmann::json::array();
    for (std::size_t i = 0; i < plan.steps.size(); ++i) {
      const PlanStep& s = plan.steps[i];
      const Node& n = g.node(s.node);
      const auto in = g.input_values(n);
      const auto out = g.output_values(n);
      // At this run's T (a chunk's share for a chunk's node), with the kernel's launches.
      const double predicted = predict_seconds(n.op->cost({in, out}, g.tokens_of(n, f->tokens)), rates, s.kernel->launches);
      predicted_total += predicted;
      nodes.push_back({{"order", s.order}, {"lane", s.lane}, {"node", n.name}, {"kernel", s.kernel->name},
                       {"why", s.reason}, {"measured_us", trace.events[i].duration_us},
                       {"predicted_us", predicted * 1e6}});
    }
    nlohmann::json result{{"model", config.name},
                          {"scope", f->model.scope},
                          {"backend", f->plan.backend},
                          {"device", m.device},
                          {"cuda_graph", f->cuda_graph},
                          {"plan", f->plan.plan},
                          {"lanes", plan.lanes.size()},
                          {"threads", plan_options.backend == Backend::cpu ? nlohmann::json(threads) : nlohmann::json(nullptr)},
                          {"tokens", f->tokens},
                          {"max_tokens", max_tokens},
                          {"seed", f->seed},
                          {"weights", f->weights.empty() ? nlohmann::json(nullptr) : nlohmann::json(f->weights)},
                          {"median_us", timing.median_s * 1e6},
                          {"min_us", timing.min_s * 1e6},
                          {"max_us", timing.max_s * 1e6},
                          {"runs", timing.runs},
                          {"input_sets", f->input_sets},
                          {"graph_launch_us", m.graph_launch_us},
                          {"floor_us", floor.seconds * 1e6},
                          {"ratio_floor", timing.median_s / floor.seconds},
                          {"touched_experts", floor.touched_experts},
                          {"fewest_expert_rows", floor.fewest_expert_rows},
                          {"nodes", nodes}};
    if (f->check) {
      result["check"] = {{"rel_norm", report.comparison.rel_norm},
                         {"rel_max", report.comparison.rel_max},
                         {"tolerance", report.tolerance},
                         {"tokens_differing", report.agreement.tokens_differing},
                         {"tokens_adopted", report.agreement.tokens_adopted},
                         {"max_adopted_gap", report.agreement.max_adopted_gap},
                         {"min_rejected_gap", report.agreement.min_rejected_gap},
                         {"min_routing_margin", report.agreement.min_margin},
                         {"tokens_within_tie_gap", report.agreement.tokens_within_tie_gap},
                         {"pass", report.pass}};
    }
    if (f->json) {
      std::cout << result.dump(2) << "\n";
    } else {
      std::cout << "moeflow run: " << config.name << " (" << f->model.scope << ")  backend " << f->plan.backend
                << (f->cuda_graph ? " (CUDA graph replay)" : "") << " on " << m.device << "  plan " << f->plan.plan
                << " (" << plan.lanes.size() << " lane(s))  seed " << f->seed << "\n";
      std::cout << std::left << "  " << std::setw(22) << "model" << std::setw(7) << "T" << std::setw(7) << "max T"
                << std::setw(7) << "runs" << std::setw(12) << "median ms" << std::setw(10) << "min ms" << std::setw(14)
                << "predicted ms" << std::setw(10) << "floor ms" << "x floor\n";
      std::cout << "  " << std::setw(22) << config.name << std::setw(7) << f->tokens << std::setw(7) << max_tokens
                << std::setw(7) << timing.runs << std::setw(12) << fixed(timing.median_s * 1e3, 3) << std::setw(10)
                << fixed(timing.min_s * 1e3, 3) << std::setw(14) << fixed(predicted_total * 1e3, 3) << std::setw(10)
                << fixed(floor.seconds * 1e3, 3) << fixed(timing.median_s / floor.seconds, 2) << "\n";
      std::cout << "  per node (one traced run; predicted = cost model at T=" << f->tokens << " on measured rates "
                << fixed(rates.flops_per_s / 1e9, 1) << " GFLOP/s, "
                << fixed(rates.bytes_per_s / 1e9, 1) << " GB/s):\n";
      std::cout << "    " << std::setw(4) << "#" << std::setw(6) << "lane" << std::setw(20) << "node" << std::setw(22)
                << "kernel" << std::setw(13) << "measured us" << std::setw(14) << "predicted us" << "why\n";
      for (const auto& n : nodes)
        std::cout << "    " << std::setw(4) << n["order"].get<int>() << std::setw(6) << n["lane"].get<int>()
                  << std::setw(20) << n["node"].get<std::string>() << std::setw(22) << n["kernel"].get<std::string>()
                  << std::setw(13) << fixed(n["measured_us"].get<double>(), 1) << std::setw(14)
                  << fixed(n["predicted_us"].get<double>(), 1) << n["why"].get<std::string>() << "\n";
      if (f->check) {
        std::cout << "  check vs fp64 reference: rel_norm " << sci(report.comparison.rel_norm) << "  rel_max "
                  << sci(report.comparison.rel_max) << "  (pass: rel_norm < " << sci(report.tolerance) << ")  routing: "
                  << report.agreement.tokens_differing << " of " << f->tokens << " tokens' top-k sets differ, "
                  << report.agreement.tokens_adopted << " near-ties adopted";
        if (report.agreement.tokens_adopted > 0) std::cout << " (max gap " << sci(report.agreement.max_adopted_gap) << ")";
        if (report.agreement.tokens_differing > report.agreement.tokens_adopted)
          std::cout << ", " << report.agreement.tokens_differing - report.agreement.tokens_adopted
                    << " beyond a near-tie (smallest gap " << sci(report.agreement.min_rejected_gap) << ")";
        std::cout << "  " << (report.pass ? "PASS" : "FAIL") << "\n";
        // How robust the routing of this layer and input is: the reference's closest call.
        if (report.agreement.min_margin >= 0)
          std::cout << "  routing margin: closest top-k decision by a score gap of " << sci(report.agreement.min_margin)
                    << "; " << report.agreement.tokens_within_tie_gap << " of " << f->tokens
                    << " tokens within the near-tie gap 1e-3 (a flip there is accepted)\n";
      }
      if (m.graph_launch_us >= 0)
        std::cout << "  CUDA graph: host-side launch cost " << fixed(m.graph_launch_us, 1) << " us (median of 50)\n";
      if (!f->trace.empty()) std::cout << "  trace: " << f->trace << "\n";
    }
    return f->check && !report.pass ? 1 : 0;
  };
}

}  // namespace moeflow::cli
