// make_plan: kernel selection, lane assignment and issue order, buffer layout.
#include <algorithm>
#include <cmath>
#include <iomanip>
#include <limits>
#include <map>
#include <optional>
#include <sstream>

#include "graph/error.hpp"
#include "ops/fold_shared_add.hpp"
#include "ops/fuse_experts.hpp"
#include "ops/fused_experts_op.hpp"
#include "ops/to_host_op.hpp"
#include "scheduler/fluid_replay.hpp"
#include "scheduler/memory_planner.hpp"
#include "scheduler/plan.hpp"

namespace moeflow {

const char* to_string(Policy p) { return p == Policy::serial ? "serial" : "concurrent"; }

Policy parse_policy(const std::string& text) {
  if (text == "serial") return Policy::serial;
  if (text == "concurrent") return Policy::concurrent;
  fail_input("--plan '" + text + "': expected serial or concurrent");
}

const char* to_string(Arena a) {
  switch (a) {
    case Arena::inputs: return "inputs";
    case Arena::weights: return "weights";
    case Arena::workspace: return "workspace";
    case Arena::host: return "host";
  }
  return "?";
}

int64_t Plan::bytes(Arena a) const {
  auto it = arena_bytes.find(a);
  return it == arena_bytes.end() ? 0 : it->second;
}

bool Plan::weights_laid_out_as(const Plan& other) const {
  if (bytes(Arena::weights) != other.bytes(Arena::weights)) return false;
  for (const Buffer& b : buffers) {
    if (b.arena != Arena::weights) continue;
    const auto twin = other.graph->find_value(graph->value(b.value).name);
    if (!twin || other.buffer(*twin).arena != Arena::weights || other.buffer(*twin).offset != b.offset ||
        other.buffer(*twin).bytes != b.bytes)
      return false;
  }
  return true;
}

Arena arena_of(const Value& v) {
  return v.role == ValueRole::weight  ? Arena::weights
         : v.role == ValueRole::input ? Arena::inputs
         : v.type->host_memory        ? Arena::host
                                      : Arena::workspace;
}

namespace {

constexpr int64_t kAlignment = 256;
int64_t align_up(int64_t n) { return (n + kAlignment - 1) / kAlignment * kAlignment; }

// The step's packed weight: the copy another step already reads when it packs the same weight the
// same way, else a new one.
void add_packed_copy(Plan& plan, PlanStep& s) {
  const Graph& g = *plan.graph;
  const Node& n = g.node(s.node);
  const PackedWeight& p = *s.kernel->packed_weight;
  const ValueId source = n.inputs.at(static_cast<std::size_t>(p.input));
  if (g.value(source).role != ValueRole::weight)
    fail_input("node '" + n.name + "': kernel '" + s.kernel->name + "' packs input " + std::to_string(p.input) + " ('" +
               g.value(source).name + "'), which is not a weight bound once");
  const std::string layout = p.layout_for(g, n);
  for (std::size_t i = 0; i < plan.packed.size(); ++i)
    if (plan.packed[i].source == source && plan.packed[i].layout == layout) {
      s.packed = static_cast<int>(i);
      return;
    }
  PackedCopy c{source, layout, s.node, p.bytes(g, n)};
  plan.packed_bytes += c.bytes;
  s.packed = static_cast<int>(plan.packed.size());
  plan.packed.push_back(c);
}

// No reuse yet: every value gets its own range in its arena (the memory planner comes later).
void lay_out_buffers(Plan& plan) {
  const Graph& g = *plan.graph;
  plan.buffers.resize(g.values().size());
  for (const Value& v : g.values()) {
    Buffer& b = plan.buffers[static_cast<std::size_t>(v.id)];
    b.value = v.id;
    b.arena = arena_of(v);
    b.bytes = v.bytes(v.tokens_in(g.max_tokens()));
    b.offset = plan.arena_bytes[b.arena];
    plan.arena_bytes[b.arena] += align_up(b.bytes);
  }
  for (PlanStep& s : plan.steps) {
    if (s.kernel->packed_weight) add_packed_copy(plan, s);
    s.workspace_offset = plan.arena_bytes[Arena::workspace];
    plan.arena_bytes[Arena::workspace] += align_up(s.workspace_bytes);
    s.host_workspace_offset = plan.arena_bytes[Arena::host];
    plan.arena_bytes[Arena::host] += align_up(s.host_workspace_bytes);
  }
}

std::vector<std::vector<NodeId>> successors_of(const Graph& g) {
  std::vector<std::vector<NodeId>> succ(g.nodes().size());
  for (const Node& n : g.nodes())
    for (NodeId p : g.predecessors(n.id)) succ[static_cast<std::size_t>(p)].push_back(n.id);
  return succ;
}

// Longest predicted path from each node to a sink, the node included: the list-scheduling priority.
std::vector<double> bottom_levels(const Graph& g, const std::vector<PlanStep>& by_node) {
  const auto succ = successors_of(g);
  std::vector<double> level(g.nodes().size(), 0.0);
  for (auto n = static_cast<NodeId>(g.nodes().size()) - 1; n >= 0; --n) {
    double tail = 0.0;
    for (NodeId s : succ[static_cast<std::size_t>(n)]) tail = std::max(tail, level[static_cast<std::size_t>(s)]);
    level[static_cast<std::size_t>(n)] = by_node[static_cast<std::size_t>(n)].predicted_s + tail;
  }
  return level;
}

std::string micros(double s) {
  std::ostringstream o;
  o.setf(std::ios::fixed);
  o.precision(s < 1e-3 ? 1 : 0);
  o << s * 1e6 << " us";
  return o.str();
}

// Serial: one lane in topological order (node ids are topological indices).
void schedule_serial(Plan& plan, std::vector<PlanStep>& by_node) {
  plan.lanes = {{"lane0", "serial plan: one lane in topological order (the baseline)"}};
  double t = 0.0;
  for (PlanStep& s : by_node) {
    s.lane = 0;
    s.start_estimate_s = t;
    t += s.predicted_s;
  }
  plan.predicted_makespan_s = t;
}

// Concurrent: list scheduling. Each round places, of the nodes whose predecessors are placed, the
// one that can start first on the lane it would take (a non-delay schedule: a lane that frees up
// takes a node that is ready then rather than idle for a longer chain's node that is not; this is
// how a shared expert fills the wait for a transfer). Among nodes that can start at the same time:
// first one whose result a communication node takes (its transfer then runs beside what follows:
// chunk c's combine before chunk c+1's experts, the two-micro-batch order), then the highest
// bottom level, then the lower id (deterministic plans).
// A node continues the lane of the predecessor that finishes last when that predecessor is still
// the lane's tail (no wait needed); otherwise it opens a lane while fewer than max_lanes exist, or
// takes the lane that frees up first. Nodes marked `in_line` never open a lane: they follow their
// latest predecessor's lane (lane 0 without one).
// Communication between ranks gets a lane of its own, opened when the first such node is placed
// and used by no other node: it moves bytes over the link, so compute of other chunks and branches
// can run beside it (the two-micro-batch schedule), and it never counts against max_lanes.
// Returns, per lane, its nodes in placement order.
std::vector<std::vector<NodeId>> schedule_lanes(Plan& plan, std::vector<PlanStep>& by_node,
                                                const std::vector<bool>& in_line) {
  const Graph& g = *plan.graph;
  const std::vector<double> level = bottom_levels(g, by_node);
  const double critical = *std::max_element(level.begin(), level.end());
  const std::size_t count = g.nodes().size();
  std::vector<bool> feeds_communication(count, false);
  for (const Node& n : g.nodes())
    if (n.op->communicates())
      for (NodeId p : g.predecessors(n.id)) feeds_communication[static_cast<std::size_t>(p)] = true;
  std::vector<double> finish(count, 0.0);
  std::vector<bool> placed(count, false);
  std::vector<NodeId> lane_tail;      // last node on each lane
  std::vector<double> lane_free;      // when each lane's last node finishes
  std::vector<std::vector<NodeId>> lane_nodes;
  int comm_lane = -1;
  plan.lanes.clear();
  // Steps whose kernels hold every SM run one after another (KernelEntry::holds_every_sm): each
  // starts when the one placed before it ends.
  NodeId last_holder = kNoNode;
  for (PlanStep& s : by_node) s.holds_after = kNoNode;
  auto holds_every_sm = [&](NodeId n) {
    const KernelEntry* k = by_node[static_cast<std::size_t>(n)].kernel;
    return k != nullptr && k->holds_every_sm;
  };

  // Where a node whose predecessors are placed would go: its lane (kNewLane: one it opens) and
  // when it could start there.
  constexpr int kNewLane = -1;
  struct Placement {
    int lane = kNewLane;
    double start = 0.0;
  };
  auto placement_of = [&](NodeId node) {
    double ready_at = 0.0;
    NodeId latest = kNoNode;
    for (NodeId p : g.predecessors(node)) {
      if (finish[static_cast<std::size_t>(p)] >= ready_at) latest = p;
      ready_at = std::max(ready_at, finish[static_cast<std::size_t>(p)]);
    }
    if (holds_every_sm(node) && last_holder != kNoNode)
      ready_at = std::max(ready_at, finish[static_cast<std::size_t>(last_holder)]);
    int lane = kNewLane;
    if (g.node(node).op->communicates()) {
      lane = comm_lane;  // the lane of its own, opened by the first transfer (kNewLane while there is none)
    } else {
      double latest_pred = -1.0;
      for (NodeId p : g.predecessors(node)) {
        const int pl = by_node[static_cast<std::size_t>(p)].lane;
        if (pl == comm_lane) continue;  // compute never continues the communication lane
        if (lane_tail[static_cast<std::size_t>(pl)] == p && finish[static_cast<std::size_t>(p)] > latest_pred) {
          lane = pl;
          latest_pred = finish[static_cast<std::size_t>(p)];
        }
      }
      const int compute_lanes = static_cast<int>(lane_tail.size()) - (comm_lane >= 0 ? 1 : 0);
      const bool may_open = !in_line[static_cast<std::size_t>(node)] || compute_lanes == 0;
      if (lane < 0 && !may_open) {
        lane = latest == kNoNode || by_node[static_cast<std::size_t>(latest)].lane == comm_lane
                   ? (comm_lane == 0 ? 1 : 0)
                   : by_node[static_cast<std::size_t>(latest)].lane;
      } else if (lane < 0 && compute_lanes >= plan.options.max_lanes) {
        double earliest = std::numeric_limits<double>::infinity();
        for (int l = 0; l < static_cast<int>(lane_free.size()); ++l)
          if (l != comm_lane && lane_free[static_cast<std::size_t>(l)] < earliest) {
            earliest = lane_free[static_cast<std::size_t>(l)];
            lane = l;
          }
      }
      // A grid holding every SM follows the one before it on that one's lane: the stream orders them
      // with no event between, and the next chunk's smaller kernels take the other lanes meanwhile
      // (qwen3-30b-a3b T=8192 layer in 2 chunks, CUDA graph: 1632-1641 µs, against 1688-1690 with the
      // second chunk's experts on another lane behind an event wait; bench/NOTES.md "Chunking").
      if (holds_every_sm(node) && last_holder != kNoNode && by_node[static_cast<std::size_t>(last_holder)].lane != comm_lane)
        lane = by_node[static_cast<std::size_t>(last_holder)].lane;
    }
    return Placement{lane, lane == kNewLane ? ready_at : std::max(ready_at, lane_free[static_cast<std::size_t>(lane)])};
  };
  // a goes before b (both placeable now).
  auto before = [&](NodeId a, const Placement& pa, NodeId b, const Placement& pb) {
    if (pa.start != pb.start) return pa.start < pb.start;
    const auto ia = static_cast<std::size_t>(a), ib = static_cast<std::size_t>(b);
    if (feeds_communication[ia] != feeds_communication[ib]) return static_cast<bool>(feeds_communication[ia]);
    if (level[ia] != level[ib]) return level[ia] > level[ib];
    return a < b;
  };

  for (std::size_t done = 0; done < count; ++done) {
    NodeId best = kNoNode;
    Placement at;
    for (const Node& n : g.nodes()) {
      if (placed[static_cast<std::size_t>(n.id)]) continue;
      bool ready = true;
      for (NodeId p : g.predecessors(n.id)) ready = ready && placed[static_cast<std::size_t>(p)];
      if (!ready) continue;
      const Placement here = placement_of(n.id);
      if (best == kNoNode || before(n.id, here, best, at)) {
        best = n.id;
        at = here;
      }
    }
    int lane = at.lane;
    if (lane == kNewLane) {
      lane = static_cast<int>(lane_tail.size());
      lane_tail.push_back(kNoNode);
      lane_free.push_back(0.0);
      lane_nodes.emplace_back();
      const Node& n = g.node(best);
      if (n.op->communicates()) {
        comm_lane = lane;
        plan.lanes.push_back({"lane" + std::to_string(lane) + " (communication)",
                              "communication between ranks, in the one order every rank enters it, on a lane of its own: "
                              "it moves bytes over the link, so compute beside it proceeds"});
      } else if (lane == 0) {
        plan.lanes.push_back({"lane0 (" + n.name + ")", "the critical path: " + n.name + " starts the longest chain (" +
                                                            micros(level[static_cast<std::size_t>(best)]) + " predicted)"});
      } else {
        plan.lanes.push_back({"lane" + std::to_string(lane) + " (" + n.name + ")",
                              n.name + " does not depend on the work already on other lanes, so it runs beside them (" +
                                  micros(level[static_cast<std::size_t>(best)]) + " on its chain vs " +
                                  micros(critical) + " on the critical path)"});
      }
    }
    PlanStep& s = by_node[static_cast<std::size_t>(best)];
    s.lane = lane;
    s.start_estimate_s = at.start;
    if (holds_every_sm(best)) {
      s.holds_after = last_holder;
      last_holder = best;
    }
    finish[static_cast<std::size_t>(best)] = s.start_estimate_s + s.predicted_s;
    lane_free[static_cast<std::size_t>(lane)] = finish[static_cast<std::size_t>(best)];
    lane_tail[static_cast<std::size_t>(lane)] = best;
    lane_nodes[static_cast<std::size_t>(lane)].push_back(best);
    placed[static_cast<std::size_t>(best)] = true;
  }
  plan.predicted_makespan_s = *std::max_element(finish.begin(), finish.end());
  return lane_nodes;
}

// Concurrent lanes share the machine: nodes bound by the same ceiling (flops or bytes) only split
// it, while launch overheads on different lanes hide behind each other. Where one kernel fills the
// machine (a GPU), the plan's lanes are replayed as a fluid schedule (scheduler/fluid_replay.hpp):
// two chunks' expert GEMMs on two lanes both end late, each having had half the machine, and what
// waits for either of them waits longer than the list schedule says. Where one kernel does not fill
// the machine (the host), the list-scheduled makespan stands alone.
double contended_makespan(const Plan& plan, const std::vector<PlanStep>& by_node,
                          const std::vector<std::vector<NodeId>>& lane_nodes) {
  if (!plan.options.rates.kernels_fill_machine) return plan.predicted_makespan_s;
  return fluid_makespan(*plan.graph, by_node, lane_nodes);
}

// A lane must save at least this much to exist: its fork and join (an event each way) cost about a
// launch, and savings within a percent are below what runs can tell apart.
bool saving_counts(double saved_s, double makespan_s, const MachineRates& rates) {
  return saved_s > std::max(rates.overhead_s, 0.01 * makespan_s);
}

// Concurrent plan: lanes from list scheduling, then each side lane is kept only when the cost model
// says overlap pays. A lane whose branch, run in line instead, would cost about the same (both
// branches bound by the same ceiling) is folded back, and the plan says so.
void schedule_concurrent(Plan& plan, std::vector<PlanStep>& by_node) {
  const std::size_t count = by_node.size();
  std::vector<bool> in_line(count, false);
  std::vector<NodeId> first_heads;  // the branches list scheduling put beside the critical path
  for (;;) {
    auto lane_nodes = schedule_lanes(plan, by_node, in_line);
    if (first_heads.empty())
      for (const auto& nodes : lane_nodes) first_heads.push_back(nodes.front());
    const double with_lanes = contended_makespan(plan, by_node, lane_nodes);
    // Each side lane's branch run in line instead; fold the one whose folding costs least, if that
    // costs too little to keep it.
    std::vector<double> folded(lane_nodes.size(), 0.0);
    int fold = -1;
    const Graph& g = *plan.graph;
    auto is_comm_lane = [&](std::size_t l) { return g.node(lane_nodes[l].front()).op->communicates(); };
    for (std::size_t l = 1; l < lane_nodes.size(); ++l) {
      if (is_comm_lane(l)) continue;  // communication keeps its lane (schedule_lanes)
      Plan trial;
      trial.graph = plan.graph;
      trial.options = plan.options;
      std::vector<PlanStep> trial_steps = by_node;
      std::vector<bool> trial_in_line = in_line;
      for (NodeId n : lane_nodes[l]) trial_in_line[static_cast<std::size_t>(n)] = true;
      const auto trial_lanes = schedule_lanes(trial, trial_steps, trial_in_line);
      folded[l] = contended_makespan(trial, trial_steps, trial_lanes);
      if (saving_counts(folded[l] - with_lanes, with_lanes, plan.options.rates)) continue;
      if (fold < 0 || folded[l] < folded[static_cast<std::size_t>(fold)]) fold = static_cast<int>(l);
    }
    if (fold < 0) {
      for (std::size_t l = 1; l < lane_nodes.size(); ++l)
        if (!is_comm_lane(l))
          plan.lanes[l].why += "; overlap pays: predicted " + micros(with_lanes) + " with this lane vs " +
                             micros(folded[l]) + " with its branch in line" +
                             (plan.options.rates.kernels_fill_machine
                                  ? " (launch overheads hide behind each other)"
                                  : " (one node's kernel leaves cores for the other lane)");
      plan.predicted_makespan_s = with_lanes;
      return;
    }
    const double fold_makespan = folded[static_cast<std::size_t>(fold)];
    const NodeId head = lane_nodes[static_cast<std::size_t>(fold)].front();
    // A lane that only appeared because an earlier branch was folded in front of it needs no note.
    if (std::find(first_heads.begin() + 1, first_heads.end(), head) != first_heads.end())
      plan.notes.push_back(g.node(head).name + " runs in line, not on a lane of its own: overlap does not pay (predicted " +
                         micros(fold_makespan) + " in line vs " + micros(with_lanes) +
                         " beside the other lanes; its work is bound by the same ceiling as theirs)");
    for (NodeId n : lane_nodes[static_cast<std::size_t>(fold)]) in_line[static_cast<std::size_t>(n)] = true;
  }
}

// On a GPU, a communication lane beside compute lanes gets kCommSms SMs of its own where the
// exchange is worth it: compute then runs on the rest (about 12% less for compute-bound GEMMs), so
// it pays only where the communication, at the link's rate, is at least a third of the compute
// (about half of it hidden with two chunks). Measured on 2 × H200, 4096 tokens per rank, 2 chunks,
// concurrent plan: qwen3-30b-a3b (0.34 ms of exchange against ~1.2 ms of compute) hid 0.55 of its
// communication with the SMs left, 0.39 without; deepseek-v3 (1.1 against ~10 ms) got slower with
// them (12.0 against 11.3 ms), `bench/results/h200x2_ranks_quick_sm_reserve_2026-11-23.jsonl`.
void leave_sms_to_communication(Plan& plan, const std::vector<PlanStep>& by_node) {
  constexpr int kCommSms = 16;
  const MachineRates& rates = plan.options.rates;
  if (plan.options.backend != Backend::cuda || !rates.kernels_fill_machine || plan.lanes.size() < 2) return;
  const Graph& g = *plan.graph;
  double compute_s = 0.0, link_s = 0.0;
  bool beside = false;  // a compute step on a lane other than the communication lane's
  int comm_lane = -1;
  for (const PlanStep& s : by_node)
    if (g.node(s.node).op->communicates()) {
      comm_lane = s.lane;
      link_s += s.cost.bytes / rates.link_bytes_per_s;
    }
  if (comm_lane < 0) return;
  for (const PlanStep& s : by_node)
    if (!g.node(s.node).op->communicates()) {
      compute_s += s.work_s;
      beside = beside || s.lane != comm_lane;
    }
  if (!beside) return;
  // qwen3's exchange is ~2/3 of its compute, deepseek-v3's ~1/4 (above): a third parts them with room
  // on both sides (at a quarter, deepseek-v3 sat on the line).
  if (link_s < compute_s / 3.0) {
    plan.notes.push_back("compute lanes keep every SM: the exchange (" + micros(link_s) + " at the link's rate) is under a "
                         "third of the compute (" + micros(compute_s) + "), so SMs left to it would cost more than they hide");
    return;
  }
  plan.sms_left_to_communication = kCommSms;
  plan.notes.push_back("compute lanes leave " + std::to_string(kCommSms) + " SMs to the communication lane: the exchange (" +
                       micros(link_s) + " at the link's rate) is at least a third of the compute (" + micros(compute_s) +
                       "), and a GEMM holding every SM would keep it from starting");
}

// On a GPU, a compute side lane whose work is small beside the plan's (a shared expert beside the
// gate and the routed experts) has its kernels aim at half the SMs. With every SM, its GEMMs' blocks
// fill the machine as soon as they launch, and the critical lane's next kernels (the gate, then a
// routed-experts kernel that wants every SM) wait for them to drain; with half, those kernels always
// find room, and a memory-bound GEMM on half the SMs still draws most of the bandwidth, well within
// its slack. So only a lane bound by bandwidth is halved: a compute-bound one would run at half its
// rate (the shared experts of qwen1.5-moe-a2.7b's four 2048-token chunks, halved: 3280 against 3202
// µs with every SM). Measured on the H100, CUDA-graph replays, µs
// (`bench/results/h100_side_lane_sms_sweep_2026-11-24.txt`, `h100_deepseek_t1_side_lane_sms_2026-11-24.txt`,
// `h100_side_lanes_ab_2026-11-24.txt`): every SM / 64 / 48 / 16 SMs on the side lane, deepseek-v3
// T=1 280.5 / 272.6 / 278.9 / 298; qwen1.5-moe-a2.7b T = 8 / 128 / 256 202.6 / 200.2 / 194.7 (48),
// 425.6 / 417.9 / 413.3, 438.2 / 424.0 / 434.7. Stream priorities alone (equal, swapped) moved
// nothing. A lane carrying a large part of the work (a chunk's experts beside another's) keeps every
// SM: stretched, it would become the critical path. Plans that exchange rows between ranks are left
// as leave_sms_to_communication splits them: the two shares together were never measured.
void share_sms_with_side_lanes(Plan& plan, const std::vector<PlanStep>& by_node) {
  constexpr double kSideShare = 0.5;
  constexpr double kRoomToStretch = 0.25;  // a side lane's work at most this share of the makespan
  // Where one kernel fills the machine (a GPU's rates); a CPU executor has no SM target to set.
  if (!plan.options.rates.kernels_fill_machine || plan.lanes.size() < 2) return;
  const Graph& g = *plan.graph;
  for (const PlanStep& s : by_node)
    if (g.node(s.node).op->communicates()) return;  // leave_sms_to_communication's split stands alone
  const MachineRates& rates = plan.options.rates;
  std::vector<double> busy(plan.lanes.size(), 0.0), bytes_s(plan.lanes.size(), 0.0), flops_s(plan.lanes.size(), 0.0);
  for (const PlanStep& s : by_node) {
    const auto l = static_cast<std::size_t>(s.lane);
    busy[l] += s.predicted_s;
    bytes_s[l] += s.cost.bytes / rates.bytes_per_s;
    flops_s[l] += s.cost.flops / rates.flops_per_s;
  }
  for (std::size_t l = 1; l < plan.lanes.size(); ++l) {
    if (busy[l] > kRoomToStretch * plan.predicted_makespan_s || bytes_s[l] < flops_s[l]) continue;
    plan.lanes[l].sm_share = kSideShare;
    plan.notes.push_back(plan.lanes[l].name + " aims at half the SMs: its work (" + micros(busy[l]) +
                         " predicted) is at most a quarter of the plan's (" + micros(plan.predicted_makespan_s) +
                         ") and bound by bandwidth, which half the SMs still draw, so it has room to stretch; with "
                         "every SM its blocks would hold the SMs the critical lane's next kernels need");
  }
}

// Issue order by estimated start (then lane, then id); cross-lane waits, skipping a wait already
// implied by an earlier wait of the same lane on a later node of the other lane.
void order_and_wait(Plan& plan, std::vector<PlanStep>& by_node) {
  const Graph& g = *plan.graph;
  std::vector<NodeId> order(by_node.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = static_cast<NodeId>(i);
  std::stable_sort(order.begin(), order.end(), [&](NodeId a, NodeId b) {
    const PlanStep& x = by_node[static_cast<std::size_t>(a)];
    const PlanStep& y = by_node[static_cast<std::size_t>(b)];
    if (x.start_estimate_s != y.start_estimate_s) return x.start_estimate_s < y.start_estimate_s;
    return a < b;
  });
  // A node never issues before a predecessor: predicted starts respect dependencies, but make it certain.
  std::vector<int> position(by_node.size(), -1);
  std::vector<NodeId> issued;
  std::vector<bool> done(by_node.size(), false);
  while (issued.size() < order.size()) {
    for (NodeId n : order) {
      if (done[static_cast<std::size_t>(n)]) continue;
      bool ready = true;
      for (NodeId p : g.predecessors(n)) ready = ready && done[static_cast<std::size_t>(p)];
      if (const NodeId h = by_node[static_cast<std::size_t>(n)].holds_after; h != kNoNode)
        ready = ready && done[static_cast<std::size_t>(h)];
      if (!ready) continue;
      done[static_cast<std::size_t>(n)] = true;
      position[static_cast<std::size_t>(n)] = static_cast<int>(issued.size());
      issued.push_back(n);
      break;
    }
  }
  const std::size_t lanes = plan.lanes.size();
  std::vector<std::vector<int>> synced(lanes, std::vector<int>(lanes, -1));  // [lane][other] = last position covered
  for (NodeId n : issued) {
    PlanStep& s = by_node[static_cast<std::size_t>(n)];
    s.order = position[static_cast<std::size_t>(n)];
    std::vector<NodeId> before = g.predecessors(n);
    if (s.holds_after != kNoNode) {
      before.push_back(s.holds_after);
      const PlanStep& holder = by_node[static_cast<std::size_t>(s.holds_after)];
      if (holder.lane != s.lane)
        s.reason += " [after '" + g.node(s.holds_after).name + "' on lane " + std::to_string(holder.lane) +
                    ": both hold every SM (persistent grids), so they never run at once]";
    }
    for (NodeId p : before) {
      const PlanStep& ps = by_node[static_cast<std::size_t>(p)];
      if (ps.lane == s.lane) continue;
      int& covered = synced[static_cast<std::size_t>(s.lane)][static_cast<std::size_t>(ps.lane)];
      if (position[static_cast<std::size_t>(p)] <= covered) continue;
      s.waits.push_back(p);
      covered = position[static_cast<std::size_t>(p)];
    }
  }
  plan.steps.clear();
  for (NodeId n : issued) plan.steps.push_back(by_node[static_cast<std::size_t>(n)]);
  plan.step_of_node.assign(by_node.size(), -1);
  for (std::size_t i = 0; i < plan.steps.size(); ++i)
    plan.step_of_node[static_cast<std::size_t>(plan.steps[i].node)] = static_cast<int>(i);
}

// A step whose kernel can start early (KernelEntry::starts_early) does so where the previous step
// of its lane releases it, it waits for no other lane (an event wait would order it after that
// lane's work anyway) and both belong to one chunk: a step of a chunk the run's T does not reach
// launches nothing, so the stream's previous kernel would be another than the plan's.
void start_early_where_released(Plan& plan) {
  std::vector<int> last_on_lane(plan.lanes.size(), -1);
  for (std::size_t i = 0; i < plan.steps.size(); ++i) {
    PlanStep& s = plan.steps[i];
    int& last = last_on_lane[static_cast<std::size_t>(s.lane)];
    if (last >= 0) {
      const Node& n = plan.graph->node(s.node);
      const Node& previous = plan.graph->node(plan.steps[static_cast<std::size_t>(last)].node);
      if (s.kernel->starts_early && s.kernel->starts_early(*plan.graph, n) && s.waits.empty() &&
          plan.steps[static_cast<std::size_t>(last)].kernel->releases_next && previous.chunk == n.chunk) {
        s.starts_early = true;
        s.reason += " [starts while '" + previous.name + "' runs: programmatic dependent launch]";
      }
    }
    last = static_cast<int>(i);
  }
}

// Where a chosen kernel reads an input on the host, route that input through a to_host node.
// Returns null when no kernel needs one.
std::shared_ptr<const Graph> with_host_copies(const Graph& g, const std::vector<const KernelEntry*>& chosen) {
  std::vector<std::pair<NodeId, int>> wanted;
  for (const Node& n : g.nodes())
    for (int index : chosen[static_cast<std::size_t>(n.id)]->host_inputs)
      if (!g.value(n.inputs.at(static_cast<std::size_t>(index))).type->host_memory) wanted.push_back({n.id, index});
  if (wanted.empty()) return nullptr;
  auto copy = std::make_shared<Graph>(g);
  for (const auto& [node, index] : wanted) {
    const std::string name = copy->node(node).name + ".to_host" + std::to_string(index);
    const ValueId source = copy->node(node).inputs[static_cast<std::size_t>(index)];
    const ValueId host = copy->add_value(name + ".host");
    copy->add_node(name, std::make_shared<ToHostOp>(), {source}, {host});
    copy->replace_input(node, static_cast<std::size_t>(index), host);
  }
  copy->validate();
  return copy;
}

}  // namespace

bool Plan::has_host_sync() const {
  for (const Node& n : graph->nodes())
    if (n.op->kind() == "to_host") return true;
  return false;
}

namespace {

// The T a plan is costed and tuned at: the cost tokens where set, else the graph's maximum.
int64_t tuned_tokens(const Graph& g, const PlanOptions& options) {
  return options.cost_tokens > 0 ? std::min(options.cost_tokens, g.max_tokens()) : g.max_tokens();
}

// The kernel a cached choice stands for in this plan: itself, or, where packed weights are off and it
// reads a packed copy, the kernel that computes the same without it (PackedWeight::unpacked_twin).
std::string runnable_tuned_kernel(const KernelRegistry& registry, const std::string& name, const PlanOptions& options) {
  if (options.packed_weights) return name;
  const KernelEntry* k = registry.find(name, options.backend);
  return k && k->packed_weight && !k->packed_weight->unpacked_twin.empty() ? k->packed_weight->unpacked_twin : name;
}

// Cache entries `moeflow tune` recorded for a chain's experts node (it measures the chain's kernels
// and the fused ones side by side) that name a fused kernel, by the name of the fused node the fuse
// pass made of that chain: the fused node has a signature of its own, which no entry names.
using TunedChains = std::map<std::string, TunedKernel>;

// The kernel a tuning cache measured fastest for this node near its T (for a fused node, its chain's
// entry in `chains`), where it can run the node within the plan's limits (captured under
// --cuda-graph; its unpacked twin where packed weights are off); none where --kernel forces the op
// or nothing was measured.
std::optional<KernelChoice> tuned_choice(const KernelRegistry& registry, const Graph& g, const Node& n,
                                         const PlanOptions& options, int64_t T, const TunedChains& chains) {
  if (!options.tuning || options.forced_kernels.count(n.op->kind())) return std::nullopt;
  const TunedKernel* t = options.tuning->find(options.tuning_device, tuning_signature(g, n), g.tokens_of(n, T));
  if (const auto chain = chains.find(n.name); !t && chain != chains.end()) t = &chain->second;
  if (!t) return std::nullopt;
  const std::string name = runnable_tuned_kernel(registry, t->kernel, options);
  std::optional<KernelChoice> c = registry.select_named(g, n, options.backend, name, options.limits());
  if (!c) return std::nullopt;
  std::ostringstream why;
  why << "tuned: fastest measured at T=" << t->tokens << " on " << t->device << " (" << std::fixed
      << std::setprecision(1) << t->time_us << " us, " << options.tuning->source() << ")"
      << (name != t->kernel ? " as " + t->kernel + ", here without its packed copy" : std::string()) << "; " << c->reason;
  c->reason = why.str();
  return c;
}

// The kernel the plan runs a node with: the tuned one where there is one, else the forced or the
// highest-priority one; none where select() would refuse the node.
std::optional<KernelChoice> planned_choice(const KernelRegistry& registry, const Graph& g, const Node& n,
                                           const PlanOptions& options, int64_t T, const TunedChains& chains) {
  if (auto tuned = tuned_choice(registry, g, n, options, T, chains)) return tuned;
  return registry.try_select(g, n, options.backend, options.forced_kernels, options.limits());
}

constexpr const char* kNotFused = "not fused with its dispatch and combine: ";

// The graph with its dispatch → experts → combine chains fused where a kernel of the backend runs
// the fused node; null where nothing is fused (fusion off, a kernel forced on the chain, no kernel).
// `declined` gets, per experts node left in a chain, why no fused kernel took it, and per fused node
// whose shared expert stayed apart, why no kernel took it folded in; `tuned_chains` the cache
// entries naming a fused kernel, per fused node, where that kernel runs it.
std::shared_ptr<const Graph> fused_where_a_kernel_runs_it(const KernelRegistry& registry, const Graph& g,
                                                          const PlanOptions& options,
                                                          std::map<std::string, std::string>& declined,
                                                          TunedChains& tuned_chains) {
  if (!options.fuse) return nullptr;
  for (const char* op : {"dispatch", "experts", "combine"})
    if (options.forced_kernels.count(op)) return nullptr;
  const bool forced = options.forced_kernels.count("fused_experts") > 0;
  // A backend without a fused kernel (the CPU: there the chain costs no launches) keeps every chain
  // and says nothing about it.
  if (!forced && registry.candidates("fused_experts", options.backend).empty()) return nullptr;
  return fuse_experts_chains(
      g,
      [&](const Graph& fused, const Node& n) {
        // A forced fused kernel is checked (and refused by name) when the fused graph is planned;
        // it takes the shared expert folded in only where it can run that node.
        const bool folds_shared = static_cast<const FusedExpertsOp&>(*n.op).shared().has_value();
        if (forced && !folds_shared) return true;
        if (forced) {
          const std::string& name = options.forced_kernels.at("fused_experts");
          if (registry.select_named(fused, n, options.backend, name, options.limits())) return true;
          declined[n.name] = "shared expert not folded in: the forced " + name + " does not run it";
          return false;
        }
        // `moeflow tune` measured the fused kernels beside the experts kernels: where an experts
        // kernel of the chain was fastest, and can run here (captured, under --cuda-graph), the
        // chain stays.
        const std::string source = fused_experts_source(n.name);
        const auto experts = g.find_node(source);
        const TunedKernel* tuned =
            options.tuning && experts ? options.tuning->find(options.tuning_device, tuning_signature(g, g.node(*experts)),
                                                              g.tokens_of(g.node(*experts), tuned_tokens(g, options)))
                                      : nullptr;
        // (select_named answers for the experts node, so a cached fused kernel never matches here.)
        const std::string tuned_kernel = tuned ? runnable_tuned_kernel(registry, tuned->kernel, options) : "";
        if (tuned && registry.select_named(g, g.node(*experts), options.backend, tuned_kernel, options.limits())) {
          std::ostringstream why;
          why << "tuned: " << tuned->kernel << " on the chain measured fastest at T=" << tuned->tokens << " ("
              << std::fixed << std::setprecision(1) << tuned->time_us << " us, " << options.tuning->source() << ")";
          declined[source] = kNotFused + why.str();
          return false;
        }
        // A fused kernel measured fastest runs the node even where the planner would pass it over
        // (KernelEntry::passed_over_on): the measurement is the better guide.
        if (tuned && registry.select_named(fused, n, options.backend, tuned_kernel, options.limits())) {
          tuned_chains[n.name] = *tuned;
          return true;
        }
        std::string why;
        if (registry.select_any(fused, n, options.backend, options.limits(), &why)) return true;
        // A node offered with the shared expert folded in is offered again without it: where that
        // one is taken, its step says why the shared expert stayed apart.
        if (folds_shared) declined[n.name] = "shared expert not folded in: " + why;
        else declined[source] = kNotFused + why;
        return false;
      },
      options.keep_values, options.fold_shared);
}

// The plan of a graph the fuse pass has already seen; `not_fused` (node -> why its chain, or its
// shared expert, stayed apart) goes into the steps' reasons. Re-entered with the graph that host copies rewrite.
Plan plan_fused_graph(std::shared_ptr<const Graph> graph, const PlanOptions& options,
                      const std::map<std::string, std::string>& not_fused, const TunedChains& tuned_chains) {
  Plan plan;
  plan.graph = graph;
  plan.options = options;
  const int64_t T = tuned_tokens(*graph, options);
  const KernelRegistry& registry = options.registry ? *options.registry : KernelRegistry::builtin();
  for (const auto& [op, name] : options.forced_kernels) {
    bool known = false;
    for (const Node& n : graph->nodes()) known = known || n.op->kind() == op;
    if (!known) fail_input("--kernel " + op + "=" + name + ": the graph has no '" + op + "' node");
  }

  std::vector<KernelChoice> choices;
  for (const Node& n : graph->nodes()) {
    if (auto tuned = tuned_choice(registry, *graph, n, options, T, tuned_chains)) choices.push_back(std::move(*tuned));
    else choices.push_back(registry.select(*graph, n, options.backend, options.forced_kernels, options.limits()));
  }
  {
    std::vector<const KernelEntry*> chosen;
    for (const KernelChoice& c : choices) chosen.push_back(c.kernel);
    if (auto rewritten = with_host_copies(*graph, chosen))
      return plan_fused_graph(rewritten, options, not_fused, tuned_chains);
  }

  std::vector<PlanStep> by_node(graph->nodes().size());
  for (const Node& n : graph->nodes()) {
    PlanStep& s = by_node[static_cast<std::size_t>(n.id)];
    s.node = n.id;
    const KernelChoice& choice = choices[static_cast<std::size_t>(n.id)];
    s.kernel = choice.kernel;
    s.reason = choice.reason;
    if (auto it = not_fused.find(n.name); it != not_fused.end())
      s.reason += " [" + it->second + "]";
    const auto in = graph->input_values(n);
    const auto out = graph->output_values(n);
    // Rows laid out as views are copied by nobody: such a step costs nothing.
    const bool viewed = rows_become_views(*graph, n, *s.kernel, options);
    s.cost = viewed ? Cost{} : n.op->cost({in, out}, graph->tokens_of(n, T));
    const int launches = viewed ? 0 : s.kernel->launches;
    const Prediction predicted = n.op->communicates() ? predict_transfer(s.cost, options.rates, launches)
                                                      : predict(s.cost, options.rates, launches);
    s.predicted_s = predicted.total_s();
    s.work_s = predicted.work_s;
    if (s.kernel->workspace) s.workspace_bytes = s.kernel->workspace(*graph, n, graph->max_tokens_of(n));
    if (s.kernel->host_workspace) s.host_workspace_bytes = s.kernel->host_workspace(*graph, n, graph->max_tokens_of(n));
    plan.predicted_serial_s += s.predicted_s;
  }
  if (options.policy == Policy::serial) schedule_serial(plan, by_node);
  else schedule_concurrent(plan, by_node);
  leave_sms_to_communication(plan, by_node);
  if (options.share_side_lanes) share_sms_with_side_lanes(plan, by_node);
  order_and_wait(plan, by_node);
  if (options.early_start) start_early_where_released(plan);
  lay_out_buffers(plan);
  if (options.reuse_memory) plan_workspace_reuse(plan);
  return plan;
}

}  // namespace

Plan make_plan(std::shared_ptr<const Graph> graph, const PlanOptions& options) {
  if (!graph) fail_input("make_plan: no graph");
  if (!graph->validated()) fail_input("make_plan: graph '" + graph->name() + "' is not validated");
  if (options.max_lanes < 1) fail_input("make_plan: max_lanes must be >= 1");
  const KernelRegistry& registry = options.registry ? *options.registry : KernelRegistry::builtin();
  std::map<std::string, std::string> not_fused;
  TunedChains tuned_chains;
  auto fused = fused_where_a_kernel_runs_it(registry, *graph, options, not_fused, tuned_chains);
  std::shared_ptr<const Graph> planned = fused ? fused : graph;
  // A reduce that adds nothing (no shared experts) goes too, unless the reduce is to stay apart.
  if (options.fold_shared)
    if (auto folded = fold_lone_reduces(*planned, options.keep_values)) planned = folded;
  // A reduce left adding a combine's output and the shared experts' becomes the combine's addends.
  // Folded into a fused node instead (where the kernel chosen for it runs it so), the add makes the
  // whole node wait for the shared experts, not only its sum: measured on the H100 (qwen1.5-moe-a2.7b
  // T = 32 / 128 / 256, concurrent plan in a CUDA graph) 385 / 430 / 441 µs against 373 / 411 / 421
  // with the reduce apart, while one lane in order gains the launch (serial 425 / 468 / 479 against
  // 427 / 480 / 490). So both are planned and the one the cost model predicts faster is kept.
  if (options.fold_shared) {
    const Graph& unfused = *planned;
    std::shared_ptr<const Graph> combines_only = fold_shared_add_into_combine(unfused, options.keep_values);
    auto chosen = [&](const Graph& g, const Node& n) -> const KernelEntry* {
      const auto c = planned_choice(registry, g, n, options, tuned_tokens(g, options), tuned_chains);
      return c ? c->kernel : nullptr;
    };
    auto same_kernel = [&](const Graph& folded, const Node& n) {
      const KernelEntry* k = chosen(folded, n);
      return k != nullptr && k == chosen(unfused, unfused.node(*unfused.find_node(n.name)));
    };
    std::shared_ptr<const Graph> with_fused = fold_shared_add_into_combine(unfused, options.keep_values, same_kernel);
    if (combines_only) planned = combines_only;
    if (with_fused && (!combines_only || with_fused->nodes().size() < combines_only->nodes().size())) {
      Plan a = plan_fused_graph(with_fused, options, not_fused, tuned_chains);
      Plan b = plan_fused_graph(planned, options, not_fused, tuned_chains);
      const bool fold = a.predicted_makespan_s < b.predicted_makespan_s;
      std::ostringstream note;
      note << std::fixed << std::setprecision(1) << "the shared add "
           << (fold ? "folded into the fused node's combine" : "kept as a reduce after the fused node")
           << ": predicted " << a.predicted_makespan_s * 1e6 << " us folded (the node then waits for the shared "
           << "experts) vs " << b.predicted_makespan_s * 1e6 << " us apart";
      Plan& kept = fold ? a : b;
      kept.notes.push_back(note.str());
      return std::move(kept);
    }
  }
  return plan_fused_graph(planned, options, not_fused, tuned_chains);
}

}  // namespace moeflow
