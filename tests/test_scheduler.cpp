// Plans and the oneTBB executor: random DAGs (every dependency respected, results right), real
// overlap of independent branches, the buffer table, kernel selection, golden plan DOT.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
#include <limits>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

#include "bench/cpu_session.hpp"
#include "graph/builder.hpp"
#include "graph/chunk.hpp"
#include "graph/dot.hpp"
#include "graph/error.hpp"
#include "graph/row_ops.hpp"
#include "ops/lower_parallel.hpp"
#include "ops/moe_layer.hpp"
#include "scheduler/cpu_executor.hpp"
#include "scheduler/fluid_replay.hpp"
#include "tests/buffer_checks.hpp"

using namespace moeflow;
using testing::HasSubstr;

namespace {

// out = 1 + Σ inputs, after sleeping `sleep_us`: slow enough that overlap is measurable.
class ProbeOp final : public OpSchema {
 public:
  explicit ProbeOp(int sleep_us) : sleep_us_(sleep_us) {}
  int sleep_us() const { return sleep_us_; }
  std::string kind() const override { return "probe"; }
  std::string summary() const override { return "1 + sum, sleeps " + std::to_string(sleep_us_) + " us"; }
  std::vector<std::string> output_names() const override { return {"out"}; }
  std::vector<ValueType> infer(const Node&, std::span<const Value* const> in) const override {
    return {ValueType{in[0]->shape(), in[0]->dtype(), {}}};
  }
  Cost cost(const OpOperands&, int64_t) const override { return {0.0, sleep_us_ * 1e-6 * 10e9}; }
  bool token_parallel() const override { return true; }
  int min_inputs() const override { return 1; }
  int max_inputs() const override { return 8; }

 private:
  int sleep_us_;
};

// `early`: the probe kernel releases the next kernel of its lane and starts early itself
// (KernelEntry::releases_next / starts_early), so the planner lets every step that waits for no
// other lane start beside the previous one of its lane.
KernelRegistry probe_registry(bool early = false) {
  KernelRegistry r;
  KernelEntry probe{"probe", Backend::cpu, "test.probe", 0, [](const Graph&, const Node&) { return Support::yes("test kernel"); },
         [](const KernelCall& c) {
           std::this_thread::sleep_for(
               std::chrono::microseconds(static_cast<const ProbeOp&>(*c.node.op).sleep_us()));
           const int64_t n = c.input_value(0).shape().elements(c.tokens);
           float* out = c.out<float>(0);
           for (int64_t i = 0; i < n; ++i) {
             float s = 1.0f;
             for (std::size_t a = 0; a < c.inputs.size(); ++a) s += c.in<float>(a)[i];
             out[i] = s;
           }
         },
         {}};
  probe.releases_next = early;
  if (early) probe.starts_early = [](const Graph&, const Node&) { return true; };
  r.add(std::move(probe));
  return r;
}

struct RandomDag {
  std::shared_ptr<const Graph> graph;
  std::vector<std::vector<int>> inputs_of;  // per node, indices into values (0 = x, i + 1 = node i)
};

RandomDag random_dag(std::mt19937& rng, int nodes) {
  GraphBuilder b("random", 8);
  std::vector<ValueId> values{b.input("x", {tokens(), Dim::of(4)}, DType::f32)};
  RandomDag dag;
  std::vector<int> consumers(1, 0);
  for (int i = 0; i < nodes; ++i) {
    std::uniform_int_distribution<int> count(1, 3), pick(0, static_cast<int>(values.size()) - 1);
    std::vector<int> chosen;
    const int c = count(rng);
    for (int j = 0; j < c; ++j) {
      int v = pick(rng);
      if (std::find(chosen.begin(), chosen.end(), v) == chosen.end()) chosen.push_back(v);
    }
    std::vector<ValueId> in;
    for (int v : chosen) {
      in.push_back(values[static_cast<std::size_t>(v)]);
      ++consumers[static_cast<std::size_t>(v)];
    }
    values.push_back(b.add("n" + std::to_string(i), std::make_shared<ProbeOp>(200 + 100 * (i % 3)), in)[0]);
    consumers.push_back(0);
    dag.inputs_of.push_back(chosen);
  }
  // Every sink feeds one final node, so the whole DAG is live.
  std::vector<ValueId> sinks;
  std::vector<int> sink_indices;
  for (std::size_t v = 1; v < values.size(); ++v)
    if (consumers[v] == 0) {
      sinks.push_back(values[v]);
      sink_indices.push_back(static_cast<int>(v));
    }
  if (sinks.size() > 8) sinks.resize(8), sink_indices.resize(8);
  ValueId out = b.add("final", std::make_shared<ProbeOp>(100), sinks)[0];
  dag.inputs_of.push_back(sink_indices);
  dag.graph = std::make_shared<const Graph>(std::move(b).finish({out}));
  return dag;
}

PlanOptions concurrent_options() {
  PlanOptions o;
  o.policy = Policy::concurrent;
  return o;
}

}  // namespace

TEST(CpuExecutor, RandomDagsRespectEveryDependencyAndComputeTheRightValues) {
  const KernelRegistry registry = probe_registry();
  std::mt19937 rng(1234);
  for (int trial = 0; trial < 12; ++trial) {
    const int nodes = 4 + trial;
    RandomDag dag = random_dag(rng, nodes);
    PlanOptions po;
    po.registry = &registry;
    po.policy = trial % 3 == 0 ? Policy::serial : Policy::concurrent;
    po.max_lanes = 1 + trial % 4;
    Plan plan = make_plan(dag.graph, po);
    HostArena inputs(plan, Arena::inputs), weights(plan, Arena::weights);
    const int64_t T = 1 + trial % 8;
    fill_random(plan, inputs, T, static_cast<uint64_t>(trial));
    CpuExecutor exec(plan, 2);
    Trace trace;
    exec.run(inputs, weights, T, &trace);
    SCOPED_TRACE("trial " + std::to_string(trial) + " " + to_string(po.policy) + " lanes " +
                 std::to_string(plan.lanes.size()));
    // Every dependency respected: a node starts after each producer of its inputs ended.
    const Graph& g = *dag.graph;
    for (std::size_t i = 0; i < plan.steps.size(); ++i) {
      const TraceEvent& e = trace.events[i];
      for (NodeId p : g.predecessors(plan.steps[i].node)) {
        const TraceEvent& pe = trace.events[static_cast<std::size_t>(plan.step_of_node[static_cast<std::size_t>(p)])];
        EXPECT_GE(e.start_us, pe.start_us + pe.duration_us) << e.name << " started before " << pe.name << " ended";
      }
    }
    // Values: evaluate the same DAG directly.
    const float* x = inputs.as<float>(*g.find_value("x"));
    std::vector<std::vector<float>> expected{std::vector<float>(x, x + T * 4)};
    for (const auto& in : dag.inputs_of) {
      std::vector<float> v(static_cast<std::size_t>(T * 4), 1.0f);
      for (int src : in)
        for (std::size_t k = 0; k < v.size(); ++k) v[k] += expected[static_cast<std::size_t>(src)][k];
      expected.push_back(v);
    }
    const float* out = exec.output();
    for (std::size_t k = 0; k < expected.back().size(); ++k) ASSERT_EQ(out[k], expected.back()[k]) << k;
  }
}

