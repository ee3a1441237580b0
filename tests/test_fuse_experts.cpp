// The fuse pass (ops/fuse_experts.hpp) and the planner's use of it: which chains it fuses and which
// it leaves alone, names and chunk tags, and results equal to the unfused graph on the CPU through a
// test kernel for the fused node (the CPU registers none: there the chain costs no launches).
#include <gtest/gtest.h>

#include <array>
#include <cstring>

#include "bench/cpu_session.hpp"
#include "graph/chunk.hpp"
#include "graph/error.hpp"
#include "kernels/cpu/elementwise.hpp"
#include "kernels/cpu/permute.hpp"
#include "kernels/cpu/swiglu_mlp.hpp"
#include "ops/fuse_experts.hpp"
#include "ops/fused_experts_op.hpp"
#include "ops/kernel_registry.hpp"
#include "ops/moe_layer.hpp"
#include "tests/layer_helpers.hpp"
#include "tests/expect_error.hpp"

using namespace moeflow;

namespace {

using testing_layers::count_kind;
using testing_layers::small_qwen;

const FusionFilter accept_all = [](const Graph&, const Node&) { return true; };

// The builtin kernels plus a CPU kernel for the fused node that runs the chain's own CPU kernels
// one after the other in its workspace (and, with a shared expert folded in, the shared expert's
// and the reduce's): the fused graph must then give the unfused graph's bytes.
KernelRegistry registry_with_cpu_fused_kernel() {
  KernelRegistry r = KernelRegistry::builtin();
  auto layout = [](const Graph& g, const Node& n, int64_t tokens) {
    const auto& op = static_cast<const FusedExpertsOp&>(*n.op);
    const int64_t H = g.value(n.inputs[0]).shape()[1].fixed, rows = tokens * op.top_k();
    const int64_t S = op.shared() ? op.shared()->intermediate : 0;
    // rows, y [kT, H]; act [kT, I]; offsets [E + 1]; slot_of [kT]; shared y [T, H], act [T, S]
    return std::array<int64_t, 7>{rows * H, rows * H, rows * op.intermediate(), op.experts() + 1, rows,
                                  S ? tokens * H : 0, tokens * S};
  };
  r.add({"fused_experts", Backend::cpu, "test.fused_chain", 0,
         [](const Graph&, const Node&) { return Support::yes("the chain's CPU kernels in one node"); },
         [layout](const KernelCall& c) {
           const auto& op = static_cast<const FusedExpertsOp&>(*c.node.op);
           const int H = static_cast<int>(c.input_value(0).shape()[1].fixed);
           const auto sizes = layout(c.graph, c.node, c.max_tokens());
           auto* rows = static_cast<float*>(c.workspace);
           float* y = rows + sizes[0];
           float* act = y + sizes[1];
           auto* offsets = reinterpret_cast<int32_t*>(act + sizes[2]);
           int32_t* slot_of = offsets + sizes[3];
           cpu::build_permutation(c.in<int32_t>(1), c.tokens, op.top_k(), op.experts(), offsets, slot_of);
           cpu::gather_rows(c.in<float>(0), slot_of, c.tokens, op.top_k(), H, rows);
           cpu::grouped_swiglu_mlp(rows, offsets, op.experts(), H, op.intermediate(), c.in<float>(3), c.in<float>(4), y, act);
           cpu::combine_rows(y, slot_of, c.in<float>(2), c.tokens, op.top_k(), H, c.out<float>(0));
           if (const auto& shared = op.shared()) {
             float* shared_y = reinterpret_cast<float*>(slot_of + sizes[4]);
             cpu::swiglu_mlp(c.in<float>(0), c.tokens, H, shared->intermediate, c.in<float>(5), c.in<float>(6),
                             shared->gated ? c.in<float>(7) : nullptr, shared_y, shared_y + sizes[5]);
             const float* addends[] = {c.out<float>(0), shared_y};
             cpu::sum_arrays(addends, 2, c.tokens * H, c.out<float>(0));
           }
         },
         [layout](const Graph& g, const Node& n, int64_t tokens) {
           int64_t words = 0;
           for (int64_t s : layout(g, n, tokens)) words += s;
           return 4 * words;
         }});
  return r;
}

std::vector<float> run_once(std::shared_ptr<const Graph> g, const PlanOptions& po, int64_t T, std::string* kinds = nullptr) {
  SessionOptions so;
  so.plan = po;
  so.seed = 11;
  CpuSession s(std::move(g), so);
  s.set_tokens(T);
  s.run();
  if (kinds)
    for (const PlanStep& step : s.plan().steps) *kinds += s.graph().node(step.node).op->kind() + " ";
  const int64_t n = s.graph().value(s.graph().outputs()[0]).shape().elements(T);
  return {s.output(), s.output() + n};
}

}  // namespace

