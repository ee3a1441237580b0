// The plain reference. Every loop here is the obvious one on purpose: it is what the engine's fast
// paths are checked against, so it must be easy to read and hard to get wrong. Weights stay fp32 and
// are widened one element at a time inside fp64 accumulations.
#include "tests/reference/reference.hpp"

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "graph/error.hpp"

namespace moeflow::reference {
namespace {

constexpr double k_inf = std::numeric_limits<double>::infinity();

double sigmoid(double v) { return 1.0 / (1.0 + std::exp(-v)); }
double silu(double v) { return v / (1.0 + std::exp(-v)); }

bool is_group_method(const RoutingRule& rule) { return rule.method != TopKMethod::greedy; }

void check_rule(const RoutingRule& rule) {
  const std::string what = std::string("reference routing (") + to_string(rule.method) + "): ";
  if (rule.experts <= 0 || rule.top_k <= 0 || rule.top_k > rule.experts)
    fail_input(what + "need 0 < top_k <= experts, got top_k " + std::to_string(rule.top_k) + ", experts " +
               std::to_string(rule.experts));
  if (!is_group_method(rule)) return;
  if (rule.n_group <= 0 || rule.experts % rule.n_group != 0)
    fail_input(what + "n_group " + std::to_string(rule.n_group) + " must divide experts " +
               std::to_string(rule.experts));
  if (rule.topk_group <= 0 || rule.topk_group > rule.n_group)
    fail_input(what + "need 0 < topk_group <= n_group, got " + std::to_string(rule.topk_group));
  if (rule.topk_group * (rule.experts / rule.n_group) < rule.top_k)
    fail_input(what + "the kept groups hold fewer than top_k experts");
}

// Per-token routing state in fp64: the scores the weights come from, the scores the choice is made on
// (scores + bias for noaux_tc) and, for group methods, each group's score.
struct TokenScores {
  std::vector<double> score;
  std::vector<double> choice;
  std::vector<double> group;
};

TokenScores token_scores(const RoutingRule& rule, const double* logits, const float* bias) {
  const int E = rule.experts;
  TokenScores s;
  s.score.resize(E);
  if (rule.scoring == Scoring::softmax) {
    double max_logit = logits[0];
    for (int e = 1; e < E; ++e) max_logit = std::max(max_logit, logits[e]);
    double sum = 0.0;
    for (int e = 0; e < E; ++e) sum += s.score[e] = std::exp(logits[e] - max_logit);
    for (int e = 0; e < E; ++e) s.score[e] /= sum;
  } else {
    for (int e = 0; e < E; ++e) s.score[e] = sigmoid(logits[e]);
  }
  s.choice = s.score;
  if (rule.use_bias)
    for (int e = 0; e < E; ++e) s.choice[e] += static_cast<double>(bias[e]);
  if (is_group_method(rule)) {
    const int size = E / rule.n_group;
    s.group.resize(rule.n_group);
    for (int g = 0; g < rule.n_group; ++g) {
      const double* c = s.choice.data() + static_cast<size_t>(g) * size;
      if (rule.method == TopKMethod::group_limited_greedy) {
        double best = c[0];
        for (int i = 1; i < size; ++i) best = std::max(best, c[i]);
        s.group[g] = best;
      } else {  // noaux_tc: sum of the two best (one when a group has a single expert)
        double first = -k_inf, second = -k_inf;
        for (int i = 0; i < size; ++i) {
          if (c[i] > first) {
            second = first;
            first = c[i];
          } else if (c[i] > second) {
            second = c[i];
          }
        }
        s.group[g] = size >= 2 ? first + second : first;
      }
    }
  }
  return s;
}

// The n best of values[0..n_values) among those `allowed`, best first. Strict '>' while scanning in
// index order is what makes ties go to the lower index. Selection rather than std::sort: a NaN can
// never make the comparison ill-formed.
std::vector<int> best_n(const std::vector<double>& values, int n, const std::vector<char>& allowed) {
  std::vector<int> picked;
  std::vector<char> taken(values.size(), 0);
  for (int j = 0; j < n; ++j) {
    int best = -1;
    for (int i = 0; i < static_cast<int>(values.size()); ++i) {
      if (!allowed[i] || taken[i]) continue;
      if (best < 0 || values[i] > values[best]) best = i;
    }
    if (best < 0) break;
    taken[best] = 1;
    picked.push_back(best);
  }
  return picked;
}

std::vector<char> experts_of_groups(const RoutingRule& rule, const std::vector<char>& kept_group) {
  std::vector<char> allowed(rule.experts, 1);
  if (!is_group_method(rule)) return allowed;
  const int size = rule.experts / rule.n_group;
  for (int e = 0; e < rule.experts; ++e) allowed[e] = kept_group[e / size];
  return allowed;
}

std::vector<int32_t> select_experts(const RoutingRule& rule, const TokenScores& s) {
  std::vector<char> kept_group;
  if (is_group_method(rule)) {
    kept_group.assign(rule.n_group, 0);
    for (int g : best_n(s.group, rule.topk_group, std::vector<char>(rule.n_group, 1))) kept_group[g] = 1;
  }
  const std::vector<int> ids = best_n(s.choice, rule.top_k, experts_of_groups(rule, kept_group));
  return {ids.begin(), ids.end()};
}

void weights_for(const RoutingRule& rule, const TokenScores& s, const int32_t* ids, double* weights) {
  const int k = rule.top_k;
  double sum = 0.0;
  for (int j = 0; j < k; ++j) sum += weights[j] = s.score[ids[j]];
  const double divisor = rule.renormalize ? sum + static_cast<double>(rule.renorm_epsilon) : 1.0;
  for (int j = 0; j < k; ++j) weights[j] = weights[j] / divisor * static_cast<double>(rule.scale);
}

// How far the routing rule would have to be bent for it to choose exactly `engine` (a set of k ids).
//
// The criterion, per token. Let G be the engine's set and c the reference's fp64 choice scores.
//  * For a kept-group set K (greedy: every expert is allowed, K plays no part), let A(K) be the
//    experts in K. Then
//        expert_gap(K) = max(0, max_{a in A(K) \ G} c[a] - min_{g in G} c[g])
//        group_gap(K)  = max(0, max_{h not in K} gs[h] - min_{h in K} gs[h])
//    i.e. how much a chosen expert (group) falls short of the best one passed over. Exact ties give 0.
//  * K must contain every group of G and hold topk_group groups; the engine may have made any such
//    choice, so the token's gap is the minimum over those K of max(expert_gap(K), group_gap(K)).
//    Groups are few (DeepSeek: 8), so all candidate K are enumerated; past 4096 candidates K is filled
//    with the best remaining groups by score instead (an upper bound, i.e. stricter).
//  * ids out of range, repeated, or in more than topk_group groups cannot be produced by the rule at
//    any tie: gap = +inf.
// The token is a near-tie when gap < tie_gap. This is stronger than asking only that each expert the
// engine added be within tie_gap of the reference's k-th score: that weaker test would accept an engine
// that dropped the best expert for one near the k-th, which is a real bug. A legitimate fp32 rounding
// flip changes scores by ~1e-7, far below tie_gap = 1e-3, so it is always accepted.
double near_tie_gap(const RoutingRule& rule, const TokenScores& s, const int32_t* engine) {
  const int E = rule.experts, k = rule.top_k;
  std::vector<char> in_engine(E, 0);
  for (int j = 0; j < k; ++j) {
    if (engine[j] < 0 || engine[j] >= E || in_engine[engine[j]]) return k_inf;
    in_engine[engine[j]] = 1;
  }
  double weakest_chosen = k_inf;
  for (int j = 0; j < k; ++j) weakest_chosen = std::min(weakest_chosen, s.choice[engine[j]]);

  auto expert_gap = [&](const std::vector<char>& allowed) {
    double gap = 0.0;
    for (int e = 0; e < E; ++e)
      if (allowed[e] && !in_engine[e]) gap = std::max(gap, s.choice[e] - weakest_chosen);
    return gap;
  };
  if (!is_group_method(rule)) return expert_gap(std::vector<char>(E, 1));

  const int n_group = rule.n_group, size = E / n_group;
  std::vector<char> required(n_group, 0);
  for (int j = 0; j < k; ++j) required[engine[j] / size] = 1;
  std::vector<int> optional;
  for (int g = 0; g < n_group; ++g)
    if (!required[g]) optional.push_back(g);
  const int to_add = rule.topk_group - (n_group - static_cast<int>(optional.size()));
  if (to_add < 0) return k_inf;

  auto gap_for = [&](const std::vector<char>& kept) {
    double weakest_kept = k_inf, best_dropped = -k_inf;
    for (int g = 0; g < n_group; ++g) {
      if (kept[g]) weakest_kept = std::min(weakest_kept, s.group[g]);
      else best_dropped = std::max(best_dropped, s.group[g]);
    }
    const double group_gap = std::max(0.0, best_dropped - weakest_kept);
    return std::max(group_gap, expert_gap(experts_of_groups(rule, kept)));
  };

  // Number of candidate K: C(optional, to_add), stopping once it is known to be large.
  double candidates = 1.0;
  for (int i = 0; i < to_add; ++i) candidates = candidates * (optional.size() - i) / (i + 1);
  if (candidates > 4096.0) {
    std::vector<char> kept = required;
    std::vector<char> allowed(n_group, 1);
    for (int g = 0; g < n_group; ++g) allowed[g] = !required[g];
    for (int g : best_n(s.group, to_add, allowed)) kept[g] = 1;
    return gap_for(kept);
  }

  // Enumerate the to_add-subsets of `optional` as a bit mask walked in lexicographic order.
  double best = k_inf;
  std::vector<char> pick(optional.size(), 0);
  std::fill(pick.end() - to_add, pick.end(), 1);
  do {
    std::vector<char> kept = required;
    for (size_t i = 0; i < optional.size(); ++i)
      if (pick[i]) kept[optional[i]] = 1;
    best = std::min(best, gap_for(kept));
  } while (std::next_permutation(pick.begin(), pick.end()));
  return best;
}

// How far a token's own choice `chosen` is from a tie (RoutingAgreement::min_margin); +inf when
// nothing was passed over.
double routing_margin(const RoutingRule& rule, const TokenScores& s, const std::vector<int32_t>& chosen) {
  const int E = rule.experts;
  std::vector<char> in_chosen(E, 0);
  double weakest_chosen = k_inf;
  for (int32_t e : chosen) {
    in_chosen[e] = 1;
    weakest_chosen = std::min(weakest_chosen, s.choice[e]);
  }
  double margin = k_inf;
  std::vector<char> allowed(E, 1);
  if (is_group_method(rule)) {
    std::vector<char> kept(rule.n_group, 0);
    for (int g : best_n(s.group, rule.topk_group, std::vector<char>(rule.n_group, 1))) kept[g] = 1;
    double weakest_kept = k_inf, best_dropped = -k_inf;
    for (int g = 0; g < rule.n_group; ++g) {
      if (kept[g]) weakest_kept = std::min(weakest_kept, s.group[g]);
      else best_dropped = std::max(best_dropped, s.group[g]);
    }
    if (best_dropped > -k_inf) margin = weakest_kept - best_dropped;
    allowed = experts_of_groups(rule, kept);
  }
  for (int e = 0; e < E; ++e)
    if (allowed[e] && !in_chosen[e]) margin = std::min(margin, weakest_chosen - s.choice[e]);
  return margin;
}

// One token's outcome before the serial tally of RoutingAgreement.
enum class TokenOutcome : char { same, adopted, rejected };

}  // namespace

std::vector<double> router_logits(const float* x, const float* router, int64_t tokens, int hidden, int experts) {
  std::vector<double> logits(static_cast<size_t>(tokens) * experts);
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, tokens), [&](const tbb::blocked_range<int64_t>& r) {
    for (int64_t t = r.begin(); t < r.end(); ++t) {
      const float* xt = x + t * hidden;
      for (int e = 0; e < experts; ++e) {
        const float* we = router + static_cast<int64_t>(e) * hidden;
        double acc = 0.0;
        for (int h = 0; h < hidden; ++h) acc += static_cast<double>(xt[h]) * static_cast<double>(we[h]);
        logits[t * experts + e] = acc;
      }
    }
  });
  return logits;
}

