// The parallel lowering as a pass, in one process (no MPI): what one rank's graph holds, and the
// weight slices it declares drawing exactly the full tensors' elements.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <string>
#include <vector>

#include "graph/chunk.hpp"
#include "ops/comm_ops.hpp"
#include "ops/lower_parallel.hpp"
#include "ops/moe_layer.hpp"
#include "scheduler/host_memory.hpp"
#include "tests/expect_error.hpp"

using namespace moeflow;
using testing::HasSubstr;
using moeflow::testing_errors::bad_input_message;

namespace {

MoEConfig small() {
  return load_config("qwen1.5-moe-a2.7b", {"hidden_size=16", "moe_intermediate_size=8", "num_experts=8",
                                           "num_experts_per_tok=2", "shared_expert_intermediate_size=12"});
}

std::vector<float> draw(const Value& v, int64_t tokens) {
  std::vector<float> out(static_cast<std::size_t>(v.shape().elements(v.tokens_in(tokens))));
  fill_random_value(v, out.data(), tokens, 5);
  return out;
}

}  // namespace

TEST(LowerParallel, ExpertWeightSlicesAreTheFullTensorsElements) {
  const MoEConfig c = small();
  const Graph full = build_moe_layer(c, {.max_tokens = 8});
  const int64_t E = c.experts, I = c.intermediate, H = c.hidden;
  const std::vector<float> w13 = draw(full.value(*full.find_value("experts.w13")), 8);
  const std::vector<float> w2 = draw(full.value(*full.find_value("experts.w2")), 8);
  for (bool ep : {false, true}) {
    ParallelLayout l{.dp = 2, .tp = 2, .ep = ep, .dispatch = DispatchKind::alltoall, .tokens = {8, 5}};
    for (int rank = 0; rank < 4; ++rank) {
      const Graph g = lower_parallel(full, l, rank);
      const std::vector<float> a = draw(g.value(*g.find_value("experts.w13")), 8);
      const std::vector<float> b = draw(g.value(*g.find_value("experts.w2")), 8);
      const int64_t El = ep ? E / 4 : E, Il = ep ? I : I / 4, e0 = ep ? rank * El : 0, i0 = ep ? 0 : rank * Il;
      ASSERT_EQ(static_cast<int64_t>(a.size()), El * 2 * Il * H);
      for (int64_t e = 0; e < El; ++e)
        for (int64_t r = 0; r < 2 * Il; ++r)
          for (int64_t h = 0; h < H; ++h) {
            // Rows [0, Il) are the gate's rows i0.., rows [Il, 2Il) the up projection's rows I + i0..
            const int64_t full_row = r < Il ? i0 + r : I + i0 + (r - Il);
            ASSERT_EQ(a[static_cast<std::size_t>((e * 2 * Il + r) * H + h)],
                      w13[static_cast<std::size_t>(((e0 + e) * 2 * I + full_row) * H + h)])
                << "ep " << ep << " rank " << rank << " w13[" << e << "," << r << "," << h << "]";
          }
      for (int64_t e = 0; e < El; ++e)
        for (int64_t h = 0; h < H; ++h)
          for (int64_t i = 0; i < Il; ++i)
            ASSERT_EQ(b[static_cast<std::size_t>((e * H + h) * Il + i)],
                      w2[static_cast<std::size_t>(((e0 + e) * H + h) * I + i0 + i)]);
    }
  }
}

TEST(LowerParallel, XIsTheDataParallelRanksRowsOfTheBatch) {
  const MoEConfig c = small();
  const Graph full = build_moe_layer(c, {.max_tokens = 16});
  ParallelLayout l{.dp = 2, .tp = 1, .ep = false, .dispatch = DispatchKind::allgather, .tokens = {5, 9}};
  const std::vector<float> all = draw(full.value(*full.find_value("x")), 16);
  const Graph g = lower_parallel(full, l, 1);  // DP rank 1: tokens 5..13 of the batch
  const std::vector<float> mine = draw(g.value(*g.find_value("x")), 9);
  ASSERT_EQ(mine.size(), static_cast<std::size_t>(9 * c.hidden));
  EXPECT_TRUE(std::equal(mine.begin(), mine.end(), all.begin() + 5 * c.hidden));
}