TEST(FuseExperts, TheChainBecomesOneNodeReadingTheChainsInputsAndKeepingTheOutputsName) {
  const Graph g = build_experts_graph(small_qwen(), {.max_tokens = 8});
  const auto fused = fuse_experts_chains(g, accept_all);
  ASSERT_TRUE(fused);
  EXPECT_EQ(count_kind(*fused, "dispatch") + count_kind(*fused, "experts") + count_kind(*fused, "combine"), 0);
  ASSERT_EQ(count_kind(*fused, "fused_experts"), 1);
  const Node& n = fused->node(*fused->find_node("fused_experts"));
  // x, ids, weights, w13, w2: the same values the chain read.
  const Node& d = g.node(*g.find_node("dispatch"));
  const Node& x = g.node(*g.find_node("experts"));
  const Node& c = g.node(*g.find_node("combine"));
  const std::vector<std::string> want = {g.value(d.inputs[0]).name, g.value(d.inputs[1]).name, g.value(c.inputs[2]).name,
                                         g.value(x.inputs[2]).name, g.value(x.inputs[3]).name};
  ASSERT_EQ(n.inputs.size(), want.size());
  for (std::size_t i = 0; i < want.size(); ++i) EXPECT_EQ(fused->value(n.inputs[i]).name, want[i]) << i;
  EXPECT_EQ(fused->value(fused->outputs()[0]).name, g.value(g.outputs()[0]).name);
  EXPECT_EQ(fused->value(n.outputs[0]).shape(), g.value(c.outputs[0]).shape());
  // Nothing left to fuse the second time.
  EXPECT_FALSE(fuse_experts_chains(*fused, accept_all));
}

TEST(FuseExperts, EachChunkIsFusedWithItsTagAndTheWholeLayerKeepsItsOtherNodes) {
  const Graph layer = build_moe_layer(small_qwen(), {.max_tokens = 10});
  const Graph g = chunk_tokens(layer, {.chunks = 2});
  const auto fused = fuse_experts_chains(g, accept_all, {}, /*fold_shared=*/false);
  ASSERT_TRUE(fused);
  EXPECT_EQ(count_kind(*fused, "fused_experts"), 2);
  EXPECT_EQ(count_kind(*fused, "gate"), 2);
  EXPECT_EQ(count_kind(*fused, "shared_expert"), 2);
  EXPECT_EQ(fused->chunks(), 2);
  for (int k = 0; k < 2; ++k) {
    const auto id = fused->find_node("fused_experts\u00b7c" + std::to_string(k));
    ASSERT_TRUE(id) << k;
    EXPECT_EQ(fused->node(*id).chunk, k);
  }
  EXPECT_EQ(fused->nodes().size(), g.nodes().size() - 2 * 2);  // two of three nodes gone per chunk
}