Routing route(const RoutingRule& rule, const std::vector<double>& logits, const float* bias, int64_t tokens,
              const int32_t* engine_ids, double tie_gap, RoutingAgreement* agreement) {
  check_rule(rule);
  const int E = rule.experts, k = rule.top_k;
  if (static_cast<int64_t>(logits.size()) < tokens * E)
    fail_input("reference routing: " + std::to_string(logits.size()) + " logits for " + std::to_string(tokens) +
               " tokens of " + std::to_string(E) + " experts");
  if (rule.use_bias && bias == nullptr) fail_input("reference routing: the rule uses a bias but none was given");

  Routing out;
  out.ids.resize(static_cast<size_t>(tokens) * k);
  out.weights.resize(static_cast<size_t>(tokens) * k);
  std::vector<TokenOutcome> outcome(tokens, TokenOutcome::same);
  std::vector<double> gap(tokens, 0.0);
  std::vector<double> margin(agreement != nullptr ? tokens : 0, k_inf);

  tbb::parallel_for(tbb::blocked_range<int64_t>(0, tokens), [&](const tbb::blocked_range<int64_t>& r) {
    for (int64_t t = r.begin(); t < r.end(); ++t) {
      const TokenScores s = token_scores(rule, logits.data() + t * E, bias);
      const std::vector<int32_t> mine = select_experts(rule, s);
      if (agreement != nullptr) margin[t] = routing_margin(rule, s, mine);
      int32_t* ids = out.ids.data() + t * k;
      std::copy(mine.begin(), mine.end(), ids);
      if (engine_ids != nullptr) {
        const int32_t* theirs = engine_ids + t * k;
        std::vector<int32_t> a(mine), b(theirs, theirs + k);
        std::sort(a.begin(), a.end());
        std::sort(b.begin(), b.end());
        if (a != b) {
          gap[t] = near_tie_gap(rule, s, theirs);
          if (gap[t] < tie_gap) {
            outcome[t] = TokenOutcome::adopted;
            std::copy(theirs, theirs + k, ids);
          } else {
            outcome[t] = TokenOutcome::rejected;  // keep our ids: the output comparison must fail
          }
        }
      }
      weights_for(rule, s, ids, out.weights.data() + t * k);
    }
  });

  if (agreement != nullptr) {
    RoutingAgreement a;
    bool any_rejected = false;
    for (int64_t t = 0; t < tokens; ++t) {
      if (std::isfinite(margin[t])) {
        a.min_margin = a.min_margin < 0 ? margin[t] : std::min(a.min_margin, margin[t]);
        if (margin[t] < tie_gap) ++a.tokens_within_tie_gap;
      }
      if (outcome[t] == TokenOutcome::same) continue;
      ++a.tokens_differing;
      if (outcome[t] == TokenOutcome::adopted) {
        ++a.tokens_adopted;
        a.max_adopted_gap = std::max(a.max_adopted_gap, gap[t]);
      } else {
        a.min_rejected_gap = any_rejected ? std::min(a.min_rejected_gap, gap[t]) : gap[t];
        any_rejected = true;
      }
    }
    *agreement = a;
  }
  return out;
}

