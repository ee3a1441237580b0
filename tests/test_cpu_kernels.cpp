// The CPU kernels against plain double-precision loops written here, on generated (never zero) data.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "graph/error.hpp"
#include "kernels/common/random.hpp"
#include "kernels/common/routing_rule.hpp"
#include "kernels/cpu/elementwise.hpp"
#include "kernels/cpu/permute.hpp"
#include "kernels/cpu/routing.hpp"
#include "kernels/cpu/swiglu_mlp.hpp"

namespace moeflow {
namespace {

constexpr uint64_t kSeed = 20240611;

// Inputs come straight from the generator, not through fill_uniform, so a fill_uniform bug
// cannot hide itself.
std::vector<float> random_values(size_t n, const std::string& name, float scale) {
  const uint64_t key = rng::stream_key(kSeed, rng::name_key(name));
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = rng::uniform_pm1(key, i) * scale;
  return v;
}

double rel_norm_error(const std::vector<float>& y, const std::vector<double>& r) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < r.size(); ++i) {
    num += (y[i] - r[i]) * (y[i] - r[i]);
    den += r[i] * r[i];
  }
  return std::sqrt(num / den);
}

bool better(double va, int ia, double vb, int ib) { return va > vb || (va == vb && ia < ib); }

// Sorted best-first under the tie rule.
std::vector<int> ranked(const std::vector<double>& v) {
  std::vector<int> idx(v.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::sort(idx.begin(), idx.end(), [&](int a, int b) { return better(v[a], a, v[b], b); });
  return idx;
}

struct RefRoute {
  std::vector<int32_t> ids;
  std::vector<double> weights;
};

RefRoute reference_route(const RoutingRule& rule, const float* logits, const float* bias) {
  const int n = rule.experts;
  std::vector<double> scores(n);
  if (rule.scoring == Scoring::sigmoid) {
    for (int e = 0; e < n; ++e) scores[e] = 1.0 / (1.0 + std::exp(-static_cast<double>(logits[e])));
  } else {
    double sum = 0.0;
    for (int e = 0; e < n; ++e) sum += std::exp(static_cast<double>(logits[e]));
    for (int e = 0; e < n; ++e) scores[e] = std::exp(static_cast<double>(logits[e])) / sum;
  }
  std::vector<double> choice = scores;
  if (rule.method == TopKMethod::noaux_tc && rule.use_bias) {
    for (int e = 0; e < n; ++e) choice[e] += bias[e];
  }
  std::vector<bool> allowed(n, true);
  if (rule.method != TopKMethod::greedy) {
    const int size = n / rule.n_group;
    std::vector<double> gscore(rule.n_group);
    for (int g = 0; g < rule.n_group; ++g) {
      std::vector<double> member(choice.begin() + g * size, choice.begin() + (g + 1) * size);
      std::sort(member.rbegin(), member.rend());
      gscore[g] = rule.method == TopKMethod::group_limited_greedy ? member[0]
                                                                  : member[0] + (size > 1 ? member[1] : 0.0);
    }
    const std::vector<int> order = ranked(gscore);
    std::vector<bool> kept(rule.n_group, false);
    for (int r = 0; r < rule.topk_group; ++r) kept[order[r]] = true;
    for (int e = 0; e < n; ++e) allowed[e] = kept[e / size];
  }
  std::vector<double> masked = choice;
  for (int e = 0; e < n; ++e) {
    if (!allowed[e]) masked[e] = -1e300;
  }
  const std::vector<int> order = ranked(masked);
  RefRoute out;
  double sum = 0.0;
  for (int j = 0; j < rule.top_k; ++j) {
    out.ids.push_back(order[j]);
    out.weights.push_back(scores[order[j]]);
    sum += scores[order[j]];
  }
  for (double& w : out.weights) {
    if (rule.renormalize) w /= sum + rule.renorm_epsilon;
    w *= rule.scale;
  }
  return out;
}

RoutingRule make_rule(int experts, int k, Scoring s, TopKMethod m, int n_group = 1, int topk_group = 1) {
  RoutingRule r;
  r.experts = experts;
  r.top_k = k;
  r.scoring = s;
  r.method = m;
  r.n_group = n_group;
  r.topk_group = topk_group;
  return r;
}

struct Routed {
  std::vector<int32_t> ids;
  std::vector<float> weights;
};

Routed route_one(const RoutingRule& rule, const std::vector<float>& logits, const float* bias = nullptr) {
  Routed r{std::vector<int32_t>(rule.top_k), std::vector<float>(rule.top_k)};
  std::vector<float> scratch(3 * static_cast<size_t>(rule.experts));
  cpu::route_token(rule, logits.data(), bias, r.ids.data(), r.weights.data(), scratch.data());
  return r;
}

// Routes many random tokens with route_tokens and checks ids exactly and weights to fp32 accuracy.
void expect_matches_reference(const RoutingRule& rule, const std::string& label) {
  const int64_t tokens = 53;
  const std::vector<float> logits = random_values(tokens * rule.experts, "logits." + label, 4.0f);
  const std::vector<float> bias = random_values(rule.experts, "bias." + label, 0.05f);
  std::vector<int32_t> ids(tokens * rule.top_k);
  std::vector<float> weights(tokens * rule.top_k);
  cpu::route_tokens(rule, logits.data(), bias.data(), tokens, ids.data(), weights.data());
  for (int64_t t = 0; t < tokens; ++t) {
    const RefRoute ref = reference_route(rule, logits.data() + t * rule.experts, bias.data());
    for (int j = 0; j < rule.top_k; ++j) {
      ASSERT_EQ(ids[t * rule.top_k + j], ref.ids[j]) << label << " token " << t << " slot " << j;
      EXPECT_NEAR(weights[t * rule.top_k + j], ref.weights[j], 1e-6 * std::max(1.0, std::abs(ref.weights[j])))
          << label << " token " << t << " slot " << j;
    }
  }
}

TEST(CpuRouting, RouterLogitsMatchDoubleLoop) {
  cpu::use_single_threaded_blas();
  const int64_t tokens = 37;
  const int hidden = 96, experts = 24;
  const auto x = random_values(tokens * hidden, "x", 1.0f);
  const auto w = random_values(experts * hidden, "router", 1.0f / std::sqrt(96.0f));
  std::vector<float> logits(tokens * experts);
  cpu::router_logits(x.data(), w.data(), tokens, hidden, experts, logits.data());
  std::vector<double> ref(tokens * experts);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int e = 0; e < experts; ++e) {
      double s = 0.0;
      for (int h = 0; h < hidden; ++h) s += static_cast<double>(x[t * hidden + h]) * w[e * hidden + h];
      ref[t * experts + e] = s;
    }
  }
  EXPECT_LT(rel_norm_error(logits, ref), 1e-6);
}

