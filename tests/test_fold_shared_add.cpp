// The shared add folded into the combine (ops/fold_shared_add.hpp): where it folds and where it
// leaves the reduce alone, the rewritten graph's shape and names, and on the CPU the same bytes as
// the layer with the reduce apart (the fp32 sums run in the reduce's order).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>

#include "bench/cpu_session.hpp"
#include "graph/chunk.hpp"
#include "graph/error.hpp"
#include "ops/combine_op.hpp"
#include "ops/fold_shared_add.hpp"
#include "ops/fuse_experts.hpp"
#include "ops/fused_experts_op.hpp"
#include "ops/lower_parallel.hpp"
#include "ops/moe_layer.hpp"
#include "tests/layer_helpers.hpp"

using namespace moeflow;

namespace {

using testing_layers::count_kind;
using testing_layers::small_qwen;

}  // namespace

TEST(FoldSharedAdd, TheCombineAddsTheSharedExpertAndTakesTheReducesPlaceAndOutput) {
  const Graph g = build_moe_layer(small_qwen(), {.max_tokens = 16});
  const Node& reduce = g.node(*g.find_node("reduce"));
  const std::string out_name = g.value(reduce.outputs[0]).name;
  const auto folded = fold_shared_add_into_combine(g);
  ASSERT_TRUE(folded);
  EXPECT_EQ(count_kind(*folded, "reduce"), 0);
  EXPECT_EQ(folded->nodes().size(), g.nodes().size() - 1);
  const Node& combine = folded->node(*folded->find_node("combine"));
  const auto& op = static_cast<const CombineOp&>(*combine.op);
  EXPECT_EQ(op.addends(), 1);
  EXPECT_THAT(op.summary(), testing::HasSubstr("+ 1 addend"));
  ASSERT_EQ(combine.inputs.size(), 4u);
  EXPECT_EQ(folded->value(combine.inputs[3]).producer, *folded->find_node("shared_expert"));
  EXPECT_EQ(folded->value(combine.outputs[0]).name, out_name);
  EXPECT_EQ(folded->outputs(), std::vector<ValueId>{combine.outputs[0]});
  // Each chunk's reduce folds into its own combine.
  const auto chunked = fold_shared_add_into_combine(chunk_tokens(g, {.chunks = 2}));
  ASSERT_TRUE(chunked);
  EXPECT_EQ(count_kind(*chunked, "reduce"), 0);
  for (const char* name : {"combine\u00b7c0", "combine\u00b7c1"}) {
    const auto c = chunked->find_node(name);
    ASSERT_TRUE(c) << name;
    EXPECT_EQ(static_cast<const CombineOp&>(*chunked->node(*c).op).addends(), 1) << name;
  }
}

TEST(FoldSharedAdd, LeavesTheReduceWhereTheRoutedSumIsReadOrOwedAcrossRanks) {
  const Graph g = build_moe_layer(small_qwen(), {.max_tokens = 16});
  const Node& reduce = g.node(*g.find_node("reduce"));
  // The combine's output read after the run (kept): the reduce stays.
  EXPECT_FALSE(fold_shared_add_into_combine(g, {g.value(reduce.inputs[0]).name}));
  // A layer without a shared expert has no such reduce.
  EXPECT_FALSE(fold_shared_add_into_combine(build_moe_layer(load_config("mixtral-8x7b", {"hidden_size=64", "intermediate_size=32"}),
                                                            {.max_tokens = 16})));
  // Tensor parallelism: each rank's routed sum is Partial, and the reduce is where the all-reduce is
  // paid, once: it stays.
  const ParallelLayout tp{.dp = 1, .tp = 2, .ep = false, .dispatch = DispatchKind::allgather, .tokens = {16}};
  const Graph rank = lower_parallel(g, tp, 0);
  ASSERT_GE(count_kind(rank, "reduce"), 1);
  EXPECT_FALSE(fold_shared_add_into_combine(rank));
}

TEST(FoldSharedAdd, TheCpuLayerComputesTheBytesOfTheReduceApart) {
  auto g = std::make_shared<const Graph>(build_moe_layer(small_qwen(), {.max_tokens = 24}));
  auto output_of = [&](bool fold) {
    SessionOptions so;
    so.threads = 2;
    so.seed = 9;
    so.plan.policy = Policy::concurrent;
    so.plan.fold_shared = fold;
    CpuSession s(g, so);
    EXPECT_EQ(count_kind(*s.plan().graph, "reduce"), fold ? 0 : 1);
    s.set_tokens(21);
    s.run();
    EXPECT_TRUE(s.check(1e-5).pass);
    const float* out = s.output();
    return std::vector<float>(out, out + 21 * small_qwen().hidden);
  };
  const std::vector<float> folded = output_of(true), apart = output_of(false);
  ASSERT_EQ(folded.size(), apart.size());
  EXPECT_EQ(0, std::memcmp(folded.data(), apart.data(), folded.size() * sizeof(float)));
}