namespace {

// y[H] (+)= scale · (silu(x·W1ᵀ) ⊙ x·W3ᵀ)·W2ᵀ for one token; w13 [2I, H], w2 [H, I].
void add_mlp(const float* x, int hidden, int intermediate, const float* w13, const float* w2, double scale,
             double* y, std::vector<double>& act) {
  act.resize(intermediate);
  for (int i = 0; i < intermediate; ++i) {
    const float* w1 = w13 + static_cast<int64_t>(i) * hidden;
    const float* w3 = w13 + static_cast<int64_t>(intermediate + i) * hidden;
    double g = 0.0, u = 0.0;
    for (int h = 0; h < hidden; ++h) {
      g += static_cast<double>(x[h]) * static_cast<double>(w1[h]);
      u += static_cast<double>(x[h]) * static_cast<double>(w3[h]);
    }
    act[i] = silu(g) * u;
  }
  for (int h = 0; h < hidden; ++h) {
    const float* w2h = w2 + static_cast<int64_t>(h) * intermediate;
    double acc = 0.0;
    for (int i = 0; i < intermediate; ++i) acc += act[i] * static_cast<double>(w2h[i]);
    y[h] += scale * acc;
  }
}

}  // namespace

std::vector<double> experts_path(const float* x, int64_t tokens, int hidden, int intermediate, int top_k,
                                 const int32_t* ids, const double* weights, const float* w13, const float* w2) {
  std::vector<double> out(static_cast<size_t>(tokens) * hidden, 0.0);
  const int64_t w13_stride = 2LL * intermediate * hidden, w2_stride = static_cast<int64_t>(hidden) * intermediate;
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, tokens), [&](const tbb::blocked_range<int64_t>& r) {
    std::vector<double> act;
    for (int64_t t = r.begin(); t < r.end(); ++t) {
      for (int j = 0; j < top_k; ++j) {
        const int64_t e = ids[t * top_k + j];
        add_mlp(x + t * hidden, hidden, intermediate, w13 + e * w13_stride, w2 + e * w2_stride,
                weights[t * top_k + j], out.data() + t * hidden, act);
      }
    }
  });
  return out;
}