TEST(CpuRouting, GreedySoftmaxMatchesReference) {
  expect_matches_reference(make_rule(40, 6, Scoring::softmax, TopKMethod::greedy), "greedy_softmax");
}

TEST(CpuRouting, GreedySoftmaxRenormalizedMatchesReference) {
  RoutingRule rule = make_rule(40, 6, Scoring::softmax, TopKMethod::greedy);
  rule.renormalize = true;
  expect_matches_reference(rule, "greedy_softmax_renorm");
}

TEST(CpuRouting, GreedySigmoidScaledMatchesReference) {
  RoutingRule rule = make_rule(32, 4, Scoring::sigmoid, TopKMethod::greedy);
  rule.scale = 2.5f;
  expect_matches_reference(rule, "greedy_sigmoid_scaled");
}

TEST(CpuRouting, GroupLimitedGreedyMatchesReference) {
  RoutingRule rule = make_rule(64, 6, Scoring::softmax, TopKMethod::group_limited_greedy, 8, 3);
  rule.scale = 16.0f;
  expect_matches_reference(rule, "group_limited");
}

TEST(CpuRouting, NoauxTcWithBiasRenormAndScaleMatchesReference) {
  RoutingRule rule = make_rule(64, 8, Scoring::sigmoid, TopKMethod::noaux_tc, 8, 4);
  rule.use_bias = true;
  rule.renormalize = true;
  rule.renorm_epsilon = 1e-20f;
  rule.scale = 2.5f;
  expect_matches_reference(rule, "noaux_tc");
}

