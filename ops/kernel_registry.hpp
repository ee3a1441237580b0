#pragma once
// Kernels per op and backend, in priority order, each with supports(node) saying whether it can run
// the node and why. Selection walks the list and records the first kernel that supports the node
// with its reason, so the plan can say "3 tokens/expert -> grouped_batched" (vLLM's "oracle" made
// explicit, see DESIGN.md). `--kernel op=name` forces one, and is refused if it cannot run the node.
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "graph/graph.hpp"

namespace moeflow {

enum class Backend { cpu, cuda };
struct CommGroups;  // ops/comm_ops.hpp
const char* to_string(Backend b);

// One call of a kernel: the node, its operands' buffers in node order, and the token rows it works
// on (the run's T, or its chunk's share of it: Graph::tokens_of).
struct KernelCall {
  const Graph& graph;
  const Node& node;
  std::span<void* const> inputs;
  std::span<void* const> outputs;
  int64_t tokens = 0;
  void* lane = nullptr;            // backend lane state: a cuda::LaneContext* on CUDA, null on the CPU
  void* workspace = nullptr;       // the kernel's own scratch, as large as its workspace() said
  void* host_workspace = nullptr;  // pinned host scratch, as large as its host_workspace() said
  const CommGroups* comm = nullptr;  // this rank's communicators in a multi-rank run, else null
  // Set in a CUDA graph captured for any T (kernels whose entry says live_tokens only): the run's T
  // in device memory, read by the kernels when they run; `tokens` is then the plan's maximum, what
  // the launches are sized for.
  const int32_t* live_tokens = nullptr;
  // Set where the plan lets this kernel start while the previous kernel of its lane still runs
  // (PlanStep::starts_early): it must be launched so, and wait before reading that kernel's outputs.
  bool starts_early = false;
  // The node's packed weight (KernelEntry::packed_weight), already written; null where it has none.
  void* packed = nullptr;

  // The most rows this node ever gets (its chunk's size in a chunked graph): what scratch is sized for.
  int64_t max_tokens() const { return graph.max_tokens_of(node); }
  template <class T> const T* in(std::size_t i) const { return static_cast<const T*>(inputs[i]); }
  template <class T> T* out(std::size_t i) const { return static_cast<T*>(outputs[i]); }
  const Value& input_value(std::size_t i) const { return graph.value(node.inputs[i]); }
};

// Whether a kernel can run a node; `reason` is shown in plans either way.
struct Support {
  bool ok = false;
  std::string reason;
  static Support yes(std::string r) { return {true, std::move(r)}; }
  static Support no(std::string r) { return {false, std::move(r)}; }
};

// A weight the kernel reads in a layout of its own (w13 with gate and up rows interleaved, for a
// SwiGLU epilogue), derived from one of the node's weight inputs once, when the weights are bound,
// and never on a run. Nodes whose kernels pack the same input with the same `layout` share one copy
// (the chunks of a chunked graph, say). The plan lists each copy (Plan::packed); the executors write
// each before their first run, outside the workspace.
struct PackedWeight {
  int input = 0;       // the node input (a weight) the copy is derived from
  std::string layout;  // what the copy holds, e.g. "w13 gate/up interleaved by 128 rows"
  std::function<int64_t(const Graph&, const Node&)> bytes;
  // Writes the copy to `packed` from the call's inputs (only weights are meaningful then).
  std::function<void(const KernelCall&, void* packed)> write;
  // The kernel that computes the same without the copy (e.g. the same tiles unfused): what a plan
  // with packed weights off runs where a tuning cache names this one.
  std::string unpacked_twin;
  // Where the copy also holds other weights of the node (a folded shared expert's, say): its layout
  // for that node, which then names it apart from the plain `layout`; null: `layout` everywhere.
  std::function<std::string(const Graph&, const Node&)> layout_of = {};
  std::string layout_for(const Graph& g, const Node& n) const { return layout_of ? layout_of(g, n) : layout; }
};

struct KernelEntry {
  std::string op_kind;
  Backend backend = Backend::cpu;
  std::string name;
  int priority = 0;  // higher is tried first
  // can_implement -> workspace -> run, as CUTLASS splits it: supports() says whether the kernel can
  // run the node; workspace() how many bytes of scratch it needs at T tokens (the plan allocates
  // them with every other buffer, once); run() does the work.
  std::function<Support(const Graph&, const Node&)> supports;
  std::function<void(const KernelCall&)> run;
  std::function<int64_t(const Graph&, const Node&, int64_t tokens)> workspace;  // empty: none
  // Inputs the kernel reads on the host (cuBLAS loops need row counts there). The planner puts a
  // to_host node in front of each, so the synchronisation is visible in the plan.
  std::vector<int> host_inputs = {};
  // Bytes of pinned host scratch (pointer arrays staged for the device); empty: none.
  std::function<int64_t(const Graph&, const Node&, int64_t tokens)> host_workspace = {};
  // Kernel launches (host: tasks) one run issues: each costs the machine's per-launch overhead in
  // the cost model, which is what lets the planner see that a chain of small launches leaves the
  // device idle enough for another lane's work.
  int launches = 1;
  // (output, input) pairs the kernel may compute in place: output o written over input i's bytes,
  // every element read before it is written. The memory planner uses one only where input i is
  // read by nothing after this node and both live in the workspace; a pair naming an input the node
  // does not have (an optional one) is passed over.
  std::vector<std::pair<int, int>> in_place = {};
  // Whether the kernel (of slice_rows or concat_rows) copies nothing where the source and the
  // destination rows are the same bytes, so the memory planner may lay the chunk's rows out as a
  // view inside the whole value (memory_planner.hpp).
  bool row_views = false;
  // Whether the kernel reads its token count from KernelCall::live_tokens when that is set, so one
  // captured CUDA graph serves any T (CudaExecutor::capture_any_tokens).
  bool live_tokens = false;
  // Where the kernel is the better choice on some shapes only (a measured crossover): its priority
  // on this node. Empty: `priority` everywhere. Candidates are ordered per node by priority_for().
  std::function<int(const Graph&, const Node&)> priority_on = {};
  // Where the kernel runs a node correctly but is not what the planner should pick on its own there
  // (measured slower than its other choices, or never measured on such shapes): why; empty where it
  // may. The planner then passes it over (a fused kernel passed over leaves the chain unfused), while
  // `--kernel` or a tuning cache still runs it there: what `moeflow tune` measures, it can choose.
  std::function<std::string(const Graph&, const Node&)> passed_over_on = {};
  // Programmatic dependent launch (CUDA, Hopper): a kernel that `releases_next` lets the next kernel
  // of its lane start while it runs; one that `starts_early` on a node can make use of that there
  // (work that needs none of the previous kernel's outputs goes first, then it waits for them;
  // empty: never). The planner pairs them (PlanStep::starts_early) where nothing else comes between.
  bool releases_next = false;
  std::function<bool(const Graph&, const Node&)> starts_early = {};
  // Whether the kernel's grid is persistent over every SM of its lane (CUTLASS's tile schedulers: one
  // block per SM, each walking its share of the tiles). Two such grids on two lanes do not share the
  // machine as the cost model's fluid replay assumes: the blocks of the one launched second wait for
  // SMs the first holds, and the tiles those blocks own run late, after the first grid ends (qwen3-
  // 30b-a3b T=8192 layer in 4 chunks in a CUDA graph, H100: 2698-2701 µs with the chunks' experts on
  // four lanes, 2219-2233 one after another; bench/NOTES.md "Chunking"). So the planner never lets
  // two of them run at once (PlanStep::holds_after).
  bool holds_every_sm = false;