std::vector<double> shared_mlp(const float* x, int64_t tokens, int hidden, const SharedMlp& mlp) {
  std::vector<double> out(static_cast<size_t>(tokens) * hidden, 0.0);
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, tokens), [&](const tbb::blocked_range<int64_t>& r) {
    std::vector<double> act;
    for (int64_t t = r.begin(); t < r.end(); ++t) {
      const float* xt = x + t * hidden;
      double gate = 1.0;
      if (mlp.gate_w != nullptr) {
        double acc = 0.0;
        for (int h = 0; h < hidden; ++h) acc += static_cast<double>(xt[h]) * static_cast<double>(mlp.gate_w[h]);
        gate = sigmoid(acc);
      }
      add_mlp(xt, hidden, mlp.intermediate, mlp.w13, mlp.w2, gate, out.data() + t * hidden, act);
    }
  });
  return out;
}

std::vector<double> moe_layer(const LayerView& layer, const float* x, int64_t tokens, const int32_t* engine_ids,
                              RoutingAgreement* agreement) {
  const RoutingRule& rule = layer.rule;
  const std::vector<double> logits = router_logits(x, layer.router, tokens, layer.hidden, rule.experts);
  const Routing routing = route(rule, logits, layer.bias, tokens, engine_ids, 1e-3, agreement);
  std::vector<double> out = experts_path(x, tokens, layer.hidden, layer.intermediate, rule.top_k,
                                         routing.ids.data(), routing.weights.data(), layer.w13, layer.w2);
  for (const SharedMlp& mlp : layer.shared) {
    const std::vector<double> y = shared_mlp(x, tokens, layer.hidden, mlp);
    for (size_t i = 0; i < out.size(); ++i) out[i] += y[i];
  }
  return out;
}