TEST(CpuRouting, NoauxTcWithoutBiasMatchesReference) {
  expect_matches_reference(make_rule(32, 3, Scoring::sigmoid, TopKMethod::noaux_tc, 4, 2), "noaux_tc_nobias");
}

TEST(CpuRouting, AllGroupsKeptEqualsGreedy) {
  expect_matches_reference(make_rule(16, 3, Scoring::softmax, TopKMethod::group_limited_greedy, 4, 4),
                           "all_groups");
}

TEST(CpuRouting, EqualLogitsGoToLowerExpertIndex) {
  const Routed r = route_one(make_rule(8, 3, Scoring::softmax, TopKMethod::greedy), std::vector<float>(8, 0.7f));
  EXPECT_EQ(r.ids, (std::vector<int32_t>{0, 1, 2}));
  for (float w : r.weights) EXPECT_FLOAT_EQ(w, 1.0f / 8.0f);
}

TEST(CpuRouting, PartialTiesKeepDescendingOrderThenLowerIndex) {
  const Routed r = route_one(make_rule(6, 4, Scoring::sigmoid, TopKMethod::greedy),
                             {0.1f, 0.9f, 0.5f, 0.9f, 0.5f, 0.9f});
  EXPECT_EQ(r.ids, (std::vector<int32_t>{1, 3, 5, 2}));
}

TEST(CpuRouting, GroupLimitedEqualGroupScoresGoToLowerGroup) {
  // Group maxima: g0 0.2, g1 0.9, g2 0.9, g3 0.9. g1 and g2 are kept, so experts 6 and 7 (0.9, 0.8)
  // lose to 3 and 4 even though 7 beats 4's group-mate 5.
  const Routed r = route_one(make_rule(8, 2, Scoring::sigmoid, TopKMethod::group_limited_greedy, 4, 2),
                             {0.1f, 0.2f, 0.5f, 0.9f, 0.9f, 0.3f, 0.9f, 0.8f});
  EXPECT_EQ(r.ids, (std::vector<int32_t>{3, 4}));
}

