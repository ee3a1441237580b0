#pragma once
// Runs a Plan on the host: one oneTBB arena of `threads`; each lane's nodes run in issue order, lanes
// run concurrently as tasks (a oneTBB flow graph whose edges are the lane order and the plan's
// cross-lane waits), and kernels parallelise inside the same arena. The workspace is allocated once,
// at the plan's size; inputs and weights are bound per run, so several plans share one set of weights.
#include <cstddef>
#include <memory>
#include <vector>

#include "scheduler/host_memory.hpp"
#include "scheduler/plan.hpp"
#include "scheduler/trace.hpp"

namespace moeflow {

class CpuExecutor {
 public:
  // `comm`: this rank's communicators when the plan's graph was lowered for several ranks.
  CpuExecutor(const Plan& plan, int threads, const CommGroups* comm = nullptr);
  ~CpuExecutor();
  CpuExecutor(const CpuExecutor&) = delete;
  CpuExecutor& operator=(const CpuExecutor&) = delete;

  // Runs the plan for `tokens` ≤ the graph's maximum. When `trace` is given, records every node.
  void run(const HostArena& inputs, const HostArena& weights, int64_t tokens, Trace* trace = nullptr);

  // A value of the last run, wherever the plan put it.
  const void* data(ValueId v) const { return locate(v); }
  const float* output(std::size_t i = 0) const;
  int threads() const { return threads_; }

 private:
  struct FlowGraph;
  const Plan& plan_;
  int threads_;
  const CommGroups* comm_;
  HostArena workspace_;
  HostArena host_;  // values the plan keeps in host memory on every backend (Arena::host)
  void* locate(ValueId v) const;  // a value's bytes by its buffer's arena
  struct Operands {
    std::vector<void*> in, out;
  };
  Operands operands(const Node& n) const;  // the node's inputs' and outputs' bytes, in node order
  void ensure_packed(const HostArena& weights);
  std::unique_ptr<FlowGraph> flow_;
  std::vector<std::unique_ptr<std::byte[]>> packed_;  // per Plan::packed (16-byte aligned)
  const std::byte* packed_from_ = nullptr;            // the weights arena they were written from
};

}  // namespace moeflow
