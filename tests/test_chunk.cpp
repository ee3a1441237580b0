// The chunk pass: structure (names, tags, shared weights, outputs keep their names), results equal
// to the unchunked graph on every family (including chunks the run's tokens never reach), the
// pipelined concurrent plan, the memory it saves, and refusals.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

#include "bench/cpu_session.hpp"
#include "bench/measure.hpp"
#include "graph/chunk.hpp"
#include "graph/error.hpp"
#include "ops/moe_layer.hpp"
#include "tests/buffer_checks.hpp"
#include "tests/expect_error.hpp"
#include "tests/family_cases.hpp"

using namespace moeflow;
using testing::HasSubstr;
using testing::Not;

namespace {

const MoEConfig& small_qwen() {
  static const MoEConfig c = load_config("qwen1.5-moe-a2.7b", {"hidden_size=256", "moe_intermediate_size=64",
                                                               "shared_expert_intermediate_size=256"});
  return c;
}

// Output of one CPU run of `g` on the seed's inputs for T tokens.
std::vector<float> run_once(std::shared_ptr<const Graph> g, Policy policy, int64_t T, bool reuse = false) {
  SessionOptions so;
  so.plan.policy = policy;
  so.plan.reuse_memory = reuse;
  so.threads = 2;
  so.seed = 7;
  CpuSession s(std::move(g), so);
  s.set_tokens(T);
  s.run();
  const int64_t n = s.graph().value(s.graph().outputs()[0]).shape().elements(T);
  return {s.output(), s.output() + n};
}

double rel_norm(const std::vector<float>& y, const std::vector<float>& r) {
  double d = 0, n = 0;
  for (std::size_t i = 0; i < r.size(); ++i) {
    d += (static_cast<double>(y[i]) - r[i]) * (static_cast<double>(y[i]) - r[i]);
    n += static_cast<double>(r[i]) * r[i];
  }
  return std::sqrt(d / n);
}

}  // namespace

TEST(Chunk, NodesAreCopiedPerChunkWithTagsNamesAndSharedWeights) {
  const Graph g = build_moe_layer(small_qwen(), {.max_tokens = 16});
  const Graph c = chunk_tokens(g, {.chunks = 3});
  EXPECT_EQ(c.chunks(), 3);
  EXPECT_EQ(c.chunk_rows(), 6);  // ceil(16 / 3)
  for (const Node& n : g.nodes())
    for (int k = 0; k < 3; ++k) {
      const auto id = c.find_node(n.name + "\u00b7c" + std::to_string(k));
      ASSERT_TRUE(id) << n.name << " chunk " << k;
      EXPECT_EQ(c.node(*id).chunk, k);
      EXPECT_EQ(c.node(*id).op, n.op);  // the same op instance: the same attributes
    }
  // Weights are not copied; x is sliced once per chunk; the output keeps its name.
  EXPECT_EQ(c.graph_inputs().size(), g.graph_inputs().size());
  for (int k = 0; k < 3; ++k) EXPECT_TRUE(c.find_node("slice_x\u00b7c" + std::to_string(k)));
  EXPECT_EQ(c.value(c.outputs()[0]).name, g.value(g.outputs()[0]).name);
  // Chunk-tagged nodes see their share of the tokens: 16 = 6 + 6 + 4; 7 = 6 + 1 + 0.
  const Node& last = c.node(*c.find_node("experts\u00b7c2"));
  EXPECT_EQ(c.max_tokens_of(last), 4);  // the last chunk never holds more than 16 - 12 rows
  EXPECT_EQ(c.tokens_of(last, 16), 4);
  EXPECT_EQ(c.tokens_of(last, 7), 0);
  EXPECT_EQ(c.tokens_of(c.node(*c.find_node("experts\u00b7c1")), 7), 1);
  // Topological order finishes a chunk before the next starts (the serial plan's order).
  int last_chunk = 0;
  for (const Node& n : c.nodes())
    if (n.chunk >= 0) {
      EXPECT_GE(n.chunk, last_chunk) << n.name;
      last_chunk = n.chunk;
    }
}