TEST(CpuRouting, NoauxTcEqualGroupSumsGoToLowerGroup) {
  // sigmoid(0) = 0.5, so the choice scores are g0 {0.75, 0.75}, g1 {1.0, 0.5}, g2 lower: g0 and g1
  // tie exactly at 1.5. Keeping one group must keep g0, although g1 holds the best expert.
  RoutingRule rule = make_rule(6, 2, Scoring::sigmoid, TopKMethod::noaux_tc, 3, 1);
  rule.use_bias = true;
  const std::vector<float> bias{0.25f, 0.25f, 0.5f, 0.0f, 0.0f, 0.0f};
  const Routed r = route_one(rule, {0.0f, 0.0f, 0.0f, 0.0f, -1.0f, -1.0f}, bias.data());
  EXPECT_EQ(r.ids, (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(r.weights, (std::vector<float>{0.5f, 0.5f}));
}

TEST(CpuRouting, NoauxTcDropsGroupsAndIgnoresBiasInWeights) {
  // 4 groups of 2, keep 2. Without bias, g3 (experts 6, 7) would win. Bias lifts experts 1 and 2 so
  // that g0 and g1 are kept; the weights are still the unbiased sigmoid scores.
  const std::vector<float> logits{-1.0f, -2.0f, -2.5f, -1.5f, -3.0f, -3.0f, 2.0f, 1.5f};
  const std::vector<float> bias{0.0f, 3.0f, 3.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  RoutingRule rule = make_rule(8, 3, Scoring::sigmoid, TopKMethod::noaux_tc, 4, 2);
  rule.use_bias = true;
  const Routed r = route_one(rule, logits, bias.data());
  auto sig = [](float v) { return 1.0 / (1.0 + std::exp(-static_cast<double>(v))); };
  // Choice: e1 = sig(-2) + 3, e2 = sig(-2.5) + 3: groups g0 and g1 win, and expert 6 (the best
  // unbiased score) is excluded with its group.
  EXPECT_EQ(r.ids, (std::vector<int32_t>{1, 2, 0}));
  EXPECT_NEAR(r.weights[0], sig(-2.0f), 1e-7);
  EXPECT_NEAR(r.weights[1], sig(-2.5f), 1e-7);
  EXPECT_NEAR(r.weights[2], sig(-1.0f), 1e-7);

  // Unbiased, g3 (sum 1.70) and g0 (0.39) are kept.
  rule.use_bias = false;
  EXPECT_EQ(route_one(rule, logits, bias.data()).ids, (std::vector<int32_t>{6, 7, 0}));
}

TEST(CpuRouting, RenormalizeDividesBySumPlusEpsilonThenScales) {
  RoutingRule rule = make_rule(5, 2, Scoring::sigmoid, TopKMethod::greedy);
  rule.renormalize = true;
  rule.renorm_epsilon = 0.25f;
  rule.scale = 3.0f;
  const std::vector<float> logits{0.3f, -0.2f, 1.1f, 0.9f, -1.0f};
  const Routed r = route_one(rule, logits);
  const RefRoute ref = reference_route(rule, logits.data(), nullptr);
  ASSERT_EQ(r.ids, (std::vector<int32_t>{2, 3}));
  EXPECT_NEAR(r.weights[0], ref.weights[0], 1e-6);
  EXPECT_NEAR(r.weights[1], ref.weights[1], 1e-6);
}

TEST(CpuRouting, InconsistentRuleIsRefused) {
  RoutingRule rule = make_rule(8, 3, Scoring::softmax, TopKMethod::group_limited_greedy, 4, 1);
  try {
    route_one(rule, std::vector<float>(8, 0.0f));
    FAIL() << "1 group of 2 experts cannot supply top_k = 3";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::bad_input);
  }
}

// Checks offsets against counts and that each expert's rows hold its (t, j) pairs in ascending order.
void expect_valid_permutation(const std::vector<int32_t>& ids, int64_t tokens, int k, int experts) {
  std::vector<int32_t> offsets(experts + 1, -1), slot_of(tokens * k, -1);
  cpu::build_permutation(ids.data(), tokens, k, experts, offsets.data(), slot_of.data());
  std::vector<int32_t> next(experts);
  int32_t start = 0;
  for (int e = 0; e < experts; ++e) {
    EXPECT_EQ(offsets[e], start) << "expert " << e;
    next[e] = start;
    start += static_cast<int32_t>(std::count(ids.begin(), ids.end(), e));
  }
  EXPECT_EQ(offsets[experts], tokens * k);
  for (int64_t i = 0; i < tokens * k; ++i) EXPECT_EQ(slot_of[i], next[ids[i]]++) << "flat slot " << i;
}

std::vector<int32_t> random_ids(int64_t n, int experts, const std::string& name) {
  const uint64_t key = rng::stream_key(kSeed, rng::name_key(name));
  std::vector<int32_t> ids(n);
  for (int64_t i = 0; i < n; ++i) {
    const float u = rng::uniform_pm1(key, i);  // [-1, 1)
    ids[i] = std::min(experts - 1, static_cast<int>((u + 1.0f) * 0.5f * experts));
  }
  return ids;
}

TEST(CpuPermute, RandomIdsWithZeroTokenExperts) {
  // Only even experts are used, so every odd expert has no rows.
  std::vector<int32_t> ids = random_ids(61 * 4, 8, "perm.ids");
  for (int32_t& e : ids) e *= 2;
  expect_valid_permutation(ids, 61, 4, 16);
}

TEST(CpuPermute, AllTokensOnOneExpert) { expect_valid_permutation(std::vector<int32_t>(40 * 2, 5), 40, 2, 8); }

TEST(CpuPermute, SingleToken) { expect_valid_permutation({3, 0, 6}, 1, 3, 7); }

TEST(CpuPermute, ZeroTokens) {
  std::vector<int32_t> offsets(5, -1);
  cpu::build_permutation(nullptr, 0, 2, 4, offsets.data(), nullptr);
  EXPECT_EQ(offsets, (std::vector<int32_t>(5, 0)));
}

TEST(CpuPermute, BadExpertIdNamesTokenSlotIdAndExperts) {
  std::vector<int32_t> ids = random_ids(5 * 2, 4, "perm.bad");
  ids[3 * 2 + 1] = 9;
  std::vector<int32_t> offsets(5), slot_of(10);
  try {
    cpu::build_permutation(ids.data(), 5, 2, 4, offsets.data(), slot_of.data());
    FAIL() << "expert id 9 accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::bad_input);
    const std::string msg = e.what();
    EXPECT_NE(msg.find("token 3"), std::string::npos) << msg;
    EXPECT_NE(msg.find("slot 1"), std::string::npos) << msg;
    EXPECT_NE(msg.find("9"), std::string::npos) << msg;
    EXPECT_NE(msg.find("4)"), std::string::npos) << msg;
  }
}

TEST(CpuPermute, GatherPlacesEachTokenAtItsSlots) {
  const int64_t tokens = 29;
  const int k = 3, hidden = 40, experts = 6;
  const auto ids = random_ids(tokens * k, experts, "gather.ids");
  const auto x = random_values(tokens * hidden, "gather.x", 1.0f);
  std::vector<int32_t> offsets(experts + 1), slot_of(tokens * k);
  cpu::build_permutation(ids.data(), tokens, k, experts, offsets.data(), slot_of.data());
  std::vector<float> rows(tokens * k * hidden);
  cpu::gather_rows(x.data(), slot_of.data(), tokens, k, hidden, rows.data());
  for (int64_t t = 0; t < tokens; ++t) {
    for (int j = 0; j < k; ++j) {
      const float* row = rows.data() + static_cast<int64_t>(slot_of[t * k + j]) * hidden;
      EXPECT_TRUE(std::equal(row, row + hidden, x.data() + t * hidden)) << "token " << t << " slot " << j;
    }
  }
}

TEST(CpuPermute, CombineIsWeightedSumAndDeterministic) {
  const int64_t tokens = 33;
  const int k = 4, hidden = 48, experts = 5;
  const auto ids = random_ids(tokens * k, experts, "combine.ids");
  const auto y = random_values(tokens * k * hidden, "combine.y", 1.0f);
  const auto w = random_values(tokens * k, "combine.w", 1.0f);
  std::vector<int32_t> offsets(experts + 1), slot_of(tokens * k);
  cpu::build_permutation(ids.data(), tokens, k, experts, offsets.data(), slot_of.data());
  std::vector<float> out(tokens * hidden), again(tokens * hidden);
  cpu::combine_rows(y.data(), slot_of.data(), w.data(), tokens, k, hidden, out.data());
  cpu::combine_rows(y.data(), slot_of.data(), w.data(), tokens, k, hidden, again.data());
  EXPECT_EQ(out, again);
  std::vector<double> ref(tokens * hidden, 0.0);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int j = 0; j < k; ++j) {
      for (int h = 0; h < hidden; ++h) {
        ref[t * hidden + h] += static_cast<double>(w[t * k + j]) * y[slot_of[t * k + j] * hidden + h];
      }
    }
  }
  EXPECT_LT(rel_norm_error(out, ref), 1e-6);
}

