#pragma once
// The plain reference: loops with fp64 accumulation over the same fp32 weights the engine reads
// (never an fp64 copy of them). Every backend, plan and layout is checked against it.
#include <cstdint>
#include <vector>

#include "kernels/common/routing_rule.hpp"

namespace moeflow::reference {

// A SwiGLU MLP applied to every token (a shared expert). gate_w [H] may be null.
struct SharedMlp {
  const float* w13 = nullptr;  // [2I, H]
  const float* w2 = nullptr;   // [H, I]
  const float* gate_w = nullptr;
  int intermediate = 0;
};

// Pointers into the weights of one layer.
struct LayerView {
  RoutingRule rule;
  int hidden = 0;
  int intermediate = 0;
  const float* router = nullptr;  // [E, H]
  const float* bias = nullptr;    // [E], read when rule.use_bias
  const float* w13 = nullptr;     // [E, 2I, H]
  const float* w2 = nullptr;      // [E, H, I]
  std::vector<SharedMlp> shared;
};

// What the near-tie rule did to the routing (DESIGN.md, "Correctness check").
struct RoutingAgreement {
  int64_t tokens_differing = 0;  // tokens whose top-k set differs from the engine's
  int64_t tokens_adopted = 0;    // ... of which near-ties, where the engine's ids were taken
  double max_adopted_gap = 0.0;  // largest score gap among adopted differences
  double min_rejected_gap = 0.0; // smallest gap among differences that were not near-ties (0 if none)
  // How close the reference's own choices came to a tie (the engine's aside): per token, the score gap
  // between its weakest chosen expert and the best allowed one passed over, and between its weakest
  // kept group and the best dropped one; the smallest over tokens (-1: no token routed), and how many
  // tokens lie within tie_gap, where a flip would be a legitimate near-tie.
  double min_margin = -1.0;
  int64_t tokens_within_tie_gap = 0;
};

struct Routing {
  std::vector<int32_t> ids;     // [T, k]
  std::vector<double> weights;  // [T, k]
};

// logits [T, E] in fp64 from fp32 x [T, H] and router [E, H].
std::vector<double> router_logits(const float* x, const float* router, int64_t tokens, int hidden, int experts);

// Routes every token by `rule`. When engine_ids [T, k] is given, a token whose engine set differs
// from the reference's only by near-ties (score gap < tie_gap) takes the engine's ids, with weights
// recomputed here in fp64; `agreement` (optional) says how often and by what gap.
Routing route(const RoutingRule& rule, const std::vector<double>& logits, const float* bias, int64_t tokens,
              const int32_t* engine_ids = nullptr, double tie_gap = 1e-3, RoutingAgreement* agreement = nullptr);

// Routed experts only: out[t] = Σ_j weights[t, j] · MLP_{ids[t, j]}(x_t). out is [T, H].
std::vector<double> experts_path(const float* x, int64_t tokens, int hidden, int intermediate, int top_k,
                                 const int32_t* ids, const double* weights, const float* w13, const float* w2);

// One shared MLP on every token. out is [T, H].
std::vector<double> shared_mlp(const float* x, int64_t tokens, int hidden, const SharedMlp& mlp);

// The whole layer: routing (with the near-tie rule against engine_ids), routed experts, shared MLPs.
std::vector<double> moe_layer(const LayerView& layer, const float* x, int64_t tokens,
                              const int32_t* engine_ids = nullptr, RoutingAgreement* agreement = nullptr);

struct Comparison {
  double rel_norm = 0.0;  // ||y - r||_2 / ||r||_2
  double rel_max = 0.0;   // max|y - r| / max|r|
  bool finite = true;     // y has no NaN or Inf
  bool passes(double tolerance) const { return finite && rel_norm < tolerance; }
};

Comparison compare(const float* y, const std::vector<double>& r);

}  // namespace moeflow::reference
