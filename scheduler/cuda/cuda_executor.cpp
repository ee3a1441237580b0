#include "scheduler/cuda/cuda_executor.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>

#include "graph/error.hpp"
#include "kernels/cuda/check.cuh"
#include "kernels/cuda/cublas_gemm.hpp"
#include "kernels/cuda/device.hpp"
#include "kernels/cuda/lane_context.hpp"
#include "kernels/cuda/timestamp.hpp"
#include "kernels/comm/communicator.hpp"
#include "ops/comm_ops.hpp"
#include "scheduler/lane_threads.hpp"

namespace moeflow {

struct CudaExecutor::State {
  State() = default;
  State(const State&) = delete;
  State& operator=(const State&) = delete;
  // Frees whatever exists, so a constructor that throws part-way leaks nothing (the executor's own
  // destructor would not run then). Null handles are skipped.
  ~State();
  int device = 0;
  std::unique_ptr<DeviceArena> workspace, host;
  std::vector<cudaStream_t> streams;
  std::vector<cuda::LaneContext> lanes;
  std::vector<void*> blas_workspaces;
  std::vector<cudaEvent_t> done;                   // per step: recorded when another lane waits on it
  std::vector<bool> needs_done;
  std::vector<cudaEvent_t> node_start, node_end;   // per step, for traces
  cudaEvent_t run_start = nullptr, run_end = nullptr;
  cudaEvent_t replay_start = nullptr, replay_end = nullptr;
  std::vector<cudaEvent_t> lane_end;
  int* error_flag = nullptr;                       // device
  std::vector<int*> lane_counters;                 // device, per lane: LaneContext::counters
  uint64_t* stamps = nullptr;                      // device: [2 per step] GPU clock (ns), stamped captures
  bool captured_stamped = false;
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t graph_exec = nullptr;
  int64_t captured_tokens = 0;
  bool captured_any_tokens = false;
  int64_t replayed_tokens = 0;
  int32_t* live_tokens = nullptr;                  // device: the T of an any-T replay, copied from...
  int32_t* live_tokens_host = nullptr;             // ...pinned host memory by the graph's first node
  std::unique_ptr<LaneThreads> lane_threads;       // set when a step holds the host and there are lanes beside it
  IssueOrder issue_order;
  std::vector<std::shared_ptr<std::byte>> packed;  // device, per Plan::packed: held while this executor is
  const std::byte* packed_from = nullptr;          // the weights arena they were found for
};

CudaExecutor::State::~State() {
  cudaSetDevice(device);
  for (cudaStream_t st : streams) cudaStreamSynchronize(st);
  if (graph_exec) cudaGraphExecDestroy(graph_exec);
  if (graph) cudaGraphDestroy(graph);
  for (auto* list : {&done, &node_start, &node_end, &lane_end})
    for (cudaEvent_t e : *list)
      if (e) cudaEventDestroy(e);
  for (cudaEvent_t e : {run_start, run_end, replay_start, replay_end})
    if (e) cudaEventDestroy(e);
  for (cuda::LaneContext& l : lanes) {
    cuda::destroy_blas_handle(l.blas);
    if (l.side) {
      cudaStreamSynchronize(l.side);
      cudaStreamDestroy(l.side);
    }
    if (l.side_fork) cudaEventDestroy(l.side_fork);
    if (l.side_join) cudaEventDestroy(l.side_join);
  }
  for (void* p : blas_workspaces) cudaFree(p);
  for (int* p : lane_counters) cudaFree(p);
  for (cudaStream_t st : streams)
    if (st) cudaStreamDestroy(st);
  if (error_flag) cudaFree(error_flag);
  if (live_tokens) cudaFree(live_tokens);
  if (live_tokens_host) cudaFreeHost(live_tokens_host);
  if (stamps) cudaFree(stamps);
}

namespace {
// A step that may wait on the host while it is issued: a copy to the host, or communication (the
// alltoall reads its counts there; MPI calls return when their transfer has).
bool holds_host(const Node& n) { return n.op->kind() == "to_host" || n.op->communicates(); }
}  // namespace

int64_t CudaExecutor::own_device_bytes(const Plan& plan) {
  const std::size_t per_lane = cuda::recommended_blas_workspace_bytes() + sizeof(int) * cuda::kLaneCounterWords;
  return static_cast<int64_t>(per_lane * plan.lanes.size()) + 4096;
}

CudaExecutor::CudaExecutor(const Plan& plan, const CommGroups* comm)
    : plan_(plan), comm_(comm), s_(std::make_unique<State>()) {
  if (plan.options.backend != Backend::cuda) fail_input("CudaExecutor: the plan was made for the cpu backend");
  State& s = *s_;
  s.device = plan.options.device;
  require_device_bytes(s.device, plan.bytes(Arena::workspace) + own_device_bytes(plan),
                       "plan '" + plan.graph->name() + "' (workspace and cuBLAS workspaces)");
  const std::size_t blas_bytes = cuda::recommended_blas_workspace_bytes();
  MOEFLOW_CUDA_CHECK(cudaSetDevice(s.device));
  s.workspace = std::make_unique<DeviceArena>(plan, Arena::workspace, s.device);
  s.host = std::make_unique<DeviceArena>(plan, Arena::host, s.device);
  MOEFLOW_CUDA_CHECK(cudaMalloc(&s.error_flag, sizeof(int)));
  MOEFLOW_CUDA_CHECK(cudaMalloc(&s.stamps, sizeof(uint64_t) * 2 * std::max<std::size_t>(plan.steps.size(), 1)));
  MOEFLOW_CUDA_CHECK(cudaMalloc(&s.live_tokens, sizeof(int32_t)));
  MOEFLOW_CUDA_CHECK(cudaMallocHost(&s.live_tokens_host, sizeof(int32_t)));
  int least = 0, greatest = 0;
  MOEFLOW_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  // The compute lanes leave the plan's share of SMs to its communication lane (the planner's
  // leave_sms_to_communication says when and why).
  std::vector<bool> communicates(plan.lanes.size(), false);
  for (const PlanStep& step : plan.steps)
    if (plan.graph->node(step.node).op->communicates()) communicates[static_cast<std::size_t>(step.lane)] = true;
  const int compute_sms = plan.sms_left_to_communication > 0
                              ? std::max(1, cuda::multiprocessor_count(s.device) - plan.sms_left_to_communication)
                              : 0;
  // Each resource goes into the state as soon as it exists, so a failure part-way (out of device
  // memory, say) leaves nothing behind: State's destructor frees whatever is there.
  for (std::size_t l = 0; l < plan.lanes.size(); ++l) {
    cuda::LaneContext& ctx = s.lanes.emplace_back();
    // The critical path (lane 0) goes first when lanes compete for the machine.
    MOEFLOW_CUDA_CHECK(cudaStreamCreateWithPriority(&ctx.stream, cudaStreamNonBlocking, l == 0 ? greatest : least));
    s.streams.push_back(ctx.stream);
    MOEFLOW_CUDA_CHECK(cudaMalloc(&ctx.blas_workspace, blas_bytes));
    s.blas_workspaces.push_back(ctx.blas_workspace);
    ctx.blas_workspace_bytes = blas_bytes;
    ctx.blas = cuda::create_blas_handle(ctx.stream, ctx.blas_workspace, blas_bytes);
    ctx.device = s.device;
    // SMs the lane's kernels aim at: fewer where communication keeps some, or where the plan halves a
    // side lane's share (Lane::sm_share).
    int lane_sms = !communicates[l] && compute_sms > 0 ? compute_sms : 0;
    if (const double share = plan.lanes[l].sm_share; share < 1.0) {
      const int device_sms = lane_sms > 0 ? lane_sms : cuda::multiprocessor_count(s.device);
      lane_sms = std::max(1, static_cast<int>(share * device_sms + 0.5));
    }
    if (lane_sms > 0) {
      ctx.sm_count = lane_sms;
      cuda::set_blas_sm_target(ctx.blas, lane_sms);
    }
    ctx.error_flag = s.error_flag;
    MOEFLOW_CUDA_CHECK(cudaMalloc(&ctx.counters, sizeof(int) * cuda::kLaneCounterWords));
    s.lane_counters.push_back(ctx.counters);
    ctx.counter_words = cuda::kLaneCounterWords;
    // On the lane's own stream: its kernels come after it (a legacy-stream memset would not order
    // them, the streams being non-blocking).
    MOEFLOW_CUDA_CHECK(cudaMemsetAsync(ctx.counters, 0, sizeof(int) * cuda::kLaneCounterWords, ctx.stream));
    MOEFLOW_CUDA_CHECK(cudaStreamCreateWithPriority(&ctx.side, cudaStreamNonBlocking, least));
    MOEFLOW_CUDA_CHECK(cudaEventCreateWithFlags(&ctx.side_fork, cudaEventDisableTiming));
    MOEFLOW_CUDA_CHECK(cudaEventCreateWithFlags(&ctx.side_join, cudaEventDisableTiming));
    MOEFLOW_CUDA_CHECK(cudaEventCreateWithFlags(&s.lane_end.emplace_back(), cudaEventDisableTiming));
  }
  // On lane 0's stream, which every run and replay starts from (a legacy-stream memset would not
  // order the lanes' non-blocking streams after it).
  MOEFLOW_CUDA_CHECK(cudaMemsetAsync(s.error_flag, 0, sizeof(int), s.streams[0]));
  const std::size_t n = plan.steps.size();
  s.done.resize(n, nullptr);
  s.needs_done.assign(n, false);
  for (const PlanStep& step : plan.steps)
    for (NodeId w : step.waits) s.needs_done[static_cast<std::size_t>(plan.step_of_node[static_cast<std::size_t>(w)])] = true;
  for (std::size_t i = 0; i < n; ++i) {
    if (s.needs_done[i]) MOEFLOW_CUDA_CHECK(cudaEventCreateWithFlags(&s.done[i], cudaEventDisableTiming));
    MOEFLOW_CUDA_CHECK(cudaEventCreate(&s.node_start.emplace_back()));
    MOEFLOW_CUDA_CHECK(cudaEventCreate(&s.node_end.emplace_back()));
  }
  MOEFLOW_CUDA_CHECK(cudaEventCreate(&s.run_start));
  MOEFLOW_CUDA_CHECK(cudaEventCreate(&s.run_end));
  MOEFLOW_CUDA_CHECK(cudaEventCreate(&s.replay_start));
  MOEFLOW_CUDA_CHECK(cudaEventCreate(&s.replay_end));
  const auto& nodes = plan.graph->nodes();
  if (plan.lanes.size() > 1 && std::any_of(nodes.begin(), nodes.end(), holds_host))
    s.lane_threads = std::make_unique<LaneThreads>(static_cast<int>(plan.lanes.size()));
}

CudaExecutor::~CudaExecutor() = default;  // State::~State frees everything

// Issues every step on its lane's stream in the plan's order. Lane 0's stream starts and ends the
// run: the other lanes fork from it (wait on run_start) and join into it (lane_end events), so
// the whole run is one region of one stream, which is also what stream capture needs. Where a step
// holds the host (s.issue_per_lane), each lane is issued by its own thread instead, in its own
// order, waiting on the host for the steps of other lanes it depends on to be issued.
void CudaExecutor::issue(const DeviceArena& inputs, const DeviceArena& weights, int64_t tokens, NodeTiming timing,
                         bool per_lane, const int32_t* live_tokens) {
  State& s = *s_;
  cudaStream_t main = s.streams[0];
  MOEFLOW_CUDA_CHECK(cudaEventRecord(s.run_start, main));
  for (std::size_t l = 1; l < s.streams.size(); ++l) MOEFLOW_CUDA_CHECK(cudaStreamWaitEvent(s.streams[l], s.run_start, 0));
  if (!per_lane) {
    for (std::size_t i = 0; i < plan_.steps.size(); ++i) issue_step(i, inputs, weights, tokens, timing, live_tokens);
  } else {
    s.issue_order.reset(plan_.steps.size());
    const std::function<void(int)> issue_lane = [&](int lane) {
      if (lane != 0) MOEFLOW_CUDA_CHECK(cudaSetDevice(s.device));  // the current device is per thread
      for (std::size_t i = 0; i < plan_.steps.size(); ++i) {
        const PlanStep& step = plan_.steps[i];
        if (step.lane != lane) continue;
        for (NodeId w : step.waits) s.issue_order.wait_issued(static_cast<std::size_t>(plan_.step_of_node[static_cast<std::size_t>(w)]));
        issue_step(i, inputs, weights, tokens, timing, live_tokens);
        s.issue_order.mark_issued(i);
      }
    };
    s.lane_threads->run(issue_lane, s.issue_order);
  }
  for (std::size_t l = 1; l < s.streams.size(); ++l) {
    MOEFLOW_CUDA_CHECK(cudaEventRecord(s.lane_end[l], s.streams[l]));
    MOEFLOW_CUDA_CHECK(cudaStreamWaitEvent(main, s.lane_end[l], 0));
  }
  MOEFLOW_CUDA_CHECK(cudaEventRecord(s.run_end, main));
}

CudaExecutor::Operands CudaExecutor::operands(const Node& n, const DeviceArena& inputs, const DeviceArena& weights) const {
  Operands o;
  o.in.reserve(n.inputs.size());
  o.out.reserve(n.outputs.size());
  for (ValueId v : n.inputs) o.in.push_back(locate(v, inputs, weights));
  for (ValueId v : n.outputs) o.out.push_back(locate(v, inputs, weights));
  return o;
}

void* CudaExecutor::locate(ValueId v, const DeviceArena& inputs, const DeviceArena& weights) const {
  switch (plan_.buffer(v).arena) {
    case Arena::inputs: return inputs.data(v);
    // By this plan's offset: a weights arena may be lent by a session of another plan of the same
    // layer (a fused or unfused graph numbers its values differently; the offsets agree).
    case Arena::weights: return weights.base() + plan_.buffer(v).offset;
    case Arena::workspace: return s_->workspace->data(v);
    case Arena::host: return s_->host->data(v);
  }
  return nullptr;
}

namespace {

// Packed weights by the source weight's device address and the layout. The executors of several
// plans of one layer (a benchmark's serial, concurrent and captured plans, sharing one weights
// arena) share one copy of each; the last executor holding it frees it. The weights outlive it: a
// session keeps its weights arena while its executor exists.
struct PackedWeights {
  std::mutex mutex;
  std::map<std::pair<const void*, std::string>, std::weak_ptr<std::byte>> copies;
};
PackedWeights& packed_weights() {
  static PackedWeights p;
  return p;
}

}  // namespace

// The plan's packed weights for `weights`: found where another executor has them, else written once
// on lane 0's stream and waited for, before any run or capture reads them.
void CudaExecutor::ensure_packed(const DeviceArena& inputs, const DeviceArena& weights) {
  State& s = *s_;
  if (plan_.packed.empty() || s.packed_from == weights.base()) return;
  const Graph& g = *plan_.graph;
  PackedWeights& cache = packed_weights();
  const std::lock_guard<std::mutex> lock(cache.mutex);
  // Built aside and swapped in at the end: a failure part-way leaves the executor as it was.
  std::vector<std::shared_ptr<std::byte>> found;
  for (const PackedCopy& c : plan_.packed) {
    const auto key = std::make_pair(static_cast<const void*>(locate(c.source, inputs, weights)), c.layout);
    if (std::shared_ptr<std::byte> held = cache.copies[key].lock()) {
      found.push_back(std::move(held));
      continue;
    }
    const PlanStep& step = plan_.step_for(c.first_reader);
    const Node& n = g.node(c.first_reader);
    require_device_bytes(s.device, c.bytes, "node '" + n.name + "': " + g.value(c.source).name + " packed as " + c.layout);
    void* bytes = nullptr;
    MOEFLOW_CUDA_CHECK(cudaMalloc(&bytes, static_cast<std::size_t>(c.bytes)));
    std::shared_ptr<std::byte> copy(static_cast<std::byte*>(bytes), [](std::byte* p) { cudaFree(p); });
    const Operands o = operands(n, inputs, weights);
    step.kernel->packed_weight->write(KernelCall{g, n, o.in, o.out, g.max_tokens_of(n), &s.lanes[0]}, copy.get());
    if (const cudaError_t launch = cudaGetLastError(); launch != cudaSuccess)
      fail_resource("node '" + n.name + "' (" + step.kernel->name + "): packing " + g.value(c.source).name +
                    " failed: " + cudaGetErrorString(launch));
    MOEFLOW_CUDA_CHECK(cudaStreamSynchronize(s.streams[0]));
    cache.copies[key] = copy;
    found.push_back(std::move(copy));
  }
  std::erase_if(cache.copies, [](const auto& entry) { return entry.second.expired(); });
  // A graph captured against other weights would replay with copies this executor lets go.
  if (s.packed_from != nullptr && s.graph_exec != nullptr) {
    MOEFLOW_CUDA_CHECK(cudaGraphExecDestroy(s.graph_exec));
    MOEFLOW_CUDA_CHECK(cudaGraphDestroy(s.graph));
    s.graph_exec = nullptr;
    s.graph = nullptr;
  }
  s.packed = std::move(found);
  s.packed_from = weights.base();
}

// One step on its lane's stream: its cross-lane waits, its kernel, its timing records and the
// event other lanes wait on.
void CudaExecutor::issue_step(std::size_t i, const DeviceArena& inputs, const DeviceArena& weights, int64_t tokens,
                              NodeTiming timing, const int32_t* live_tokens) {
  State& s = *s_;
  const Graph& g = *plan_.graph;
  const PlanStep& step = plan_.steps[i];
  const Node& n = g.node(step.node);
  cuda::LaneContext& lane = s.lanes[static_cast<std::size_t>(step.lane)];
  for (NodeId w : step.waits)
    MOEFLOW_CUDA_CHECK(cudaStreamWaitEvent(lane.stream, s.done[static_cast<std::size_t>(plan_.step_of_node[static_cast<std::size_t>(w)])], 0));
  const Operands o = operands(n, inputs, weights);
  if (timing == NodeTiming::events) MOEFLOW_CUDA_CHECK(cudaEventRecord(s.node_start[i], lane.stream));
  if (timing == NodeTiming::stamps) cuda::record_global_time(s.stamps + 2 * i, lane.stream);
  // A chunk the run's tokens do not reach has no rows: it runs (its events still fire) and
  // produces nothing.
  if (const int64_t rows = g.tokens_of(n, tokens); rows > 0)
    step.kernel->run(KernelCall{g, n, o.in, o.out, rows, &lane,
                                step.workspace_bytes ? s.workspace->base() + step.workspace_offset : nullptr,
                                step.host_workspace_bytes ? s.host->base() + step.host_workspace_offset : nullptr,
                                comm_, live_tokens, step.starts_early,
                                step.packed >= 0 ? s.packed[static_cast<std::size_t>(step.packed)].get() : nullptr});
  // A launch the kernel's wrapper did not check fails here, on the thread that issued it (the
  // runtime keeps the last error per host thread, and lanes may be issued from their own threads).
  if (const cudaError_t launch = cudaGetLastError(); launch != cudaSuccess)
    fail_resource("node '" + n.name + "' (" + step.kernel->name + "): a launch failed: " + cudaGetErrorString(launch));
  if (timing == NodeTiming::events) MOEFLOW_CUDA_CHECK(cudaEventRecord(s.node_end[i], lane.stream));
  if (timing == NodeTiming::stamps) cuda::record_global_time(s.stamps + 2 * i + 1, lane.stream);
  if (s.needs_done[i]) MOEFLOW_CUDA_CHECK(cudaEventRecord(s.done[i], lane.stream));
}

void CudaExecutor::check_device_flags() {
  int flag = 0;
  MOEFLOW_CUDA_CHECK(cudaMemcpy(&flag, s_->error_flag, sizeof(int), cudaMemcpyDeviceToHost));
  if (flag != 0) {
    MOEFLOW_CUDA_CHECK(cudaMemsetAsync(s_->error_flag, 0, sizeof(int), s_->streams[0]));  // before the next run
    if (flag & cuda::kErrorCapacityOverflow)
      throw Error(ErrorKind::check_failed,
                  "an expert received more rows than the padded strategy's capacity (device flag raised); its output "
                  "is incomplete: choose another experts kernel (--kernel experts=...)");
    throw Error(ErrorKind::check_failed, "a device kernel raised error flag " + std::to_string(flag));
  }
}

// Where ranks exchange rows, a peer lost mid-run can leave NCCL's kernels waiting with no call here
// failing: the wait polls the communicators' asynchronous errors and, past comm::peer_timeout(),
// aborts them (their kernels then stop) so that this rank fails with a reason instead of hanging.
// One rank's run of one layer takes milliseconds; the deadline is the contract's minute by default.
void CudaExecutor::wait_run_end() {
  const bool exchanges = comm_ != nullptr && (comm_->world != nullptr || comm_->tp != nullptr);
  if (!exchanges) {
    MOEFLOW_CUDA_CHECK(cudaEventSynchronize(s_->run_end));
    return;
  }
  const std::chrono::milliseconds timeout = comm::peer_timeout();
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    const cudaError_t status = cudaEventQuery(s_->run_end);
    if (status == cudaSuccess) return;
    if (status != cudaErrorNotReady) MOEFLOW_CUDA_CHECK(status);
    for (comm::Communicator* c : {comm_->world, comm_->tp})
      if (c) c->check_async();
    if (std::chrono::steady_clock::now() > deadline) {
      for (comm::Communicator* c : {comm_->world, comm_->tp})
        if (c) c->abort();
      char seconds[32];
      std::snprintf(seconds, sizeof seconds, "%g", static_cast<double>(timeout.count()) / 1000.0);
      fail_resource("plan '" + plan_.graph->name() + "': the run had not finished after " + seconds +
                    " s with its exchanges in flight (a peer lost?); this rank's communicators are aborted "
                    "(MOEFLOW_PEER_TIMEOUT sets the deadline)");
    }
    std::this_thread::yield();
  }
}