// y = (silu(x·W1ᵀ) ⊙ x·W3ᵀ)·W2ᵀ for one row, in double over the fp32 weights.
std::vector<double> reference_swiglu(const float* x, int hidden, int inter, const float* w13, const float* w2) {
  std::vector<double> act(inter);
  for (int i = 0; i < inter; ++i) {
    double g = 0.0, u = 0.0;
    for (int h = 0; h < hidden; ++h) {
      g += static_cast<double>(x[h]) * w13[static_cast<int64_t>(i) * hidden + h];
      u += static_cast<double>(x[h]) * w13[static_cast<int64_t>(inter + i) * hidden + h];
    }
    act[i] = g / (1.0 + std::exp(-g)) * u;
  }
  std::vector<double> y(hidden);
  for (int h = 0; h < hidden; ++h) {
    double s = 0.0;
    for (int i = 0; i < inter; ++i) s += act[i] * w2[static_cast<int64_t>(h) * inter + i];
    y[h] = s;
  }
  return y;
}

TEST(CpuSwiglu, GroupedMlpMatchesReferenceWithEmptyAndMultiBlockExperts) {
  cpu::use_single_threaded_blas();
  const int experts = 10, hidden = 64, inter = 48;
  // Experts 0, 2 and 5 have no rows; expert 3 spans three 64-row blocks, the last one partial (22
  // rows: two small-rows passes); experts 4 and 6 have one and two rows (the matrix-vector path);
  // experts 7, 8 and 9 have 17, 32 (two small-rows passes) and 33 rows (CBLAS).
  const std::vector<int32_t> counts{0, 5, 0, 150, 1, 0, 2, 17, 32, 33};
  std::vector<int32_t> offsets(experts + 1, 0);
  for (int e = 0; e < experts; ++e) offsets[e + 1] = offsets[e] + counts[e];
  const int64_t rows_n = offsets[experts];
  const auto rows = random_values(rows_n * hidden, "mlp.rows", 1.0f);
  const auto w13 = random_values(static_cast<size_t>(experts) * 2 * inter * hidden, "mlp.w13",
                                 1.0f / std::sqrt(static_cast<float>(hidden)));
  const auto w2 = random_values(static_cast<size_t>(experts) * hidden * inter, "mlp.w2",
                                1.0f / std::sqrt(static_cast<float>(inter)));
  std::vector<float> out(rows_n * hidden), act(cpu::swiglu_workspace_floats(rows_n, inter));
  cpu::grouped_swiglu_mlp(rows.data(), offsets.data(), experts, hidden, inter, w13.data(), w2.data(), out.data(),
                          act.data());
  std::vector<double> ref;
  for (int e = 0; e < experts; ++e) {
    for (int32_t r = offsets[e]; r < offsets[e + 1]; ++r) {
      const auto y = reference_swiglu(rows.data() + static_cast<int64_t>(r) * hidden, hidden, inter,
                                      w13.data() + static_cast<int64_t>(e) * 2 * inter * hidden,
                                      w2.data() + static_cast<int64_t>(e) * hidden * inter);
      ref.insert(ref.end(), y.begin(), y.end());
    }
  }
  EXPECT_LT(rel_norm_error(out, ref), 1e-5);
}