TEST(CpuExecutor, IndependentBranchesOverlapInTimeOnlyUnderTheConcurrentPlan) {
  const KernelRegistry registry = probe_registry();
  GraphBuilder b("branches", 4);
  ValueId x = b.input("x", {tokens(), Dim::of(4)}, DType::f32);
  // 200 ms branches: a loaded CI machine has been seen to wake oneTBB's second worker ~20 ms late.
  ValueId a = b.add("left", std::make_shared<ProbeOp>(200000), {x})[0];
  ValueId c = b.add("right", std::make_shared<ProbeOp>(200000), {x})[0];
  auto g = std::make_shared<const Graph>(std::move(b).finish({b.add("join", std::make_shared<ProbeOp>(0), {a, c})[0]}));
  for (Policy policy : {Policy::serial, Policy::concurrent}) {
    PlanOptions po;
    po.registry = &registry;
    po.policy = policy;
    Plan plan = make_plan(g, po);
    HostArena inputs(plan, Arena::inputs), weights(plan, Arena::weights);
    fill_random(plan, inputs, 4, 1);
    CpuExecutor exec(plan, 2);
    Trace trace;
    exec.run(inputs, weights, 4, &trace);
    auto event = [&](const std::string& name) {
      for (const TraceEvent& e : trace.events)
        if (e.name == name) return e;
      throw std::runtime_error("no event " + name);
    };
    const TraceEvent l = event("left"), r = event("right");
    const double overlap = std::min(l.start_us + l.duration_us, r.start_us + r.duration_us) - std::max(l.start_us, r.start_us);
    if (policy == Policy::serial) {
      EXPECT_EQ(plan.lanes.size(), 1u);
      EXPECT_LE(overlap, 0.0);
    } else {
      EXPECT_EQ(plan.lanes.size(), 2u);
      EXPECT_NE(l.lane, r.lane);
      EXPECT_GT(overlap, 100000.0) << "the branches should run together for most of their 200 ms";
    }
  }
}

TEST(Plan, ConcurrentPlanPutsSharedExpertBesideTheRoutedPath) {
  MoEConfig c = load_config("qwen1.5-moe-a2.7b", {"hidden_size=256", "moe_intermediate_size=64",
                                                  "shared_expert_intermediate_size=256"});
  auto g = std::make_shared<const Graph>(build_moe_layer(c, {.max_tokens = 64}));
  PlanOptions po;
  po.policy = Policy::concurrent;
  Plan plan = make_plan(g, po);
  // The plan's graph: the reduce folded into the combine, which adds the shared expert's output.
  const Graph& pg = *plan.graph;
  EXPECT_FALSE(pg.find_node("reduce"));
  const PlanStep& shared = plan.step_for(*pg.find_node("shared_expert"));
  const PlanStep& experts = plan.step_for(*pg.find_node("experts"));
  const PlanStep& combine = plan.step_for(*pg.find_node("combine"));
  EXPECT_NE(shared.lane, experts.lane);
  // The combine waits for whichever branch is not on its own lane, and nothing else.
  const NodeId other = combine.lane == shared.lane ? *pg.find_node("experts") : *pg.find_node("shared_expert");
  EXPECT_THAT(combine.waits, testing::ElementsAre(other));
  EXPECT_THAT(plan.lanes[static_cast<std::size_t>(shared.lane)].why + plan.lanes[0].why, HasSubstr("shared_expert"));
  // Issue order is a topological order.
  for (const PlanStep& s : plan.steps)
    for (NodeId p : pg.predecessors(s.node)) EXPECT_LT(plan.step_for(p).order, s.order);
}

// The built-in CPU kernels, each declaring the launches its GPU counterpart issues, and rates like an
// H100's (one kernel fills the machine): what the CUDA planner sees, without a GPU.
struct GpuLikePlanning {
  KernelRegistry registry;
  PlanOptions options;
  GpuLikePlanning() {
    for (const char* kind : {"gate", "shared_expert", "dispatch", "experts", "combine", "reduce"})
      for (const KernelEntry* e : KernelRegistry::builtin().candidates(kind, Backend::cpu)) {
        KernelEntry copy = *e;
        copy.launches = std::string(kind) == "shared_expert" || std::string(kind) == "dispatch" ? 4 : 2;
        registry.add(copy);
      }
    options.policy = Policy::concurrent;
    options.registry = &registry;
    options.rates = {.flops_per_s = 800e12, .bytes_per_s = 3e12, .overhead_s = 5e-6, .kernels_fill_machine = true};
  }
};

TEST(Plan, SharedExpertGetsALaneWhenItsLaunchesHideBehindTheRoutedChain) {
  GpuLikePlanning p;
  // T=1: both branches read ~69 MB; the routed one is a chain of a dozen launches.
  auto g = std::make_shared<const Graph>(build_moe_layer(load_config("qwen1.5-moe-a2.7b"), {.max_tokens = 1}));
  Plan plan = make_plan(g, p.options);
  const PlanStep& shared = plan.step_for(*g->find_node("shared_expert"));
  ASSERT_EQ(plan.lanes.size(), 2u);
  EXPECT_NE(shared.lane, plan.step_for(*g->find_node("experts")).lane);
  EXPECT_THAT(plan.lanes[static_cast<std::size_t>(shared.lane)].why, HasSubstr("overlap pays"));
  EXPECT_TRUE(plan.notes.empty());
  EXPECT_LT(plan.predicted_makespan_s, plan.predicted_serial_s);
  // Its work is as large as the routed branch's: no room to stretch it over half the SMs.
  for (const Lane& lane : plan.lanes) EXPECT_EQ(lane.sm_share, 1.0) << lane.name;
}

