#include "bench/cpu_session.hpp"

#include <chrono>
#include <sstream>

#include "graph/error.hpp"

namespace moeflow {

int64_t CpuSession::bytes_needed(const Plan& plan) {
  return plan.bytes(Arena::weights) + plan.bytes(Arena::inputs) + plan.bytes(Arena::workspace) + plan.bytes(Arena::host);
}

CpuSession::CpuSession(std::shared_ptr<const Graph> graph, const SessionOptions& options,
                       const CpuSession* share_weights)
    : plan_(make_plan(graph, observing(*graph, options.plan))), options_(options) {
  if (share_weights && (!plan_.weights_laid_out_as(share_weights->plan_) || share_weights->options_.seed != options.seed))
    fail_input("CpuSession: weights can only be shared between plans of one layer and seed");
  std::ostringstream what;
  what.setf(std::ios::fixed);
  what.precision(2);
  what << "'" << plan_.graph->name() << "' (weights " << static_cast<double>(plan_.bytes(Arena::weights)) / (1 << 30)
       << " GiB in f32 + inputs and workspace at T=" << plan_.graph->max_tokens() << ")";
  require_host_bytes(bytes_needed(plan_) - (share_weights ? plan_.bytes(Arena::weights) : 0), what.str());
  if (share_weights) weights_ = share_weights->weights_;
  else weights_ = std::make_shared<HostArena>(plan_, Arena::weights);
  executor_ = std::make_unique<CpuExecutor>(plan_, options.threads, options.comm);
  if (!share_weights && options.load_weights)
    options.load_weights(*plan_.graph, [this](ValueId v) { return weights_->as<float>(v); });
  else if (!share_weights)
    fill_random(plan_, *weights_, plan_.graph->max_tokens(), options.seed);
}

void CpuSession::set_tokens(int64_t tokens, int input_sets) {
  if (input_sets < 1) fail_input("CpuSession: input_sets must be >= 1");
  if (tokens <= 0 || tokens > plan_.graph->max_tokens())
    fail_input("tokens = " + std::to_string(tokens) + " must be in [1, " + std::to_string(plan_.graph->max_tokens()) +
               "] (the maximum the graph was built for)");
  tokens_ = tokens;
  require_host_bytes(input_sets * plan_.bytes(Arena::inputs), "input sets of '" + plan_.graph->name() + "'");
  inputs_.resize(static_cast<std::size_t>(input_sets));
  for (int s = 0; s < input_sets; ++s) {
    if (!inputs_[static_cast<std::size_t>(s)]) inputs_[static_cast<std::size_t>(s)] = std::make_unique<HostArena>(plan_, Arena::inputs);
    // Set 0 is drawn from the seed itself, so `run --seed S` and tests see the same inputs.
    fill_random(plan_, *inputs_[static_cast<std::size_t>(s)], tokens, options_.seed + 0x9e3779b9ull * static_cast<uint64_t>(s));
  }
  set_ = 0;
}

void CpuSession::use_input_set(int set) {
  if (set < 0 || set >= input_sets()) fail_input("CpuSession: no input set " + std::to_string(set));
  set_ = set;
}

double CpuSession::run(Trace* trace) {
  if (tokens_ == 0) fail_input("CpuSession::run: call set_tokens first");
  const auto t0 = std::chrono::steady_clock::now();
  executor_->run(*inputs_[static_cast<std::size_t>(set_)], *weights_, tokens_, trace);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

const void* CpuSession::value_data(ValueId v) const {
  // By the buffer's arena: a view of an input (a chunk's rows of x) lies in the current input set.
  switch (plan_.buffer(v).arena) {
    case Arena::weights: return weights_->data(v);
    case Arena::inputs: return inputs_.at(static_cast<std::size_t>(set_))->data(v);
    default: return executor_->data(v);
  }
}

CheckReport CpuSession::check(double tolerance) const { return check_against(output(), tolerance); }

CheckReport CpuSession::check_against(const float* out, double tolerance) const {
  auto data = [this](ValueId v) { return value_data(v); };
  ReferenceResult ref = reference_run(*plan_.graph, tokens_, data, data);
  return check_output(out, ref, tolerance);
}

Floor CpuSession::floor(const MachineRates& rates) {
  const Graph& g = *plan_.graph;
  if (routing_ids(g).empty()) return roofline_floor(g, tokens_, nullptr, rates);  // nothing routed (shared experts alone)
  const int current = set_;
  const Floor f = mean_floor(g, tokens_, input_sets(), [&](int set) {
    use_input_set(set);
    if (!routing_is_input(g)) run();  // a whole layer's routing exists once its gate has run on this set
    return gather_routing(g, tokens_, [&](ValueId v, int64_t count) {
      const auto* data = static_cast<const int32_t*>(value_data(v));
      return std::vector<int32_t>(data, data + count);
    });
  }, rates);
  use_input_set(current);
  if (!routing_is_input(g)) run();
  return f;
}

}  // namespace moeflow