TEST(FuseExperts, TheSharedExpertAndTheReduceFoldIntoTheFusedNodeWhichKeepsTheLayersOutput) {
  const Graph g = build_moe_layer(small_qwen(), {.max_tokens = 8});  // gated shared expert, S = 64
  const auto fused = fuse_experts_chains(g, accept_all);
  ASSERT_TRUE(fused);
  EXPECT_EQ(count_kind(*fused, "shared_expert") + count_kind(*fused, "reduce") + count_kind(*fused, "combine"), 0);
  ASSERT_EQ(count_kind(*fused, "fused_experts"), 1);
  const Node& n = fused->node(*fused->find_node("fused_experts"));
  const auto& op = static_cast<const FusedExpertsOp&>(*n.op);
  ASSERT_TRUE(op.shared());
  EXPECT_EQ(op.shared()->intermediate, 64);
  EXPECT_TRUE(op.shared()->gated);
  // The chain's five inputs, then the shared expert's w13, w2 and gate weight.
  const Node& s = g.node(*g.find_node("shared_expert"));
  ASSERT_EQ(n.inputs.size(), 8u);
  for (std::size_t i = 1; i < 4; ++i) EXPECT_EQ(fused->value(n.inputs[4 + i]).name, g.value(s.inputs[i]).name) << i;
  EXPECT_NE(op.summary().find("+shared I=64 sigmoid-gated"), std::string::npos) << op.summary();
  // The layer's output is the fused node's, under the reduce's name.
  ASSERT_EQ(fused->outputs().size(), 1u);
  EXPECT_EQ(fused->value(fused->outputs()[0]).producer, n.id);
  EXPECT_EQ(fused->value(fused->outputs()[0]).name, g.value(g.outputs()[0]).name);
  EXPECT_EQ(fused->nodes().size(), g.nodes().size() - 4);  // gate and the fused node
  // Without folding (or without a shared expert) the reduce and the shared expert stay.
  const auto apart = fuse_experts_chains(g, accept_all, {}, /*fold_shared=*/false);
  ASSERT_TRUE(apart);
  EXPECT_EQ(count_kind(*apart, "shared_expert"), 1);
  EXPECT_EQ(count_kind(*apart, "reduce"), 1);
  EXPECT_FALSE(static_cast<const FusedExpertsOp&>(*apart->node(*apart->find_node("fused_experts")).op).shared());
  // An ungated shared expert (DeepSeek's) folds with seven inputs.
  const MoEConfig deepseek = load_config("deepseek-v3", {"hidden_size=64", "moe_intermediate_size=16"});
  const auto ds = fuse_experts_chains(build_moe_layer(deepseek, {.max_tokens = 4}), accept_all);
  ASSERT_TRUE(ds);
  const Node& dn = ds->node(*ds->find_node("fused_experts"));
  ASSERT_TRUE(static_cast<const FusedExpertsOp&>(*dn.op).shared());
  EXPECT_FALSE(static_cast<const FusedExpertsOp&>(*dn.op).shared()->gated);
  EXPECT_EQ(dn.inputs.size(), 7u);
}

TEST(FuseExperts, AFoldDeclinedIsOfferedAgainWithoutTheSharedExpertAndAReadSharedOutputKeepsItApart) {
  const Graph layer = chunk_tokens(build_moe_layer(small_qwen(), {.max_tokens = 10}), {.chunks = 2});
  // Chunk 0 takes the fold, chunk 1 only the plain chain.
  const auto mixed = fuse_experts_chains(layer, [](const Graph&, const Node& n) {
    return n.chunk == 0 || !static_cast<const FusedExpertsOp&>(*n.op).shared();
  });
  ASSERT_TRUE(mixed);
  EXPECT_EQ(count_kind(*mixed, "fused_experts"), 2);
  EXPECT_EQ(count_kind(*mixed, "shared_expert"), 1);
  EXPECT_TRUE(mixed->find_node("shared_expert\u00b7c1"));
  EXPECT_TRUE(static_cast<const FusedExpertsOp&>(*mixed->node(*mixed->find_node("fused_experts\u00b7c0")).op).shared());
  EXPECT_FALSE(static_cast<const FusedExpertsOp&>(*mixed->node(*mixed->find_node("fused_experts\u00b7c1")).op).shared());
  // The shared expert's output read after the run (kept): it stays its own node.
  const Graph g = build_moe_layer(small_qwen(), {.max_tokens = 8});
  const std::string shared_y = g.value(g.node(*g.find_node("shared_expert")).outputs[0]).name;
  const auto kept = fuse_experts_chains(g, accept_all, {shared_y});
  ASSERT_TRUE(kept);
  EXPECT_EQ(count_kind(*kept, "shared_expert"), 1);
  EXPECT_EQ(count_kind(*kept, "fused_experts"), 1);
}

