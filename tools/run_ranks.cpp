#include "tools/run_ranks.hpp"

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <thread>

#include "bench/multi_rank.hpp"
#ifdef MOEFLOW_HAVE_CUDA
#include "bench/cuda/cuda_session.hpp"
#include "bench/cuda/multi_rank_cuda.hpp"
#include "kernels/cuda/device.hpp"
#endif
#include "graph/chunk.hpp"
#include "graph/dot.hpp"
#include "graph/error.hpp"
#include "kernels/comm/row_exchange.hpp"
#include "kernels/common/random.hpp"
#include "ops/comm_ops.hpp"
#include "ops/moe_layer.hpp"

namespace moeflow::cli {

namespace {

// What every rank must agree on before the first collective: a rank given other flags would enter
// other collectives, or the same ones with other sizes, and hang or corrupt the others.
std::string agreed_text(const RankRunRequest& q) {
  // The one-process graph every rank lowers, as its DOT's hash: the same flags must build the same graph.
  Graph g = build_scope_graph(q.config, q.scope, {.max_tokens = q.layout.max_tokens()});
  if (q.chunking.chunks > 0 || q.chunking.chunk_tokens > 0) g = chunk_tokens(g, q.chunking);
  std::ostringstream o;
  o << "graph " << std::hex << rng::name_key(graph_dot(g)) << std::dec << " | " << q.config.fields.dump() << " | scope " << q.scope << " | chunks " << q.chunking.chunks << "/"
    << q.chunking.chunk_tokens << " | plan " << q.plan_name << " | " << q.layout.str() << " | seed " << q.seed
    << " | warmup " << q.warmup << " runs " << q.runs << " sets " << q.input_sets << " check " << q.check;
  return o.str();
}

std::string fixed(double v, int digits) {
  std::ostringstream o;
  o << std::fixed << std::setprecision(digits) << v;
  return o.str();
}

// One rank's session of either backend, behind what the multi-rank commands need.
class RankSession {
 public:
  virtual ~RankSession() = default;
  virtual void set_tokens(int64_t tokens, int sets) = 0;
  virtual void use_input_set(int set) = 0;
  virtual double run(Trace* trace) = 0;  // seconds (device seconds on the GPU)
  virtual std::vector<float> output() = 0;
  virtual CheckReport check(int rank) = 0;  // against the one-process reference of this rank's tokens
  virtual std::vector<int32_t> read_i32(ValueId v, int64_t count) = 0;
  // The transport's own all-to-all with `bytes` to and from every other rank: median seconds.
  virtual double time_alltoall(int64_t bytes, int reps) = 0;
  virtual std::string device() const = 0;
  virtual double tolerance() const = 0;
  // The graph the plan runs (the planner may have added host copies to the one given).
  virtual const Graph& graph() const = 0;
};

// What both backends' sessions do alike.
template <class Session>
class SessionRank : public RankSession {
 public:
  void set_tokens(int64_t tokens, int sets) override { session_->set_tokens(tokens, sets); }
  void use_input_set(int set) override { session_->use_input_set(set); }
  double run(Trace* trace) override { return session_->run(trace); }
  const Graph& graph() const override { return session_->graph(); }

 protected:
  std::unique_ptr<Session> session_;
};

class CpuRankSession final : public SessionRank<CpuSession> {
 public:
  CpuRankSession(const RankRunRequest& q, RankComms& comms, std::shared_ptr<const Graph> graph) : q_(q), comms_(comms) {
    SessionOptions o;
    o.plan = q.plan;
    o.threads = q.threads;
    o.seed = q.seed;
    o.comm = &comms.groups;
    session_ = std::make_unique<CpuSession>(std::move(graph), o);
  }
  std::vector<float> output() override {
    const int64_t n = session_->tokens() * q_.config.hidden;
    return std::vector<float>(session_->output(), session_->output() + n);
  }
  CheckReport check(int rank) override {
    return check_rank_output(session_->output(), q_.config, q_.layout, rank, q_.scope, q_.seed, tolerance());
  }
  std::vector<int32_t> read_i32(ValueId v, int64_t count) override {
    const auto* p = static_cast<const int32_t*>(session_->value_data(v));
    return std::vector<int32_t>(p, p + count);
  }
  double time_alltoall(int64_t bytes, int reps) override { return time_host_alltoall(*comms_.world, bytes, reps); }
  std::string device() const override { return cpu_name(q_.threads); }
  double tolerance() const override { return 1e-5; }

