#include "scheduler/memory_planner.hpp"

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "graph/row_ops.hpp"
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

using Before = std::vector<std::vector<bool>>;

// The (output, input) values a kernel may compute in place on node n (KernelEntry::in_place); a pair
// naming an input the node does not have (an optional one, such as a combine's first addend) names
// nothing.
std::vector<std::pair<ValueId, ValueId>> in_place_values(const KernelEntry& kernel, const Node& n) {
  std::vector<std::pair<ValueId, ValueId>> pairs;
  for (const auto& [o, i] : kernel.in_place)
    if (static_cast<std::size_t>(i) < n.inputs.size())
      pairs.push_back({n.outputs.at(static_cast<std::size_t>(o)), n.inputs[static_cast<std::size_t>(i)]});
  return pairs;
}

// The steps that touch value v: its producer first, then its consumers.
std::vector<std::size_t> uses_of(const Plan& plan, const Value& v) {
  std::vector<std::size_t> steps = {static_cast<std::size_t>(plan.step_of_node.at(static_cast<std::size_t>(v.producer)))};
  for (NodeId c : v.consumers) steps.push_back(static_cast<std::size_t>(plan.step_of_node[static_cast<std::size_t>(c)]));
  return steps;
}

// Graph outputs, and values the caller reads after a run: they keep their own bytes.
bool pinned(const Graph& g, const PlanOptions& options, const Value& v) {
  const auto& keep = options.keep_values;
  return std::find(g.outputs().begin(), g.outputs().end(), v.id) != g.outputs().end() ||
         std::find(keep.begin(), keep.end(), v.name) != keep.end();
}
bool pinned(const Plan& plan, const Value& v) { return pinned(*plan.graph, plan.options, v); }

// Whether `part` may lie `at` bytes into `whole`, by the graph alone: a workspace value nobody
// reads after the run, inside a workspace or input value, at the arenas' alignment.
bool may_view(const Graph& g, const PlanOptions& options, ValueId part, ValueId whole, int64_t at) {
  const Value& p = g.value(part);
  const Value& w = g.value(whole);
  const Arena pa = arena_of(p), wa = arena_of(w);
  return pa == Arena::workspace && (wa == Arena::workspace || wa == Arena::inputs) && !pinned(g, options, p) &&
         at % kAlignment == 0 && at + p.bytes(p.tokens_in(g.max_tokens())) <= w.bytes(w.tokens_in(g.max_tokens()));
}

// Whether a slice_rows / concat_rows step may lay its rows out as views at all. A joined value's
// rows are written by each chunk's producer, on lanes the plan need not order, so the joined value's
// first write is not one step: only one nobody shares bytes with (a graph output, or a value read
// after the run) takes its chunks' rows as views.
bool offers_views(const Graph& g, const PlanOptions& options, const Node& n, const KernelEntry& kernel) {
  if (!kernel.row_views) return false;
  return n.op->kind() != "concat_rows" || pinned(g, options, g.value(n.outputs[0]));
}

// Where a value lies inside another one's bytes (base -1: it has its own).
struct View {
  ValueId base = -1;
  int64_t offset = 0;
};

// The views the plan can afford. First the chunk pass's rows: a chunk's slice of x is read where x
// has it, and each chunk's output is written where the joined output keeps it, so slice_rows and
// concat_rows copy nothing (their kernels allow it: KernelEntry::row_views). Then, walking back, a
// kernel computing in place over an input carries its output's view to that input where the input
// is read by nothing after it (a layer's one-addend reduce before concat_rows: the combine then
// writes straight into the output's rows and the reduce launches nothing). A view keeps the
// arena's 256-byte alignment and stays inside its base.
struct Views {
  std::vector<View> of;                             // indexed by value id
  std::vector<std::pair<ValueId, ValueId>> in_place;  // (output, input) pairs that carried a view
};

Views find_views(const Plan& plan, const Before& before) {
  const Graph& g = *plan.graph;
  Views views;
  std::vector<View>& view = views.of;
  view.resize(g.values().size());
  std::vector<bool> is_base(g.values().size(), false);
  auto add = [&](ValueId part, ValueId whole, int64_t at) {
    if (view[static_cast<std::size_t>(part)].base >= 0 || is_base[static_cast<std::size_t>(part)] ||
        !may_view(g, plan.options, part, whole, at))
      return false;
    view[static_cast<std::size_t>(part)] = {whole, at};
    is_base[static_cast<std::size_t>(whole)] = true;
    return true;
  };
  for (const PlanStep& s : plan.steps)
    if (offers_views(g, plan.options, g.node(s.node), *s.kernel)) for_each_row_part(g, g.node(s.node), add);
  for (std::size_t k = plan.steps.size(); k-- > 0;) {
    const PlanStep& s = plan.steps[k];
    const Node& n = g.node(s.node);
    for (const auto& [out, in] : in_place_values(*s.kernel, n)) {
      if (view[static_cast<std::size_t>(out)].base < 0 || plan.buffer(in).bytes != plan.buffer(out).bytes) continue;
      bool last_use = true;
      for (std::size_t u : uses_of(plan, g.value(in)))
        if (u != k && !before[k][u]) last_use = false;
      if (last_use && add(in, out, 0)) views.in_place.emplace_back(out, in);
    }
  }
  return views;
}