TEST(FuseExperts, APlanSaysWhyTheSharedExpertStayedApart) {
  const auto g = std::make_shared<const Graph>(build_moe_layer(small_qwen(), {.max_tokens = 8}));
  KernelRegistry registry = registry_with_cpu_fused_kernel();
  registry.add({"fused_experts", Backend::cpu, "test.routed_only", 1,
                [](const Graph&, const Node& n) {
                  return static_cast<const FusedExpertsOp&>(*n.op).shared() ? Support::no("routed experts only")
                                                                             : Support::yes("routed");
                },
                [](const KernelCall&) {}, {}});
  PlanOptions po;
  po.registry = &registry;
  // test.fused_chain (behind it) still takes the fold.
  EXPECT_EQ(count_kind(*make_plan(g, po).graph, "shared_expert"), 0);
  // Forced, the routed-only kernel leaves the shared expert apart and the plan says so.
  po.forced_kernels["fused_experts"] = "test.routed_only";
  const Plan plan = make_plan(g, po);
  EXPECT_EQ(count_kind(*plan.graph, "shared_expert"), 1);
  std::string reason;
  for (const PlanStep& step : plan.steps)
    if (plan.graph->node(step.node).op->kind() == "fused_experts") reason = step.reason;
  EXPECT_NE(reason.find("[shared expert not folded in: the forced test.routed_only does not run it]"), std::string::npos)
      << reason;
  // --no-fold-shared: apart, whatever the kernels.
  po.forced_kernels.clear();
  po.fold_shared = false;
  EXPECT_EQ(count_kind(*make_plan(g, po).graph, "shared_expert"), 1);
}

TEST(FuseExperts, LeavesAChainAloneWhereTheFilterOrAKeptIntermediateSaysSo) {
  const Graph g = build_experts_graph(small_qwen(), {.max_tokens = 8});
  EXPECT_FALSE(fuse_experts_chains(g, [](const Graph&, const Node&) { return false; }));
  const Node& x = g.node(*g.find_node("experts"));
  EXPECT_FALSE(fuse_experts_chains(g, accept_all, {g.value(x.outputs[0]).name}));  // y is read after the run
  const Graph layer = chunk_tokens(build_moe_layer(small_qwen(), {.max_tokens = 10}), {.chunks = 2});
  // Only chunk 1 accepted: chunk 0 keeps its three nodes.
  const auto fused = fuse_experts_chains(layer, [](const Graph&, const Node& n) { return n.chunk == 1; });
  ASSERT_TRUE(fused);
  EXPECT_EQ(count_kind(*fused, "fused_experts"), 1);
  EXPECT_TRUE(fused->find_node("experts\u00b7c0"));
  EXPECT_TRUE(fused->find_node("fused_experts\u00b7c1"));
}

TEST(FuseExperts, PlannerFusesWhereABackendKernelRunsTheNodeAndResultsAreTheChainsBytes) {
  const KernelRegistry registry = registry_with_cpu_fused_kernel();
  for (const bool chunked : {false, true}) {
    Graph built = build_moe_layer(small_qwen(), {.max_tokens = 13});
    if (chunked) built = chunk_tokens(built, {.chunks = 3});
    const auto g = std::make_shared<const Graph>(std::move(built));
    PlanOptions po;
    po.registry = &registry;
    po.policy = Policy::concurrent;
    std::string fused_kinds, chain_kinds;
    const std::vector<float> fused = run_once(g, po, 13, &fused_kinds);
    po.fuse = false;
    const std::vector<float> chain = run_once(g, po, 13, &chain_kinds);
    EXPECT_NE(fused_kinds.find("fused_experts"), std::string::npos) << fused_kinds;
    EXPECT_EQ(fused_kinds.find("shared_expert"), std::string::npos) << fused_kinds;  // folded in
    EXPECT_EQ(chain_kinds.find("fused_experts"), std::string::npos) << chain_kinds;
    ASSERT_EQ(fused.size(), chain.size());
    EXPECT_EQ(0, std::memcmp(fused.data(), chain.data(), fused.size() * 4)) << "chunked " << chunked;
    // Fewer tokens than the maximum, empty chunks included.
    po.fuse = true;
    const std::vector<float> few = run_once(g, po, 2);
    po.fuse = false;
    const std::vector<float> few_chain = run_once(g, po, 2);
    EXPECT_EQ(0, std::memcmp(few.data(), few_chain.data(), few.size() * 4)) << "chunked " << chunked;
  }
}