// Where the fuse pass made the chain one fused_experts node (its shared expert left apart), the
// reduce folds into that node as its addends, only where the filter says a kernel runs it so.
TEST(FoldSharedAdd, AFusedNodeTakesTheAddendsWhereAKernelRunsThem) {
  const Graph g = build_moe_layer(small_qwen(), {.max_tokens = 16});
  const auto fused = fuse_experts_chains(g, [](const Graph&, const Node&) { return true; }, {}, /*fold_shared=*/false);
  ASSERT_TRUE(fused);
  ASSERT_EQ(count_kind(*fused, "fused_experts"), 1);
  ASSERT_EQ(count_kind(*fused, "reduce"), 1);
  const std::string out_name = fused->value(fused->node(*fused->find_node("reduce")).outputs[0]).name;
  // No filter, or one that declines: the reduce stays.
  EXPECT_FALSE(fold_shared_add_into_combine(*fused));
  int asked = 0;
  EXPECT_FALSE(fold_shared_add_into_combine(*fused, {}, [&](const Graph&, const Node&) { return ++asked, false; }));
  EXPECT_EQ(asked, 1);
  const auto folded = fold_shared_add_into_combine(*fused, {}, [](const Graph& trial, const Node& n) {
    return trial.validated() && static_cast<const FusedExpertsOp&>(*n.op).addends() == 1;
  });
  ASSERT_TRUE(folded);
  EXPECT_EQ(count_kind(*folded, "reduce"), 0);
  const Node& node = folded->node(*folded->find_node("fused_experts"));  // the fuse pass's name for it
  const auto& op = static_cast<const FusedExpertsOp&>(*node.op);
  EXPECT_EQ(op.addends(), 1);
  EXPECT_THAT(op.summary(), testing::HasSubstr("+ 1 addend"));
  ASSERT_EQ(node.inputs.size(), 6u);
  EXPECT_EQ(folded->value(node.inputs[5]).producer, *folded->find_node("shared_expert"));
  EXPECT_EQ(folded->value(node.outputs[0]).name, out_name);
  EXPECT_EQ(folded->outputs(), std::vector<ValueId>{node.outputs[0]});
  // A node already folding its shared expert, or given both, is refused.
  EXPECT_THROW(FusedExpertsOp(60, 4, 32, FoldedShared{64, true}, 1), Error);
  EXPECT_THROW(FusedExpertsOp(60, 4, 32, std::nullopt, FusedExpertsOp::kMaxAddends + 1), Error);
}

// A layer without a shared expert ends in a reduce that adds nothing: it folds into the combine (or
// the fused node) the same way, the layer's output then written by that node, with the same bytes
// on the CPU; a reduce owed across ranks, or one with addends, is not such a reduce.
TEST(FoldSharedAdd, AReduceWithNothingToAddFoldsAway) {
  const MoEConfig mixtral = load_config("mixtral-8x7b", {"hidden_size=64", "intermediate_size=32"});
  const Graph g = build_moe_layer(mixtral, {.max_tokens = 16});
  const Node& reduce = g.node(*g.find_node("reduce"));
  ASSERT_EQ(reduce.inputs.size(), 1u);
  const std::string out_name = g.value(reduce.outputs[0]).name;
  const auto folded = fold_lone_reduces(g);
  ASSERT_TRUE(folded);
  EXPECT_EQ(count_kind(*folded, "reduce"), 0);
  EXPECT_EQ(folded->nodes().size(), g.nodes().size() - 1);
  const Node& combine = folded->node(*folded->find_node("combine"));
  EXPECT_EQ(static_cast<const CombineOp&>(*combine.op).addends(), 0);
  EXPECT_EQ(folded->value(combine.outputs[0]).name, out_name);
  EXPECT_EQ(folded->outputs(), std::vector<ValueId>{combine.outputs[0]});
  // Into a fused node too, and per chunk.
  const auto fused = fuse_experts_chains(g, [](const Graph&, const Node&) { return true; });
  ASSERT_TRUE(fused);
  const auto fused_folded = fold_lone_reduces(*fused);
  ASSERT_TRUE(fused_folded);
  EXPECT_EQ(count_kind(*fused_folded, "reduce"), 0);
  EXPECT_EQ(fused_folded->value(fused_folded->outputs()[0]).producer, *fused_folded->find_node("fused_experts"));
  const auto chunked = fold_lone_reduces(chunk_tokens(g, {.chunks = 2}));
  ASSERT_TRUE(chunked);
  EXPECT_EQ(count_kind(*chunked, "reduce"), 0);
  // Not: a reduce with the shared experts' outputs to add, a kept routed sum, a sum owed across ranks.
  EXPECT_FALSE(fold_lone_reduces(build_moe_layer(small_qwen(), {.max_tokens = 16})));
  EXPECT_FALSE(fold_lone_reduces(g, {g.value(reduce.inputs[0]).name}));
  const ParallelLayout tp{.dp = 1, .tp = 2, .ep = false, .dispatch = DispatchKind::allgather, .tokens = {16}};
  const Graph rank = lower_parallel(g, tp, 0);
  ASSERT_GE(count_kind(rank, "reduce"), 1);
  EXPECT_FALSE(fold_lone_reduces(rank));
  // The planner folds it; on the CPU the layer's bytes are those of the plan that keeps the reduce
  // (here because the routed sum is kept for reading).
  auto layer = std::make_shared<const Graph>(g);
  auto run = [&](const std::vector<std::string>& keep, int reduces) {
    SessionOptions so;
    so.threads = 2;
    so.seed = 9;
    so.plan.keep_values = keep;
    CpuSession s(layer, so);
    EXPECT_EQ(count_kind(*s.plan().graph, "reduce"), reduces);
    s.set_tokens(13);
    s.run();
    EXPECT_TRUE(s.check(1e-5).pass);
    return std::vector<float>(s.output(), s.output() + 13 * mixtral.hidden);
  };
  const std::vector<float> planned = run({}, 0), kept = run({g.value(reduce.inputs[0]).name}, 1);
  ASSERT_EQ(planned.size(), kept.size());
  EXPECT_EQ(0, std::memcmp(planned.data(), kept.data(), planned.size() * sizeof(float)));
}
