#include "ops/kernel_registry.hpp"

#include <algorithm>

#include "graph/error.hpp"

namespace moeflow {

const char* to_string(Backend b) { return b == Backend::cpu ? "cpu" : "cuda"; }

const KernelRegistry& KernelRegistry::builtin() {
  static const KernelRegistry registry = [] {
    KernelRegistry r;
    register_gate_kernels(r);
    register_shared_expert_kernels(r);
    register_dispatch_kernels(r);
    register_experts_kernels(r);
    register_combine_kernels(r);
    register_reduce_kernels(r);
    register_row_kernels(r);
    register_comm_kernels(r);
#ifdef MOEFLOW_HAVE_CUDA
    register_cuda_kernels(r);
#endif
    return r;
  }();
  return registry;
}

void KernelRegistry::add(KernelEntry entry) { entries_.push_back(std::move(entry)); }

std::vector<const KernelEntry*> KernelRegistry::candidates(const std::string& op_kind, Backend backend) const {
  std::vector<const KernelEntry*> list;
  for (const KernelEntry& e : entries_)
    if (e.op_kind == op_kind && e.backend == backend) list.push_back(&e);
  std::stable_sort(list.begin(), list.end(), [](auto* a, auto* b) { return a->priority > b->priority; });
  return list;
}

namespace {
// Why `limits` rule the kernel out (and which setting does), or empty.
std::string outside_limits(const KernelEntry& k, const KernelLimits& limits) {
  if (limits.capturable && !k.host_inputs.empty())
    return "reads sizes on the host, which a CUDA graph cannot capture (--cuda-graph)";
  if (!limits.packed_weights && k.packed_weight)
    return "reads " + k.packed_weight->layout +
           ", a packed copy, and packed weights are off (--no-packed-weights, or too little device memory for the copy)";
  return {};
}

// Whether `k` can run the node within `limits`.
Support usable(const KernelEntry& k, const Graph& g, const Node& n, const KernelLimits& limits) {
  if (std::string why = outside_limits(k, limits); !why.empty()) return Support::no(std::move(why));
  return k.supports(g, n);
}
}  // namespace

KernelChoice KernelRegistry::select(const Graph& g, const Node& n, Backend backend,
                                    const std::map<std::string, std::string>& forced, const KernelLimits& limits) const {
  const std::vector<const KernelEntry*> list = candidates(n.op->kind(), backend);
  if (list.empty())
    fail_input("node '" + n.name + "': no " + std::string(to_string(backend)) + " kernel for op '" + n.op->kind() + "'");
  auto it = forced.find(n.op->kind());
  if (it != forced.end()) {
    for (const KernelEntry* k : list) {
      if (k->name != it->second) continue;
      Support s = k->supports(g, n);
      if (!s.ok) fail_input("node '" + n.name + "': forced kernel '" + k->name + "' cannot run it: " + s.reason);
      if (const std::string why = outside_limits(*k, limits); !why.empty())
        fail_input("node '" + n.name + "': forced kernel '" + k->name + "' " + why + "; drop that or the --kernel");
      return {k, "forced by --kernel " + n.op->kind() + "=" + k->name + " (" + s.reason + ")"};
    }
    std::string names;
    for (const KernelEntry* k : list) names += (names.empty() ? "" : ", ") + k->name;
    fail_input("--kernel " + n.op->kind() + "=" + it->second + ": no such " + to_string(backend) +
               " kernel; known: " + names);
  }
  std::string refusals;
  if (auto choice = select_any(g, n, backend, limits, &refusals)) return *choice;
  fail_input("node '" + n.name + "': no " + std::string(to_string(backend)) + " kernel supports it; " + refusals);
}

std::optional<KernelChoice> KernelRegistry::try_select(const Graph& g, const Node& n, Backend backend,
                                                       const std::map<std::string, std::string>& forced,
                                                       const KernelLimits& limits) const {
  const auto it = forced.find(n.op->kind());
  return it != forced.end() ? select_named(g, n, backend, it->second, limits) : select_any(g, n, backend, limits);
}

const KernelEntry* KernelRegistry::find(const std::string& name, Backend backend) const {
  for (const KernelEntry& e : entries_)
    if (e.name == name && e.backend == backend) return &e;
  return nullptr;
}

std::optional<KernelChoice> KernelRegistry::select_named(const Graph& g, const Node& n, Backend backend,
                                                         const std::string& name, const KernelLimits& limits) const {
  for (const KernelEntry* k : candidates(n.op->kind(), backend)) {
    if (k->name != name) continue;
    const Support s = usable(*k, g, n, limits);
    if (s.ok) return KernelChoice{k, s.reason};
    return std::nullopt;
  }
  return std::nullopt;
}

std::optional<KernelChoice> KernelRegistry::select_any(const Graph& g, const Node& n, Backend backend,
                                                       const KernelLimits& limits, std::string* refusals) const {
  // Each candidate's priority on this node, asked once (priority_on may look at the whole graph).
  std::vector<std::pair<int, const KernelEntry*>> ranked;
  for (const KernelEntry* k : candidates(n.op->kind(), backend)) ranked.emplace_back(k->priority_for(g, n), k);
  std::stable_sort(ranked.begin(), ranked.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  std::string why;
  for (const auto& [priority, k] : ranked) {
    Support s = usable(*k, g, n, limits);
    if (s.ok) {
      const std::string passed_over = k->passed_over_for(g, n);
      if (passed_over.empty()) return KernelChoice{k, s.reason};
      s.reason = passed_over + " (it runs here where forced or tuned)";
    }
    why += (why.empty() ? "" : "; ") + k->name + ": " + s.reason;
  }
  if (refusals) *refusals = why.empty() ? "no " + std::string(to_string(backend)) + " kernel for '" + n.op->kind() + "'" : why;
  return std::nullopt;
}

Support cpu_supports_f32(const Graph& g, const Node& n) {
  for (const auto* list : {&n.inputs, &n.outputs})
    for (ValueId id : *list) {
      const Value& v = g.value(id);
      if (v.dtype() == DType::bf16)
        return Support::no("CPU kernels compute in f32; '" + v.name + "' is " + v.type_str());
    }
  return Support::yes("the CPU kernel (f32, oneTBB)");
}

}  // namespace moeflow