 private:
  const RankRunRequest& q_;
  RankComms& comms_;
};

#ifdef MOEFLOW_HAVE_CUDA
// This rank's GPU ceilings, measured, then averaged over the ranks so that every rank plans alike.
// The planner needs them to see that one GEMM fills the GPU: with the placeholder (host) rates it
// put two chunks' expert GEMMs on two lanes as if each left room for the other (measured on 2 ×
// H200, deepseek-v3 4096 tokens per rank, 2 chunks: the concurrent layer 12.7 ms against 11.3 serial).
// Measured once per process (every rank reaches its first session together, so the sum is entered
// by all of them alike).
MachineRates agreed_cuda_rates(int device, comm::Communicator& world) {
  static std::optional<MachineRates> agreed;
  if (agreed) return *agreed;
  MachineRates rates = measure_cuda_rates(device);
  float v[2] = {static_cast<float>(rates.flops_per_s / 1e12), static_cast<float>(rates.bytes_per_s / 1e9)};
  world.host().all_reduce_sum(v, v, 2, comm::Element::f32);
  rates.flops_per_s = static_cast<double>(v[0]) / world.size() * 1e12;
  rates.bytes_per_s = static_cast<double>(v[1]) / world.size() * 1e9;
  agreed = rates;
  return rates;
}

class CudaRankSession final : public SessionRank<CudaSession> {
 public:
  CudaRankSession(const RankRunRequest& q, RankComms& comms, std::shared_ptr<const Graph> graph)
      : q_(q), comms_(comms), device_(rank_device()), nccl_(make_device_comms(comms, device_)) {
    CudaSessionOptions o;
    o.plan = q.plan;
    o.plan.device = device_;
    o.plan.rates = agreed_cuda_rates(device_, *comms.world);
    o.seed = q.seed;
    o.comm = &nccl_.groups;
    session_ = std::make_unique<CudaSession>(std::move(graph), o);
  }
  // The session (its streams and buffers) goes before the NCCL communicators it ran on.
  ~CudaRankSession() override { session_.reset(); }
  std::vector<float> output() override { return session_->output(); }
  CheckReport check(int rank) override {
    return check_rank_output_cuda(session_->output(), q_.config, q_.layout, rank, q_.scope, q_.seed, device_, tolerance());
  }
  std::vector<int32_t> read_i32(ValueId v, int64_t count) override { return session_->read_i32(v, count); }
  double time_alltoall(int64_t bytes, int reps) override {
    return time_device_alltoall(*nccl_.world, *comms_.world, device_, bytes, reps);
  }
  std::string device() const override { return cuda::device_name(device_); }
  double tolerance() const override { return 1e-2; }

