#include "kernels/cpu/routing.hpp"

#include <cblas.h>
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "graph/error.hpp"

namespace moeflow::cpu {
namespace {

// The one ordering every selection uses, so ties go to the lower index on every backend
// (std::partial_sort on values alone would leave them to the implementation).
bool better(float va, int ia, float vb, int ib) { return va > vb || (va == vb && ia < ib); }

void check_rule(const RoutingRule& rule) {
  const int e = rule.experts;
  if (e <= 0 || rule.top_k <= 0 || rule.top_k > e) {
    fail_input("routing: top_k = " + std::to_string(rule.top_k) + " must lie in [1, " + std::to_string(e) + "]");
  }
  if (rule.method == TopKMethod::greedy) return;
  if (rule.n_group <= 0 || e % rule.n_group != 0) {
    fail_input("routing: n_group = " + std::to_string(rule.n_group) + " must divide experts = " + std::to_string(e));
  }
  if (rule.topk_group <= 0 || rule.topk_group > rule.n_group) {
    fail_input("routing: topk_group = " + std::to_string(rule.topk_group) + " must lie in [1, n_group = " +
               std::to_string(rule.n_group) + "]");
  }
  if (static_cast<int64_t>(rule.topk_group) * (e / rule.n_group) < rule.top_k) {
    fail_input("routing: topk_group = " + std::to_string(rule.topk_group) + " groups of " +
               std::to_string(e / rule.n_group) + " experts cannot supply top_k = " + std::to_string(rule.top_k));
  }
}

void compute_scores(Scoring scoring, const float* logits, int experts, float* scores) {
  if (scoring == Scoring::sigmoid) {
    for (int e = 0; e < experts; ++e) scores[e] = 1.0f / (1.0f + std::exp(-logits[e]));
    return;
  }
  float m = logits[0];
  for (int e = 1; e < experts; ++e) m = std::max(m, logits[e]);
  float sum = 0.0f;
  for (int e = 0; e < experts; ++e) {
    scores[e] = std::exp(logits[e] - m);
    sum += scores[e];
  }
  const float inv = 1.0f / sum;
  for (int e = 0; e < experts; ++e) scores[e] *= inv;
}

// Group score: max of the group (group_limited_greedy) or sum of its top two (noaux_tc).
float group_score(TopKMethod method, const float* choice, int size) {
  if (method == TopKMethod::group_limited_greedy) {
    float m = choice[0];
    for (int i = 1; i < size; ++i) m = std::max(m, choice[i]);
    return m;
  }
  if (size == 1) return choice[0];
  float a = -std::numeric_limits<float>::infinity();  // best
  float b = a;                                        // second best
  for (int i = 0; i < size; ++i) {
    if (choice[i] > a) {
      b = a;
      a = choice[i];
    } else if (choice[i] > b) {
      b = choice[i];
    }
  }
  return a + b;
}

// The worst kept group, found as the rank-th best by successive predecessors: keeps the
// selection allocation-free (group g is kept iff it is not worse than the returned one).
int last_kept_group(const float* gscore, int groups, int keep) {
  int prev = -1;
  for (int r = 0; r < keep; ++r) {
    int best = -1;
    for (int g = 0; g < groups; ++g) {
      if (prev >= 0 && !better(gscore[prev], prev, gscore[g], g)) continue;
      if (best < 0 || better(gscore[g], g, gscore[best], best)) best = g;
    }
    prev = best;
  }
  return prev;
}

}  // namespace

void router_logits(const float* x, const float* router, int64_t tokens, int hidden, int experts, float* logits) {
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, tokens, 16), [&](const tbb::blocked_range<int64_t>& r) {
    const int64_t t0 = r.begin();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(r.size()), experts, hidden, 1.0f,
                x + t0 * hidden, hidden, router, hidden, 0.0f, logits + t0 * experts, experts);
  });
}

void route_token(const RoutingRule& rule, const float* logits, const float* bias, int32_t* ids, float* weights,
                 float* scratch) {
  check_rule(rule);
  const int n = rule.experts;
  const int k = rule.top_k;
  float* scores = scratch;
  compute_scores(rule.scoring, logits, n, scores);

  const bool biased = rule.use_bias;  // any rule may choose on biased scores (noaux_tc always does)
  float* choice = scores;
  if (biased) {
    choice = scratch + n;
    for (int e = 0; e < n; ++e) choice[e] = scores[e] + bias[e];
  }

  const bool grouped = rule.method != TopKMethod::greedy && rule.topk_group < rule.n_group;
  const int group_size = grouped ? n / rule.n_group : n;
  float* gscore = scratch + 2 * n;
  int last_group = 0;
  if (grouped) {
    for (int g = 0; g < rule.n_group; ++g) gscore[g] = group_score(rule.method, choice + g * group_size, group_size);
    last_group = last_kept_group(gscore, rule.n_group, rule.topk_group);
  }

  // Insertion into a sorted list held in ids/weights (weights hold the choice scores until the
  // end): experts arrive in index order, so an equal value never passes an earlier one.
  int filled = 0;
  for (int e = 0; e < n; ++e) {
    if (grouped) {
      const int g = e / group_size;
      if (g != last_group && !better(gscore[g], g, gscore[last_group], last_group)) continue;
    }
    const float v = choice[e];
    if (filled == k && !better(v, e, weights[k - 1], ids[k - 1])) continue;
    int pos = filled < k ? filled++ : k - 1;
    while (pos > 0 && better(v, e, weights[pos - 1], ids[pos - 1])) {
      weights[pos] = weights[pos - 1];
      ids[pos] = ids[pos - 1];
      --pos;
    }
    weights[pos] = v;
    ids[pos] = e;
  }

  float sum = 0.0f;
  for (int j = 0; j < k; ++j) {
    weights[j] = scores[ids[j]];
    sum += weights[j];
  }
  const float denom = sum + rule.renorm_epsilon;
  for (int j = 0; j < k; ++j) {
    if (rule.renormalize) weights[j] /= denom;
    weights[j] *= rule.scale;
  }
}

void route_tokens(const RoutingRule& rule, const float* logits, const float* bias, int64_t tokens, int32_t* ids,
                  float* weights) {
  const int n = rule.experts;
  const int k = rule.top_k;
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, tokens, 64), [&](const tbb::blocked_range<int64_t>& r) {
    std::vector<float> scratch(3 * static_cast<size_t>(n));
    for (int64_t t = r.begin(); t < r.end(); ++t) {
      route_token(rule, logits + t * n, bias, ids + t * k, weights + t * k, scratch.data());
    }
  });
}

}  // namespace moeflow::cpu
