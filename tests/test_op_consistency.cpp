// The op-consistency harness: every op's every CPU kernel against the plain reference, on random
// shapes and the routing corner cases (T = 1, T not a multiple of anything, zero-token experts,
// all tokens on one expert, every routing rule, ties). Each case is named by its parameters.
#include <gtest/gtest.h>

#include <cstring>
#include <set>

#include "bench/cpu_session.hpp"
#include "ops/layer_builder.hpp"
#include "ops/moe_layer.hpp"

using namespace moeflow;

namespace {

// Runs `graph` once with each CPU kernel registered for `op_kind` forced in turn.
template <class Check>
void for_each_kernel(std::shared_ptr<const Graph> g, const std::string& op_kind, int64_t T,
                     const std::function<void(CpuSession&)>& prepare, Check&& check) {
  const auto kernels = KernelRegistry::builtin().candidates(op_kind, Backend::cpu);
  ASSERT_FALSE(kernels.empty()) << op_kind;
  for (const KernelEntry* k : kernels) {
    SCOPED_TRACE("kernel " + k->name);
    SessionOptions so;
    so.plan.forced_kernels[op_kind] = k->name;
    so.threads = 2;
    so.seed = 7;
    CpuSession s(g, so);
    s.set_tokens(T);
    if (prepare) prepare(s);
    s.run();
    check(s);
  }
}

// ---------------------------------------------------------------- gate

struct GateCase {
  std::string label;
  RoutingRule rule;
  int hidden;
  int64_t tokens;
  bool ties;  // duplicate router rows, so experts tie exactly
};

RoutingRule rule_of(int E, int k, Scoring s, TopKMethod m, int groups, int keep, bool renorm, float scale) {
  RoutingRule r;
  r.experts = E;
  r.top_k = k;
  r.scoring = s;
  r.method = m;
  r.n_group = groups;
  r.topk_group = keep;
  r.use_bias = m == TopKMethod::noaux_tc;
  r.renormalize = renorm;
  r.renorm_epsilon = m == TopKMethod::greedy ? 0.0f : 1e-20f;
  r.scale = scale;
  return r;
}

std::vector<GateCase> gate_cases() {
  std::vector<GateCase> cases;
  for (int64_t T : {1, 37}) {
    for (bool ties : {false, true}) {
      cases.push_back({"softmax_greedy_E8_k2_renorm", rule_of(8, 2, Scoring::softmax, TopKMethod::greedy, 1, 1, true, 1), 64, T, ties});
      cases.push_back({"softmax_greedy_E60_k4_norenorm", rule_of(60, 4, Scoring::softmax, TopKMethod::greedy, 1, 1, false, 1), 96, T, ties});
      cases.push_back({"sigmoid_greedy_E16_k3_scale2", rule_of(16, 3, Scoring::sigmoid, TopKMethod::greedy, 1, 1, false, 2), 40, T, ties});
      cases.push_back({"softmax_grouplimited_E32_k6_g8keep3_scale16",
                       rule_of(32, 6, Scoring::softmax, TopKMethod::group_limited_greedy, 8, 3, false, 16), 72, T, ties});
      cases.push_back({"sigmoid_noauxtc_E64_k8_g8keep4_renorm_scale2.5",
                       rule_of(64, 8, Scoring::sigmoid, TopKMethod::noaux_tc, 8, 4, true, 2.5f), 128, T, ties});
      cases.push_back({"sigmoid_noauxtc_E16_k1_g4keep1", rule_of(16, 1, Scoring::sigmoid, TopKMethod::noaux_tc, 4, 1, false, 1), 33, T, ties});
    }
  }
  return cases;
}

class GateConsistency : public testing::TestWithParam<GateCase> {};

TEST_P(GateConsistency, IdsAndWeightsMatchReference) {
  const GateCase& c = GetParam();
  LayerBuilder b("gate_case", c.tokens);
  ValueId x = b.input("x", {tokens(), Dim::of(c.hidden)}, DType::f32);
  Route route = b.gate(x, c.rule);
  auto g = std::make_shared<const Graph>(std::move(b).finish({route.ids, route.weights}));
  const ValueId router = *g->find_value("gate.router");
  auto prepare = [&](CpuSession& s) {
    if (!c.ties) return;
    // Experts 2k+1 get the router row of expert 2k: exact ties that only the tie rule decides.
    float* w = static_cast<float*>(const_cast<void*>(s.value_data(router)));
    for (int e = 1; e < c.rule.experts; e += 2)
      std::memcpy(w + static_cast<int64_t>(e) * c.hidden, w + static_cast<int64_t>(e - 1) * c.hidden, sizeof(float) * c.hidden);
    if (c.rule.use_bias) {
      float* bias = static_cast<float*>(const_cast<void*>(s.value_data(*g->find_value("gate.bias"))));
      for (int e = 1; e < c.rule.experts; e += 2) bias[e] = bias[e - 1];
    }
  };
  for_each_kernel(g, "gate", c.tokens, prepare, [&](CpuSession& s) {
    const int64_t T = c.tokens;
    const int k = c.rule.top_k;
    const auto* ids = static_cast<const int32_t*>(s.value_data(route.ids));
    const auto* weights = static_cast<const float*>(s.value_data(route.weights));
    const std::vector<double> logits = reference::router_logits(
        static_cast<const float*>(s.value_data(x)), static_cast<const float*>(s.value_data(router)), T, c.hidden,
        c.rule.experts);
    reference::RoutingAgreement a;
    const float* bias = c.rule.use_bias ? static_cast<const float*>(s.value_data(*g->find_value("gate.bias"))) : nullptr;
    const reference::Routing r = reference::route(c.rule, logits, bias, T, ids, 1e-3, &a);
    EXPECT_EQ(a.tokens_differing, a.tokens_adopted) << "a routing difference beyond a near-tie";
    if (c.ties) {
      // Exact ties between twin experts: the engine must have chosen like the reference, by index.
      EXPECT_EQ(a.tokens_differing, 0);
    }
    for (int64_t t = 0; t < T; ++t) {
      std::set<int32_t> distinct(ids + t * k, ids + (t + 1) * k);
      EXPECT_EQ(static_cast<int>(distinct.size()), k) << "token " << t;
      for (int j = 0; j < k; ++j) {
        EXPECT_EQ(ids[t * k + j], r.ids[static_cast<std::size_t>(t * k + j)]) << "token " << t << " slot " << j;
        EXPECT_NEAR(weights[t * k + j], r.weights[static_cast<std::size_t>(t * k + j)],
                    1e-5 * std::max(1.0, std::abs(r.weights[static_cast<std::size_t>(t * k + j)])));
      }
    }
  });
}

INSTANTIATE_TEST_SUITE_P(Rules, GateConsistency, testing::ValuesIn(gate_cases()),
                         [](const testing::TestParamInfo<GateCase>& i) {
                           std::string n = i.param.label + "_H" + std::to_string(i.param.hidden) + "_T" +
                                           std::to_string(i.param.tokens) + (i.param.ties ? "_ties" : "");
                           for (char& ch : n)
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           return n;
                         });

// ---------------------------------------------------------------- dispatch, experts, combine

enum class Routing { uniform, zero_token_experts, all_on_one_expert };
const char* to_string(Routing r) {
  return r == Routing::uniform ? "uniform" : r == Routing::zero_token_experts ? "zeroTokenExperts" : "allOnExpert3";
}

struct ExpertsCase {
  int experts, top_k, hidden, intermediate;
  int64_t tokens;
  Routing routing;
};

class ExpertsPathConsistency : public testing::TestWithParam<ExpertsCase> {};

TEST_P(ExpertsPathConsistency, DispatchExpertsCombineMatchReference) {
  const ExpertsCase& c = GetParam();
  MoEConfig config = load_config("mixtral-8x7b", {"hidden_size=" + std::to_string(c.hidden),
                                                  "intermediate_size=" + std::to_string(c.intermediate),
                                                  "num_local_experts=" + std::to_string(c.experts),
                                                  "num_experts_per_tok=" + std::to_string(c.top_k)});
  auto g = std::make_shared<const Graph>(build_experts_graph(config, {.max_tokens = c.tokens}));
  const ValueId ids_v = *g->find_value("route.ids"), w_v = *g->find_value("route.weights"), x_v = *g->find_value("x");
  auto prepare = [&](CpuSession& s) {
    auto* ids = static_cast<int32_t*>(s.input_data(ids_v));
    for (int64_t t = 0; t < c.tokens; ++t)
      for (int j = 0; j < c.top_k; ++j) {
        int32_t& id = ids[t * c.top_k + j];
        if (c.routing == Routing::zero_token_experts) id = j;  // only experts [0, k) get tokens
        if (c.routing == Routing::all_on_one_expert) id = (3 + j) % c.experts;  // every token on expert 3
      }
  };
  for (const std::string& op : {std::string("dispatch"), std::string("experts"), std::string("combine")}) {
    SCOPED_TRACE("op " + op);
    for_each_kernel(g, op, c.tokens, prepare, [&](CpuSession& s) {
      const auto* ids = static_cast<const int32_t*>(s.value_data(ids_v));
      const auto* w = static_cast<const float*>(s.value_data(w_v));
      const auto* x = static_cast<const float*>(s.value_data(x_v));
      // dispatch: every (t, j) row is x[t], offsets count each expert's rows, experts in order.
      const auto* offsets = static_cast<const int32_t*>(s.value_data(*g->find_value("dispatch.offsets")));
      const auto* slot = static_cast<const int32_t*>(s.value_data(*g->find_value("dispatch.slot_of")));
      const auto* rows = static_cast<const float*>(s.value_data(*g->find_value("dispatch.rows")));
      std::vector<int32_t> count(static_cast<std::size_t>(c.experts), 0);
      for (int64_t i = 0; i < c.tokens * c.top_k; ++i) ++count[static_cast<std::size_t>(ids[i])];
      EXPECT_EQ(offsets[0], 0);
      for (int e = 0; e < c.experts; ++e) EXPECT_EQ(offsets[e + 1] - offsets[e], count[static_cast<std::size_t>(e)]) << e;
      for (int64_t t = 0; t < c.tokens; ++t)
        for (int j = 0; j < c.top_k; ++j) {
          const int32_t r = slot[t * c.top_k + j];
          const int32_t e = ids[t * c.top_k + j];
          EXPECT_TRUE(r >= offsets[e] && r < offsets[e + 1]) << "row of (" << t << "," << j << ") not in its expert";
          ASSERT_EQ(0, std::memcmp(rows + static_cast<int64_t>(r) * c.hidden, x + t * c.hidden, sizeof(float) * c.hidden));
        }
      // experts + combine against the reference.
      std::vector<double> wd(w, w + c.tokens * c.top_k);
      const std::vector<double> ref = reference::experts_path(
          x, c.tokens, c.hidden, c.intermediate, c.top_k, ids, wd.data(),
          static_cast<const float*>(s.value_data(*g->find_value("experts.w13"))),
          static_cast<const float*>(s.value_data(*g->find_value("experts.w2"))));
      const reference::Comparison cmp = reference::compare(s.output(), ref);
      EXPECT_TRUE(cmp.passes(1e-5)) << "rel_norm " << cmp.rel_norm;
    });
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, ExpertsPathConsistency,
    testing::Values(ExpertsCase{8, 2, 64, 32, 1, Routing::uniform}, ExpertsCase{8, 2, 96, 40, 37, Routing::uniform},
                    ExpertsCase{60, 4, 72, 56, 53, Routing::uniform},
                    ExpertsCase{16, 3, 64, 48, 29, Routing::zero_token_experts},
                    ExpertsCase{16, 1, 80, 24, 67, Routing::all_on_one_expert},
                    ExpertsCase{8, 2, 48, 33, 131, Routing::all_on_one_expert},
                    ExpertsCase{32, 8, 100, 17, 7, Routing::uniform}),
    [](const testing::TestParamInfo<ExpertsCase>& i) {
      const ExpertsCase& c = i.param;
      return "E" + std::to_string(c.experts) + "_k" + std::to_string(c.top_k) + "_H" + std::to_string(c.hidden) + "_I" +
             std::to_string(c.intermediate) + "_T" + std::to_string(c.tokens) + "_" + to_string(c.routing);
    });

// ---------------------------------------------------------------- shared expert, reduce

struct SharedCase {
  int hidden, intermediate;
  int64_t tokens;
  bool gated;
};

class SharedExpertConsistency : public testing::TestWithParam<SharedCase> {};

TEST_P(SharedExpertConsistency, MatchesReferenceAndReduceAddsExactly) {
  const SharedCase& c = GetParam();
  LayerBuilder b("shared_case", c.tokens);
  ValueId x = b.input("x", {tokens(), Dim::of(c.hidden)}, DType::f32);
  ValueId y = b.shared_expert(x, {.intermediate = c.intermediate, .gated = c.gated});
  ValueId other = b.input("other", {tokens(), Dim::of(c.hidden)}, DType::f32);
  ValueId sum = b.reduce(y, {other, x});
  auto g = std::make_shared<const Graph>(std::move(b).finish({sum, y}));
  for (const std::string& op : {std::string("shared_expert"), std::string("reduce")}) {
    for_each_kernel(g, op, c.tokens, nullptr, [&](CpuSession& s) {
      auto f = [&](ValueId v) { return static_cast<const float*>(s.value_data(v)); };
      reference::SharedMlp mlp{f(*g->find_value("shared_expert.w13")), f(*g->find_value("shared_expert.w2")),
                               c.gated ? f(*g->find_value("shared_expert.gate_w")) : nullptr, c.intermediate};
      const std::vector<double> ref = reference::shared_mlp(f(x), c.tokens, c.hidden, mlp);
      const reference::Comparison cmp = reference::compare(f(y), ref);
      EXPECT_TRUE(cmp.passes(1e-5)) << "rel_norm " << cmp.rel_norm;
      for (int64_t i = 0; i < c.tokens * c.hidden; ++i) ASSERT_EQ(f(sum)[i], (f(y)[i] + f(other)[i]) + f(x)[i]) << i;
    });
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, SharedExpertConsistency,
                         testing::Values(SharedCase{64, 32, 1, false}, SharedCase{96, 80, 70, true},
                                         SharedCase{128, 200, 131, false}, SharedCase{40, 24, 3, true}),
                         [](const testing::TestParamInfo<SharedCase>& i) {
                           const SharedCase& c = i.param;
                           return "H" + std::to_string(c.hidden) + "_I" + std::to_string(c.intermediate) + "_T" +
                                  std::to_string(c.tokens) + (c.gated ? "_gated" : "_plain");
                         });

}  // namespace