double CudaExecutor::run(const DeviceArena& inputs, const DeviceArena& weights, int64_t tokens, Trace* trace) {
  const Graph& g = *plan_.graph;
  if (tokens <= 0 || tokens > g.max_tokens())
    fail_input("tokens = " + std::to_string(tokens) + " must be in [1, " + std::to_string(g.max_tokens()) + "]");
  MOEFLOW_CUDA_CHECK(cudaSetDevice(s_->device));
  ensure_packed(inputs, weights);
  issue(inputs, weights, tokens, trace ? NodeTiming::events : NodeTiming::none, s_->lane_threads != nullptr);
  wait_run_end();
  MOEFLOW_CUDA_CHECK(cudaGetLastError());
  check_device_flags();
  float ms = 0.0f;
  MOEFLOW_CUDA_CHECK(cudaEventElapsedTime(&ms, s_->run_start, s_->run_end));
  if (trace) {
    std::vector<double> start_us, end_us;
    for (std::size_t i = 0; i < plan_.steps.size(); ++i) {
      float start = 0.0f, end = 0.0f;
      MOEFLOW_CUDA_CHECK(cudaEventElapsedTime(&start, s_->run_start, s_->node_start[i]));
      MOEFLOW_CUDA_CHECK(cudaEventElapsedTime(&end, s_->run_start, s_->node_end[i]));
      start_us.push_back(start * 1e3);
      end_us.push_back(end * 1e3);
    }
    fill_trace(*trace, tokens, start_us, end_us);
  }
  return ms * 1e-3;
}