  // A weight the kernel reads packed (see PackedWeight); empty: none.
  std::optional<PackedWeight> packed_weight = {};

  int priority_for(const Graph& g, const Node& n) const { return priority_on ? priority_on(g, n) : priority; }
  std::string passed_over_for(const Graph& g, const Node& n) const {
    return passed_over_on ? passed_over_on(g, n) : std::string();
  }
};

struct KernelChoice {
  const KernelEntry* kernel = nullptr;
  std::string reason;
};

// What a plan rules out beyond each kernel's supports().
struct KernelLimits {
  bool capturable = false;     // pass over kernels that read inputs on the host (a CUDA graph cannot sync)
  bool packed_weights = true;  // false: pass over kernels that read a packed copy of a weight (PackedWeight)
};

class KernelRegistry {
 public:
  // Every kernel moeflow ships, registered once.
  static const KernelRegistry& builtin();

  void add(KernelEntry entry);
  std::vector<const KernelEntry*> candidates(const std::string& op_kind, Backend backend) const;
  // The kernel called `name` on `backend`, whatever op it runs, or null.
  const KernelEntry* find(const std::string& name, Backend backend) const;
  // The highest-priority kernel that supports the node, or the forced one. Throws Error(bad_input)
  // naming the node and every candidate's reason when none can run it.
  // Kernels the `limits` rule out are passed over (a forced one is an error).
  KernelChoice select(const Graph& g, const Node& n, Backend backend,
                      const std::map<std::string, std::string>& forced = {}, const KernelLimits& limits = {}) const;
  // What select() returns, or none where it would throw: for callers that compare choices (the
  // planner's fold decision) rather than report them.
  std::optional<KernelChoice> try_select(const Graph& g, const Node& n, Backend backend,
                                         const std::map<std::string, std::string>& forced = {},
                                         const KernelLimits& limits = {}) const;
  // The kernel called `name` where it exists, can run the node and is within `limits`; its reason is
  // its supports() reason. None otherwise: the caller falls back.
  std::optional<KernelChoice> select_named(const Graph& g, const Node& n, Backend backend, const std::string& name,
                                           const KernelLimits& limits = {}) const;
  // The highest-priority kernel (priority_for the node) that can run the node within `limits` and
  // is not passed_over_on it, or none: for callers that have another way (the fuse pass leaves a chain
  // unfused). Where there is none and `refusals` is given, it gets every candidate's reason
  // ("name: why; ...").
  std::optional<KernelChoice> select_any(const Graph& g, const Node& n, Backend backend, const KernelLimits& limits = {},
                                         std::string* refusals = nullptr) const;

 private:
  std::vector<KernelEntry> entries_;
};

// Each op's translation unit registers its kernels here (explicit calls: static registration is
// dropped by the linker from static libraries).
void register_gate_kernels(KernelRegistry& r);
void register_shared_expert_kernels(KernelRegistry& r);
void register_dispatch_kernels(KernelRegistry& r);
void register_experts_kernels(KernelRegistry& r);
void register_combine_kernels(KernelRegistry& r);
void register_reduce_kernels(KernelRegistry& r);
void register_row_kernels(KernelRegistry& r);  // slice_rows, concat_rows (the chunk pass's ops)
void register_comm_kernels(KernelRegistry& r);  // the parallel lowering's ops (ops/comm_ops.hpp)
#ifdef MOEFLOW_HAVE_CUDA
void register_cuda_kernels(KernelRegistry& r);  // ops/cuda/cuda_kernels.cpp
#endif

// The common supports() of CPU kernels: every float operand must be f32.
Support cpu_supports_f32(const Graph& g, const Node& n);

}  // namespace moeflow