// The value whose bytes v lies in, and how far into them.
ValueId root_of(const std::vector<View>& view, ValueId v, int64_t& offset) {
  offset = 0;
  for (std::size_t hops = 0; view[static_cast<std::size_t>(v)].base >= 0; ++hops) {
    if (hops > view.size()) throw std::logic_error("memory planner: views form a cycle");  // cannot happen: see find_views
    offset += view[static_cast<std::size_t>(v)].offset;
    v = view[static_cast<std::size_t>(v)].base;
  }
  return v;
}

// A workspace buffer and the steps that touch it, its views' included (the first one writes it).
struct Item {
  ValueId value = -1;              // -1: a kernel's scratch
  int64_t bytes = 0;
  std::vector<std::size_t> steps;  // ascending issue order: steps[0] writes it
  bool pinned = false;             // a graph output: never shares
  int64_t* offset = nullptr;       // where the result goes
  int64_t placed = -1;
};

// True when all of a's uses are over before b is written.
bool dead_before(const Item& a, const Item& b, const Before& before) {
  const std::size_t birth = b.steps.front();
  for (std::size_t s : a.steps)
    if (!before[birth][s]) return false;
  return true;
}

}  // namespace

bool rows_become_views(const Graph& g, const Node& n, const KernelEntry& kernel, const PlanOptions& options) {
  if (!options.reuse_memory || !offers_views(g, options, n, kernel)) return false;
  bool all = true;
  for_each_row_part(g, n, [&](ValueId part, ValueId whole, int64_t at) { all = all && may_view(g, options, part, whole, at); });
  return all;
}

void plan_workspace_reuse(Plan& plan) {
  const Graph& g = *plan.graph;
  const auto before = happens_before(plan);
  const Views views = find_views(plan, before);
  const std::vector<View>& view = views.of;
  std::vector<Item> items;
  std::vector<int> item_of(g.values().size(), -1);  // the item of each value that has its own bytes
  for (Buffer& b : plan.buffers) {
    if (b.arena != Arena::workspace || view[static_cast<std::size_t>(b.value)].base >= 0) continue;
    const Value& v = g.value(b.value);
    Item it;
    it.value = v.id;
    it.bytes = b.bytes;
    it.offset = &b.offset;
    it.steps = uses_of(plan, v);
    it.pinned = pinned(plan, v);
    item_of[static_cast<std::size_t>(v.id)] = static_cast<int>(items.size());
    items.push_back(it);
  }
  // A view's uses are its root's: the root's bytes stay taken from the first write of either.
  for (const Value& v : g.values()) {
    int64_t offset = 0;
    const ValueId root = root_of(view, v.id, offset);
    if (root == v.id || item_of[static_cast<std::size_t>(root)] < 0) continue;
    auto& steps = items[static_cast<std::size_t>(item_of[static_cast<std::size_t>(root)])].steps;
    const auto more = uses_of(plan, v);
    steps.insert(steps.end(), more.begin(), more.end());
  }
  for (Item& it : items) {
    std::sort(it.steps.begin(), it.steps.end());
    it.steps.erase(std::unique(it.steps.begin(), it.steps.end()), it.steps.end());
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
  item_of.assign(g.values().size(), -1);  // from here: the placed item of each value, for in-place outputs
  // Whether value `out`, written by step s, may take over the bytes of input item `in`: the kernel
  // declares it, `in` is an unpinned workspace value at least as large, and every other use of `in`
  // is over before s (so nothing reads it after s starts writing).
  auto in_place_source = [&](const Item& out) -> int {
    if (out.value < 0) return -1;
    const std::size_t s = static_cast<std::size_t>(plan.step_of_node[static_cast<std::size_t>(g.value(out.value).producer)]);
    if (out.steps.front() != s) return -1;  // a view of it is written before it is
    const PlanStep& step = plan.steps[s];
    const Node& n = g.node(step.node);
    for (const auto& [o, i] : in_place_values(*step.kernel, n)) {
      if (o != out.value) continue;
      const int source = item_of[static_cast<std::size_t>(i)];
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
  // Views go where their roots were placed.
  for (const Value& v : g.values()) {
    const View& w = view[static_cast<std::size_t>(v.id)];
    if (w.base < 0) continue;
    int64_t offset = 0;
    const Buffer& root = plan.buffers[static_cast<std::size_t>(root_of(view, v.id, offset))];
    Buffer& b = plan.buffers[static_cast<std::size_t>(v.id)];
    b.arena = root.arena;
    b.offset = root.offset + offset;
    b.view_of = w.base;
    b.view_offset = w.offset;
  }
  for (const auto& [out, in] : views.in_place) plan.buffers[static_cast<std::size_t>(out)].in_place_of = in;
  // The row copies say what is left of them.
  for (PlanStep& s : plan.steps) {
    if (!s.kernel->row_views) continue;
    const Node& n = g.node(s.node);
    const bool joins = n.op->kind() == "concat_rows";
    const auto& parts = joins ? n.inputs : n.outputs;
    const auto viewed = std::count_if(parts.begin(), parts.end(), [&](ValueId v) { return view[static_cast<std::size_t>(v)].base >= 0; });
    if (viewed == 0) continue;
    const std::string whole = g.value(joins ? n.outputs[0] : n.inputs[0]).name;
    s.reason = viewed == static_cast<std::ptrdiff_t>(parts.size())
                   ? (joins ? "every chunk wrote its rows into " + whole : "a view of " + whole + "'s rows") +
                         ": nothing to copy (memory planner)"
                   : std::to_string(viewed) + " of " + std::to_string(parts.size()) + " chunks wrote their rows into " +
                         whole + " (memory planner); " + s.reason + " for the others";
  }
}

}  // namespace moeflow