void CudaExecutor::fill_trace(Trace& trace, int64_t tokens, const std::vector<double>& start_us,
                              const std::vector<double>& end_us) const {
  const Graph& g = *plan_.graph;
  trace.tokens = tokens;
  trace.lanes.clear();
  for (const Lane& l : plan_.lanes) trace.lanes.push_back(l.name);
  trace.events.clear();
  for (std::size_t i = 0; i < plan_.steps.size(); ++i) {
    const PlanStep& step = plan_.steps[i];
    const Node& n = g.node(step.node);
    trace.events.push_back({n.name, n.op->kind(), step.kernel->name, step.lane, n.chunk, start_us[i],
                            end_us[i] - start_us[i], step.predicted_s * 1e6});
  }
}

void CudaExecutor::capture(const DeviceArena& inputs, const DeviceArena& weights, int64_t tokens, bool stamped) {
  if (tokens <= 0 || tokens > plan_.graph->max_tokens())
    fail_input("tokens = " + std::to_string(tokens) + " must be in [1, " + std::to_string(plan_.graph->max_tokens()) + "]");
  capture_graph(inputs, weights, tokens, stamped, false);
}

void CudaExecutor::capture_any_tokens(const DeviceArena& inputs, const DeviceArena& weights, bool stamped) {
  const Graph& g = *plan_.graph;
  const int64_t most = g.max_tokens();
  for (const PlanStep& step : plan_.steps) {
    const Node& n = g.node(step.node);
    if (!step.kernel->live_tokens)
      fail_input("capture for any T: node '" + n.name + "' runs kernel '" + step.kernel->name +
                 "', which needs its T when it is issued; capture for one T, or choose a kernel that reads it on the "
                 "device (--kernel)");
    if (g.tokens_of(n, 1) != 1 || g.tokens_of(n, most) != most)
      fail_input("capture for any T: node '" + n.name + "' works on " + std::to_string(g.tokens_of(n, most)) +
                 " rows at T = " + std::to_string(most) + " (a chunk or fixed rows), not on T rows");
  }
  capture_graph(inputs, weights, most, stamped, true);
}

