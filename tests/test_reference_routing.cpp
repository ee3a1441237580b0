// Hand-worked routing cases, one or more per model family, checked against the plain reference and
// against the CPU engine's route_token. The expected ids and weights are literals worked out by hand
// (the arithmetic is in the comments), so neither implementation grades itself.
//
// Most logits are written as ln(w): softmax then gives w / Σw exactly, so the arithmetic stays in
// small fractions. Sigmoid cases use logit(p) = ln(p / (1 - p)), whose sigmoid is p.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "kernels/common/routing_rule.hpp"
#include "kernels/cpu/routing.hpp"
#include "tests/reference/reference.hpp"

namespace moeflow {
namespace {

using reference::Routing;
using reference::RoutingAgreement;

std::vector<double> ln_of(const std::vector<double>& w) {
  std::vector<double> out;
  for (double v : w) out.push_back(std::log(v));
  return out;
}

std::vector<double> logit_of(const std::vector<double>& p) {
  std::vector<double> out;
  for (double v : p) out.push_back(std::log(v / (1.0 - v)));
  return out;
}

RoutingRule greedy_rule(int experts, int top_k, Scoring scoring, bool renormalize, float scale = 1.0f) {
  RoutingRule r;
  r.experts = experts;
  r.top_k = top_k;
  r.scoring = scoring;
  r.method = TopKMethod::greedy;
  r.renormalize = renormalize;
  r.scale = scale;
  return r;
}

// One token, routed by hand.
struct HandCase {
  RoutingRule rule;
  std::vector<double> logits;  // [E]
  std::vector<float> bias;     // [E] or empty
  std::vector<int32_t> ids;    // [k], expected
  std::vector<double> weights; // [k], expected
};

// Mixtral: softmax over 8, greedy top-2, always renormalised.
// logits = ln{1, 5, 2, 8, 3, 4, 7, 6}: Σw = 36, scores = w/36.
// Top-2: e3 (8/36), e6 (7/36). Renormalised: 8/(8+7) = 8/15 = 0.5333..., 7/15 = 0.4666...
HandCase mixtral_case() {
  return {greedy_rule(8, 2, Scoring::softmax, true), ln_of({1, 5, 2, 8, 3, 4, 7, 6}), {}, {3, 6},
          {0.5333333333333333, 0.4666666666666667}};
}

// Qwen2-MoE: softmax, greedy top-4, norm_topk_prob = false (no renormalisation, scale 1).
// logits = ln{3, 1, 4, 1, 5, 9, 2, 6}: Σw = 31.
// Top-4: e5 (9), e7 (6), e4 (5), e2 (4) -> 9/31, 6/31, 5/31, 4/31.
HandCase qwen2_case() {
  return {greedy_rule(8, 4, Scoring::softmax, false), ln_of({3, 1, 4, 1, 5, 9, 2, 6}), {}, {5, 7, 4, 2},
          {0.2903225806451613, 0.1935483870967742, 0.16129032258064516, 0.12903225806451613}};
}

// Qwen3-MoE: softmax, greedy top-3, norm_topk_prob = true.
// logits = ln{1, 6, 2, 5, 3, 4, 10, 9}: Σw = 40 (cancels in the renormalisation).
// Top-3: e6 (10), e7 (9), e1 (6); their sum 25 -> 10/25 = 0.4, 9/25 = 0.36, 6/25 = 0.24.
HandCase qwen3_case() {
  return {greedy_rule(8, 3, Scoring::softmax, true), ln_of({1, 6, 2, 5, 3, 4, 10, 9}), {}, {6, 7, 1},
          {0.4, 0.36, 0.24}};
}

// DeepSeek-V2: softmax, group_limited_greedy, E = 8 in n_group = 4 groups {0,1} {2,3} {4,5} {6,7},
// topk_group = 2, k = 3, not renormalised, so routed_scaling_factor = 16 applies.
// logits = ln{9, 1, 2, 8, 7, 10, 3, 4}: Σw = 44.
// Group max: g0 = 9, g1 = 8, g2 = 10, g3 = 4 -> keep g2, g0 -> candidates e0, e1, e4, e5.
// Top-3 among them: e5 (10), e0 (9), e4 (7). (Greedy would take e3 = 8 over e4: the group rule matters.)
// Weights: 16 * 10/44 = 3.6363..., 16 * 9/44 = 3.2727..., 16 * 7/44 = 2.5454...
HandCase deepseek_v2_case() {
  RoutingRule r = greedy_rule(8, 3, Scoring::softmax, false, 16.0f);
  r.method = TopKMethod::group_limited_greedy;
  r.n_group = 4;
  r.topk_group = 2;
  return {r, ln_of({9, 1, 2, 8, 7, 10, 3, 4}), {}, {5, 0, 4},
          {3.6363636363636362, 3.272727272727273, 2.5454545454545454}};
}

// DeepSeek-V3: sigmoid, noaux_tc with correction bias, E = 8 in 4 groups, topk_group = 2, k = 2,
// renormalised with epsilon 1e-20, scale 2.5.
// scores s = {0.9, 0.05, 0.85, 0.12, 0.8, 0.35, 0.2, 0.4}
// bias   b = {0.25, -0.02, 0.01, 0.03, -0.01, 0.02, -0.03, 0}
// choice c = {1.15, 0.03, 0.86, 0.15, 0.79, 0.37, 0.17, 0.40}
// Group top-2 sums: g0 = 1.18, g1 = 1.01, g2 = 1.16, g3 = 0.57 -> keep g0, g2 -> e0, e1, e4, e5.
// Top-2 of c: e0 (1.15), e4 (0.79); e2 (0.86) is out because its group was dropped.
// Weights use s, not c: 0.9 / (0.9 + 0.8 + 1e-20) * 2.5 = 2.25/1.7 = 1.3235294117647058,
//                       0.8 / 1.7 * 2.5 = 2/1.7 = 1.1764705882352942.
// Without the bias (c = s): g0 = 0.95, g1 = 0.97, g2 = 1.15, g3 = 0.6 -> keep g2, g1 ->
// top-2 of {0.85, 0.12, 0.8, 0.35} = e2, e4: the bias changes the choice.
HandCase deepseek_v3_case() {
  RoutingRule r = greedy_rule(8, 2, Scoring::sigmoid, true, 2.5f);
  r.method = TopKMethod::noaux_tc;
  r.n_group = 4;
  r.topk_group = 2;
  r.use_bias = true;
  r.renorm_epsilon = 1e-20f;
  return {r, logit_of({0.9, 0.05, 0.85, 0.12, 0.8, 0.35, 0.2, 0.4}),
          {0.25f, -0.02f, 0.01f, 0.03f, -0.01f, 0.02f, -0.03f, 0.0f}, {0, 4},
          {1.3235294117647058, 1.1764705882352942}};
}

// Equal logits: every score is 1/4; ties go to the lower index -> e0, e1; renormalised 1/2 each.
HandCase equal_logits_case() {
  return {greedy_rule(4, 2, Scoring::softmax, true), {0.0, 0.0, 0.0, 0.0}, {}, {0, 1}, {0.5, 0.5}};
}

// A three-way tie at the top: ln{2, 7, 1, 8, 2, 8, 1, 8}, k = 2. e3, e5, e7 all score 8/37;
// the lower two win -> e3, e5, renormalised 8/16 = 0.5 each.
HandCase three_way_tie_case() {
  return {greedy_rule(8, 2, Scoring::softmax, true), ln_of({2, 7, 1, 8, 2, 8, 1, 8}), {}, {3, 5}, {0.5, 0.5}};
}

// Equal group scores (group_limited_greedy): ln{1, 2, 3, 6, 1, 5, 6, 4}, 4 groups, topk_group = 1, k = 2.
// Group max: g0 = 2, g1 = 6, g2 = 5, g3 = 6: g1 and g3 tie -> g1 (lower) -> candidates e2, e3.
// Top-2: e3 (6), e2 (3). (Greedy would take e3, e6.) Renormalised: 6/9 = 0.666..., 3/9 = 0.333...
HandCase equal_groups_case() {
  RoutingRule r = greedy_rule(8, 2, Scoring::softmax, true);
  r.method = TopKMethod::group_limited_greedy;
  r.n_group = 4;
  r.topk_group = 1;
  return {r, ln_of({1, 2, 3, 6, 1, 5, 6, 4}), {}, {3, 2}, {0.6666666666666666, 0.3333333333333333}};
}

// Equal group scores (noaux_tc): sigmoid of logits {0, 0, 0, 0} = 0.5 each, zero bias; 2 groups of 2,
// topk_group = 1, k = 1. Both group sums are 1.0 -> g0 -> e0 (ties again to the lower index).
// Not renormalised: 0.5 * 2.5 = 1.25.
HandCase equal_noaux_groups_case() {
  RoutingRule r = greedy_rule(4, 1, Scoring::sigmoid, false, 2.5f);
  r.method = TopKMethod::noaux_tc;
  r.n_group = 2;
  r.topk_group = 1;
  r.use_bias = true;
  return {r, {0.0, 0.0, 0.0, 0.0}, {0.0f, 0.0f, 0.0f, 0.0f}, {0}, {1.25}};
}

void expect_reference(const HandCase& c) {
  const Routing got = reference::route(c.rule, c.logits, c.bias.empty() ? nullptr : c.bias.data(), 1);
  EXPECT_EQ(got.ids, c.ids);
  ASSERT_EQ(got.weights.size(), c.weights.size());
  for (size_t j = 0; j < c.weights.size(); ++j) EXPECT_NEAR(got.weights[j], c.weights[j], 1e-12) << "j = " << j;
}

void expect_cpu(const HandCase& c) {
  const int E = c.rule.experts, k = c.rule.top_k;
  std::vector<float> logits(c.logits.begin(), c.logits.end());
  std::vector<float> scratch(3 * static_cast<size_t>(E));
  std::vector<int32_t> ids(k, -1);
  std::vector<float> weights(k, std::numeric_limits<float>::quiet_NaN());
  cpu::route_token(c.rule, logits.data(), c.bias.empty() ? nullptr : c.bias.data(), ids.data(), weights.data(),
                   scratch.data());
  EXPECT_EQ(ids, c.ids);
  // fp32 softmax/sigmoid: 1e-6 absolute, relative for the weights scaled above 1.
  for (int j = 0; j < k; ++j)
    EXPECT_NEAR(weights[j], c.weights[j], 1e-6 * std::max(1.0, std::abs(c.weights[j]))) << "j = " << j;
}

// ---- The reference on the hand-worked cases -------------------------------------------------------

TEST(ReferenceRouting, MixtralSoftmaxGreedyRenormalised) { expect_reference(mixtral_case()); }
TEST(ReferenceRouting, Qwen2MoeNotRenormalised) { expect_reference(qwen2_case()); }
TEST(ReferenceRouting, Qwen3MoeRenormalised) { expect_reference(qwen3_case()); }
TEST(ReferenceRouting, DeepSeekV2GroupLimitedGreedyScaled) { expect_reference(deepseek_v2_case()); }
TEST(ReferenceRouting, DeepSeekV3NoauxTcBiasChangesChoiceNotWeights) { expect_reference(deepseek_v3_case()); }

TEST(ReferenceRouting, DeepSeekV2WithoutGroupsWouldChooseDifferently) {
  HandCase c = deepseek_v2_case();
  c.rule.method = TopKMethod::greedy;
  // Greedy top-3 of ln{9, 1, 2, 8, 7, 10, 3, 4}: e5 (10), e0 (9), e3 (8) -> 16 * 8/44 = 2.9090...
  c.ids = {5, 0, 3};
  c.weights = {3.6363636363636362, 3.272727272727273, 2.909090909090909};
  expect_reference(c);
}

TEST(ReferenceRouting, DeepSeekV3WithoutBiasWouldChooseDifferently) {
  HandCase c = deepseek_v3_case();
  c.rule.use_bias = false;
  // Worked out above: e2 (0.85), e4 (0.8); 0.85/1.65 * 2.5 = 1.2878787..., 0.8/1.65 * 2.5 = 1.2121212...
  c.ids = {2, 4};
  c.weights = {1.2878787878787878, 1.2121212121212124};
  expect_reference(c);
}

TEST(ReferenceRouting, EqualLogitsGoToLowerIndex) {
  expect_reference(equal_logits_case());
  expect_reference(three_way_tie_case());
}

TEST(ReferenceRouting, EqualGroupScoresGoToLowerGroup) {
  expect_reference(equal_groups_case());
  expect_reference(equal_noaux_groups_case());
}

TEST(ReferenceRouting, RoutesEachTokenOnItsOwnRow) {
  // Two tokens: Mixtral's logits, then the same reversed (ln{6, 7, 4, 3, 8, 2, 5, 1}):
  // top-2 e4 (8), e1 (7) -> 8/15, 7/15.
  const HandCase c = mixtral_case();
  std::vector<double> logits = c.logits;
  logits.insert(logits.end(), c.logits.rbegin(), c.logits.rend());
  const Routing got = reference::route(c.rule, logits, nullptr, 2);
  EXPECT_EQ(got.ids, (std::vector<int32_t>{3, 6, 4, 1}));
  const std::vector<double> want = {0.5333333333333333, 0.4666666666666667, 0.5333333333333333, 0.4666666666666667};
  for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(got.weights[i], want[i], 1e-12);
}

TEST(ReferenceRouting, RouterLogitsAccumulateInDouble) {
  // x = {1, 2}, router rows {0.5, -1} and {0.25, 0.25}: logits 0.5 - 2 = -1.5 and 0.25 + 0.5 = 0.75.
  const std::vector<float> x = {1.0f, 2.0f}, router = {0.5f, -1.0f, 0.25f, 0.25f};
  EXPECT_EQ(reference::router_logits(x.data(), router.data(), 1, 2, 2), (std::vector<double>{-1.5, 0.75}));
}

// ---- The near-tie rule ----------------------------------------------------------------------------

// Sigmoid greedy, k = 2, scores {0.9, 0.6, 0.59999, 0.2}: the reference takes e0, e1; e2 is 1e-5 short.
RoutingRule near_tie_rule() { return greedy_rule(4, 2, Scoring::sigmoid, true); }

TEST(ReferenceNearTie, FlipWithinTieGapIsAdoptedInEngineOrder) {
  const std::vector<double> logits = logit_of({0.9, 0.6, 0.59999, 0.2});
  const std::vector<int32_t> engine = {2, 0};  // the flip, and the engine's own order
  RoutingAgreement agreement;
  const Routing got = reference::route(near_tie_rule(), logits, nullptr, 1, engine.data(), 1e-3, &agreement);
  EXPECT_EQ(got.ids, engine);
  // Weights from the reference's scores: 0.59999 / 1.49999 = 0.3999959999733332, 0.9 / 1.49999 = 0.6000040000266669.
  EXPECT_NEAR(got.weights[0], 0.3999959999733332, 1e-12);
  EXPECT_NEAR(got.weights[1], 0.6000040000266669, 1e-12);
  EXPECT_EQ(agreement.tokens_differing, 1);
  EXPECT_EQ(agreement.tokens_adopted, 1);
  EXPECT_NEAR(agreement.max_adopted_gap, 1e-5, 1e-12);  // 0.6 - 0.59999
  EXPECT_EQ(agreement.min_rejected_gap, 0.0);
}

TEST(ReferenceNearTie, SameSetInAnotherOrderIsNotADifference) {
  const std::vector<double> logits = logit_of({0.9, 0.6, 0.59999, 0.2});
  const std::vector<int32_t> engine = {1, 0};
  RoutingAgreement agreement;
  const Routing got = reference::route(near_tie_rule(), logits, nullptr, 1, engine.data(), 1e-3, &agreement);
  EXPECT_EQ(got.ids, (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(agreement.tokens_differing, 0);
}

TEST(ReferenceNearTie, DifferentSetBeyondTieGapIsRejected) {
  // Token 0: scores {0.9, 0.6, 0.5, 0.2}, engine e0, e2: e2 is 0.1 short of e1 -> gap 0.1.
  // Token 1: same scores, engine e0, e3: 0.6 - 0.2 -> gap 0.4.
  // Token 2: agrees. The smallest rejected gap is 0.1; rejected tokens keep the reference's ids.
  std::vector<double> logits;
  for (int t = 0; t < 3; ++t) {
    const std::vector<double> row = logit_of({0.9, 0.6, 0.5, 0.2});
    logits.insert(logits.end(), row.begin(), row.end());
  }
  const std::vector<int32_t> engine = {0, 2, 0, 3, 0, 1};
  RoutingAgreement agreement;
  const Routing got = reference::route(near_tie_rule(), logits, nullptr, 3, engine.data(), 1e-3, &agreement);
  EXPECT_EQ(got.ids, (std::vector<int32_t>{0, 1, 0, 1, 0, 1}));
  EXPECT_EQ(agreement.tokens_differing, 2);
  EXPECT_EQ(agreement.tokens_adopted, 0);
  EXPECT_EQ(agreement.max_adopted_gap, 0.0);
  EXPECT_NEAR(agreement.min_rejected_gap, 0.1, 1e-12);
}

TEST(ReferenceNearTie, DroppingTheBestExpertIsRejected) {
  // Engine e1, e2 instead of e0, e1: e2 is only 1e-5 below the reference's k-th (e1), but the engine
  // passed over e0 (0.9) to take it: gap 0.9 - 0.59999 = 0.30001. A real bug, not a tie.
  const std::vector<double> logits = logit_of({0.9, 0.6, 0.59999, 0.2});
  const std::vector<int32_t> engine = {1, 2};
  RoutingAgreement agreement;
  const Routing got = reference::route(near_tie_rule(), logits, nullptr, 1, engine.data(), 1e-3, &agreement);
  EXPECT_EQ(got.ids, (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(agreement.tokens_adopted, 0);
  EXPECT_NEAR(agreement.min_rejected_gap, 0.30001, 1e-12);
}

TEST(ReferenceNearTie, ImpossibleIdsAreRejectedWithInfiniteGap) {
  const std::vector<double> logits = logit_of({0.9, 0.6, 0.59999, 0.2});
  for (const std::vector<int32_t>& engine : {std::vector<int32_t>{0, 0}, std::vector<int32_t>{0, 4}}) {
    RoutingAgreement agreement;
    reference::route(near_tie_rule(), logits, nullptr, 1, engine.data(), 1e-3, &agreement);
    EXPECT_EQ(agreement.tokens_differing, 1);
    EXPECT_EQ(agreement.tokens_adopted, 0);
    EXPECT_EQ(agreement.min_rejected_gap, std::numeric_limits<double>::infinity());
  }
}

// group_limited_greedy, sigmoid, 4 groups of 2, topk_group = 1, k = 2.
// scores {0.9, 0.3, 0.89999, 0.7, 0.1, 0.2, 0.1, 0.2}: group max g0 = 0.9, g1 = 0.89999 -> the
// reference keeps g0 -> e0, e1.
RoutingRule group_near_tie_rule() {
  RoutingRule r = greedy_rule(8, 2, Scoring::sigmoid, true);
  r.method = TopKMethod::group_limited_greedy;
  r.n_group = 4;
  r.topk_group = 1;
  return r;
}

TEST(ReferenceNearTie, GroupFlipWithinTieGapIsAdopted) {
  // The engine kept g1 instead: e2, e3. Inside g1 it chose the only two experts (expert gap 0); the
  // group gap is 0.9 - 0.89999 = 1e-5.
  // Weights: 0.89999 / 1.59999 = 0.56249726560791, 0.7 / 1.59999 = 0.4375027343920899.
  const std::vector<double> logits = logit_of({0.9, 0.3, 0.89999, 0.7, 0.1, 0.2, 0.1, 0.2});
  const std::vector<int32_t> engine = {2, 3};
  RoutingAgreement agreement;
  const Routing got = reference::route(group_near_tie_rule(), logits, nullptr, 1, engine.data(), 1e-3, &agreement);
  EXPECT_EQ(got.ids, engine);
  EXPECT_NEAR(got.weights[0], 0.56249726560791, 1e-12);
  EXPECT_NEAR(got.weights[1], 0.4375027343920899, 1e-12);
  EXPECT_EQ(agreement.tokens_adopted, 1);
  EXPECT_NEAR(agreement.max_adopted_gap, 1e-5, 1e-12);
}

TEST(ReferenceNearTie, ExpertsFromTooManyGroupsAreRejected) {
  // e0 (g0) and e2 (g1) together need two kept groups, but topk_group = 1: no tie explains it.
  const std::vector<double> logits = logit_of({0.9, 0.3, 0.89999, 0.7, 0.1, 0.2, 0.1, 0.2});
  const std::vector<int32_t> engine = {0, 2};
  RoutingAgreement agreement;
  const Routing got = reference::route(group_near_tie_rule(), logits, nullptr, 1, engine.data(), 1e-3, &agreement);
  EXPECT_EQ(got.ids, (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(agreement.tokens_adopted, 0);
  EXPECT_EQ(agreement.min_rejected_gap, std::numeric_limits<double>::infinity());
}

TEST(ReferenceNearTie, GroupGapBeyondTieGapIsRejected) {
  // As above but g1's best is 0.8: keeping g1 needs a group gap of 0.9 - 0.8 = 0.1.
  const std::vector<double> logits = logit_of({0.9, 0.3, 0.8, 0.7, 0.1, 0.2, 0.1, 0.2});
  const std::vector<int32_t> engine = {2, 3};
  RoutingAgreement agreement;
  reference::route(group_near_tie_rule(), logits, nullptr, 1, engine.data(), 1e-3, &agreement);
  EXPECT_EQ(agreement.tokens_adopted, 0);
  EXPECT_NEAR(agreement.min_rejected_gap, 0.1, 1e-12);
}

TEST(ReferenceNearTie, MarginIsTheClosestCallOfTheReferencesOwnChoice) {
  // Greedy k = 2. Token 0, scores {0.9, 0.6, 0.5, 0.2}: e1 beats e2 by 0.1. Token 1,
  // {0.9, 0.6, 0.59999, 0.2}: by 1e-5, inside the tie gap. No engine ids are needed for this.
  std::vector<double> logits = logit_of({0.9, 0.6, 0.5, 0.2});
  const std::vector<double> close = logit_of({0.9, 0.6, 0.59999, 0.2});
  logits.insert(logits.end(), close.begin(), close.end());
  RoutingAgreement agreement;
  reference::route(near_tie_rule(), logits, nullptr, 2, nullptr, 1e-3, &agreement);
  EXPECT_NEAR(agreement.min_margin, 1e-5, 1e-12);
  EXPECT_EQ(agreement.tokens_within_tie_gap, 1);
  EXPECT_EQ(agreement.tokens_differing, 0);
  // Group-limited, topk_group = 1: g0 (best 0.9) is kept over g1 (best 0.8) by 0.1, and both of g0's
  // experts are taken, so no expert was passed over: the margin is the group gap.
  RoutingAgreement groups;
  reference::route(group_near_tie_rule(), logit_of({0.9, 0.3, 0.8, 0.7, 0.1, 0.2, 0.1, 0.2}), nullptr, 1, nullptr,
                   1e-3, &groups);
  EXPECT_NEAR(groups.min_margin, 0.1, 1e-12);
  EXPECT_EQ(groups.tokens_within_tie_gap, 0);
}

// ---- Experts, shared MLP, layer, compare ----------------------------------------------------------

// H = 2, I = 1, E = 2.
//   e0: W1 = {0.5, 0.25}, W3 = {1, -1},   W2 = {2, -3}
//   e1: W1 = {1, -1},     W3 = {0.5, 0.5}, W2 = {1, 4}
// silu(1) = 1/(1 + e^-1) = 0.7310585786300049, silu(-1) = -1/(1 + e) = -0.2689414213699951.
const std::vector<float> k_w13 = {0.5f, 0.25f, 1.0f, -1.0f, 1.0f, -1.0f, 0.5f, 0.5f};
const std::vector<float> k_w2 = {2.0f, -3.0f, 1.0f, 4.0f};

TEST(ReferenceExperts, TinyHandWorked) {
  // Token 0, x = {1, 2}, ids {1, 0}, weights {0.25, 0.75}:
  //   e0: h = 0.5 + 0.5 = 1, u = 1 - 2 = -1, a = -silu(1) = -0.7310585786300049,
  //       y0 = {2a, -3a} = {-1.4621171572600098, 2.193175735890015}
  //   e1: h = 1 - 2 = -1, u = 0.5 + 1 = 1.5, a = 1.5 silu(-1) = -0.40341213205499266,
  //       y1 = {a, 4a} = {-0.40341213205499266, -1.6136485282199706}
  //   out = 0.75 y0 + 0.25 y1 = {-1.1974409009587557, 1.2414696698625185}
  // Token 1, x = {4, -4}, ids {0, 1}, weights {0.5, 0.25}:
  //   e0: h = 2 - 1 = 1, u = 4 + 4 = 8, a = 8 silu(1) = 5.848468629040039 -> y0 = {11.696937258080078, -17.545405887120117}
  //   e1: u = 2 - 2 = 0 -> y1 = 0
  //   out = 0.5 y0 = {5.848468629040039, -8.772702943560059}
  const std::vector<float> x = {1.0f, 2.0f, 4.0f, -4.0f};
  const std::vector<int32_t> ids = {1, 0, 0, 1};
  const std::vector<double> w = {0.25, 0.75, 0.5, 0.25};
  const std::vector<double> out =
      reference::experts_path(x.data(), 2, 2, 1, 2, ids.data(), w.data(), k_w13.data(), k_w2.data());
  const std::vector<double> want = {-1.1974409009587557, 1.2414696698625185, 5.848468629040039, -8.772702943560059};
  ASSERT_EQ(out.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(out[i], want[i], 1e-12) << "i = " << i;
}

TEST(ReferenceSharedMlp, GatedAndUngated) {
  // e0's MLP as the shared expert, x = {1, 2}: MLP(x) = y0 = {-1.4621171572600098, 2.193175735890015}.
  // Gate w_g = {1, -1}: x·w_g = -1, sigmoid(-1) = 0.2689414213699951 -> {-0.3932238664829637, 0.5898357997244456}.
  const std::vector<float> x = {1.0f, 2.0f}, gate = {1.0f, -1.0f};
  reference::SharedMlp mlp{k_w13.data(), k_w2.data(), nullptr, 1};
  std::vector<double> out = reference::shared_mlp(x.data(), 1, 2, mlp);
  EXPECT_NEAR(out[0], -1.4621171572600098, 1e-12);
  EXPECT_NEAR(out[1], 2.193175735890015, 1e-12);
  mlp.gate_w = gate.data();
  out = reference::shared_mlp(x.data(), 1, 2, mlp);
  EXPECT_NEAR(out[0], -0.3932238664829637, 1e-12);
  EXPECT_NEAR(out[1], 0.5898357997244456, 1e-12);
}

TEST(ReferenceLayer, RouterExpertsAndGatedShared) {
  // Router rows e0 = {1, 0}, e1 = {0, 1}; x = {1, 2} -> logits {1, 2}; softmax, k = 1, renormalised
  // -> e1 with weight 1. Routed: y1 = {-0.40341213205499266, -1.6136485282199706}.
  // Shared (e0's weights, gate {1, -1}): {-0.3932238664829637, 0.5898357997244456}.
  // Sum: {-0.7966359985379563, -1.0238127284955252}.
  const std::vector<float> x = {1.0f, 2.0f}, router = {1.0f, 0.0f, 0.0f, 1.0f}, gate = {1.0f, -1.0f};
  reference::LayerView layer;
  layer.rule = greedy_rule(2, 1, Scoring::softmax, true);
  layer.hidden = 2;
  layer.intermediate = 1;
  layer.router = router.data();
  layer.w13 = k_w13.data();
  layer.w2 = k_w2.data();
  layer.shared.push_back({k_w13.data(), k_w2.data(), gate.data(), 1});
  std::vector<double> out = reference::moe_layer(layer, x.data(), 1);
  EXPECT_NEAR(out[0], -0.7966359985379563, 1e-12);
  EXPECT_NEAR(out[1], -1.0238127284955252, 1e-12);

  // An engine that routed to e0 instead (score gap e/(1+e) - 1/(1+e) = 0.4621...) is rejected: the
  // reference keeps e1, and the output comparison would fail.
  const int32_t engine_ids[] = {0};
  RoutingAgreement agreement;
  out = reference::moe_layer(layer, x.data(), 1, engine_ids, &agreement);
  EXPECT_NEAR(out[0], -0.7966359985379563, 1e-12);
  EXPECT_EQ(agreement.tokens_differing, 1);
  EXPECT_EQ(agreement.tokens_adopted, 0);
  EXPECT_NEAR(agreement.min_rejected_gap, 0.46211715726000974, 1e-12);
}

TEST(ReferenceCompare, NormsAndNonFinite) {
  // y = {1, 2}, r = {1, 2.5}: ||y - r|| = 0.5, ||r|| = sqrt(7.25) -> 0.18569533817705186; max 0.5 / 2.5 = 0.2.
  const std::vector<float> y = {1.0f, 2.0f};
  reference::Comparison c = reference::compare(y.data(), {1.0, 2.5});
  EXPECT_TRUE(c.finite);
  EXPECT_NEAR(c.rel_norm, 0.18569533817705186, 1e-15);
  EXPECT_NEAR(c.rel_max, 0.2, 1e-15);
  EXPECT_TRUE(c.passes(0.2));
  EXPECT_FALSE(c.passes(0.1));

  EXPECT_EQ(reference::compare(y.data(), {1.0, 2.0}).rel_norm, 0.0);

  // Zero reference: rel_norm is ||y|| = sqrt(5).
  c = reference::compare(y.data(), {0.0, 0.0});
  EXPECT_NEAR(c.rel_norm, 2.23606797749979, 1e-14);

  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    const std::vector<float> yb = {1.0f, bad};
    c = reference::compare(yb.data(), {1.0, 2.0});
    EXPECT_FALSE(c.finite);
    EXPECT_FALSE(c.passes(1e30));
  }
  // NaN everywhere must not pass either, even against a zero reference.
  const std::vector<float> nan2 = {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::quiet_NaN()};
  EXPECT_FALSE(reference::compare(nan2.data(), {0.0, 0.0}).passes(1e30));
}

// ---- The CPU engine's route_token on the same hand-worked cases -----------------------------------

TEST(CpuRouteToken, MixtralSoftmaxGreedyRenormalised) { expect_cpu(mixtral_case()); }
TEST(CpuRouteToken, Qwen2MoeNotRenormalised) { expect_cpu(qwen2_case()); }
TEST(CpuRouteToken, Qwen3MoeRenormalised) { expect_cpu(qwen3_case()); }
TEST(CpuRouteToken, DeepSeekV2GroupLimitedGreedyScaled) { expect_cpu(deepseek_v2_case()); }
TEST(CpuRouteToken, DeepSeekV3NoauxTcBiasChangesChoiceNotWeights) { expect_cpu(deepseek_v3_case()); }

TEST(CpuRouteToken, EqualLogitsGoToLowerIndex) {
  expect_cpu(equal_logits_case());
  expect_cpu(three_way_tie_case());
}

TEST(CpuRouteToken, EqualGroupScoresGoToLowerGroup) {
  expect_cpu(equal_groups_case());
  expect_cpu(equal_noaux_groups_case());
}

TEST(CpuRouteToken, AgreesWithReferenceWithoutAdoptingAnything) {
  // The hand cases again, checked through the near-tie machinery: the engine's ids must match the
  // reference's outright (no near-tie is needed on any of them).
  for (const HandCase& c : {mixtral_case(), qwen2_case(), qwen3_case(), deepseek_v2_case(), deepseek_v3_case()}) {
    std::vector<float> logits(c.logits.begin(), c.logits.end()), scratch(3 * static_cast<size_t>(c.rule.experts));
    std::vector<int32_t> ids(c.rule.top_k);
    std::vector<float> weights(c.rule.top_k);
    cpu::route_token(c.rule, logits.data(), c.bias.empty() ? nullptr : c.bias.data(), ids.data(), weights.data(),
                     scratch.data());
    RoutingAgreement agreement;
    reference::route(c.rule, c.logits, c.bias.empty() ? nullptr : c.bias.data(), 1, ids.data(), 1e-3, &agreement);
    EXPECT_EQ(agreement.tokens_differing, 0) << to_string(c.rule.method);
  }
}

TEST(CpuRouteToken, Fp32RoundingFlipIsAdopted) {
  // logits {1, 0.5, 0.5 + 1e-9, 0}: in fp64 e2 beats e1 by ~1e-10 in score; in fp32 both logits round
  // to 0.5, so the engine takes the lower index e1. That is a legitimate flip and must be adopted.
  const RoutingRule rule = greedy_rule(4, 2, Scoring::softmax, true);
  const std::vector<double> logits = {1.0, 0.5, 0.5 + 1e-9, 0.0};
  const Routing ref = reference::route(rule, logits, nullptr, 1);
  ASSERT_EQ(ref.ids, (std::vector<int32_t>{0, 2}));
  const std::vector<float> logits32(logits.begin(), logits.end());
  std::vector<float> scratch(12), weights(2);
  std::vector<int32_t> ids(2);
  cpu::route_token(rule, logits32.data(), nullptr, ids.data(), weights.data(), scratch.data());
  ASSERT_EQ(ids, (std::vector<int32_t>{0, 1}));
  RoutingAgreement agreement;
  const Routing got = reference::route(rule, logits, nullptr, 1, ids.data(), 1e-3, &agreement);
  EXPECT_EQ(got.ids, ids);
  EXPECT_EQ(agreement.tokens_adopted, 1);
  EXPECT_GT(agreement.max_adopted_gap, 0.0);
  EXPECT_LT(agreement.max_adopted_gap, 1e-9);
}

}  // namespace
}  // namespace moeflow