TEST(Plan, SideLaneWithRoomToStretchAimsAtHalfTheSms) {
  GpuLikePlanning p;
  // T=128: the routed experts stream ~1 GB, the shared expert 69 MB beside them.
  auto g = std::make_shared<const Graph>(build_moe_layer(load_config("qwen1.5-moe-a2.7b"), {.max_tokens = 128}));
  Plan plan = make_plan(g, p.options);
  ASSERT_EQ(plan.lanes.size(), 2u);
  const int side = plan.step_for(*g->find_node("shared_expert")).lane;
  ASSERT_EQ(side, 1);
  EXPECT_EQ(plan.lanes[0].sm_share, 1.0);
  EXPECT_EQ(plan.lanes[1].sm_share, 0.5);
  ASSERT_EQ(plan.notes.size(), 1u) << testing::PrintToString(plan.notes);
  EXPECT_THAT(plan.notes[0], HasSubstr("lane1 (shared_expert) aims at half the SMs"));
  std::ostringstream dot;
  plan.write_dot(dot);
  EXPECT_THAT(dot.str(), HasSubstr("lane1 (shared_expert), 50% of the SMs"));
  // On the host (one node's kernel does not fill the machine) and in a serial plan nothing is halved.
  PlanOptions host;
  host.policy = Policy::concurrent;
  for (const Lane& lane : make_plan(g, host).lanes) EXPECT_EQ(lane.sm_share, 1.0) << lane.name;
  PlanOptions serial = p.options;
  serial.policy = Policy::serial;
  EXPECT_EQ(make_plan(g, serial).lanes.at(0).sm_share, 1.0);
  // Asked for (--side-lanes-every-sm), every lane keeps every SM.
  PlanOptions every_sm = p.options;
  every_sm.share_side_lanes = false;
  const Plan kept = make_plan(g, every_sm);
  ASSERT_EQ(kept.lanes.size(), 2u);
  EXPECT_EQ(kept.lanes[1].sm_share, 1.0);
  EXPECT_TRUE(kept.notes.empty());
}

TEST(Plan, SharedExpertStaysInLineWhenBothBranchesAreBoundByTheSameCeiling) {
  GpuLikePlanning p;
  // T=64: the routed experts stream gigabytes; the shared expert's 88 MB would only share that bandwidth.
  auto g = std::make_shared<const Graph>(build_moe_layer(load_config("deepseek-v3"), {.max_tokens = 64}));
  Plan plan = make_plan(g, p.options);
  EXPECT_EQ(plan.lanes.size(), 1u);
  ASSERT_EQ(plan.notes.size(), 1u) << testing::PrintToString(plan.notes);
  EXPECT_THAT(plan.notes[0], HasSubstr("shared_expert runs in line"));
  EXPECT_THAT(plan.notes[0], HasSubstr("overlap does not pay"));
  std::ostringstream summary;
  plan.write_summary(summary);
  EXPECT_THAT(summary.str(), HasSubstr("note: shared_expert runs in line"));
  for (const PlanStep& s : plan.steps)
    for (NodeId q : g->predecessors(s.node)) EXPECT_LT(plan.step_for(q).order, s.order);
}

// set(n, lane, overhead_s, work_s): step n of a hand-laid plan for the fluid replay.
static auto hand_laid(std::vector<PlanStep>& steps) {
  return [&steps](NodeId n, int lane, double overhead_s, double work_s) {
    PlanStep& s = steps[static_cast<std::size_t>(n)];
    s.node = n;
    s.lane = lane;
    s.work_s = work_s;
    s.predicted_s = overhead_s + work_s;
  };
}

// The fluid replay on a hand-laid plan of probe nodes: work shares the machine, launch overheads
// and the lanes' order do not.
TEST(FluidReplay, WorkSharesTheMachineAndOverheadsHideBehindIt) {
  GraphBuilder b("fluid", 4);
  const ValueId x = b.input("x", {tokens(), Dim::of(4)}, DType::f32);
  const ValueId a = b.add("a", std::make_shared<ProbeOp>(0), {x})[0];
  const ValueId c = b.add("c", std::make_shared<ProbeOp>(0), {x})[0];
  const ValueId d = b.add("d", std::make_shared<ProbeOp>(0), {a, c})[0];
  const Graph g = std::move(b).finish({d});
  std::vector<PlanStep> steps(3);
  auto set = hand_laid(steps);
  // a and c, 1 s of work each, on two lanes: each gets half the machine, both end at 2 s; then d.
  set(0, 0, 0.0, 1.0);
  set(1, 1, 0.0, 1.0);
  set(2, 0, 0.0, 0.5);
  EXPECT_DOUBLE_EQ(fluid_makespan(g, steps, {{0, 2}, {1}}), 2.5);
  // The same in one lane: 1 + 1 + 0.5.
  EXPECT_DOUBLE_EQ(fluid_makespan(g, steps, {{0, 1, 2}}), 2.5);
  // c all overhead (latency): it hides behind a's work on the other lane.
  set(1, 1, 0.8, 0.0);
  EXPECT_DOUBLE_EQ(fluid_makespan(g, steps, {{0, 2}, {1}}), 1.5);
  EXPECT_DOUBLE_EQ(fluid_makespan(g, steps, {{0, 1, 2}}), 2.3);
  // c: 0.2 s of overhead, then 0.5 s of work. To 0.2 s a runs alone (0.2 done); then both at half
  // speed until c's work ends at 1.2 s (a: 0.7 done); a's last 0.3 alone to 1.5 s; d to 2.0 s.
  set(1, 1, 0.2, 0.5);
  EXPECT_DOUBLE_EQ(fluid_makespan(g, steps, {{0, 2}, {1}}), 2.0);
  // An order against the edges (d ahead of a on its lane) never ends, and a node on no lane: refused.
  EXPECT_THROW(fluid_makespan(g, steps, {{2, 0}, {1}}), Error);
  EXPECT_THROW(fluid_makespan(g, steps, {{0, 2}}), Error);
}