TEST(FuseExperts, ForcingAKernelOnTheChainKeepsItAndTheBuiltinCpuHasNoFusedKernel) {
  const auto g = std::make_shared<const Graph>(build_experts_graph(small_qwen(), {.max_tokens = 8}));
  const KernelRegistry registry = registry_with_cpu_fused_kernel();
  PlanOptions po;
  po.registry = &registry;
  EXPECT_EQ(count_kind(*make_plan(g, po).graph, "fused_experts"), 1);
  po.forced_kernels["experts"] = "cpu.grouped_swiglu";
  EXPECT_EQ(count_kind(*make_plan(g, po).graph, "fused_experts"), 0);
  po.forced_kernels.clear();
  po.forced_kernels["fused_experts"] = "test.fused_chain";
  const Plan forced = make_plan(g, po);
  ASSERT_EQ(count_kind(*forced.graph, "fused_experts"), 1);
  for (const PlanStep& step : forced.steps) {
    if (forced.graph->node(step.node).op->kind() == "fused_experts") {
      EXPECT_NE(step.reason.find("forced"), std::string::npos) << step.reason;
    }
  }
  po.forced_kernels["fused_experts"] = "no.such_kernel";
  EXPECT_NE(testing_errors::bad_input_message([&] { make_plan(g, po); }).find("no.such_kernel"), std::string::npos);
  // The CPU backend as shipped: nothing to run a fused node with, so the chain stays as it is.
  EXPECT_EQ(count_kind(*make_plan(g, PlanOptions{}).graph, "fused_experts"), 0);
}

TEST(FuseExperts, APlanSaysWhyAChainStayedApart) {
  const auto g = std::make_shared<const Graph>(build_experts_graph(small_qwen(), {.max_tokens = 8}));
  KernelRegistry registry = KernelRegistry::builtin();
  registry.add({"fused_experts", Backend::cpu, "test.never", 0,
                [](const Graph&, const Node&) { return Support::no("refuses every node"); },
                [](const KernelCall&) {}, {}});
  PlanOptions po;
  po.registry = &registry;
  const Plan plan = make_plan(g, po);
  EXPECT_EQ(count_kind(*plan.graph, "fused_experts"), 0);
  bool said = false;
  for (const PlanStep& step : plan.steps)
    if (plan.graph->node(step.node).op->kind() == "experts")
      said = step.reason.find("not fused with its dispatch and combine: test.never: refuses every node") != std::string::npos;
  EXPECT_TRUE(said);
  // The shipped CPU backend has no fused kernel at all: nothing to say.
  for (const PlanStep& step : make_plan(g, PlanOptions{}).steps)
    EXPECT_EQ(step.reason.find("not fused"), std::string::npos) << step.reason;
}

TEST(FuseExperts, WhereOneChunkIsFusedTheOtherStillSaysWhyNot) {
  const auto g = std::make_shared<const Graph>(
      chunk_tokens(build_moe_layer(small_qwen(), {.max_tokens = 10}), {.chunks = 2}));
  KernelRegistry registry = KernelRegistry::builtin();
  registry.add({"fused_experts", Backend::cpu, "test.chunk1_only", 0,
                [](const Graph&, const Node& n) {
                  return n.chunk == 1 ? Support::yes("chunk 1") : Support::no("takes chunk 1 only");
                },
                [](const KernelCall&) {}, {}});
  PlanOptions po;
  po.registry = &registry;
  const Plan plan = make_plan(g, po);
  EXPECT_EQ(count_kind(*plan.graph, "fused_experts"), 1);
  std::string reason;
  for (const PlanStep& step : plan.steps)
    if (plan.graph->node(step.node).name == "experts\u00b7c0") reason = step.reason;
  EXPECT_NE(reason.find("not fused with its dispatch and combine: test.chunk1_only: takes chunk 1 only"), std::string::npos)
      << reason;
}

TEST(FuseExperts, ATuningCacheDecidesBetweenTheFusedKernelAndTheChain) {
  const auto g = std::make_shared<const Graph>(build_experts_graph(small_qwen(), {.max_tokens = 8}));
  const KernelRegistry registry = registry_with_cpu_fused_kernel();
  const std::string signature = tuning_signature(*g, g->node(*g->find_node("experts")));
  PlanOptions po;
  po.registry = &registry;
  // The chain's own kernel measured fastest: the chain stays, and the plan says why.
  auto chain_faster = std::make_shared<TuningCache>();
  chain_faster->record({"Some GPU", signature, 8, "cpu.grouped_swiglu", 12.5});
  po.tuning = chain_faster;
  const Plan kept = make_plan(g, po);
  EXPECT_EQ(count_kind(*kept.graph, "fused_experts"), 0);
  std::string reason;
  for (const PlanStep& step : kept.steps)
    if (kept.graph->node(step.node).op->kind() == "experts") reason = step.reason;
  EXPECT_NE(reason.find("not fused with its dispatch and combine: tuned: cpu.grouped_swiglu on the chain measured "
                        "fastest at T=8 (12.5 us"),
            std::string::npos)
      << reason;
  // The fused kernel measured fastest: fused as without a cache.
  auto fused_faster = std::make_shared<TuningCache>();
  fused_faster->record({"Some GPU", signature, 8, "test.fused_chain", 9.0});
  po.tuning = fused_faster;
  EXPECT_EQ(count_kind(*make_plan(g, po).graph, "fused_experts"), 1);
  // An entry for another device does not apply.
  po.tuning = chain_faster;
  po.tuning_device = "Another GPU";
  EXPECT_EQ(count_kind(*make_plan(g, po).graph, "fused_experts"), 1);
  // Nor does one naming a kernel that cannot run the experts node here (it would not be chosen for
  // the chain either): fused as without a cache.
  auto cannot_run = std::make_shared<TuningCache>();
  cannot_run->record({"Some GPU", signature, 8, "no.such_kernel", 1.0});
  po.tuning = cannot_run;
  po.tuning_device = "";
  EXPECT_EQ(count_kind(*make_plan(g, po).graph, "fused_experts"), 1);
}

