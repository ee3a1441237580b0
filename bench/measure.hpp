#pragma once
// Timing and the roofline floor of DESIGN.md ("Benchmarks: scope, floor, method"), shared by
// `moeflow run` and `moeflow bench`.
#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "graph/graph.hpp"
#include "scheduler/cost_model.hpp"
#include "scheduler/plan.hpp"

namespace moeflow {

struct Timing {
  double median_s = 0.0;
  double min_s = 0.0;
  double max_s = 0.0;
  int runs = 0;
};

// Median (of an even count: the mean of the middle two), minimum and maximum of `samples` seconds.
Timing timing_of(std::vector<double> samples);

// Warm-up runs, then at least `min_runs` timed runs, more while the budget lasts (up to max_runs).
// `run_once(i)` runs iteration i (so callers can rotate over input sets) and returns its seconds.
Timing time_runs(const std::function<double(int)>& run_once, int warmup, int min_runs, int max_runs, double budget_s);

// floor = max(B / BW, F / P). B: bytes of the distinct experts routed to (counted from `ids`, [T, k])
// plus the graph's inputs and outputs once (and, for a whole layer, the router and shared-expert
// weights); intermediates never count. F: 6·T·k·H·I (+ 2·T·H·E gate, + 6·T·H·I_s shared experts).
struct Floor {
  double bytes = 0.0;
  double flops = 0.0;
  int64_t touched_experts = 0;
  // The fewest rows any expert gets within one chunk among the experts that chunk routes to (the
  // whole T where unchunked; 0 when nothing is routed). Every chunk re-reads its touched experts'
  // weights and pads each one's rows to a GEMM tile, so a chunked layer keeps pace with the unchunked
  // one only while this stays in the hundreds (issue 5 asks ≤ 1.05 where it is ≥ 512).
  int64_t fewest_expert_rows = 0;
  double seconds = 0.0;
  bool memory_bound = false;
};
Floor roofline_floor(const Graph& g, int64_t tokens, const int32_t* ids, const MachineRates& rates);

// The fewer of two counts of Floor::fewest_expert_rows, 0 standing for none (nothing routed).
int64_t fewer_rows(int64_t a, int64_t b);

// Floor::fewest_expert_rows of `ids` ([T, k], each chunk's rows in order, as gather_routing returns
// them) for graph `g`, whose routing_ids say how many rows each chunk holds.
int64_t fewest_expert_rows(const Graph& g, int64_t tokens, const int32_t* ids);

// The floor averaged over a session's input sets, each routing to its own experts (its
// fewest_expert_rows: the fewest over the sets). `ids_of(set)` selects that set and returns its
// routing ([T, k] ids in host memory): an input of an experts-only graph, or what the gate produced
// when the set last ran.
Floor mean_floor(const Graph& g, int64_t tokens, int sets, const std::function<std::vector<int32_t>(int set)>& ids_of,
                 const MachineRates& rates);
// The values holding the routing the floor counts: the ids each dispatch node reads, in chunk order
// (one for an unchunked graph; none when nothing is routed).
std::vector<ValueId> routing_ids(const Graph& g);
// The routing of a run of `tokens` tokens as one [T, k] array: each chunk's rows in order, read
// through `data` (a session's view of a value's buffer on the host).
std::vector<int32_t> gather_routing(const Graph& g, int64_t tokens, const std::function<std::vector<int32_t>(ValueId, int64_t count)>& data);
// Plan options that keep alive what a session reads after a run: every gate's top-k ids and every
// dispatch's (the reference check's near-tie rule and the floor read them).
PlanOptions observing(const Graph& g, PlanOptions options);
// Whether the routing is a graph input (unchunked experts-only graph) rather than computed by a run.
inline bool routing_is_input(const Graph& g) {
  const auto ids = routing_ids(g);
  return ids.size() == 1 && g.value(ids[0]).role == ValueRole::input;
}

// One benchmark row as DESIGN.md lists its fields (scope, preset, T, plan, kernels, time_us,
// floor_us, ratio_floor, ratio_serial (null here), tflops, gbps, gpu) plus what explains it.
nlohmann::json bench_row(const std::string& scope, const std::string& preset, int64_t tokens, const std::string& plan,
                         std::size_t lanes, const std::string& kernels, const Timing& t, const Floor& floor,
                         int input_sets);

// The last columns of a printed bench row, shared by both backends' tables: time / the serial plan's
// ("-" where no serial row came first) and the fewest rows a touched expert gets in one chunk
// (Floor::fewest_expert_rows: issue 5 holds chunked runs to the unchunked pace only from 512).
constexpr const char* kPrintedRowTailHeader = "x serial  fewest rows";
std::string printed_row_tail(const nlohmann::json& row);

// "Intel(R) Xeon(R) ..." from /proc/cpuinfo, with the thread count.
std::string cpu_name(int threads);

}  // namespace moeflow