TEST(Chunk, ChunkTokensGivesTheChunkCountAndOneChunkIsTheSameGraph) {
  const Graph g = build_moe_layer(small_qwen(), {.max_tokens = 16});
  const Graph c = chunk_tokens(g, {.chunk_tokens = 5});
  EXPECT_EQ(c.chunks(), 4);
  EXPECT_EQ(c.chunk_rows(), 5);
  const Graph one = chunk_tokens(g, {.chunks = 1});
  EXPECT_EQ(one.nodes().size(), g.nodes().size());
  EXPECT_EQ(one.chunks(), 0);
}

TEST(Chunk, RefusesBadRequestsByName) {
  const Graph g = build_moe_layer(small_qwen(), {.max_tokens = 16});
  using testing_errors::bad_input_message;
  EXPECT_THAT(bad_input_message([&] { chunk_tokens(g, {}); }), HasSubstr("exactly one of --chunks"));
  EXPECT_THAT(bad_input_message([&] { chunk_tokens(g, {.chunks = 2, .chunk_tokens = 4}); }), HasSubstr("exactly one"));
  EXPECT_THAT(bad_input_message([&] { chunk_tokens(g, {.chunks = -1}); }), HasSubstr("chunks = -1"));
  EXPECT_THAT(bad_input_message([&] { chunk_tokens(g, {.chunk_tokens = 17}); }),
              HasSubstr("--chunk-tokens = 17 exceeds the maximum tokens 16"));
  const Graph c = chunk_tokens(g, {.chunks = 2});
  EXPECT_THAT(bad_input_message([&] { chunk_tokens(c, {.chunks = 2}); }), HasSubstr("already split into 2 chunks"));
}

using ChunkParam = std::tuple<int, int, int64_t, Policy>;  // family case, chunks, T, plan

class ChunkedLayer : public testing::TestWithParam<ChunkParam> {};

TEST_P(ChunkedLayer, MatchesTheUnchunkedGraph) {
  const auto& [index, chunks, T, policy] = GetParam();
  const auto& fc = testing_cases::family_cases()[static_cast<std::size_t>(index)];
  const MoEConfig config = load_config(fc.preset, fc.sets);
  const Graph g = build_moe_layer(config, {.max_tokens = 24});
  const std::vector<float> whole = run_once(std::make_shared<const Graph>(g), Policy::serial, T);
  auto chunked = std::make_shared<const Graph>(chunk_tokens(g, {.chunks = chunks}));
  const std::vector<float> parts = run_once(chunked, policy, T, /*reuse=*/true);
  ASSERT_EQ(parts.size(), whole.size());
  EXPECT_LT(rel_norm(parts, whole), 1e-6);
}

INSTANTIATE_TEST_SUITE_P(
    Families, ChunkedLayer,
    testing::Combine(testing::Range(0, 5), testing::Values(2, 5),
                     // T = 3 with 5 chunks of 5 rows: chunks 1..4 are empty and still run.
                     testing::Values<int64_t>(3, 17, 24), testing::Values(Policy::serial, Policy::concurrent)),
    [](const testing::TestParamInfo<ChunkParam>& i) {
      return testing_cases::family_cases()[static_cast<std::size_t>(std::get<0>(i.param))].name + "_chunks" +
             std::to_string(std::get<1>(i.param)) + "_T" + std::to_string(std::get<2>(i.param)) + "_" +
             to_string(std::get<3>(i.param));
    });