// A fused kernel the planner passes over (KernelEntry::passed_over_on: measured slower there, say)
// leaves the chain unfused and says why; --kernel runs it, and so does a tuning cache that measured it
// fastest, even where another fused kernel would be the planner's own choice: the cache's fused
// kernel is the one the fused node runs, not only a reason to fuse. The results stay the chain's.
TEST(FuseExperts, AKernelPassedOverRunsWhereForcedOrTuned) {
  const auto g = std::make_shared<const Graph>(build_experts_graph(small_qwen(), {.max_tokens = 8}));
  const std::string signature = tuning_signature(*g, g->node(*g->find_node("experts")));
  KernelEntry passed_over = *registry_with_cpu_fused_kernel().find("test.fused_chain", Backend::cpu);
  passed_over.name = "test.fused_passed_over";
  passed_over.passed_over_on = [](const Graph&, const Node&) { return std::string("measured slower here"); };
  KernelRegistry alone = KernelRegistry::builtin();
  alone.add(passed_over);
  PlanOptions po;
  po.registry = &alone;
  auto step_of = [](const Plan& p, const std::string& kind) {
    for (const PlanStep& step : p.steps)
      if (p.graph->node(step.node).op->kind() == kind) return step;
    ADD_FAILURE() << "no " << kind << " step";
    return PlanStep{};
  };

  const Plan chain = make_plan(g, po);
  EXPECT_EQ(count_kind(*chain.graph, "fused_experts"), 0);
  EXPECT_NE(step_of(chain, "experts").reason.find("not fused with its dispatch and combine: test.fused_passed_over: "
                                                  "measured slower here (it runs here where forced or tuned)"),
            std::string::npos)
      << step_of(chain, "experts").reason;
  const std::vector<float> unfused = run_once(g, po, 7);

  PlanOptions forced = po;
  forced.forced_kernels = {{"fused_experts", "test.fused_passed_over"}};
  const Plan forced_plan = make_plan(g, forced);
  EXPECT_EQ(step_of(forced_plan, "fused_experts").kernel->name, "test.fused_passed_over");
  EXPECT_EQ(run_once(g, forced, 7), unfused);

  // With the planner's own fused kernel registered too, a cache naming the passed-over one chooses it.
  KernelRegistry both = registry_with_cpu_fused_kernel();
  both.add(passed_over);
  PlanOptions tuned = po;
  tuned.registry = &both;
  EXPECT_EQ(step_of(make_plan(g, tuned), "fused_experts").kernel->name, "test.fused_chain");
  auto cache = std::make_shared<TuningCache>();
  cache->record({"Some GPU", signature, 8, "test.fused_passed_over", 9.0});
  tuned.tuning = cache;
  const Plan tuned_plan = make_plan(g, tuned);
  const PlanStep fused = step_of(tuned_plan, "fused_experts");
  EXPECT_EQ(fused.kernel->name, "test.fused_passed_over");
  EXPECT_EQ(fused.reason.rfind("tuned: fastest measured at T=8 on Some GPU (9.0 us", 0), 0u) << fused.reason;
  EXPECT_EQ(run_once(g, tuned, 7), unfused);
  // Where it is the only fused kernel, the cache still fuses the chain for it.
  tuned.registry = &alone;
  EXPECT_EQ(step_of(make_plan(g, tuned), "fused_experts").kernel->name, "test.fused_passed_over");
}
