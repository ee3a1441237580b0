#pragma once
// A Plan: every node's lane, the global issue order, the cross-lane waits, the kernel chosen for it
// and why, and the buffer table (offset and size of every value at the graph's maximum T). One plan
// serves any T ≤ that maximum. Lanes are logical: a CUDA stream on the GPU; on the host, a lane's
// nodes run in issue order and different lanes run concurrently as tasks in one oneTBB arena.
#include <map>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "graph/graph.hpp"
#include "ops/kernel_registry.hpp"
#include "scheduler/cost_model.hpp"
#include "scheduler/tuning_cache.hpp"

namespace moeflow {

enum class Policy {
  serial,      // one lane, topological order: the baseline every benchmark compares against
  concurrent,  // list scheduling on the critical path; independent branches on their own lanes
};
const char* to_string(Policy p);
Policy parse_policy(const std::string& text);

// The most lanes the concurrent planner opens unless told otherwise (--max-lanes).
inline constexpr int kDefaultMaxLanes = 4;

struct PlanOptions {
  Policy policy = Policy::serial;
  Backend backend = Backend::cpu;
  int max_lanes = kDefaultMaxLanes;
  std::map<std::string, std::string> forced_kernels;  // op kind -> kernel name (--kernel)
  MachineRates rates;                                 // for the cost model
  int64_t cost_tokens = 0;                            // T the costs are evaluated at; 0: the maximum
  const KernelRegistry* registry = nullptr;           // kernels to choose from; null: the built-in ones
  bool capturable = false;                            // only kernels a CUDA graph can capture (--cuda-graph)
  int device = 0;                                     // CUDA device (backend cuda)
  bool reuse_memory = true;                           // let workspace buffers share bytes (memory_planner.hpp)
  std::vector<std::string> keep_values;               // read after a run (checks, floors): never share bytes
  // Measured kernel choices (`moeflow tune`, --tuning-cache) and the device they must match (empty:
  // any device's). A cached choice goes before the registry's order; --kernel goes before both.
  std::shared_ptr<const TuningCache> tuning;
  std::string tuning_device;
  // Fuse dispatch → experts → combine chains into one fused_experts node where a kernel of the
  // backend can run it (ops/fuse_experts.hpp); a --kernel forced on one of the three keeps them apart.
  bool fuse = true;
  // With `fuse`: offer the fused node the layer's shared expert and the reduce adding it too, kept
  // where a fused kernel runs both (ops/fuse_experts.hpp). A reduce left adding a combine's output
  // becomes that combine's addends (ops/fold_shared_add.hpp), with or without `fuse`.
  bool fold_shared = true;
  // Let a kernel start while the previous one of its lane runs where both allow it (CUDA's
  // programmatic dependent launch; PlanStep::starts_early).
  bool early_start = true;
  // Let a GPU side lane with room to stretch aim at half the SMs (Lane::sm_share; off:
  // --side-lanes-every-sm, every lane aims at every SM).
  bool share_side_lanes = true;
  // Let kernels read a weight packed once at bind time (PackedWeight: w13 interleaved for a SwiGLU
  // epilogue, w2 transposed for the one-token kernel); off (--no-packed-weights, or CudaSession where
  // the copies would not fit in device memory) they are passed over, and the plan holds no packed copy.
  bool packed_weights = true;