// Capture on lane 0's stream (the other lanes fork from it and join back). With `live`, the graph's
// first node copies the replay's T from pinned host memory to the device, where the kernels read it.
void CudaExecutor::capture_graph(const DeviceArena& inputs, const DeviceArena& weights, int64_t tokens, bool stamped,
                                 bool live) {
  if (plan_.has_host_sync())
    fail_input("--cuda-graph: plan '" + plan_.graph->name() +
               "' waits on the host (a to_host node, for a kernel that needs row counts there); a CUDA graph cannot "
               "contain that. Plan with capturable kernels (the planner does so under --cuda-graph)");
  for (const Node& n : plan_.graph->nodes())
    if (n.op->communicates())
      fail_input("--cuda-graph: plan '" + plan_.graph->name() + "' exchanges rows between ranks (node '" + n.name +
                 "'), and its exchanges wait on the host (row counts over MPI); a CUDA graph cannot contain that");
  State& s = *s_;
  MOEFLOW_CUDA_CHECK(cudaSetDevice(s.device));
  if (s.graph_exec) MOEFLOW_CUDA_CHECK(cudaGraphExecDestroy(s.graph_exec));
  if (s.graph) MOEFLOW_CUDA_CHECK(cudaGraphDestroy(s.graph));
  s.graph_exec = nullptr;
  s.graph = nullptr;
  ensure_packed(inputs, weights);  // outside the graph: written once, not on every replay
  MOEFLOW_CUDA_CHECK(cudaStreamSynchronize(s.streams[0]));
  *s.live_tokens_host = static_cast<int32_t>(tokens);
  MOEFLOW_CUDA_CHECK(cudaStreamBeginCapture(s.streams[0], cudaStreamCaptureModeThreadLocal));
  try {
    if (live)
      MOEFLOW_CUDA_CHECK(cudaMemcpyAsync(s.live_tokens, s.live_tokens_host, sizeof(int32_t), cudaMemcpyHostToDevice,
                                         s.streams[0]));
    issue(inputs, weights, tokens, stamped ? NodeTiming::stamps : NodeTiming::none, false,
          live ? s.live_tokens : nullptr);
  } catch (...) {
    cudaGraph_t broken = nullptr;
    cudaStreamEndCapture(s.streams[0], &broken);
    if (broken) cudaGraphDestroy(broken);
    cudaGetLastError();
    throw;
  }
  MOEFLOW_CUDA_CHECK(cudaStreamEndCapture(s.streams[0], &s.graph));
  // Captured kernel nodes carry their stream's priority, but a graph runs at the priority of the
  // stream it is launched into unless told otherwise: keep the critical lane ahead on replay too.
  MOEFLOW_CUDA_CHECK(cudaGraphInstantiateWithFlags(&s.graph_exec, s.graph, cudaGraphInstantiateFlagUseNodePriority));
  // Uploaded now, not by its first launch: a replay is then timed as a graph that serving replays
  // again and again (the upload, done once, put 1.3-1.9 µs into the first launch of every capture of
  // a one-kernel graph on the H100, more with more nodes; bench/probes/single_token_timeline.cu).
  MOEFLOW_CUDA_CHECK(cudaGraphUpload(s.graph_exec, s.streams[0]));
  MOEFLOW_CUDA_CHECK(cudaStreamSynchronize(s.streams[0]));
  s.captured_tokens = tokens;
  s.captured_any_tokens = live;
  s.captured_stamped = stamped;
}