Comparison compare(const float* y, const std::vector<double>& r) {
  Comparison c;
  double diff2 = 0.0, ref2 = 0.0, y2 = 0.0, diff_max = 0.0, ref_max = 0.0, y_max = 0.0;
  for (size_t i = 0; i < r.size(); ++i) {
    const double yi = static_cast<double>(y[i]);
    if (!std::isfinite(yi)) {
      c.finite = false;
      continue;
    }
    const double d = yi - r[i];
    diff2 += d * d;
    ref2 += r[i] * r[i];
    y2 += yi * yi;
    diff_max = std::max(diff_max, std::abs(d));
    ref_max = std::max(ref_max, std::abs(r[i]));
    y_max = std::max(y_max, std::abs(yi));
  }
  // A zero reference leaves nothing to be relative to: report the size of y itself.
  c.rel_norm = ref2 > 0.0 ? std::sqrt(diff2) / std::sqrt(ref2) : std::sqrt(y2);
  c.rel_max = ref_max > 0.0 ? diff_max / ref_max : y_max;
  // A NaN or Inf anywhere makes the errors NaN too, so no printout of them can look like a pass.
  if (!c.finite) {
    c.rel_norm = std::numeric_limits<double>::quiet_NaN();
    c.rel_max = std::numeric_limits<double>::quiet_NaN();
  }
  return c;
}

}  // namespace moeflow::reference