// A step whose kernel holds every SM (PlanStep::holds_after) starts only when the one holding them
// before it has ended, which may let latency on its predecessor's lane hide behind it: a and c
// (holders, 1 s of work each) on two lanes; d (after a, 1 s of latency) and out (after d and c).
TEST(FluidReplay, GridsHoldingEverySmRunOneAfterTheOther) {
  GraphBuilder b("holders", 4);
  const ValueId x = b.input("x", {tokens(), Dim::of(4)}, DType::f32);
  const ValueId a = b.add("a", std::make_shared<ProbeOp>(0), {x})[0];
  const ValueId c = b.add("c", std::make_shared<ProbeOp>(0), {x})[0];
  const ValueId d = b.add("d", std::make_shared<ProbeOp>(0), {a})[0];
  const ValueId out = b.add("out", std::make_shared<ProbeOp>(0), {d, c})[0];
  const Graph g = std::move(b).finish({out});
  std::vector<PlanStep> steps(4);
  auto set = hand_laid(steps);
  set(0, 0, 0.0, 1.0);
  set(1, 1, 0.0, 1.0);
  set(2, 0, 1.0, 0.0);
  set(3, 0, 0.0, 0.0);
  // Sharing the machine, a and c both end at 2 s; d's latency follows to 3 s.
  EXPECT_DOUBLE_EQ(fluid_makespan(g, steps, {{0, 2, 3}, {1}}), 3.0);
  // c after a: a alone to 1 s, then c's work beside d's latency, all done at 2 s.
  steps[1].holds_after = 0;
  EXPECT_DOUBLE_EQ(fluid_makespan(g, steps, {{0, 2, 3}, {1}}), 2.0);
}

// qwen3-30b-a3b at T=8192 in four chunks with GPU-like rates, the experts kernels holding every SM (as
// CUTLASS's persistent grids do): whatever lanes the plan opens, no two of those steps can run at
// once. Each is ordered after the one before it by its lane or by a wait (closure over both), and
// says so in its reason where the lanes differ.
TEST(Plan, StepsHoldingEverySmNeverRunAtOnce) {
  GpuLikePlanning p;
  KernelRegistry holding;
  for (const char* kind : {"gate", "shared_expert", "dispatch", "experts", "combine", "reduce"})
    for (const KernelEntry* e : p.registry.candidates(kind, Backend::cpu)) {
      KernelEntry copy = *e;
      copy.holds_every_sm = std::string(kind) == "experts";
      holding.add(copy);
    }
  for (const char* kind : {"slice_rows", "concat_rows"})  // the chunk pass's row views
    for (const KernelEntry* e : KernelRegistry::builtin().candidates(kind, Backend::cpu)) {
      holding.add(*e);
      p.registry.add(*e);
    }
  p.options.registry = &holding;
  p.options.fuse = false;
  auto layer = build_moe_layer(load_config("qwen3-30b-a3b"), {.max_tokens = 8192});
  auto g = std::make_shared<const Graph>(chunk_tokens(layer, {.chunks = 4}));
  const Plan plan = make_plan(g, p.options);
  const std::size_t n = plan.steps.size();
  // after[i][j]: step j ends before step i starts (lane order and waits, transitively).
  std::vector<std::vector<bool>> after(n, std::vector<bool>(n, false));
  std::vector<int> last_on_lane(plan.lanes.size(), -1);
  for (std::size_t i = 0; i < n; ++i) {
    const PlanStep& s = plan.steps[i];
    std::vector<std::size_t> direct;
    if (int& last = last_on_lane[static_cast<std::size_t>(s.lane)]; last >= 0) direct.push_back(static_cast<std::size_t>(last));
    for (NodeId w : s.waits) direct.push_back(static_cast<std::size_t>(plan.step_of_node[static_cast<std::size_t>(w)]));
    for (std::size_t j : direct) {
      after[i][j] = true;
      for (std::size_t k = 0; k < n; ++k) after[i][k] = after[i][k] || after[j][k];
    }
    last_on_lane[static_cast<std::size_t>(s.lane)] = static_cast<int>(i);
  }
  std::vector<std::size_t> holders;
  for (std::size_t i = 0; i < n; ++i)
    if (plan.steps[i].kernel->holds_every_sm) holders.push_back(i);
  ASSERT_EQ(holders.size(), 4u);
  for (std::size_t a = 1; a < holders.size(); ++a) {
    const PlanStep& s = plan.steps[holders[a]];
    const PlanStep& previous = plan.steps[holders[a - 1]];
    EXPECT_EQ(s.holds_after, previous.node) << g->node(s.node).name;
    EXPECT_TRUE(after[holders[a]][holders[a - 1]]) << g->node(s.node).name << " may overlap " << g->node(previous.node).name;
    if (s.lane != previous.lane) {
      EXPECT_THAT(s.reason, HasSubstr("both hold every SM"));
    }
  }
  // Without the flag the same registry lets two chunks' experts run on two lanes at once (the
  // fluid replay alone sees no harm in it), so the test above is not vacuous.
  p.options.registry = &p.registry;
  const Plan free = make_plan(g, p.options);
  bool any_overlap_possible = false;
  for (const PlanStep& s : free.steps) {
    EXPECT_EQ(s.holds_after, kNoNode) << "holds_after set without a holding kernel";
  }
  std::vector<int> experts_lanes;
  for (const PlanStep& s : free.steps)
    if (g->node(s.node).op->kind() == "experts") experts_lanes.push_back(s.lane);
  for (std::size_t a = 1; a < experts_lanes.size(); ++a) any_overlap_possible |= experts_lanes[a] != experts_lanes[0];
  EXPECT_TRUE(any_overlap_possible) << "the unflagged plan keeps every chunk's experts on one lane";
}

