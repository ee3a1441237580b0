// Whole layers of every model family at CI sizes (H <= 512, I <= 256), with both planners and
// several T, checked against the fp64 reference (fp32: relative norm error < 1e-5).
#include <gtest/gtest.h>

#include "bench/cpu_session.hpp"
#include "tests/family_cases.hpp"
#include "graph/error.hpp"
#include "ops/moe_layer.hpp"

using namespace moeflow;

namespace {

using testing_cases::family_cases;

using LayerParam = std::tuple<int, Policy, int64_t>;  // case index, plan, T

class WholeLayer : public testing::TestWithParam<LayerParam> {};

}  // namespace

TEST_P(WholeLayer, MatchesReference) {
  const auto& [index, policy, T] = GetParam();
  const testing_cases::FamilyCase& lc = family_cases()[static_cast<std::size_t>(index)];
  const MoEConfig config = load_config(lc.preset, lc.sets);
  auto g = std::make_shared<const Graph>(build_moe_layer(config, {.max_tokens = 96}));
  SessionOptions so;
  so.plan.policy = policy;
  so.threads = 2;
  so.seed = static_cast<uint64_t>(T);
  CpuSession session(g, so);
  session.set_tokens(T);
  session.run();
  const CheckReport r = session.check(1e-5);
  EXPECT_TRUE(r.pass) << "rel_norm " << r.comparison.rel_norm << " rel_max " << r.comparison.rel_max
                      << " tokens differing " << r.agreement.tokens_differing << " adopted "
                      << r.agreement.tokens_adopted;
  EXPECT_LT(r.comparison.rel_norm, 1e-5);
  // A second run over the same inputs gives the same bytes (no floating-point races).
  std::vector<float> first(session.output(), session.output() + T * config.hidden);
  session.run();
  EXPECT_EQ(0, std::memcmp(first.data(), session.output(), first.size() * sizeof(float)));
}

INSTANTIATE_TEST_SUITE_P(
    Families, WholeLayer,
    testing::Combine(testing::Range(0, 5), testing::Values(Policy::serial, Policy::concurrent),
                     testing::Values<int64_t>(1, 37, 96)),
    [](const testing::TestParamInfo<LayerParam>& info) {
      return family_cases()[static_cast<std::size_t>(std::get<0>(info.param))].name + "_" +
             to_string(std::get<1>(info.param)) + "_T" + std::to_string(std::get<2>(info.param));
    });

TEST(WholeLayer, OnePlanServesEveryTUpToItsMaximum) {
  const MoEConfig config = load_config("qwen3-30b-a3b", {"hidden_size=128", "moe_intermediate_size=48", "num_experts=16"});
  auto g = std::make_shared<const Graph>(build_moe_layer(config, {.max_tokens = 50}));
  SessionOptions so;
  so.plan.policy = Policy::concurrent;
  so.threads = 2;
  CpuSession session(g, so);
  for (int64_t T : {50, 1, 13, 49}) {
    session.set_tokens(T);
    session.run();
    EXPECT_TRUE(session.check(1e-5).pass) << "T=" << T;
  }
}

TEST(Scopes, RoutedAndSharedBranchesRunAloneAndMatchTheReference) {
  const MoEConfig config = load_config("qwen1.5-moe-a2.7b", {"hidden_size=128", "moe_intermediate_size=48",
                                                             "shared_expert_intermediate_size=96"});
  for (const char* scope : {"routed", "shared"}) {
    auto g = std::make_shared<const Graph>(build_scope_graph(config, scope, {.max_tokens = 24}));
    EXPECT_EQ(g->find_node("shared_expert").has_value(), std::string(scope) == "shared") << scope;
    EXPECT_EQ(g->find_node("experts").has_value(), std::string(scope) == "routed") << scope;
    SessionOptions so;
    so.plan.policy = Policy::concurrent;
    so.threads = 2;
    CpuSession session(g, so);
    session.set_tokens(24, 2);
    session.run();
    EXPECT_TRUE(session.check(1e-5).pass) << scope;
    EXPECT_GT(session.floor(MachineRates{}).seconds, 0.0) << scope;
  }
  const MoEConfig no_shared = load_config("mixtral-8x7b", {"hidden_size=64", "intermediate_size=32"});
  EXPECT_THROW(build_scope_graph(no_shared, "shared", {.max_tokens = 8}), Error);
  EXPECT_THROW(build_scope_graph(no_shared, "sideways", {.max_tokens = 8}), Error);
}

TEST(WholeLayer, ReusedWorkspaceGivesTheSameBytesAndASmallerPeak) {
  const MoEConfig config = load_config("deepseek-v3", {"hidden_size=256", "moe_intermediate_size=64"});
  auto g = std::make_shared<const Graph>(build_moe_layer(config, {.max_tokens = 64}));
  std::vector<std::vector<float>> outputs;
  std::vector<int64_t> peaks;
  for (bool reuse : {false, true}) {
    SessionOptions so;
    so.plan.policy = Policy::concurrent;
    so.plan.reuse_memory = reuse;
    so.threads = 2;
    CpuSession s(g, so);
    s.set_tokens(64);
    s.run();
    EXPECT_TRUE(s.check(1e-5).pass) << "reuse " << reuse;
    outputs.emplace_back(s.output(), s.output() + 64 * config.hidden);
    peaks.push_back(s.plan().bytes(Arena::workspace));
  }
  EXPECT_EQ(outputs[0], outputs[1]);
  EXPECT_LT(peaks[1], peaks[0]);
}