bool CudaExecutor::captured() const { return s_->graph_exec != nullptr; }

double CudaExecutor::replay(Trace* trace, int64_t tokens) {
  State& s = *s_;
  if (!s.graph_exec) fail_input("replay: nothing captured");
  if (trace && !s.captured_stamped) fail_input("replay: tracing a replay needs a stamped capture");
  if (tokens == 0) tokens = s.captured_tokens;
  if (s.captured_any_tokens) {
    if (tokens < 1 || tokens > s.captured_tokens)
      fail_input("replay: tokens = " + std::to_string(tokens) + " must be in [1, " + std::to_string(s.captured_tokens) + "]");
    *s.live_tokens_host = static_cast<int32_t>(tokens);  // the previous replay has finished reading it
  } else if (tokens != s.captured_tokens) {
    fail_input("replay: the graph was captured for T = " + std::to_string(s.captured_tokens) + ", not " +
               std::to_string(tokens) + " (capture again, or capture for any T)");
  }
  s.replayed_tokens = tokens;
  // Events recorded during capture become graph nodes, not timing records: time around the launch.
  MOEFLOW_CUDA_CHECK(cudaEventRecord(s.replay_start, s.streams[0]));
  MOEFLOW_CUDA_CHECK(cudaGraphLaunch(s.graph_exec, s.streams[0]));
  MOEFLOW_CUDA_CHECK(cudaEventRecord(s.replay_end, s.streams[0]));
  MOEFLOW_CUDA_CHECK(cudaEventSynchronize(s.replay_end));
  check_device_flags();
  float ms = 0.0f;
  MOEFLOW_CUDA_CHECK(cudaEventElapsedTime(&ms, s.replay_start, s.replay_end));
  if (trace) {
    const std::size_t n = plan_.steps.size();
    std::vector<uint64_t> stamps(2 * n);
    MOEFLOW_CUDA_CHECK(cudaMemcpy(stamps.data(), s.stamps, sizeof(uint64_t) * 2 * n, cudaMemcpyDeviceToHost));
    const uint64_t origin = n ? *std::min_element(stamps.begin(), stamps.end()) : 0;
    std::vector<double> start_us(n), end_us(n);
    for (std::size_t i = 0; i < n; ++i) {
      start_us[i] = static_cast<double>(stamps[2 * i] - origin) * 1e-3;
      end_us[i] = static_cast<double>(stamps[2 * i + 1] - origin) * 1e-3;
    }
    fill_trace(*trace, s.replayed_tokens, start_us, end_us);
  }
  return ms * 1e-3;
}

double CudaExecutor::replay_launch_seconds(int launches) {
  State& s = *s_;
  if (!s.graph_exec) fail_input("replay: nothing captured");
  std::vector<double> times;
  for (int i = 0; i < launches; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    MOEFLOW_CUDA_CHECK(cudaGraphLaunch(s.graph_exec, s.streams[0]));
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    MOEFLOW_CUDA_CHECK(cudaStreamSynchronize(s.streams[0]));
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

int CudaExecutor::lane_sm_count(int lane) const { return s_->lanes.at(static_cast<std::size_t>(lane)).sm_count; }

const void* CudaExecutor::data(ValueId v) const {
  return plan_.buffer(v).arena == Arena::host ? s_->host->data(v) : s_->workspace->data(v);
}

}  // namespace moeflow