// The collectives of one rank's graph in the order its order edges chain them.
std::vector<std::string> communication_chain(const Graph& g) {
  std::map<NodeId, NodeId> next;
  NodeId first = kNoNode;
  int comm = 0;
  for (const Node& n : g.nodes()) {
    if (!n.op->communicates()) continue;
    ++comm;
    NodeId before = kNoNode;
    for (NodeId a : n.after)
      if (g.node(a).op->communicates()) before = a;
    if (before == kNoNode) first = n.id;
    else next[before] = n.id;
  }
  std::vector<std::string> chain;
  for (NodeId n = first; n != kNoNode; n = next.count(n) ? next[n] : kNoNode) chain.push_back(g.node(n).name);
  EXPECT_EQ(static_cast<int>(chain.size()), comm) << "the collectives are not one chain";
  return chain;
}

TEST(LowerParallel, OneRanksGraphChainsItsCollectivesAndSumsThePartialOnce) {
  const MoEConfig c = small();
  const Graph chunked = chunk_tokens(build_moe_layer(c, {.max_tokens = 12}), {.chunks = 2});
  ParallelLayout l{.dp = 2, .tp = 2, .ep = true, .dispatch = DispatchKind::topk_allgather, .tokens = {12, 3}};
  const Graph g = lower_parallel(chunked, l, 3);
  int partial_sums = 0;
  for (const Node& n : g.nodes())
    if (n.op->kind() == "reduce_scatter") ++partial_sums;
  EXPECT_EQ(partial_sums, 2);
  // Per chunk: gather over the world, reduce-scatter, TP gather; chunk 1's rows go out before chunk
  // 0's results come back (two micro-batches), and each chunk's TP gather follows its reduce-scatter.
  EXPECT_EQ(communication_chain(g),
            (std::vector<std::string>{"dispatch_all_gather\u00b7c0", "dispatch_all_gather\u00b7c1",
                                      "dispatch_reduce_scatter\u00b7c0", "dispatch_tp_gather\u00b7c0",
                                      "dispatch_reduce_scatter\u00b7c1", "dispatch_tp_gather\u00b7c1"}));
  // Chunk 1 of DP rank 1 (3 tokens, chunks of 6) is empty there, yet its collectives exist.
  const Node& gather1 = g.node(*g.find_node("dispatch_all_gather\u00b7c1"));
  const auto& op = static_cast<const AllGatherRowsOp&>(*gather1.op);
  EXPECT_EQ(op.rows(), (std::vector<int64_t>{3, 3, 0, 0}));
  // The experts' output is Partial, the graph output whole.
  EXPECT_EQ(g.value(*g.find_value("experts\u00b7c0.y")).type->dist, Distribution::partial());
  EXPECT_EQ(g.value(g.outputs()[0]).type->dist, Distribution::replicated());
}

TEST(LowerParallel, AlltoallChainIsTheTwoMicroBatchOrder) {
  const Graph chunked = chunk_tokens(build_moe_layer(small(), {.max_tokens = 12}), {.chunks = 3});
  ParallelLayout l{.dp = 2, .tp = 1, .ep = true, .dispatch = DispatchKind::alltoall, .tokens = {12, 7}};
  for (int rank = 0; rank < 2; ++rank)
    EXPECT_EQ(communication_chain(lower_parallel(chunked, l, rank)),
              (std::vector<std::string>{"dispatch_alltoall\u00b7c0", "dispatch_alltoall\u00b7c1",
                                        "dispatch_alltoall_back\u00b7c0", "dispatch_alltoall\u00b7c2",
                                        "dispatch_alltoall_back\u00b7c1", "dispatch_alltoall_back\u00b7c2"}))
        << "rank " << rank;
}

TEST(LowerParallel, RefusesWhatItCannotLower) {
  const MoEConfig c = small();
  const Graph full = build_moe_layer(c, {.max_tokens = 8});
  ParallelLayout l{.dp = 2, .tp = 1, .ep = true, .dispatch = DispatchKind::alltoall, .tokens = {8, 9}};
  EXPECT_THAT(bad_input_message([&] { lower_parallel(full, l, 0); }), HasSubstr("built for at most 8"));
  l.tokens = {8, 8};
  EXPECT_THAT(bad_input_message([&] { lower_parallel(full, l, 2); }), HasSubstr("rank 2 outside a world of 2"));
  ParallelLayout three{.dp = 3, .tp = 1, .ep = true, .dispatch = DispatchKind::alltoall, .tokens = {2, 2, 2}};
  EXPECT_THAT(bad_input_message([&] { lower_parallel(full, three, 0); }), HasSubstr("8 experts, which do not divide over 3"));
  three.ep = false;
  EXPECT_THAT(bad_input_message([&] { lower_parallel(full, three, 0); }),
              HasSubstr("intermediate size 8, which does not divide over 3"));
}
