#include "tools/run_ranks.hpp"

#include <cstdlib>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "bench/multi_rank.hpp"
#include "graph/error.hpp"

namespace moeflow::cli {

namespace {

// What every rank must agree on before the first collective: a rank given other flags would enter
// other collectives, or the same ones with other sizes, and hang or corrupt the others.
std::string agreed_text(const RankRunRequest& q) {
  std::ostringstream o;
  o << q.config.fields.dump() << " | scope " << q.scope << " | chunks " << q.chunking.chunks << "/"
    << q.chunking.chunk_tokens << " | plan " << q.plan_name << " | " << q.layout.str() << " | seed " << q.seed
    << " | warmup " << q.warmup << " runs " << q.runs << " sets " << q.input_sets << " check " << q.check;
  return o.str();
}

std::string fixed(double v, int digits) {
  std::ostringstream o;
  o << std::fixed << std::setprecision(digits) << v;
  return o.str();
}

}  // namespace

int run_ranks(const RankRunRequest& q) {
  auto world = comm::mpi_world();
  const int rank = world->rank(), ranks = world->size();
  try {
    agree_across_ranks(*world, agreed_text(q));
  } catch (Error& e) {
    throw e.raised_on_every_rank();
  }
  RankComms comms = make_rank_comms(std::move(world), q.layout);
  comm::Communicator& all = *comms.world;
  auto graph = rank_graph(q.config, q.layout, rank, {.scope = q.scope, .chunks = q.chunking.chunks,
                                                     .chunk_tokens = q.chunking.chunk_tokens});
  SessionOptions o;
  o.plan = q.plan;
  o.threads = q.threads;
  o.seed = q.seed;
  o.comm = &comms.groups;
  CpuSession session(graph, o);
  const int64_t tokens = q.layout.tokens_of(rank);
  session.set_tokens(tokens, q.input_sets);

  // Test hook (tests/test_cli.cpp): this rank dies before its first run, as a crashed rank would.
  if (const char* die = std::getenv("MOEFLOW_TEST_DIE_RANK"); die && std::atoi(die) == rank) std::_Exit(9);
  // Every rank runs the same count, each run started together: a run's time is the slowest rank's.
  std::vector<double> times;
  for (int i = 0; i < q.warmup + q.runs; ++i) {
    session.use_input_set(i % q.input_sets);
    all.barrier();
    const double t = session.run();
    if (i >= q.warmup) times.push_back(t);
  }
  std::sort(times.begin(), times.end());
  const double median = times[times.size() / 2];
  session.use_input_set(0);
  all.barrier();
  Trace trace;
  session.run(&trace);
  trace.pid = rank;
  trace.process = "rank " + std::to_string(rank) + " (dp " + std::to_string(q.layout.dp_rank(rank)) + ", tp " +
                  std::to_string(q.layout.tp_rank(rank)) + ") " + graph->name() + " T=" + std::to_string(tokens);
  CheckReport report;
  if (q.check)
    report = check_rank_output(session.output(), q.config, q.layout, rank, q.scope, q.seed, 1e-5);

  // Rank 0 reports for all.
  const float mine[5] = {static_cast<float>(median * 1e6), static_cast<float>(times.front() * 1e6),
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
      for (const std::string& t : traces)
        for (auto& e : nlohmann::json::parse(t).at("traceEvents")) merged["traceEvents"].push_back(std::move(e));
      std::ofstream out(q.trace);
      if (!out) fail_input("--trace: cannot write '" + q.trace + "'");
      out << merged.dump(1) << "\n";
    }
    nlohmann::json rows = nlohmann::json::array();
    for (int r = 0; r < ranks; ++r) {
      const float* v = &every[static_cast<std::size_t>(5 * r)];
      nlohmann::json row{{"rank", r}, {"dp_rank", q.layout.dp_rank(r)}, {"tp_rank", q.layout.tp_rank(r)},
                         {"tokens", static_cast<int64_t>(v[4])}, {"median_us", v[0]}, {"min_us", v[1]}};
      if (q.check) row["check"] = {{"rel_norm", v[2]}, {"tolerance", 1e-5}, {"pass", v[3] > 0.5f}};
      rows.push_back(row);
    }
    if (q.json) {
      std::cout << nlohmann::json{{"model", q.config.name}, {"scope", q.scope}, {"backend", "cpu"},
                                  {"plan", q.plan_name}, {"layout", q.layout.str()}, {"ranks", ranks},
                                  {"transport", all.transport()}, {"threads_per_rank", q.threads},
                                  {"runs", q.runs}, {"seed", q.seed}, {"per_rank", rows}}
                       .dump(2)
                << "\n";
    } else {
      std::cout << "moeflow run: " << q.config.name << " (" << q.scope << ")  " << ranks << " ranks over "
                << all.transport() << ": " << q.layout.str() << "  plan " << q.plan_name << "  seed " << q.seed << "\n";
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
          std::cout << "rel_norm " << e.str() << " (< 1e-05)  " << (row["check"]["pass"].get<bool>() ? "PASS" : "FAIL");
        }
        std::cout << "\n";
      }
      if (!q.trace.empty()) std::cout << "  trace (every rank, one process row each): " << q.trace << "\n";
    }
  }
  return pass ? 0 : 1;
}

}  // namespace moeflow::cli
