#pragma once
// How a gate turns router logits into top-k expert ids and weights. This is the resolved form:
// model-family quirks (when DeepSeek-V2 scales, which epsilon a renormalisation adds) are decided
// when a config becomes a RoutingRule, so kernels apply it without knowing any model family.
namespace moeflow {

enum class Scoring { softmax, sigmoid };
enum class TopKMethod { greedy, group_limited_greedy, noaux_tc };

struct RoutingRule {
  int experts = 0;
  int top_k = 0;
  Scoring scoring = Scoring::softmax;
  TopKMethod method = TopKMethod::greedy;
  int n_group = 1;       // groups of experts (group methods only); divides `experts`
  int topk_group = 1;    // groups kept (group methods only)
  bool use_bias = false; // add the correction bias to the scores for choosing (noaux_tc)
  bool renormalize = false;
  float renorm_epsilon = 0.0f;  // added to the sum when renormalising (1e-20 for DeepSeek)
  float scale = 1.0f;           // effective multiplier on the top-k weights (1 when not applied)
};

inline const char* to_string(Scoring s) { return s == Scoring::softmax ? "softmax" : "sigmoid"; }
inline const char* to_string(TopKMethod m) {
  switch (m) {
    case TopKMethod::greedy: return "greedy";
    case TopKMethod::group_limited_greedy: return "group_limited_greedy";
    case TopKMethod::noaux_tc: return "noaux_tc";
  }
  return "?";
}

}  // namespace moeflow
