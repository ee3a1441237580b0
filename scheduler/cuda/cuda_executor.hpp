#pragma once
// Weights: the arena a run or capture is given must outlive the executor's use of it and keep its
// contents; weights a kernel reads packed (Plan::packed) are derived from it once, and shared with
// other executors given the same weights (keyed by the weights' device addresses). Giving another
// arena repacks, and drops a graph captured against the previous one.
// Runs a Plan on one GPU: each lane is a CUDA stream (the critical lane at the highest priority, the
// others lowest), each cross-lane wait an event, every activation in one device allocation sized by
// the plan's buffer table, one cuBLAS handle and workspace per stream. A run can be issued eagerly
// or captured once as a CUDA graph and replayed. Per-node CUDA-event timing goes into the same
// Chrome-trace format as the CPU executor's. Where a step waits on the host while it is issued (a
// to_host copy, communication), an eager run issues each lane from its own thread (lane_threads.hpp).
#include <memory>
#include <vector>

#include "scheduler/cuda/device_arena.hpp"
#include "scheduler/plan.hpp"
#include "scheduler/trace.hpp"

namespace moeflow {

class CudaExecutor {
 public:
  // Checks free device memory for the workspace, pinned host scratch and cuBLAS workspaces first.
  // `comm`: this rank's communicators when the plan's graph was lowered for several ranks.
  explicit CudaExecutor(const Plan& plan, const CommGroups* comm = nullptr);
  ~CudaExecutor();
  // Device bytes an executor of `plan` allocates beyond the plan's arenas and packed copies: a
  // cuBLAS workspace and counters per lane, and a few flags.
  static int64_t own_device_bytes(const Plan& plan);
  CudaExecutor(const CudaExecutor&) = delete;
  CudaExecutor& operator=(const CudaExecutor&) = delete;

  // Issues the plan for `tokens` and waits for it; returns the device time in seconds (events).
  // With `trace`, records every node's start and duration.
  double run(const DeviceArena& inputs, const DeviceArena& weights, int64_t tokens, Trace* trace = nullptr);

  // Captures the plan for `tokens` as a CUDA graph (refused for a plan with a host sync). With
  // `stamped`, a one-thread kernel records the GPU clock before and after every node, so replay()
  // can trace the graph (each stamp is a launch and shifts the timeline by about one).
  void capture(const DeviceArena& inputs, const DeviceArena& weights, int64_t tokens, bool stamped = false);
  // Captures the plan once for every T up to the graph's maximum: the launches are sized for the
  // maximum and the kernels read the replay's T from device memory (a copy from pinned host memory
  // is the graph's first node). Refused, naming the node, where a kernel cannot (KernelEntry::
  // live_tokens) or a node's rows do not follow T (chunks, fixed rows).
  void capture_any_tokens(const DeviceArena& inputs, const DeviceArena& weights, bool stamped = false);
  bool captured() const;
  // Replays the captured graph and waits; returns the device time in seconds. With `trace` (a
  // stamped capture), records every node's start and duration. `tokens`: the T to run, any T up to
  // the maximum after capture_any_tokens, else the captured T (0 means that T).
  double replay(Trace* trace = nullptr, int64_t tokens = 0);
  // Host-side cost of launching the captured graph once (no wait): seconds, median of `launches`.
  double replay_launch_seconds(int launches);

  const void* data(ValueId v) const;
  const Plan& plan() const { return plan_; }
  // The SMs lane `lane`'s kernels aim at (cuBLAS's SM count target, persistent grids); 0: every SM.
  int lane_sm_count(int lane) const;

 private:
  struct State;
  enum class NodeTiming { none, events, stamps };
  void issue(const DeviceArena& inputs, const DeviceArena& weights, int64_t tokens, NodeTiming timing, bool per_lane,
             const int32_t* live_tokens = nullptr);
  void issue_step(std::size_t i, const DeviceArena& inputs, const DeviceArena& weights, int64_t tokens, NodeTiming timing,
                  const int32_t* live_tokens);
  void capture_graph(const DeviceArena& inputs, const DeviceArena& weights, int64_t tokens, bool stamped, bool live);
  void fill_trace(Trace& trace, int64_t tokens, const std::vector<double>& start_us, const std::vector<double>& end_us) const;
  void check_device_flags();
  void* locate(ValueId v, const DeviceArena& inputs, const DeviceArena& weights) const;
  struct Operands {
    std::vector<void*> in, out;
  };
  Operands operands(const Node& n, const DeviceArena& inputs, const DeviceArena& weights) const;  // in node order
  void ensure_packed(const DeviceArena& inputs, const DeviceArena& weights);
  void wait_run_end();
  const Plan& plan_;
  const CommGroups* comm_;
  std::unique_ptr<State> s_;
};

}  // namespace moeflow
