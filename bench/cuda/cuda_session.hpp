#pragma once
// CpuSession's counterpart on one GPU: plan, device-memory check, weights drawn on the device by
// the counter-based generator (bf16, the same bits the host would round to), input sets, eager runs
// or CUDA-graph replays timed with events, the reference check on the same bf16-rounded data, and
// the roofline floor on measured device ceilings.
#include <functional>
#include <map>
#include <memory>
#include <vector>

#include "bench/measure.hpp"
#include "bench/reference_run.hpp"
#include "scheduler/cuda/cuda_executor.hpp"

namespace moeflow {

struct CudaSessionOptions {
  PlanOptions plan;  // backend is set to cuda
  uint64_t seed = 0;
  // Fills the weights instead of the device generator (a checkpoint): called with the plan's graph
  // and where each weight's fp32 data goes (host staging); bf16 weights are rounded to nearest even
  // on upload, and the check reads exactly those rounded values.
  std::function<void(const Graph&, const std::function<float*(ValueId)>&)> load_weights;
  // This rank's communicators (NCCL), for a graph lowered for several ranks.
  const CommGroups* comm = nullptr;
};

// The device's two ceilings (DESIGN.md): median device-to-device copy of 2 GiB (bytes read +
// written) and median cuBLAS bf16 8192^3 product on random data; measured on a process's first call
// for a device, the same figures after.
MachineRates measure_cuda_rates(int device);

// Right after tens of GB of device memory were freed and allocated (a model's sessions replaced by
// the next model's), the device copies 14% slower for a second or more, then recovers while idle;
// neither memory temperature, clocks nor power change (bench/probes/alloc_history.cu). Waits, in
// steps of 200 ms and at most kMostSettle_s, until a 1 GiB copy reads at kSettledShare of the
// ceiling again; returns the seconds it waited (0: the first copy read that fast, or less than 4 GiB
// is free for the check). The bench calls it where a model's weights were just drawn, so that no
// point is measured in that state.
constexpr double kSettledShare = 0.95;
constexpr double kMostSettle_s = 10.0;
double settle_device_bandwidth(int device, double ceiling_bytes_per_s);

// Device bytes a session of `plan` allocates: the weights unless `weights_held` by another session,
// inputs, workspace, packed weight copies (at most: a copy another executor holds is shared) and the
// executor's own (CudaExecutor::own_device_bytes).
int64_t session_device_bytes(const Plan& plan, bool weights_held);
// Room a plan with packed weights must leave free (CUDA graphs, cuBLAS's own allocations) before
// plan_within_device_memory keeps its packed copies.
constexpr int64_t kPackedWeightsHeadroom = int64_t{256} << 20;

// The session's plan: `options` as they are where session_device_bytes and kPackedWeightsHeadroom
// fit in `free_bytes` of device memory; where they do not and the plan packs weights, the plan
// without packed copies (PlanOptions::packed_weights off), with a note saying so, unless the
// options force a kernel that packs (then the caller's memory check says what is missing). The
// caller checks the result's bytes against the device.
Plan plan_within_device_memory(std::shared_ptr<const Graph> graph, PlanOptions options, int64_t free_bytes,
                               bool weights_held);

class CudaSession {
 public:
  // `share_weights`: a session of the same layer under another plan lends its weights (the plans'
  // graphs may differ by to_host nodes, never in their weights, which is checked).
  CudaSession(std::shared_ptr<const Graph> graph, CudaSessionOptions options, CudaSession* share_weights = nullptr);
  ~CudaSession();

  void set_tokens(int64_t tokens, int input_sets = 1);
  void use_input_set(int set);
  int input_sets() const { return static_cast<int>(inputs_.size()); }
  int64_t tokens() const { return tokens_; }

  double run(Trace* trace = nullptr);  // device seconds
  // Overwrites an input of the selected set (tests build routings by hand). `check` reads it back.
  void write_input(ValueId v, const void* host, std::size_t bytes);
  // Captures the plan for the current T and input set; replay() runs it (device seconds). A
  // stamped capture can be traced node by node on replay (CudaExecutor::capture).
  void capture(bool stamped = false);
  // Captures once for every T up to the maximum (CudaExecutor::capture_any_tokens); replay() then
  // runs at the T of the latest set_tokens.
  void capture_any_tokens(bool stamped = false);
  double replay(Trace* trace = nullptr);
  double replay_launch_seconds(int launches) { return executor_->replay_launch_seconds(launches); }

  // Copies what the reference needs to the host and compares (bf16: tolerance 1e-2).
  CheckReport check(double tolerance);
  // Compares another engine's output of this session's tokens (a rank of a multi-rank run) with the
  // reference on this session's inputs; near-ties follow this session's last run.
  CheckReport check_against(const float* output, double tolerance);
  Floor floor(const MachineRates& rates);
  // The first output, copied to the host as fp32.
  std::vector<float> output();
  // The first `count` elements of an i32 activation of the last run (routing, exchange counts).
  std::vector<int32_t> read_i32(ValueId v, int64_t count);

  const Plan& plan() const { return plan_; }
  const Graph& graph() const { return *plan_.graph; }
  const CudaExecutor& executor() const { return *executor_; }

 private:
  Plan plan_;
  CudaSessionOptions options_;
  std::shared_ptr<DeviceArena> weights_;
  // Host fp32 copies of loaded weights as the device holds them (load_weights); null when drawn.
  std::shared_ptr<const std::map<ValueId, std::vector<float>>> loaded_;
  std::vector<std::unique_ptr<DeviceArena>> inputs_;
  std::unique_ptr<CudaExecutor> executor_;
  int64_t tokens_ = 0;
  int set_ = 0;
  std::map<std::pair<int, ValueId>, std::vector<std::byte>> overwritten_;  // by (set, value); cleared by set_tokens

  void upload_loaded_weights();
};

}  // namespace moeflow