 private:
  const RankRunRequest& q_;
  RankComms& comms_;
  int device_;
  DeviceComms nccl_;
};
#endif

std::unique_ptr<RankSession> make_rank_session(const RankRunRequest& q, RankComms& comms, std::shared_ptr<const Graph> graph) {
  if (q.plan.backend == Backend::cuda) {
#ifdef MOEFLOW_HAVE_CUDA
    return std::make_unique<CudaRankSession>(q, comms, std::move(graph));
#else
    fail_resource("--backend cuda: this build has no CUDA backend");
#endif
  }
  return std::make_unique<CpuRankSession>(q, comms, std::move(graph));
}

struct RankFigures {
  double median_s = 0.0, min_s = 0.0;
  double p25_s = 0.0, p75_s = 0.0;  // quartiles of the timed runs: their spread
  Trace trace;
  std::vector<double> node_median_us;  // per plan step, over the traced runs
};

// Every rank runs the same count, each run started together (a host barrier): a run's time is then
// the slowest rank's. Then `traced` traced runs on input set 0 (which the check reads): each node's
// median duration.
RankFigures run_in_step(RankSession& session, const RankRunRequest& q, comm::Communicator& host, int64_t tokens,
                        int traced = 1) {
  session.set_tokens(tokens, q.input_sets);
  const comm::PeerDeadline deadline;  // each collective of the runs below is entered by all within seconds
  // Test hooks (tests/test_cli_ranks.cpp): this rank dies before its first run, as a crashed rank
  // would, or stays alive but never enters it, as a hung one would.
  if (const char* die = std::getenv("MOEFLOW_TEST_DIE_RANK"); die && std::atoi(die) == host.rank()) std::_Exit(9);
  if (const char* hang = std::getenv("MOEFLOW_TEST_HANG_RANK"); hang && std::atoi(hang) == host.rank())
    std::this_thread::sleep_for(std::chrono::hours(1));
  std::vector<double> times;
  for (int i = 0; i < q.warmup + q.runs; ++i) {
    session.use_input_set(i % q.input_sets);
    host.barrier();
    const double t = session.run(nullptr);
    if (i >= q.warmup) times.push_back(t);
  }
  std::sort(times.begin(), times.end());
  RankFigures f;
  f.median_s = times[times.size() / 2];
  f.min_s = times.front();
  f.p25_s = times[times.size() / 4];
  f.p75_s = times[(3 * times.size()) / 4 < times.size() ? (3 * times.size()) / 4 : times.size() - 1];
  session.use_input_set(0);
  std::vector<std::vector<double>> per_node;
  for (int i = 0; i < traced; ++i) {
    host.barrier();
    f.trace = Trace{};
    session.run(&f.trace);
    per_node.resize(f.trace.events.size());
    for (std::size_t e = 0; e < f.trace.events.size(); ++e) per_node[e].push_back(f.trace.events[e].duration_us);
  }
  for (auto& d : per_node) {
    std::sort(d.begin(), d.end());
    f.node_median_us.push_back(d[d.size() / 2]);
  }
  return f;
}

}  // namespace

int run_ranks(const RankRunRequest& q) {
  auto world = comm::mpi_world();
  const int rank = world->rank(), ranks = world->size();
  agree_across_ranks(*world, agreed_text(q));
  RankComms comms = make_rank_comms(std::move(world), q.layout);
  comm::Communicator& all = *comms.world;
  const int64_t tokens = q.layout.tokens_of(rank);
  const bool gpu = q.plan.backend == Backend::cuda;
  RankGraphOptions graph_options{.scope = q.scope, .chunks = q.chunking.chunks, .chunk_tokens = q.chunking.chunk_tokens,
                                 .dtype = gpu ? DType::bf16 : DType::f32};
  auto graph = rank_graph(q.config, q.layout, rank, graph_options);
  auto session = make_rank_session(q, comms, graph);
  RankFigures figures = run_in_step(*session, q, all, tokens);
  CheckReport report;
  if (q.check) report = session->check(rank);
  const std::string device = session->device();
  const double median = figures.median_s;
  Trace& trace = figures.trace;
  trace.pid = rank;
  trace.process = "rank " + std::to_string(rank) + " (dp " + std::to_string(q.layout.dp_rank(rank)) + ", tp " +
                  std::to_string(q.layout.tp_rank(rank)) + ") " + graph->name() + " T=" + std::to_string(tokens) + " on " +
                  device;
  const double tolerance = session->tolerance();

  // Rank 0 reports for all.
  const float mine[5] = {static_cast<float>(median * 1e6), static_cast<float>(figures.min_s * 1e6),
                         static_cast<float>(report.comparison.rel_norm), q.check ? (report.pass ? 1.0f : 0.0f) : 1.0f,
                         static_cast<float>(tokens)};
  std::vector<float> every(static_cast<std::size_t>(5 * ranks));
  all.all_gather(mine, every.data(), 5, comm::Element::f32);
  std::ostringstream trace_json;
  trace.write_chrome_json(trace_json);
  const std::vector<std::string> traces = all_gather_strings(all, trace_json.str());
  bool pass = true;
  for (int r = 0; r < ranks; ++r) pass = pass && every[static_cast<std::size_t>(5 * r + 3)] > 0.5f;
  if (rank == 0) {
    if (!q.trace.empty()) {
      nlohmann::json merged{{"traceEvents", nlohmann::json::array()}, {"displayTimeUnit", "ms"}};
      for (const std::string& t : traces) {
        nlohmann::json one = nlohmann::json::parse(t);  // kept alive over the loop below
        for (auto& e : one.at("traceEvents")) merged["traceEvents"].push_back(std::move(e));
      }
      std::ofstream out(q.trace);
      if (!out) fail_input("--trace: cannot write '" + q.trace + "'");
      out << merged.dump(1) << "\n";
    }
    nlohmann::json rows = nlohmann::json::array();
    for (int r = 0; r < ranks; ++r) {
      const float* v = &every[static_cast<std::size_t>(5 * r)];
      nlohmann::json row{{"rank", r}, {"dp_rank", q.layout.dp_rank(r)}, {"tp_rank", q.layout.tp_rank(r)},
                         {"tokens", static_cast<int64_t>(v[4])}, {"median_us", v[0]}, {"min_us", v[1]}};
      if (q.check) row["check"] = {{"rel_norm", v[2]}, {"tolerance", tolerance}, {"pass", v[3] > 0.5f}};
      rows.push_back(row);
    }
    if (q.json) {
      std::cout << nlohmann::json{{"model", q.config.name}, {"scope", q.scope}, {"backend", gpu ? "cuda" : "cpu"},
                                  {"device", device},
                                  {"plan", q.plan_name}, {"layout", q.layout.str()}, {"ranks", ranks},
                                  {"transport", gpu ? "nccl" : all.transport()}, {"threads_per_rank", q.threads},
                                  {"runs", q.runs}, {"seed", q.seed}, {"per_rank", rows}}
                       .dump(2)
                << "\n";
    } else {
      std::cout << "moeflow run: " << q.config.name << " (" << q.scope << ")  " << ranks << " ranks over "
                << (gpu ? "nccl" : all.transport()) << " on " << device << ": " << q.layout.str() << "  plan " << q.plan_name << "  seed " << q.seed << "\n";
      std::cout << "  " << std::left << std::setw(6) << "rank" << std::setw(5) << "dp" << std::setw(5) << "tp"
                << std::setw(8) << "T" << std::setw(12) << "median ms" << std::setw(10) << "min ms"
                << (q.check ? "check vs one-process fp64 reference of its tokens" : "") << "\n";
      for (const auto& row : rows) {
        std::cout << "  " << std::setw(6) << row["rank"].get<int>() << std::setw(5) << row["dp_rank"].get<int>()
                  << std::setw(5) << row["tp_rank"].get<int>() << std::setw(8) << row["tokens"].get<int64_t>()
                  << std::setw(12) << fixed(row["median_us"].get<double>() / 1e3, 3) << std::setw(10)
                  << fixed(row["min_us"].get<double>() / 1e3, 3);
        if (q.check) {
          std::ostringstream e;
          e << std::scientific << std::setprecision(3) << row["check"]["rel_norm"].get<double>();
          std::cout << "rel_norm " << e.str() << " (< " << tolerance << ")  " << (row["check"]["pass"].get<bool>() ? "PASS" : "FAIL");
        }
        std::cout << "\n";
      }
      if (!q.trace.empty()) std::cout << "  trace (every rank, one process row each): " << q.trace << "\n";
    }
  }
  return pass ? 0 : 1;
}

namespace {

// What one rank measured for one bench point.
struct Exchange {
  double dispatch_us = 0, combine_us = 0, compute_us = 0;
  double dispatch_bytes = 0, combine_bytes = 0;  // this rank sent to other ranks
};

// The rows going out (a TP share, the world gather, the alltoall), or the sums coming back (the
// reduce-scatter, the alltoall's way back, the TP group's gather).
bool dispatch_side(const Node& n) {
  const std::string op = n.op->kind();
  const auto* gather = dynamic_cast<const AllGatherRowsOp*>(n.op.get());
  return op == "take_rows" || op == "alltoall_dispatch" || (gather && gather->group() == CommGroup::world);
}
bool combine_side(const Node& n) {
  const std::string op = n.op->kind();
  const auto* gather = dynamic_cast<const AllGatherRowsOp*>(n.op.get());
  return op == "reduce_scatter" || op == "alltoall_combine" || (gather && gather->group() == CommGroup::tp);
}

Exchange exchange_of(const RankFigures& f, RankSession& session, int rank) {
  const Graph& g = session.graph();
  Exchange x;
  for (std::size_t i = 0; i < f.trace.events.size(); ++i) {
    const TraceEvent& e = f.trace.events[i];
    const double us = f.node_median_us[i];
    const auto id = g.find_node(e.name);
    if (!id) fail_input("bench: traced node '" + e.name + "' is not in the plan's graph '" + g.name() + "'");
    const Node& n = g.node(*id);
    double sent = 0;
    if (const auto* op = dynamic_cast<const CommOp*>(n.op.get())) {
      const int me = op->group() == CommGroup::world ? rank : static_cast<int>(op->rows().size() > 1 ? rank % op->rows().size() : 0);
      const int64_t mine = op->rows()[static_cast<std::size_t>(me)];
      const int64_t members = static_cast<int64_t>(op->rows().size());
      double row_bytes = 0;
      for (ValueId v : n.inputs) {
        const Value& val = g.value(v);
        if (val.shape()[0].symbolic()) row_bytes += static_cast<double>(val.shape().elements(1) * static_cast<int64_t>(dtype_size(val.dtype())));
      }
      if (e.op == "all_gather") sent = static_cast<double>(mine * (members - 1)) * row_bytes;
      if (e.op == "reduce_scatter") sent = static_cast<double>(op->total_rows() - mine) * row_bytes;
      // The alltoall's bytes are the routed rows' (routed_alltoall_bytes), whatever its kernel moved.
    }
    if (dispatch_side(n)) {
      x.dispatch_us += us;
      x.dispatch_bytes += sent;
    } else if (combine_side(n)) {
      x.combine_us += us;
      x.combine_bytes += sent;
    } else {
      x.compute_us += us;
    }
  }
  return x;
}

// The bytes the alltoall exchanges route, whatever layout their kernel moved them in (the fixed-block
// kernel also moves padding): each token goes once to every other rank owning one of its experts
// (counted from its ids, read after the run) and comes back from it; what a rank receives is what
// the others send it (exchanged on the host). {dispatch, combine} bytes this rank sends, or {-1, -1}
// where the graph has no alltoall. Every rank must call it (the exchange).
std::pair<double, double> routed_alltoall_bytes(RankSession& session, comm::Communicator& all) {
  const Graph& g = session.graph();
  const int rank = all.rank(), ranks = all.size();
  std::vector<int64_t> sent(static_cast<std::size_t>(ranks), 0);
  double row_bytes = 0, hidden_bytes = 0;
  bool any = false;
  for (const Node& n : g.nodes()) {
    const auto* op = dynamic_cast<const AlltoallDispatchOp*>(n.op.get());
    if (op == nullptr) continue;
    any = true;
    row_bytes = 0;
    for (ValueId v : n.inputs) {
      const Value& val = g.value(v);
      if (val.shape()[0].symbolic()) row_bytes += static_cast<double>(val.shape().elements(1) * static_cast<int64_t>(dtype_size(val.dtype())));
    }
    const Value& x = g.value(n.inputs[0]);
    hidden_bytes = static_cast<double>(x.shape().elements(1) * static_cast<int64_t>(dtype_size(x.dtype())));
    const int64_t rows = op->rows()[static_cast<std::size_t>(rank)];
    const int k = op->top_k();
    const comm::ExpertOwners owners{op->experts_per_rank()};
    const std::vector<int32_t> ids = session.read_i32(n.inputs[1], rows * k);
    for (int64_t t = 0; t < rows; ++t)
      for (int r = 0; r < ranks; ++r) {
        if (r == rank) continue;
        for (int j = 0; j < k; ++j)
          if (owners.owns(r, ids[static_cast<std::size_t>(t * k + j)])) {
            ++sent[static_cast<std::size_t>(r)];
            break;
          }
      }
  }
  if (!any) return {-1.0, -1.0};
  const std::vector<int64_t> received = comm::exchange_counts(all, sent);
  double out = 0, back = 0;
  for (int r = 0; r < ranks; ++r) {
    out += static_cast<double>(sent[static_cast<std::size_t>(r)]) * row_bytes;
    if (r != rank) back += static_cast<double>(received[static_cast<std::size_t>(r)]) * hidden_bytes;
  }
  return {out, back};
}

// One bench point measured on every rank: [0] layer time, [1] dispatch, [2] combine, [3] compute
// (us, traced medians), [4] dispatch and [5] combine bytes sent, [6] [7] the transport's own
// all-to-all of those bytes (us), [8] [9] the layer time's quartiles (us). worst: the slowest rank;
// mean: over ranks.
constexpr int kPointFigures = 10;
struct PointFigures {
  float worst[kPointFigures] = {}, mean[kPointFigures] = {};
  std::string device;
};

PointFigures measure_point(const RankRunRequest& q0, const std::string& scope, RankComms& comms, bool gpu) {
  comm::Communicator& all = *comms.world;
  const int rank = all.rank(), ranks = all.size();
  RankRunRequest q = q0;
  q.scope = scope;
  auto graph = rank_graph(q.config, q.layout, rank,
                          {.scope = scope, .chunks = q.chunking.chunks, .dtype = gpu ? DType::bf16 : DType::f32});
  // The exchanges' counts are read after the run: their buffers must not be reused by then.
  for (const Node& n : graph->nodes())
    if (n.op->kind() == "alltoall_dispatch") {
      q.plan.keep_values.push_back(graph->value(n.outputs[4]).name);
      if (!graph->value(n.inputs[1]).is_graph_input())  // the ids: routed_alltoall_bytes reads them
        q.plan.keep_values.push_back(graph->value(n.inputs[1]).name);
    }
  auto session = make_rank_session(q, comms, graph);
  const RankFigures f = run_in_step(*session, q, all, q.layout.tokens_of(rank), 5);
  Exchange x = exchange_of(f, *session, rank);
  if (const auto [out, back] = routed_alltoall_bytes(*session, all); out >= 0) {
    x.dispatch_bytes += out;
    x.combine_bytes += back;
  }
  // The transport's own all-to-all of the same bytes, in this run: every rank sends each other rank
  // the mean over ranks of what the exchanges sent (all ranks must pass the same size).
  const float sent[2] = {static_cast<float>(x.dispatch_bytes), static_cast<float>(x.combine_bytes)};
  std::vector<float> all_sent(static_cast<std::size_t>(2 * ranks));
  all.all_gather(sent, all_sent.data(), 2, comm::Element::f32);
  double mean_d = 0, mean_c = 0;
  for (int r = 0; r < ranks; ++r) {
    mean_d += all_sent[static_cast<std::size_t>(2 * r)] / ranks;
    mean_c += all_sent[static_cast<std::size_t>(2 * r + 1)] / ranks;
  }
  const double own_d = mean_d > 0 ? session->time_alltoall(static_cast<int64_t>(mean_d / (ranks - 1)), 10) : 0;
  const double own_c = mean_c > 0 ? session->time_alltoall(static_cast<int64_t>(mean_c / (ranks - 1)), 10) : 0;
  const float mine[kPointFigures] = {static_cast<float>(f.median_s * 1e6), static_cast<float>(x.dispatch_us),
                                    static_cast<float>(x.combine_us), static_cast<float>(x.compute_us),
                                    static_cast<float>(x.dispatch_bytes), static_cast<float>(x.combine_bytes),
                                    static_cast<float>(own_d * 1e6), static_cast<float>(own_c * 1e6),
                                    static_cast<float>(f.p25_s * 1e6), static_cast<float>(f.p75_s * 1e6)};
  std::vector<float> every(static_cast<std::size_t>(kPointFigures * ranks));
  all.all_gather(mine, every.data(), kPointFigures, comm::Element::f32);
  PointFigures p;
  for (int r = 0; r < ranks; ++r)
    for (int i = 0; i < kPointFigures; ++i) {
      p.worst[i] = std::max(p.worst[i], every[static_cast<std::size_t>(kPointFigures * r + i)]);
      p.mean[i] += every[static_cast<std::size_t>(kPointFigures * r + i)] / static_cast<float>(ranks);
    }
  p.device = session->device();
  return p;
}

}  // namespace

int bench_ranks(const RankBenchRequest& b) {
  auto world = comm::mpi_world();
  const int rank = world->rank(), ranks = world->size();
  {
    std::ostringstream what;
    for (const auto& m : b.models) what << m << ",";
    for (const auto& s : b.sets) what << s << ",";
    for (auto t : b.tokens) what << t << ",";
    for (auto k : b.kinds) what << to_string(k) << ",";
    for (auto c : b.chunks) what << c << ",";
    for (const auto& p : b.plans) what << p << ",";
    what << b.base.layout.str() << " seed " << b.base.seed << " runs " << b.base.runs;
    agree_across_ranks(*world, what.str());
  }
  ParallelLayout first = b.base.layout;
  RankComms comms = make_rank_comms(std::move(world), first);
  std::ofstream json;
  if (rank == 0 && !b.json.empty()) {
    json.open(b.json);
    if (!json) fail_input("--json: cannot write '" + b.json + "'");
  }
  const bool gpu = b.base.plan.backend == Backend::cuda;
  if (rank == 0)
    // The dispatch kind is per row: the header names only what every row shares.
    std::cout << "moeflow bench: " << ranks << " ranks (dp=" << first.dp << " tp=" << first.tp << (first.ep ? " ep" : "")
              << ")\n"
              << "  model                 T/rank kind            chunks plan        layer ms  dispatch ms  combine ms  "
                 "sent MB (d+c)  vs own all-to-all  hidden (at the layer time's quartiles)\n";
  for (const std::string& model : b.models)
    for (int64_t t : b.tokens)
      for (DispatchKind kind : b.kinds)
        for (int chunks : b.chunks) {
          Exchange serial_point;
          double serial_layer_us = -1;
          for (const std::string& plan : b.plans) {
            RankRunRequest q = b.base;
            q.config = load_config(model, b.sets);
            q.layout.dispatch = kind;
            q.layout.tokens.assign(static_cast<std::size_t>(q.layout.dp), t);
            try {
              check_layout(q.layout, q.config, ranks);
            } catch (Error& e) {
              throw e.raised_on_every_rank();
            }
            q.plan.policy = parse_policy(plan);
            q.chunking = chunks > 1 ? ChunkOptions{.chunks = chunks} : ChunkOptions{};
            const PointFigures layer = measure_point(q, "layer", comms, gpu);
            if (rank != 0 && plan != "serial") continue;
            // The exchanges alone (serial plans): experts that copy their rows, routing drawn
            // uniformly, so no rank waits for another's compute.
            PointFigures alone;
            if (plan == "serial") {
              RankRunRequest e = q;
              e.plan.registry = &exchange_timing_kernels();
              alone = measure_point(e, "experts", comms, gpu);
            }
            if (rank != 0) continue;
            const float* worst = layer.worst;
            const float* mean = layer.mean;
            const double ours = worst[1] + worst[2], own = worst[6] + worst[7];
            nlohmann::json row{{"scope", "layer"}, {"preset", model}, {"tokens_per_rank", t}, {"ranks", ranks},
                               {"layout", q.layout.str()}, {"dispatch", to_string(kind)}, {"chunks", chunks},
                               {"plan", plan}, {"backend", gpu ? "cuda" : "cpu"}, {"gpu", layer.device},
                               {"time_us", worst[0]}, {"dispatch_us", worst[1]}, {"combine_us", worst[2]},
                               {"compute_us", worst[3]}, {"dispatch_bytes_per_rank", mean[4]},
                               {"combine_bytes_per_rank", mean[5]}, {"own_alltoall_us", own},
                               {"exchange_gbps", ours > 0 ? (mean[4] + mean[5]) / ours / 1e3 : 0.0},
                               {"own_alltoall_gbps", own > 0 ? (mean[4] + mean[5]) / own / 1e3 : 0.0},
                               {"ratio_own_alltoall", ours > 0 ? own / ours : 0.0}};
            double alone_ratio = -1;
            if (plan == "serial") {
              const double a = alone.worst[1] + alone.worst[2], a_own = alone.worst[6] + alone.worst[7];
              alone_ratio = a > 0 ? a_own / a : 0.0;
              row["alone"] = {{"dispatch_us", alone.worst[1]}, {"combine_us", alone.worst[2]},
                              {"bytes_per_rank", alone.mean[4] + alone.mean[5]}, {"own_alltoall_us", a_own},
                              {"exchange_gbps", a > 0 ? (alone.mean[4] + alone.mean[5]) / a / 1e3 : 0.0},
                              {"ratio_own_alltoall", alone_ratio}};
            }
            row["time_p25_us"] = worst[8];
            row["time_p75_us"] = worst[9];
            double hidden = -1, hidden_low = -1, hidden_high = -1;
            if (plan == "serial") {
              serial_layer_us = worst[0];
              serial_point = Exchange{worst[1], worst[2], worst[3], mean[4], mean[5]};
            } else if (serial_layer_us > 0) {
              const double comm = serial_point.dispatch_us + serial_point.combine_us;
              auto hidden_at = [&](double layer_us) { return comm > 0 ? (comm + serial_point.compute_us - layer_us) / comm : 0.0; };
              hidden = hidden_at(worst[0]);
              // The same with the concurrent layer's quartiles: how far its run-to-run spread moves it.
              hidden_low = hidden_at(worst[9]);
              hidden_high = hidden_at(worst[8]);
              row["comm_hidden"] = hidden;
              row["comm_hidden_quartiles"] = {hidden_low, hidden_high};
              row["serial_time_us"] = serial_layer_us;
            }
            if (json.is_open()) json << row.dump() << std::endl;
            std::cout << "  " << std::left << std::setw(22) << model << std::setw(7) << t << std::setw(16)
                      << to_string(kind) << std::setw(7) << chunks << std::setw(12) << plan << std::setw(10)
                      << fixed(worst[0] / 1e3, 3) << std::setw(13) << fixed(worst[1] / 1e3, 3) << std::setw(12)
                      << fixed(worst[2] / 1e3, 3) << std::setw(15) << fixed((mean[4] + mean[5]) / 1e6, 2)
                      << std::setw(19)
                      << ((ours > 0 ? fixed(own / ours, 2) : std::string("-")) +
                          (alone_ratio >= 0 ? " (alone " + fixed(alone_ratio, 2) + ")" : std::string("")))
                      << (row.contains("comm_hidden")
                              ? fixed(hidden, 2) + " (" + fixed(hidden_low, 2) + " to " + fixed(hidden_high, 2) + ")"
                              : std::string(""))
                      << "\n";
          }
        }
  return 0;
}

}  // namespace moeflow::cli