TEST(CpuSwiglu, GroupedMlpWithNoRowsAtAllWritesNothing) {
  const std::vector<int32_t> offsets(4, 0);
  cpu::grouped_swiglu_mlp(nullptr, offsets.data(), 3, 16, 8, nullptr, nullptr, nullptr, nullptr);
}

void check_shared_mlp(bool gated) {
  cpu::use_single_threaded_blas();
  const int64_t tokens = 70;  // one full 64-row block and a partial one
  const int hidden = 96, inter = 80;
  const auto x = random_values(tokens * hidden, "shared.x", 1.0f);
  const auto w13 = random_values(2 * inter * hidden, "shared.w13", 1.0f / std::sqrt(static_cast<float>(hidden)));
  const auto w2 = random_values(hidden * inter, "shared.w2", 1.0f / std::sqrt(static_cast<float>(inter)));
  const auto gate = random_values(hidden, "shared.gate", 1.0f / std::sqrt(static_cast<float>(hidden)));
  std::vector<float> out(tokens * hidden), act(cpu::swiglu_workspace_floats(tokens, inter));
  cpu::swiglu_mlp(x.data(), tokens, hidden, inter, w13.data(), w2.data(), gated ? gate.data() : nullptr,
                  out.data(), act.data());
  std::vector<double> ref;
  for (int64_t t = 0; t < tokens; ++t) {
    auto y = reference_swiglu(x.data() + t * hidden, hidden, inter, w13.data(), w2.data());
    if (gated) {
      double dot = 0.0;
      for (int h = 0; h < hidden; ++h) dot += static_cast<double>(x[t * hidden + h]) * gate[h];
      for (double& v : y) v *= 1.0 / (1.0 + std::exp(-dot));
    }
    ref.insert(ref.end(), y.begin(), y.end());
  }
  EXPECT_LT(rel_norm_error(out, ref), 1e-5);
}