  KernelLimits limits() const { return {.capturable = capturable, .packed_weights = packed_weights}; }
};

struct Lane {
  std::string name;  // "lane0 (routed)", "lane1 (shared_expert)"
  std::string why;   // why this lane exists
  // The share of the device's SMs the lane's kernels aim at (cuBLAS's SM count target, persistent
  // grids: LaneContext::sm_count); 1: all of them. The planner halves it for a side lane with room
  // to stretch (share_sms_with_side_lanes in planner.cpp says why).
  double sm_share = 1.0;
};

struct PlanStep {
  NodeId node = kNoNode;
  int lane = 0;
  int order = 0;                // position in the global issue order
  std::vector<NodeId> waits;    // cross-lane predecessors to wait for (an event / a task edge)
  const KernelEntry* kernel = nullptr;
  std::string reason;           // why that kernel
  Cost cost;                    // at cost_tokens
  double predicted_s = 0.0;     // cost model at cost_tokens
  double work_s = 0.0;          // the part of predicted_s bound by a machine ceiling (cost_model.hpp)
  double start_estimate_s = 0.0;
  int64_t workspace_offset = 0;  // the kernel's scratch in the workspace arena
  int64_t workspace_bytes = 0;   // at the maximum T
  int64_t host_workspace_offset = 0;  // the kernel's pinned host scratch in the host arena
  int64_t host_workspace_bytes = 0;
  // Starts while the previous step of its lane still runs (KernelEntry::starts_early and that step's
  // releases_next, no cross-lane wait): the memory planner keeps its buffers apart from that step's.
  bool starts_early = false;
  // Where the kernel holds every SM (KernelEntry::holds_every_sm): the step before it, in placement
  // order, whose kernel does too, or kNoNode. It starts after that one ends, on whatever lane; where
  // the lanes differ, `waits` carries it like a predecessor.
  NodeId holds_after = kNoNode;
  int packed = -1;  // index into Plan::packed of the packed weight the kernel reads, or -1
};

// A weight in a kernel's own layout (PackedWeight), written once when the weights are bound: one per
// (source weight, layout), shared by every step that reads it.
struct PackedCopy {
  ValueId source = -1;
  std::string layout;
  NodeId first_reader = kNoNode;  // the node whose kernel's PackedWeight::write fills it
  int64_t bytes = 0;
};

// Which allocation a buffer lives in.
enum class Arena { inputs, weights, workspace, host };  // host: pinned host memory on a GPU backend
const char* to_string(Arena a);
// The arena a value's buffer belongs to by its role (a view may put it in its base's instead).
Arena arena_of(const Value& v);

struct Buffer {
  ValueId value = -1;
  Arena arena = Arena::workspace;
  int64_t offset = 0;  // bytes from the arena's start, 256-byte aligned
  int64_t bytes = 0;   // at the maximum T
  ValueId in_place_of = -1;  // the input whose bytes this value overwrites (memory planner), or -1
  // A view (memory planner): the value has no bytes of its own but lies `view_offset` bytes into
  // value `view_of`'s (a chunk's rows of the whole value); arena and offset are where that puts it.
  ValueId view_of = -1;
  int64_t view_offset = 0;
  bool is_view() const { return view_of >= 0; }
};

class Plan {
 public:
  std::shared_ptr<const Graph> graph;
  PlanOptions options;
  std::vector<Lane> lanes;
  std::vector<std::string> notes;   // planner decisions worth reading (a branch kept in line, and why)
  std::vector<PlanStep> steps;      // in issue order
  std::vector<int> step_of_node;    // node id -> index into steps
  std::vector<Buffer> buffers;      // indexed by value id; kernels' scratch is in PlanStep
  std::map<Arena, int64_t> arena_bytes;
  // Packed weights, written once when the weights are bound (not workspace): device memory beside the
  // weights, shared by every executor of the same weights (CudaExecutor).
  std::vector<PackedCopy> packed;
  int64_t packed_bytes = 0;        // their sum
  double predicted_makespan_s = 0.0;
  double predicted_serial_s = 0.0;  // sum of every node's prediction
  // SMs the compute lanes leave to a communication lane beside them (LaneContext::sm_count): a
  // persistent GEMM holding every SM keeps NCCL's kernels from starting until it ends. 0: none.
  int sms_left_to_communication = 0;

  const PlanStep& step_for(NodeId n) const { return steps.at(static_cast<std::size_t>(step_of_node.at(static_cast<std::size_t>(n)))); }
  const Buffer& buffer(ValueId v) const { return buffers.at(static_cast<std::size_t>(v)); }
  // True when some node waits for the device on the host (a to_host node): no CUDA-graph capture.
  bool has_host_sync() const;
  int64_t bytes(Arena a) const;
  // True when `other` lays out the same weights (by name) at the same offsets and sizes, so one
  // weights arena serves both: plans of one layer for different policies, whose planned graphs are
  // different objects (fusion and folding rewrite the graph for each plan).
  bool weights_laid_out_as(const Plan& other) const;

  // One line per step: order, lane, node, kernel, reason, predicted time.
  void write_summary(std::ostream& out) const;
  // The buffer table and the size of every arena.
  void write_memory(std::ostream& out) const;
  // The schedule as DOT (lanes as clusters, issue order, cross-lane waits), deterministic.
  void write_dot(std::ostream& out) const;
};

// Checks the graph is validated, chooses kernels, assigns lanes and order, lays out buffers.
Plan make_plan(std::shared_ptr<const Graph> graph, const PlanOptions& options);

}  // namespace moeflow