// Rank 0 of two (experts split over the ranks, alltoall), two chunks, a GPU's rates: the two-micro-
// batch schedule comes out of list scheduling alone. The shared experts fill the wait for the first
// transfer; chunk 0's combine goes before chunk 1's experts, so chunk 0's results travel while chunk
// 1 computes; and the two chunks' experts share one lane, since on a machine that one kernel fills,
// two lanes would only end both late (the fluid replay of the plan).
TEST(Plan, TwoMicroBatchOrderEmergesWhereRanksExchangeRows) {
  auto g = std::make_shared<const Graph>(build_moe_layer(load_config("deepseek-v3"), {.max_tokens = 4096}));
  const Graph chunked = chunk_tokens(*g, {.chunks = 2});
  ParallelLayout layout{.dp = 2, .tp = 1, .ep = true, .dispatch = DispatchKind::alltoall, .tokens = {4096, 4096}};
  auto rank0 = std::make_shared<const Graph>(lower_parallel(chunked, layout, 0));
  PlanOptions options;
  options.policy = Policy::concurrent;
  options.rates = {.flops_per_s = 800e12, .bytes_per_s = 3e12, .overhead_s = 5e-6, .kernels_fill_machine = true};
  Plan plan = make_plan(rank0, options);
  auto step = [&](const std::string& name) -> const PlanStep& {
    const auto n = rank0->find_node(name);
    if (!n) throw std::runtime_error("no node " + name);
    return plan.step_for(*n);
  };
  const PlanStep& experts0 = step("experts·c0");
  const PlanStep& experts1 = step("experts·c1");
  EXPECT_EQ(experts0.lane, experts1.lane);
  EXPECT_LT(step("combine·c0").order, experts1.order);
  EXPECT_EQ(step("combine·c0").lane, experts0.lane);
  for (const char* shared : {"shared_expert·c0", "shared_expert·c1"}) EXPECT_LT(step(shared).order, step("dispatch·c0").order);
  // The transfers: each on the communication lane, chunk 1's way out before chunk 0's way back.
  EXPECT_LT(step("dispatch_alltoall·c1").order, step("dispatch_alltoall_back·c0").order);
  EXPECT_NE(step("dispatch_alltoall·c0").lane, experts0.lane);
  PlanOptions serial = options;
  serial.policy = Policy::serial;
  EXPECT_LT(plan.predicted_makespan_s, make_plan(rank0, serial).predicted_makespan_s);
  // With ranks, the SMs are split only for the communication lane (share_sms_with_side_lanes).
  for (const Lane& lane : plan.lanes) EXPECT_EQ(lane.sm_share, 1.0) << lane.name;
}

TEST(Plan, SerialPlanIsOneLaneInTopologicalOrder) {
  MoEConfig c = load_config("deepseek-v3", {"hidden_size=128", "moe_intermediate_size=32"});
  auto g = std::make_shared<const Graph>(build_moe_layer(c, {.max_tokens = 16}));
  Plan plan = make_plan(g, {});
  ASSERT_EQ(plan.lanes.size(), 1u);
  for (std::size_t i = 0; i < plan.steps.size(); ++i) {
    EXPECT_EQ(plan.steps[i].node, static_cast<NodeId>(i));
    EXPECT_EQ(plan.steps[i].order, static_cast<int>(i));
    EXPECT_TRUE(plan.steps[i].waits.empty());
  }
}

TEST(Plan, BufferTableGivesEveryValueItsOwnAlignedRangeAtMaximumT) {
  MoEConfig c = load_config("qwen3-30b-a3b", {"hidden_size=128", "moe_intermediate_size=32", "num_experts=16"});
  auto g = std::make_shared<const Graph>(build_moe_layer(c, {.max_tokens = 100}));
  PlanOptions po = concurrent_options();
  po.reuse_memory = false;  // --no-reuse-memory: the layout the memory planner starts from
  Plan plan = make_plan(g, po);
  std::map<Arena, std::vector<std::pair<int64_t, int64_t>>> ranges;
  for (const Value& v : plan.graph->values()) {  // (its reduce folded into the combine: fold_lone_reduces)
    const Buffer& b = plan.buffer(v.id);
    EXPECT_EQ(b.bytes, v.bytes(100)) << v.name;
    EXPECT_EQ(b.offset % 256, 0) << v.name;
    ranges[b.arena].push_back({b.offset, b.offset + b.bytes});
  }
  for (const PlanStep& s : plan.steps)
    if (s.workspace_bytes) ranges[Arena::workspace].push_back({s.workspace_offset, s.workspace_offset + s.workspace_bytes});
  for (auto& [arena, list] : ranges) {
    std::sort(list.begin(), list.end());
    for (std::size_t i = 1; i < list.size(); ++i) EXPECT_LE(list[i - 1].second, list[i].first) << to_string(arena);
    EXPECT_LE(list.back().second, plan.bytes(arena));
  }
  EXPECT_EQ(plan.buffer(*plan.graph->find_value("dispatch.rows")).bytes, 100 * 8 * 128 * 4);
}

TEST(Plan, ForcedKernelsAreCheckedByName) {
  MoEConfig c = load_config("mixtral-8x7b", {"hidden_size=64", "intermediate_size=32"});
  auto g = std::make_shared<const Graph>(build_moe_layer(c, {.max_tokens = 8}));
  PlanOptions po;
  po.forced_kernels["experts"] = "cpu.grouped_swiglu";
  EXPECT_THAT(make_plan(g, po).step_for(*g->find_node("experts")).reason, HasSubstr("forced"));
  po.forced_kernels["experts"] = "no.such.kernel";
  try {
    make_plan(g, po);
    FAIL();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("no.such.kernel"));
    EXPECT_THAT(e.what(), HasSubstr("cpu.grouped_swiglu"));
  }
}

TEST(KernelRegistry, FindsAKernelByNameOnItsBackendOnly) {
  const KernelRegistry& r = KernelRegistry::builtin();
  const KernelEntry* k = r.find("cpu.grouped_swiglu", Backend::cpu);
  ASSERT_NE(k, nullptr);
  EXPECT_EQ(k->op_kind, "experts");
  EXPECT_EQ(r.find("cpu.grouped_swiglu", Backend::cuda), nullptr);
  EXPECT_EQ(r.find("no.such.kernel", Backend::cpu), nullptr);
}

// A kernel that is the better choice on some nodes only (priority_on): it leads there and nowhere
// else, a host-reading one still gives way under capture, and a forced kernel is unaffected.
TEST(KernelRegistry, APriorityThatDependsOnTheNodeOrdersTheCandidatesForThatNodeOnly) {
  KernelRegistry registry = probe_registry();
  KernelEntry specialist = *registry.candidates("probe", Backend::cpu).front();
  specialist.name = "test.specialist";
  specialist.priority = -1;  // behind test.probe (0) by default
  specialist.priority_on = [](const Graph&, const Node& n) { return n.name == "wide" ? 1 : -1; };
  specialist.supports = [](const Graph&, const Node&) { return Support::yes("runs every probe node"); };
  registry.add(specialist);
  GraphBuilder b("priority_on", 4);
  ValueId x = b.input("x", {tokens(), Dim::of(4)}, DType::f32);
  ValueId narrow = b.add("narrow", std::make_shared<ProbeOp>(0), {x})[0];
  ValueId wide = b.add("wide", std::make_shared<ProbeOp>(0), {narrow})[0];
  const Graph g = std::move(b).finish({wide});
  EXPECT_EQ(registry.select(g, g.node(0), Backend::cpu).kernel->name, "test.probe");
  EXPECT_EQ(registry.select(g, g.node(1), Backend::cpu).kernel->name, "test.specialist");
  EXPECT_EQ(registry.select(g, g.node(1), Backend::cpu, {{"probe", "test.probe"}}).kernel->name, "test.probe");
  // The same specialist reading an input on the host: a CUDA graph passes it over.
  KernelRegistry syncing = probe_registry();
  specialist.host_inputs = {0};
  syncing.add(specialist);
  EXPECT_EQ(syncing.select(g, g.node(1), Backend::cpu).kernel->name, "test.specialist");
  EXPECT_EQ(syncing.select(g, g.node(1), Backend::cpu, {}, {.capturable = true}).kernel->name, "test.probe");
}