TEST(Chunk, ChunkRowsAreViewsOfTheWholeValueSoNothingIsCopied) {
  // qwen3 has no shared expert: its reduce adds nothing and is folded into the combine
  // (fold_lone_reduces), which writes each chunk's rows straight into the output.
  const MoEConfig config = load_config("qwen3-30b-a3b", {"hidden_size=128", "moe_intermediate_size=64", "num_experts=16"});
  auto g = std::make_shared<const Graph>(build_moe_layer(config, {.max_tokens = 24}));
  auto chunked = std::make_shared<const Graph>(chunk_tokens(*g, {.chunks = 2}));
  for (Policy policy : {Policy::serial, Policy::concurrent}) {
    PlanOptions po;
    po.policy = policy;
    const Plan plan = make_plan(chunked, po);
    const Graph& c = *plan.graph;
    const ValueId x = *c.find_value("x"), out = c.outputs()[0];
    for (int k = 0; k < 2; ++k) {
      const std::string tag = "\u00b7c" + std::to_string(k);
      const Node& slice = c.node(*c.find_node("slice_x" + tag));
      const Buffer& rows = plan.buffer(slice.outputs[0]);
      EXPECT_EQ(rows.view_of, x) << to_string(policy);
      EXPECT_EQ(rows.arena, Arena::inputs);
      EXPECT_EQ(rows.offset, plan.buffer(x).offset + k * 12 * 128 * 4);
      EXPECT_THAT(plan.step_for(slice.id).reason, HasSubstr("nothing to copy"));
      const Node& combine = c.node(*c.find_node("combine" + tag));
      EXPECT_FALSE(c.find_node("reduce" + tag));
      EXPECT_EQ(plan.buffer(combine.outputs[0]).view_of, out);
      EXPECT_EQ(plan.buffer(combine.outputs[0]).offset, plan.buffer(out).offset + k * 12 * 128 * 4);
    }
    const Node& concat = c.node(c.value(out).producer);
    EXPECT_THAT(plan.step_for(concat.id).reason, HasSubstr("every chunk wrote its rows into"));
    EXPECT_EQ(testing_buffers::expect_live_values_apart(plan, to_string(policy)), 4);
  }
  // The joined output is the unchunked graph's, at a T that leaves the second chunk short.
  EXPECT_LT(rel_norm(run_once(chunked, Policy::concurrent, 19, /*reuse=*/true), run_once(g, Policy::serial, 19)), 1e-6);
}

TEST(Chunk, RowsOffTheArenaAlignmentAreCopied) {
  // 72 f32 features: a chunk of 12 rows starts 3456 bytes in, off the 256-byte alignment.
  const MoEConfig config = load_config("qwen3-30b-a3b", {"hidden_size=72", "moe_intermediate_size=64", "num_experts=16"});
  auto g = std::make_shared<const Graph>(build_moe_layer(config, {.max_tokens = 24}));
  auto chunked = std::make_shared<const Graph>(chunk_tokens(*g, {.chunks = 2}));
  PlanOptions po;
  po.policy = Policy::concurrent;
  const Plan plan = make_plan(chunked, po);
  const Graph& c = *plan.graph;
  EXPECT_TRUE(plan.buffer(c.node(*c.find_node("slice_x\u00b7c0")).outputs[0]).is_view());
  const Node& second = c.node(*c.find_node("slice_x\u00b7c1"));
  EXPECT_FALSE(plan.buffer(second.outputs[0]).is_view());
  EXPECT_THAT(plan.step_for(second.id).reason, Not(HasSubstr("nothing to copy")));
  EXPECT_THAT(plan.step_for(c.value(c.outputs()[0]).producer).reason, HasSubstr("1 of 2 chunks wrote their rows into"));
  testing_buffers::expect_live_values_apart(plan, "H=72");
  EXPECT_LT(rel_norm(run_once(chunked, Policy::concurrent, 24, /*reuse=*/true), run_once(g, Policy::serial, 24)), 1e-6);
}

TEST(Chunk, ChunkedPlansNeverLetTwoLiveValuesShareBytes) {
  for (const auto& fc : testing_cases::family_cases()) {
    const Graph g = build_moe_layer(load_config(fc.preset, fc.sets), {.max_tokens = 24});
    for (int chunks : {2, 3, 5})
      for (Policy policy : {Policy::serial, Policy::concurrent}) {
        PlanOptions po;
        po.policy = policy;
        const Plan plan = make_plan(std::make_shared<const Graph>(chunk_tokens(g, {.chunks = chunks})), po);
        const int views = testing_buffers::expect_live_values_apart(
            plan, fc.name + " " + std::to_string(chunks) + " chunks " + to_string(policy));
        EXPECT_GT(views, 0) << fc.name << " " << chunks << " chunks";
      }
  }
}

TEST(Chunk, ExpertsOnlyGraphSlicesEveryTokenInput) {
  const MoEConfig config = load_config("qwen3-30b-a3b", {"hidden_size=128", "moe_intermediate_size=64", "num_experts=16"});
  const Graph g = build_experts_graph(config, {.max_tokens = 20});
  const Graph c = chunk_tokens(g, {.chunk_tokens = 8});
  int slices = 0;
  for (const Node& n : c.nodes()) slices += n.op->kind() == "slice_rows";
  EXPECT_EQ(slices, 3 * 3);  // x, ids, weights per chunk
  const auto whole = run_once(std::make_shared<const Graph>(g), Policy::serial, 19);
  const auto parts = run_once(std::make_shared<const Graph>(c), Policy::concurrent, 19);
  EXPECT_LT(rel_norm(parts, whole), 1e-6);
}

