#include "scheduler/memory_planner.hpp"

#include <algorithm>
#include <cstdint>
#include <vector>

#include "scheduler/plan.hpp"

namespace moeflow {

namespace {

constexpr int64_t kAlignment = 256;
int64_t align_up(int64_t n) { return (n + kAlignment - 1) / kAlignment * kAlignment; }

// before[i][j]: step j finishes before step i starts (by lane order and waits, transitively).
// Issue order is topological for both kinds of edge, so one forward pass closes it. A step that
// starts early (PlanStep::starts_early) runs beside the previous step of its lane: only what was
// over before that one started is over before it; once it ends, that step has ended too.
std::vector<std::vector<bool>> happens_before(const Plan& plan) {
  const std::size_t n = plan.steps.size();
  std::vector<std::vector<bool>> before(n, std::vector<bool>(n, false));
  std::vector<int> last_on_lane(plan.lanes.size(), -1);
  std::vector<int> beside(n, -1);  // the step an early one starts beside
  for (std::size_t i = 0; i < n; ++i) {
    const PlanStep& s = plan.steps[i];
    std::vector<std::size_t> preds;
    int& last = last_on_lane[static_cast<std::size_t>(s.lane)];
    if (last >= 0) preds.push_back(static_cast<std::size_t>(last));
    last = static_cast<int>(i);
    for (NodeId w : s.waits) preds.push_back(static_cast<std::size_t>(plan.step_of_node[static_cast<std::size_t>(w)]));
    if (s.starts_early && !preds.empty()) {
      beside[i] = static_cast<int>(preds.front());
      for (std::size_t j = 0; j < n; ++j) before[i][j] = before[preds.front()][j];
      preds.erase(preds.begin());
    }
    for (std::size_t p : preds) {
      std::vector<std::size_t> ended = {p};
      if (beside[p] >= 0) ended.push_back(static_cast<std::size_t>(beside[p]));
      for (std::size_t e : ended) {
        before[i][e] = true;
        for (std::size_t j = 0; j < n; ++j)
          if (before[e][j]) before[i][j] = true;
      }
    }
  }
  return before;
}

// A workspace buffer and the steps that touch it (the first one writes it).
struct Item {
  ValueId value = -1;              // -1: a kernel's scratch
  int64_t bytes = 0;
  std::vector<std::size_t> steps;  // steps[0] writes it
  bool pinned = false;             // a graph output: never shares
  int64_t* offset = nullptr;       // where the result goes
  int64_t placed = -1;
};

// True when all of a's uses are over before b is written.
bool dead_before(const Item& a, const Item& b, const std::vector<std::vector<bool>>& before) {
  const std::size_t birth = b.steps.front();
  for (std::size_t s : a.steps)
    if (!before[birth][s]) return false;
  return true;
}

}  // namespace

void plan_workspace_reuse(Plan& plan) {
  const Graph& g = *plan.graph;
  const auto before = happens_before(plan);
  std::vector<Item> items;
  for (Buffer& b : plan.buffers) {
    if (b.arena != Arena::workspace) continue;
    const Value& v = g.value(b.value);
    Item it;
    it.value = v.id;
    it.bytes = b.bytes;
    it.offset = &b.offset;
    it.steps.push_back(static_cast<std::size_t>(plan.step_of_node.at(static_cast<std::size_t>(v.producer))));
    for (NodeId c : v.consumers) it.steps.push_back(static_cast<std::size_t>(plan.step_of_node[static_cast<std::size_t>(c)]));
    const auto& keep = plan.options.keep_values;
    it.pinned = std::find(g.outputs().begin(), g.outputs().end(), v.id) != g.outputs().end() ||
                std::find(keep.begin(), keep.end(), v.name) != keep.end();
    items.push_back(it);
  }
  for (std::size_t i = 0; i < plan.steps.size(); ++i) {
    PlanStep& s = plan.steps[i];
    if (s.workspace_bytes == 0) continue;
    Item it;
    it.bytes = s.workspace_bytes;
    it.offset = &s.workspace_offset;
    it.steps = {i};
    items.push_back(it);
  }
  // Issue order of the first write, then larger first: big buffers settle low and small ones fill gaps.
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
    if (a.steps.front() != b.steps.front()) return a.steps.front() < b.steps.front();
    return a.bytes > b.bytes;
  });
  // The placed item of each value, for in-place outputs.
  std::vector<int> item_of(g.values().size(), -1);
  // Whether value `out`, written by step s, may take over the bytes of input item `in`: the kernel
  // declares it, `in` is an unpinned workspace value at least as large, and every other use of `in`
  // is over before s (so nothing reads it after s starts writing).
  auto in_place_source = [&](const Item& out) -> int {
    if (out.value < 0) return -1;
    const std::size_t s = out.steps.front();
    const PlanStep& step = plan.steps[s];
    const Node& n = g.node(step.node);
    for (const auto& [o, i] : step.kernel->in_place) {
      if (n.outputs.at(static_cast<std::size_t>(o)) != out.value) continue;
      const int source = item_of[static_cast<std::size_t>(n.inputs.at(static_cast<std::size_t>(i)))];
      if (source < 0) continue;
      const Item& in = items[static_cast<std::size_t>(source)];
      if (in.pinned || in.bytes < out.bytes) continue;
      bool last_use = true;
      for (std::size_t u : in.steps)
        if (u != s && !before[s][u]) last_use = false;
      if (last_use) return source;
    }
    return -1;
  };
  int64_t peak = 0;
  for (std::size_t k = 0; k < items.size(); ++k) {
    Item& it = items[k];
    if (const int source = in_place_source(it); source >= 0) {
      // Earlier items that share the source's bytes died before it was written, so they are dead
      // for this one too; later items see this item's own uses.
      it.placed = items[static_cast<std::size_t>(source)].placed;
      *it.offset = it.placed;
      plan.buffers[static_cast<std::size_t>(it.value)].in_place_of = items[static_cast<std::size_t>(source)].value;
      item_of[static_cast<std::size_t>(it.value)] = static_cast<int>(k);
      continue;
    }
    std::vector<std::pair<int64_t, int64_t>> taken;  // byte ranges of placed items it may not share with
    for (std::size_t j = 0; j < k; ++j) {
      const Item& other = items[j];
      const bool disjoint_in_time =
          !it.pinned && !other.pinned && (dead_before(other, it, before) || dead_before(it, other, before));
      if (!disjoint_in_time) taken.push_back({other.placed, other.placed + align_up(other.bytes)});
    }
    std::sort(taken.begin(), taken.end());
    int64_t offset = 0;
    for (const auto& [lo, hi] : taken) {
      if (offset + align_up(it.bytes) <= lo) break;
      offset = std::max(offset, hi);
    }
    it.placed = offset;
    *it.offset = offset;
    if (it.value >= 0) item_of[static_cast<std::size_t>(it.value)] = static_cast<int>(k);
    peak = std::max(peak, offset + align_up(it.bytes));
  }
  plan.arena_bytes[Arena::workspace] = peak;
}

}  // namespace moeflow