TEST(Plan, GoldenDotFiles) {
  MoEConfig c = load_config("qwen1.5-moe-a2.7b", {"hidden_size=256", "moe_intermediate_size=64",
                                                  "shared_expert_intermediate_size=256"});
  auto g = std::make_shared<const Graph>(build_moe_layer(c, {.max_tokens = 64}));
  std::ostringstream plan_dot, chunked_dot;
  make_plan(g, concurrent_options()).write_dot(plan_dot);
  // Two chunks: lanes as clusters, chunk indices and the cross-lane waits of a pipelined plan.
  auto chunked = std::make_shared<const Graph>(chunk_tokens(*g, {.chunks = 2}));
  make_plan(chunked, concurrent_options()).write_dot(chunked_dot);
  // Rank 1 of two (expert parallel, alltoall, uneven tokens), chunked: communication nodes with the
  // bytes they move, chained in one order, on a lane of their own.
  ParallelLayout layout{.dp = 2, .tp = 1, .ep = true, .dispatch = DispatchKind::alltoall, .tokens = {64, 40}};
  auto rank1 = std::make_shared<const Graph>(lower_parallel(*chunked, layout, 1));
  std::ostringstream rank1_dot;
  make_plan(rank1, concurrent_options()).write_dot(rank1_dot);
  const std::pair<std::string, std::string> files[] = {
      {"qwen2_moe_small.graph.dot", graph_dot(*g)},
      {"qwen2_moe_small.plan_concurrent.dot", plan_dot.str()},
      {"qwen2_moe_small_2chunks.graph.dot", graph_dot(*chunked)},
      {"qwen2_moe_small_2chunks.plan_concurrent.dot", chunked_dot.str()},
      {"qwen2_moe_small_2chunks_ep2_rank1.graph.dot", graph_dot(*rank1)},
      {"qwen2_moe_small_2chunks_ep2_rank1.plan_concurrent.dot", rank1_dot.str()}};
  for (const auto& [name, text] : files) {
    const std::string path = std::string(MOEFLOW_SOURCE_DIR) + "/tests/golden/" + name;
    if (std::getenv("MOEFLOW_UPDATE_GOLDEN")) std::ofstream(path) << text;
    std::ifstream f(path);
    ASSERT_TRUE(f) << "missing " << path << " (run once with MOEFLOW_UPDATE_GOLDEN=1)";
    std::stringstream golden;
    golden << f.rdbuf();
    EXPECT_EQ(text, golden.str()) << name << " differs from its golden file";
  }
}

TEST(CpuExecutor, RefusesTokensAboveThePlansMaximum) {
  MoEConfig c = load_config("mixtral-8x7b", {"hidden_size=64", "intermediate_size=32"});
  auto g = std::make_shared<const Graph>(build_moe_layer(c, {.max_tokens = 8}));
  Plan plan = make_plan(g, {});
  HostArena inputs(plan, Arena::inputs), weights(plan, Arena::weights);
  CpuExecutor exec(plan, 1);
  try {
    exec.run(inputs, weights, 9);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::bad_input);
    EXPECT_THAT(e.what(), HasSubstr("[1, 8]"));
  }
}

TEST(Plan, KernelThatReadsAnInputOnTheHostGetsAToHostNodeInFrontOfIt) {
  // A test registry: the consumer's only kernel reads its second input on the host.
  KernelRegistry registry = probe_registry();
  KernelEntry host_reader = *registry.candidates("probe", Backend::cpu).front();
  host_reader.name = "test.host_reader";
  host_reader.priority = 1;
  host_reader.host_inputs = {1};
  host_reader.supports = [](const Graph&, const Node& n) {
    return n.name == "consumer" ? Support::yes("reads input 1 on the host") : Support::no("only the consumer");
  };
  registry.add(host_reader);
  registry.add({"to_host", Backend::cpu, "test.copy", 0, [](const Graph&, const Node&) { return Support::yes("copy"); },
                [](const KernelCall&) {}, {}});
  GraphBuilder b("host_inputs", 4);
  ValueId x = b.input("x", {Dim::of(4)}, DType::i32);
  ValueId y = b.input("y", {tokens(), Dim::of(4)}, DType::f32);
  ValueId out = b.add("consumer", std::make_shared<ProbeOp>(0), {y, x})[0];
  auto g = std::make_shared<const Graph>(std::move(b).finish({out}));
  PlanOptions po;
  po.registry = &registry;
  const Plan plan = make_plan(g, po);
  EXPECT_TRUE(plan.has_host_sync());
  ASSERT_EQ(plan.graph->nodes().size(), 2u);
  const Node& copy = plan.graph->node(0);
  const Node& consumer = plan.graph->node(1);
  EXPECT_EQ(copy.op->kind(), "to_host");
  EXPECT_EQ(plan.graph->value(consumer.inputs[1]).name, "consumer.to_host1.host");
  EXPECT_EQ(plan.buffer(consumer.inputs[1]).arena, Arena::host);
  EXPECT_EQ(plan.step_for(consumer.id).kernel->name, "test.host_reader");
  EXPECT_EQ(g->nodes().size(), 1u);  // the caller's graph is left as it was
}

