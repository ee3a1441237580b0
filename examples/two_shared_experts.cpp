// A layer no preset describes, built node by node: a custom router (sigmoid scores with a
// correction bias, group-limited selection, renormalised and scaled), two shared experts (one
// sigmoid-gated, one plain) and the routed experts. It is planned concurrently, run on the CPU,
// and checked against the fp64 reference. Registered as a test (exit 0 = PASS).
#include <iostream>

#include "bench/cpu_session.hpp"
#include "graph/dot.hpp"
#include "ops/layer_builder.hpp"

using namespace moeflow;

int main() {
  constexpr int64_t kMaxTokens = 48;
  constexpr int kHidden = 192;

  LayerBuilder b("two_shared_experts", kMaxTokens);
  const ValueId x = b.input("x", {tokens(), Dim::of(kHidden)}, DType::f32);

  RoutingRule router;
  router.experts = 24;
  router.top_k = 3;
  router.scoring = Scoring::sigmoid;
  router.method = TopKMethod::group_limited_greedy;  // groups scored by their best expert ...
  router.n_group = 6;
  router.topk_group = 2;
  router.use_bias = true;                            // ... chosen on biased scores, weighted without the bias
  router.renormalize = true;
  router.renorm_epsilon = 1e-20f;
  router.scale = 1.5f;
  const Route route = b.gate(x, router, "router");

  const ValueId gated = b.shared_expert(x, {.intermediate = 96, .gated = true, .name = "shared_gated"});
  const ValueId plain = b.shared_expert(x, {.intermediate = 64, .gated = false, .name = "shared_plain"});
  const ExpertRows routed = b.experts(b.dispatch(x, route), {.intermediate = 48});
  const ValueId out = b.reduce(b.combine(routed, route), {gated, plain});
  auto graph = std::make_shared<const Graph>(std::move(b).finish({out}));

  SessionOptions options;
  options.plan.policy = Policy::concurrent;
  options.threads = 2;
  options.seed = 11;
  CpuSession session(graph, options);
  session.plan().write_summary(std::cout);

  bool pass = true;
  for (int64_t T : {int64_t{1}, int64_t{29}, kMaxTokens}) {
    session.set_tokens(T);
    session.run();
    const CheckReport r = session.check(1e-5);
    std::cout << "T=" << T << ": rel_norm " << r.comparison.rel_norm << ", rel_max " << r.comparison.rel_max
              << ", routing differences " << r.agreement.tokens_differing << " (" << r.agreement.tokens_adopted
              << " near-ties) " << (r.pass ? "PASS" : "FAIL") << "\n";
    pass = pass && r.pass;
  }
  // Three lanes: the routed path and each shared expert on its own.
  if (session.plan().lanes.size() < 3) {
    std::cout << "FAIL: expected the two shared experts beside the routed path, got "
              << session.plan().lanes.size() << " lane(s)\n";
    pass = false;
  }
  return pass ? 0 : 1;
}
