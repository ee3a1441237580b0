#include "bench/measure.hpp"

#include <algorithm>
#include <fstream>
#include <iomanip>
#include <map>
#include <set>
#include <sstream>
#include <vector>

#include "graph/error.hpp"
#include "ops/fused_experts_op.hpp"

namespace moeflow {

Timing time_runs(const std::function<double(int)>& run_once, int warmup, int min_runs, int max_runs, double budget_s) {
  int i = 0;
  for (; i < warmup; ++i) run_once(i);
  std::vector<double> times;
  double spent = 0.0;
  while (static_cast<int>(times.size()) < min_runs || (spent < budget_s && static_cast<int>(times.size()) < max_runs)) {
    const double s = run_once(i++);
    times.push_back(s);
    spent += s;
  }
  return timing_of(std::move(times));
}

Timing timing_of(std::vector<double> samples) {
  Timing t;
  t.runs = static_cast<int>(samples.size());
  if (samples.empty()) return t;
  std::sort(samples.begin(), samples.end());
  const std::size_t mid = samples.size() / 2;
  t.median_s = samples.size() % 2 ? samples[mid] : 0.5 * (samples[mid - 1] + samples[mid]);
  t.min_s = samples.front();
  t.max_s = samples.back();
  return t;
}

Floor roofline_floor(const Graph& g, int64_t T, const int32_t* ids, const MachineRates& rates) {
  Floor f;
  for (ValueId v : g.graph_inputs())
    if (g.value(v).role == ValueRole::input) f.bytes += static_cast<double>(g.value(v).bytes(T));
  for (ValueId v : g.outputs()) f.bytes += static_cast<double>(g.value(v).bytes(T));
  auto weight_bytes = [&](ValueId v) { return static_cast<double>(g.value(v).bytes(T)); };
  for (const Node& n : g.nodes()) {
    const std::string kind = n.op->kind();
    if (!routed_experts(n) && kind != "gate" && kind != "shared_expert") continue;
    // The floor is the layer's, however it is scheduled: a chunked graph counts each op once, for
    // all T tokens (its chunk-0 copy stands for it), with every chunk's routing in `ids`.
    if (n.chunk > 0) continue;
    const double H = static_cast<double>(g.value(n.inputs[0]).shape()[1].fixed);
    if (const auto routed = routed_experts(n)) {  // experts, or the fused node that runs them
      if (!ids) fail_input("floor: graph '" + g.name() + "' routes rows but no routing was given");
      std::set<int32_t> touched(ids, ids + T * routed->top_k);
      f.touched_experts = static_cast<int64_t>(touched.size());
      f.fewest_expert_rows = fewest_expert_rows(g, T, ids);
      const double per_expert =
          (weight_bytes(n.inputs[routed->w13_input]) + weight_bytes(n.inputs[routed->w13_input + 1])) / routed->experts;
      f.bytes += per_expert * static_cast<double>(touched.size());
      f.flops += 6.0 * static_cast<double>(T) * routed->top_k * H * routed->intermediate;
      if (n.op->kind() == "fused_experts")  // a shared expert folded in counts as the shared_expert node did
        if (const auto& shared = static_cast<const FusedExpertsOp&>(*n.op).shared()) {
          for (std::size_t i = 5; i < n.inputs.size(); ++i) f.bytes += weight_bytes(n.inputs[i]);
          f.flops += 6.0 * static_cast<double>(T) * H * shared->intermediate + (shared->gated ? 2.0 * static_cast<double>(T) * H : 0.0);
        }
    } else if (kind == "gate" || kind == "shared_expert") {
      for (std::size_t i = 1; i < n.inputs.size(); ++i) f.bytes += weight_bytes(n.inputs[i]);
      const auto in = g.input_values(n);
      const auto out = g.output_values(n);
      f.flops += n.op->cost({in, out}, T).flops;
    }
  }
  const double memory_s = f.bytes / rates.bytes_per_s, compute_s = f.flops / rates.flops_per_s;
  f.memory_bound = memory_s >= compute_s;
  f.seconds = std::max(memory_s, compute_s);
  return f;
}

int64_t fewer_rows(int64_t a, int64_t b) { return a == 0 ? b : b == 0 ? a : std::min(a, b); }

int64_t fewest_expert_rows(const Graph& g, int64_t tokens, const int32_t* ids) {
  int64_t fewest = 0;
  for (ValueId v : routing_ids(g)) {
    const Value& val = g.value(v);
    const int64_t rows = val.shape().elements(val.tokens_in(tokens));
    std::map<int32_t, int64_t> rows_of;  // touched expert -> its rows in this chunk
    for (int64_t i = 0; i < rows; ++i) ++rows_of[ids[i]];
    for (const auto& [expert, count] : rows_of)
      if (expert >= 0) fewest = fewer_rows(fewest, count);
    ids += rows;
  }
  return fewest;
}

std::vector<ValueId> routing_ids(const Graph& g) {
  std::vector<ValueId> ids;
  for (const Node& n : g.nodes())  // topological order keeps chunk order
    if (n.op->kind() == "dispatch" || n.op->kind() == "fused_experts") ids.push_back(n.inputs[1]);
  return ids;
}

std::vector<int32_t> gather_routing(const Graph& g, int64_t tokens,
                                    const std::function<std::vector<int32_t>(ValueId, int64_t count)>& data) {
  std::vector<int32_t> all;
  for (ValueId v : routing_ids(g)) {
    const Value& val = g.value(v);
    const std::vector<int32_t> part = data(v, val.shape().elements(val.tokens_in(tokens)));
    all.insert(all.end(), part.begin(), part.end());
  }
  return all;
}

PlanOptions observing(const Graph& g, PlanOptions options) {
  for (const Node& n : g.nodes())
    if (n.op->kind() == "gate") options.keep_values.push_back(g.value(n.outputs[0]).name);
  for (ValueId v : routing_ids(g))
    if (!g.value(v).is_graph_input()) options.keep_values.push_back(g.value(v).name);
  return options;
}

Floor mean_floor(const Graph& g, int64_t tokens, int sets, const std::function<std::vector<int32_t>(int set)>& ids_of,
                 const MachineRates& rates) {
  if (routing_ids(g).empty()) return roofline_floor(g, tokens, nullptr, rates);  // no routed experts
  Floor mean;
  for (int s = 0; s < sets; ++s) {
    const std::vector<int32_t> ids = ids_of(s);
    const Floor f = roofline_floor(g, tokens, ids.data(), rates);
    mean.bytes += f.bytes / sets;
    mean.flops += f.flops / sets;
    mean.seconds += f.seconds / sets;
    mean.touched_experts += f.touched_experts;
    mean.fewest_expert_rows = fewer_rows(mean.fewest_expert_rows, f.fewest_expert_rows);
    mean.memory_bound = f.memory_bound;
  }
  mean.touched_experts /= sets;
  return mean;
}

nlohmann::json bench_row(const std::string& scope, const std::string& preset, int64_t tokens, const std::string& plan,
                         std::size_t lanes, const std::string& kernels, const Timing& t, const Floor& floor,
                         int input_sets) {
  return {{"scope", scope},
          {"preset", preset},
          {"T", tokens},
          {"plan", plan},
          {"lanes", lanes},
          {"kernels", kernels},
          {"time_us", t.median_s * 1e6},
          {"min_us", t.min_s * 1e6},
          {"runs", t.runs},
          {"input_sets", input_sets},
          {"floor_us", floor.seconds * 1e6},
          {"ratio_floor", t.median_s / floor.seconds},
          {"ratio_serial", nullptr},
          {"tflops", floor.flops / t.median_s / 1e12},
          {"gbps", floor.bytes / t.median_s / 1e9},
          {"touched_experts", floor.touched_experts},
          {"fewest_expert_rows", floor.fewest_expert_rows}};
}

std::string printed_row_tail(const nlohmann::json& row) {
  const nlohmann::json& serial = row.at("ratio_serial");
  std::ostringstream out;
  out << std::left << std::fixed << std::setprecision(3) << std::setw(10);
  if (serial.is_null()) out << "-";
  else out << serial.get<double>();
  out << row.at("fewest_expert_rows").get<int64_t>();
  return out.str();
}

std::string cpu_name(int threads) {
  std::ifstream f("/proc/cpuinfo");
  std::string line, name = "cpu";
  while (std::getline(f, line))
    if (line.rfind("model name", 0) == 0) {
      name = line.substr(line.find(':') + 2);
      break;
    }
  return name + " (" + std::to_string(threads) + " threads)";
}

}  // namespace moeflow