TEST(MemoryPlanner, OverlappingBuffersAreNeverLiveTogetherAndTheyAddUpToThePeak) {
  const KernelRegistry registry = probe_registry(), early_registry = probe_registry(/*early=*/true);
  std::mt19937 rng(99);
  for (int trial = 0; trial < 40; ++trial) {
    RandomDag dag = random_dag(rng, 5 + trial % 20);
    PlanOptions po;
    po.registry = trial >= 20 ? &early_registry : &registry;  // steps starting beside their lane's previous one
    po.policy = trial % 4 == 0 ? Policy::serial : Policy::concurrent;
    po.max_lanes = 1 + trial % 4;
    po.reuse_memory = true;
    const Plan plan = make_plan(dag.graph, po);
    const Plan plain = make_plan(dag.graph, [&] { PlanOptions p = po; p.reuse_memory = false; return p; }());
    // A step starts early exactly where the kernels allow it, it follows a step of its lane and
    // waits for no other lane.
    int early = 0;
    for (std::size_t i = 0; i < plan.steps.size(); ++i) {
      const PlanStep& s = plan.steps[i];
      bool follows = false;
      for (std::size_t p = 0; p < i; ++p) follows = follows || plan.steps[p].lane == s.lane;
      EXPECT_EQ(s.starts_early, trial >= 20 && follows && s.waits.empty()) << "trial " << trial << " step " << i;
      if (s.starts_early) {
        EXPECT_NE(s.reason.find("programmatic dependent launch"), std::string::npos) << s.reason;
      }
      early += s.starts_early;
    }
    if (trial >= 20) {
      EXPECT_GT(early, 0) << "trial " << trial;
    }
    EXPECT_LE(plan.bytes(Arena::workspace), plain.bytes(Arena::workspace));
    EXPECT_EQ(testing_buffers::expect_live_values_apart(plan, "trial " + std::to_string(trial)), 0);
  }
}

TEST(MemoryPlanner, AViewKeepsTheValueItLiesInAliveUntilItsLastReader) {
  // m's first rows are read through a view (slice0) after every node that reads m itself has run:
  // q0, born then, must not take m's bytes while q1 still has to read them.
  KernelRegistry registry = probe_registry();
  register_row_kernels(registry);
  GraphBuilder b("sliced", 16);
  const ValueId x = b.input("x", {tokens(), Dim::of(64)}, DType::f32);  // 256 bytes per row
  const ValueId m = b.add("m", std::make_shared<ProbeOp>(0), {x})[0];
  const ValueId s0 = b.add("slice0", std::make_shared<SliceRowsOp>(0, 16), {m})[0];
  const ValueId s1 = b.add("slice1", std::make_shared<SliceRowsOp>(0, 16), {m})[0];
  const ValueId q0 = b.add("q0", std::make_shared<ProbeOp>(0), {s1})[0];
  const ValueId q1 = b.add("q1", std::make_shared<ProbeOp>(0), {s0, q0})[0];
  auto g = std::make_shared<const Graph>(std::move(b).finish({q1}));
  std::vector<std::vector<float>> results;
  for (bool reuse : {false, true}) {
    PlanOptions po;
    po.registry = &registry;
    po.reuse_memory = reuse;
    const Plan plan = make_plan(g, po);
    if (reuse) {
      EXPECT_EQ(plan.buffer(s0).view_of, m);
      EXPECT_EQ(plan.buffer(s1).view_of, m);
      EXPECT_GT(testing_buffers::expect_live_values_apart(plan, "sliced"), 0);
    }
    HostArena inputs(plan, Arena::inputs), weights(plan, Arena::weights);
    fill_random(plan, inputs, 16, 5);
    CpuExecutor exec(plan, 1);
    exec.run(inputs, weights, 16);
    results.emplace_back(exec.output(), exec.output() + 16 * 64);
  }
  EXPECT_EQ(results[0], results[1]);
}

TEST(MemoryPlanner, OnlyAJoinedValueNobodySharesBytesWithTakesItsPartsAsViews) {
  // Each part of a join is written by its own producer, on lanes the plan need not order: a joined
  // value whose bytes could be reused has no single first write, so its parts keep their own bytes.
  KernelRegistry registry = probe_registry();
  register_row_kernels(registry);
  for (bool joined_is_output : {true, false}) {
    GraphBuilder b("joined", 16);
    const ValueId x = b.input("x", {tokens(), Dim::of(64)}, DType::f32);
    const ValueId a = b.add("a", std::make_shared<ProbeOp>(0), {x})[0];
    const ValueId c = b.add("c", std::make_shared<ProbeOp>(0), {x})[0];
    const ValueId joined = b.add("join", std::make_shared<ConcatRowsOp>(2, 8), {a, c})[0];
    const ValueId out = joined_is_output ? joined : b.add("after", std::make_shared<ProbeOp>(0), {joined})[0];
    auto g = std::make_shared<const Graph>(std::move(b).finish({out}));
    PlanOptions po;
    po.registry = &registry;
    po.policy = Policy::concurrent;
    const Plan plan = make_plan(g, po);
    EXPECT_EQ(plan.buffer(a).view_of, joined_is_output ? joined : -1) << joined_is_output;
    testing_buffers::expect_live_values_apart(plan, joined_is_output ? "joined output" : "joined mid-graph");
  }
}

TEST(Plan, NoStepStartsEarlyWhereThePlanSaysSoOrAKernelDoesNotAllowIt) {
  std::mt19937 rng(5);
  const RandomDag dag = random_dag(rng, 12);
  const KernelRegistry early = probe_registry(/*early=*/true), plain = probe_registry();
  PlanOptions po;
  po.policy = Policy::serial;
  po.registry = &early;
  auto count = [](const Plan& p) {
    int n = 0;
    for (const PlanStep& s : p.steps) n += s.starts_early;
    return n;
  };
  const Plan serial = make_plan(dag.graph, po);
  EXPECT_EQ(count(serial), static_cast<int>(serial.steps.size()) - 1);  // one lane: every step but the first
  po.early_start = false;                          // --no-early-start
  EXPECT_EQ(count(make_plan(dag.graph, po)), 0);
  po.early_start = true;
  po.registry = &plain;
  EXPECT_EQ(count(make_plan(dag.graph, po)), 0);
}

TEST(MemoryPlanner, RandomDagsComputeTheSameValuesWithReuse) {
  const KernelRegistry registry = probe_registry();
  std::mt19937 rng(7);
  for (int trial = 0; trial < 10; ++trial) {
    RandomDag dag = random_dag(rng, 6 + trial);
    std::vector<std::vector<float>> results;
    for (bool reuse : {false, true}) {
      PlanOptions po;
      po.registry = &registry;
      po.policy = Policy::concurrent;
      po.max_lanes = 2 + trial % 3;
      po.reuse_memory = reuse;
      Plan plan = make_plan(dag.graph, po);
      HostArena inputs(plan, Arena::inputs), weights(plan, Arena::weights);
      fill_random(plan, inputs, 8, static_cast<uint64_t>(trial));
      CpuExecutor exec(plan, 2);
      exec.run(inputs, weights, 8);
      results.emplace_back(exec.output(), exec.output() + 8 * 4);
    }
    EXPECT_EQ(results[0], results[1]) << "trial " << trial;
  }
}