TEST(Chunk, ConcurrentPlanPipelinesChunks) {
  auto g = std::make_shared<const Graph>(chunk_tokens(build_moe_layer(load_config("qwen1.5-moe-a2.7b"), {.max_tokens = 512}), {.chunks = 2}));
  PlanOptions po;
  po.policy = Policy::concurrent;
  const Plan plan = make_plan(g, po);
  const PlanStep& experts0 = plan.step_for(*g->find_node("experts\u00b7c0"));
  const PlanStep& gate1 = plan.step_for(*g->find_node("gate\u00b7c1"));
  const PlanStep& dispatch1 = plan.step_for(*g->find_node("dispatch\u00b7c1"));
  // Chunk 1's routing runs on another lane, predicted to start before chunk 0's experts end.
  EXPECT_NE(gate1.lane, experts0.lane);
  EXPECT_LT(dispatch1.start_estimate_s, experts0.start_estimate_s + experts0.predicted_s);
  EXPECT_LT(plan.predicted_makespan_s, plan.predicted_serial_s);
}

TEST(Chunk, FourChunksCutThePeakWorkspaceOfTheSerialPlan) {
  // deepseek-v3 at T=8192: planned only, never allocated.
  const Graph g = build_moe_layer(load_config("deepseek-v3"), {.max_tokens = 8192});
  PlanOptions po;
  po.reuse_memory = true;
  const int64_t one = make_plan(std::make_shared<const Graph>(g), po).bytes(Arena::workspace);
  const int64_t four = make_plan(std::make_shared<const Graph>(chunk_tokens(g, {.chunks = 4})), po).bytes(Arena::workspace);
  EXPECT_LE(four, one * 6 / 10) << "1 chunk " << one << " bytes, 4 chunks " << four;
}

TEST(Chunk, TheFloorIsTheLayersHoweverItIsChunked) {
  const Graph g = build_moe_layer(small_qwen(), {.max_tokens = 24});
  const MachineRates rates{.flops_per_s = 1e11, .bytes_per_s = 2e10};
  auto floor_of = [&](std::shared_ptr<const Graph> graph) {
    SessionOptions so;
    so.seed = 3;
    so.threads = 2;
    CpuSession s(std::move(graph), so);
    s.set_tokens(17, 2);
    return s.floor(rates);
  };
  const Floor whole = floor_of(std::make_shared<const Graph>(g));
  const Floor parts = floor_of(std::make_shared<const Graph>(chunk_tokens(g, {.chunks = 3})));
  EXPECT_GT(whole.touched_experts, 0);
  EXPECT_EQ(parts.touched_experts, whole.touched_experts);
  EXPECT_DOUBLE_EQ(parts.bytes, whole.bytes);
  EXPECT_DOUBLE_EQ(parts.flops, whole.flops);
}


TEST(Chunk, FewestExpertRowsCountsEachChunkApart) {
  // 12 tokens in 3 chunks of 4; choice j of every token goes to expert j, except token 11's first,
  // which goes to the last expert: chunk 2 gives that expert 1 row and expert 0 three.
  const MoEConfig& config = small_qwen();
  const int k = config.top_k, E = config.experts;
  ASSERT_GT(E, k);
  const Graph whole = build_moe_layer(config, {.max_tokens = 12});
  const Graph parts = chunk_tokens(whole, {.chunks = 3});
  std::vector<int32_t> ids(12 * k);
  for (int t = 0; t < 12; ++t)
    for (int j = 0; j < k; ++j) ids[t * k + j] = j;
  EXPECT_EQ(fewest_expert_rows(whole, 12, ids.data()), 12);
  EXPECT_EQ(fewest_expert_rows(parts, 12, ids.data()), 4);
  EXPECT_EQ(fewest_expert_rows(parts, 10, ids.data()), 2);  // chunks of 4, 4 and 2 tokens
  ids[11 * k] = E - 1;
  EXPECT_EQ(fewest_expert_rows(whole, 12, ids.data()), 1);
  EXPECT_EQ(fewest_expert_rows(parts, 12, ids.data()), 1);
  ids[11 * k] = -1;  // no expert: not counted
  EXPECT_EQ(fewest_expert_rows(parts, 12, ids.data()), 3);
}
