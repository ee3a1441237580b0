#include "scheduler/cpu_executor.hpp"

#include <tbb/flow_graph.h>
#include <tbb/task_arena.h>

#include <chrono>
#include <exception>
#include <mutex>

#include "graph/error.hpp"
#include "kernels/cpu/elementwise.hpp"

namespace moeflow {

using Clock = std::chrono::steady_clock;

// Built once per executor, inside its arena, so every task it spawns runs there.
struct CpuExecutor::FlowGraph {
  tbb::task_arena arena;
  std::unique_ptr<tbb::flow::graph> graph;  // made inside `arena`: a flow graph runs its tasks in the arena it was made in
  std::vector<std::unique_ptr<tbb::flow::continue_node<tbb::flow::continue_msg>>> nodes;  // by step
  std::vector<std::size_t> roots;

  // State of the run in flight.
  const HostArena* inputs = nullptr;
  const HostArena* weights = nullptr;
  int64_t tokens = 0;
  Clock::time_point start;
  std::vector<TraceEvent>* events = nullptr;
  std::mutex error_mutex;
  std::exception_ptr error;

  explicit FlowGraph(int threads) : arena(threads) {}
};

CpuExecutor::CpuExecutor(const Plan& plan, int threads, const CommGroups* comm)
    : plan_(plan), threads_(threads), comm_(comm), workspace_(plan, Arena::workspace), host_(plan, Arena::host) {
  if (plan.options.backend != Backend::cpu) fail_input("CpuExecutor: the plan was made for the cuda backend");
  if (threads <= 0) fail_input("--threads must be > 0, got " + std::to_string(threads));
  flow_ = std::make_unique<FlowGraph>(threads);
  FlowGraph& f = *flow_;
  const Graph& g = *plan.graph;
  f.arena.execute([&] {
    cpu::use_single_threaded_blas();
    f.graph = std::make_unique<tbb::flow::graph>();
    for (std::size_t i = 0; i < plan.steps.size(); ++i) {
      f.nodes.push_back(std::make_unique<tbb::flow::continue_node<tbb::flow::continue_msg>>(
          *f.graph, [this, i, &g](const tbb::flow::continue_msg&) {
            FlowGraph& fl = *flow_;
            if (fl.error) return tbb::flow::continue_msg();  // a node failed: let the rest drain
            const PlanStep& s = plan_.steps[i];
            const Node& n = g.node(s.node);
            const Operands o = operands(n);
            const auto t0 = Clock::now();
            try {
              // A chunk the run's tokens do not reach has no rows: it runs and produces nothing.
              if (const int64_t rows = g.tokens_of(n, fl.tokens); rows > 0)
                s.kernel->run(KernelCall{g, n, o.in, o.out, rows, nullptr,
                                         s.workspace_bytes ? workspace_.base() + s.workspace_offset : nullptr, nullptr,
                                         comm_, nullptr, false,
                                         s.packed >= 0 ? packed_[static_cast<std::size_t>(s.packed)].get() : nullptr});
            } catch (...) {
              std::lock_guard<std::mutex> lock(fl.error_mutex);
              if (!fl.error) fl.error = std::current_exception();
            }
            if (fl.events) {
              const auto t1 = Clock::now();
              TraceEvent& e = (*fl.events)[i];
              e.name = n.name;
              e.op = n.op->kind();
              e.kernel = s.kernel->name;
              e.lane = s.lane;
              e.chunk = n.chunk;
              e.start_us = std::chrono::duration<double, std::micro>(t0 - fl.start).count();
              e.duration_us = std::chrono::duration<double, std::micro>(t1 - t0).count();
            }
            return tbb::flow::continue_msg();
          }));
    }
    // Edges: each lane in issue order, plus the cross-lane waits.
    std::vector<int> last_on_lane(plan.lanes.size(), -1);
    for (std::size_t i = 0; i < plan.steps.size(); ++i) {
      const PlanStep& s = plan.steps[i];
      bool has_pred = false;
      int& last = last_on_lane[static_cast<std::size_t>(s.lane)];
      if (last >= 0) {
        tbb::flow::make_edge(*f.nodes[static_cast<std::size_t>(last)], *f.nodes[i]);
        has_pred = true;
      }
      last = static_cast<int>(i);
      for (NodeId w : s.waits) {
        tbb::flow::make_edge(*f.nodes[static_cast<std::size_t>(plan.step_of_node[static_cast<std::size_t>(w)])], *f.nodes[i]);
        has_pred = true;
      }
      if (!has_pred) f.roots.push_back(i);
    }
  });
}

CpuExecutor::~CpuExecutor() = default;

void* CpuExecutor::locate(ValueId v) const {
  switch (plan_.buffer(v).arena) {
    case Arena::inputs:
    case Arena::weights: {
      // A view may put an activation in the inputs arena (a chunk's rows of x): the run's arenas.
      const HostArena* arena = plan_.buffer(v).arena == Arena::inputs ? flow_->inputs : flow_->weights;
      if (!arena) fail_input("value '" + plan_.graph->value(v).name + "': no run has bound its arena yet");
      return arena->data(v);
    }
    case Arena::workspace: return workspace_.data(v);
    case Arena::host: return host_.data(v);
  }
  return nullptr;
}

CpuExecutor::Operands CpuExecutor::operands(const Node& n) const {
  Operands o;
  for (ValueId v : n.inputs) o.in.push_back(locate(v));
  for (ValueId v : n.outputs) o.out.push_back(locate(v));
  return o;
}

// The plan's packed weights, written from `weights` before the first run (again only when another
// weights arena is bound), by the first step that reads each, on this thread.
void CpuExecutor::ensure_packed(const HostArena& weights) {
  if (plan_.packed.empty() || packed_from_ == weights.base()) return;
  const Graph& g = *plan_.graph;
  // Built aside and swapped in at the end: a failure part-way leaves the executor as it was.
  std::vector<std::unique_ptr<std::byte[]>> written;
  for (const PackedCopy& c : plan_.packed) {
    const Node& n = g.node(c.first_reader);
    const PlanStep& step = plan_.step_for(c.first_reader);
    const Operands o = operands(n);
    auto& copy = written.emplace_back(new std::byte[static_cast<std::size_t>(c.bytes)]);
    flow_->arena.execute([&] {
      step.kernel->packed_weight->write(KernelCall{g, n, o.in, o.out, g.max_tokens_of(n), nullptr, nullptr, nullptr, comm_},
                                        copy.get());
    });
  }
  packed_ = std::move(written);
  packed_from_ = weights.base();
}

void CpuExecutor::run(const HostArena& inputs, const HostArena& weights, int64_t tokens, Trace* trace) {
  const Graph& g = *plan_.graph;
  if (tokens <= 0 || tokens > g.max_tokens())
    fail_input("tokens = " + std::to_string(tokens) + " must be in [1, " + std::to_string(g.max_tokens()) +
               "] (the plan's maximum; plan with --max-tokens for more)");
  FlowGraph& f = *flow_;
  f.inputs = &inputs;
  f.weights = &weights;
  ensure_packed(weights);
  f.tokens = tokens;
  f.error = nullptr;
  std::vector<TraceEvent> events(trace ? plan_.steps.size() : 0);
  f.events = trace ? &events : nullptr;
  f.start = Clock::now();
  f.arena.execute([&] {
    for (std::size_t r : f.roots) f.nodes[r]->try_put(tbb::flow::continue_msg());
    f.graph->wait_for_all();
  });
  if (f.error) std::rethrow_exception(f.error);
  if (trace) {
    trace->tokens = tokens;
    trace->lanes.clear();
    for (const Lane& l : plan_.lanes) trace->lanes.push_back(l.name);
    for (std::size_t i = 0; i < events.size(); ++i) events[i].predicted_us = plan_.steps[i].predicted_s * 1e6;
    trace->events = std::move(events);
  }
}

const float* CpuExecutor::output(std::size_t i) const {
  return static_cast<const float*>(locate(plan_.graph->outputs().at(i)));
}

}  // namespace moeflow