TEST(CpuSwiglu, SharedMlpWithoutGateMatchesReference) { check_shared_mlp(false); }

TEST(CpuSwiglu, SharedMlpWithSigmoidGateMatchesReference) { check_shared_mlp(true); }

TEST(CpuElementwise, SumArraysAddsInAddendOrder) {
  const int64_t n = 10007;  // several parallel chunks, the last one partial
  const auto a = random_values(n, "sum.a", 1.0f), b = random_values(n, "sum.b", 1e3f),
             c = random_values(n, "sum.c", 1e-3f);
  const float* addends[] = {a.data(), b.data(), c.data()};
  std::vector<float> out(n);
  cpu::sum_arrays(addends, 3, n, out.data());
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(out[i], (a[i] + b[i]) + c[i]) << i;
}

TEST(CpuElementwise, SumArraysInPlaceIntoFirstAddend) {
  const int64_t n = 5000;
  auto a = random_values(n, "sum.a", 1.0f);
  const auto b = random_values(n, "sum.b", 1.0f);
  const auto original = a;
  const float* addends[] = {a.data(), b.data()};
  cpu::sum_arrays(addends, 2, n, a.data());
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(a[i], original[i] + b[i]) << i;
}

TEST(CpuElementwise, FillUniformReproducibleScaledAndNeverZero) {
  const int64_t n = 20000;
  const uint64_t name = rng::name_key("layer0.w13");
  std::vector<float> first(n), second(n);
  cpu::fill_uniform(first.data(), n, kSeed, name, 0.125f, 0);
  cpu::fill_uniform(second.data(), n, kSeed, name, 0.125f, 0);
  EXPECT_EQ(first, second);
  const uint64_t key = rng::stream_key(kSeed, name);
  for (int64_t i = 0; i < n; ++i) {
    ASSERT_EQ(first[i], rng::uniform_pm1(key, i) * 0.125f) << i;
    ASSERT_NE(first[i], 0.0f) << i;
    ASSERT_LE(std::abs(first[i]), 0.125f) << i;
  }
  std::vector<float> other(n);
  cpu::fill_uniform(other.data(), n, kSeed, rng::name_key("layer0.w2"), 0.125f, 0);
  EXPECT_NE(first, other);
}

TEST(CpuElementwise, FillUniformSliceEqualsSliceOfFullGeneration) {
  const int64_t n = 20000, first = 12345, len = 3000;
  const uint64_t name = rng::name_key("x");
  std::vector<float> full(n), slice(len);
  cpu::fill_uniform(full.data(), n, 7, name, 1.0f);
  cpu::fill_uniform(slice.data(), len, 7, name, 1.0f, first);
  EXPECT_TRUE(std::equal(slice.begin(), slice.end(), full.begin() + first));
}

}  // namespace
}  // namespace moeflow