TEST(MemoryPlanner, ReduceWritesOverItsFirstAddendOnlyWhenNothingReadsItAfterwards) {
  MoEConfig c = load_config("qwen1.5-moe-a2.7b", {"hidden_size=256", "moe_intermediate_size=64",
                                                  "shared_expert_intermediate_size=256"});
  auto g = std::make_shared<const Graph>(build_moe_layer(c, {.max_tokens = 32}));
  const Node& reduce = g->node(*g->find_node("reduce"));
  const ValueId sum = reduce.outputs[0], first = reduce.inputs[0];
  for (Policy policy : {Policy::serial, Policy::concurrent}) {
    PlanOptions po;
    po.policy = policy;
    po.fold_shared = false;  // the reduce kept apart (by default the combine adds the shared output)
    const Plan plan = make_plan(g, po);
    EXPECT_EQ(plan.buffer(sum).in_place_of, first) << to_string(policy);
    EXPECT_EQ(plan.buffer(sum).offset, plan.buffer(first).offset) << to_string(policy);
    std::ostringstream table;
    plan.write_memory(table);
    EXPECT_THAT(table.str(), HasSubstr("in place over " + g->value(first).name));
    // Read after the run (kept), the addend keeps its own bytes.
    po.keep_values = {g->value(first).name};
    const Plan kept = make_plan(g, po);
    EXPECT_EQ(kept.buffer(sum).in_place_of, -1);
    EXPECT_NE(kept.buffer(sum).offset, kept.buffer(first).offset);
  }
  // And the layer computes the same bytes either way.
  auto output_of = [&](bool reuse) {
    SessionOptions so;
    so.plan.policy = Policy::concurrent;
    so.plan.reuse_memory = reuse;
    so.plan.fold_shared = false;
    so.threads = 2;
    CpuSession s(g, so);
    s.set_tokens(29);
    s.run();
    return std::vector<float>(s.output(), s.output() + 29 * 256);
  };
  EXPECT_EQ(output_of(true), output_of(false));
}

// A kernel that reads a packed weight (KernelEntry::packed_weight): here an exact copy of w13, so its
// results must equal the built-in kernel's. The copy is written once per executor and weights arena,
// one copy serves every chunk, and runs after it read the copy, not w13 (w13 is overwritten with NaN
// after the first run: the second run's output must not change).
TEST(CpuExecutor, PackedWeightsAreWrittenOnceAndReadInsteadOfTheirSource) {
  const MoEConfig config = load_config("qwen3-30b-a3b", {"hidden_size=64", "moe_intermediate_size=32", "num_experts=8"});
  KernelRegistry registry = KernelRegistry::builtin();
  const KernelEntry* plain = registry.find("cpu.grouped_swiglu", Backend::cpu);
  ASSERT_NE(plain, nullptr);
  KernelEntry packed = *plain;
  packed.name = "test.grouped_swiglu_from_copy";
  packed.priority = 100;
  auto writes = std::make_shared<int>(0);
  const auto w13_bytes = [](const Graph& g, const Node& n) { return g.value(n.inputs[2]).bytes(g.max_tokens()); };
  packed.packed_weight = PackedWeight{2, "a copy of w13", w13_bytes, [writes, w13_bytes](const KernelCall& c, void* to) {
                                        ++*writes;
                                        std::memcpy(to, c.inputs[2], static_cast<std::size_t>(w13_bytes(c.graph, c.node)));
                                      },
                                      /*unpacked_twin=*/""};
  packed.run = [run = plain->run](const KernelCall& c) {
    ASSERT_NE(c.packed, nullptr);
    std::vector<void*> in(c.inputs.begin(), c.inputs.end());
    in[2] = c.packed;
    run(KernelCall{c.graph, c.node, in, c.outputs, c.tokens, c.lane, c.workspace, c.host_workspace, c.comm});
  };
  registry.add(packed);
  for (int chunks : {1, 3}) {
    SCOPED_TRACE(std::to_string(chunks) + " chunk(s)");
    Graph graph = build_experts_graph(config, {.max_tokens = 24});
    if (chunks > 1) graph = chunk_tokens(graph, {.chunks = chunks});
    auto g = std::make_shared<const Graph>(std::move(graph));
    PlanOptions po;
    po.fuse = false;
    po.policy = Policy::concurrent;
    PlanOptions reference_options = po;
    po.registry = &registry;
    const Plan plan = make_plan(g, po);
    const Plan reference_plan = make_plan(g, reference_options);
    ASSERT_EQ(plan.packed.size(), 1u);
    EXPECT_EQ(plan.packed[0].bytes, int64_t{8} * 2 * 32 * 64 * 4);
    int readers = 0;
    for (const PlanStep& s : plan.steps) readers += s.packed == 0;
    EXPECT_EQ(readers, chunks);
    HostArena inputs(plan, Arena::inputs), weights(plan, Arena::weights);
    fill_random(plan, inputs, 24, 5);
    fill_random(plan, weights, 24, 5);
    const ValueId out = g->outputs()[0];
    const std::size_t n = static_cast<std::size_t>(g->value(out).bytes(24) / 4);
    CpuExecutor reference(reference_plan, 2);
    reference.run(inputs, weights, 24);
    const std::vector<float> want(static_cast<const float*>(reference.data(out)), static_cast<const float*>(reference.data(out)) + n);
    *writes = 0;
    CpuExecutor exec(plan, 2);
    exec.run(inputs, weights, 24);
    const auto* got = static_cast<const float*>(exec.data(out));
    for (std::size_t i = 0; i < n; ++i) ASSERT_EQ(got[i], want[i]) << i;
    float* w13 = weights.as<float>(*g->find_value("experts.w13"));
    std::fill(w13, w13 + plan.packed[0].bytes / 4, std::numeric_limits<float>::quiet_NaN());
    exec.run(inputs, weights, 17);
    exec.run(inputs, weights, 24);
    for (std::size_t i = 0; i < n; ++i) ASSERT_EQ(got[i], want[i]) << "after w13 was overwritten, " << i;
    EXPECT_EQ(*writes, 1);
  }
}
