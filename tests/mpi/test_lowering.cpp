// The parallel lowering run for real under mpirun (2 and 4 ranks): every dispatch kind, with and
// without --ep, tp 1 and 2, uneven tokens per DP rank, chunked and not, serial and concurrent
// plans. Each rank's output must equal the one-process reference of its own tokens (fp32, relative
// norm error < 1e-5), and a rerun must give identical bytes.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "bench/multi_rank.hpp"
#include "graph/error.hpp"
#include "ops/model_config.hpp"

using namespace moeflow;

namespace {

int world_size() { return comm::mpi_world()->size(); }

// Small Qwen2-MoE (gated shared expert) whose E = 8 and I = 32 divide over 2 and 4 ranks.
MoEConfig small_qwen() {
  return load_config("qwen1.5-moe-a2.7b", {"hidden_size=64", "moe_intermediate_size=32", "num_experts=8",
                                           "num_experts_per_tok=3", "shared_expert_intermediate_size=48"});
}

// Uneven tokens per DP rank (one of them 1 token), the same list on every rank.
std::vector<int64_t> uneven_tokens(int dp) {
  const int64_t pattern[] = {13, 6, 1, 9};
  std::vector<int64_t> t;
  for (int d = 0; d < dp; ++d) t.push_back(pattern[d % 4]);
  return t;
}

struct Case {
  DispatchKind kind;
  bool ep;
  int tp;
  int chunks;
  TpDispatch tp_dispatch = TpDispatch::slices;
  Policy policy = Policy::serial;
  std::string scope = "layer";
};

std::string case_name(const Case& c) {
  std::string n = std::string(to_string(c.kind)) + (c.ep ? "_ep" : "_split_I") + "_tp" + std::to_string(c.tp) + "_chunks" +
                  std::to_string(c.chunks) + "_" + to_string(c.tp_dispatch) + "_" + to_string(c.policy) + "_" + c.scope;
  for (char& ch : n)
    if (ch == '-') ch = '_';
  return n;
}

std::vector<float> run_rank(const MoEConfig& config, const ParallelLayout& layout, const Case& c, RankComms& comms,
                            int runs) {
  const int rank = comms.world->rank();
  auto graph = rank_graph(config, layout, rank, {.scope = c.scope, .chunks = c.chunks});
  SessionOptions o;
  o.seed = 7;
  o.threads = 2;
  o.plan.policy = c.policy;
  o.comm = &comms.groups;
  CpuSession s(graph, o);
  s.set_tokens(layout.tokens_of(rank));
  std::vector<float> first;
  const int64_t n = layout.tokens_of(rank) * config.hidden;
  for (int i = 0; i < runs; ++i) {
    s.run();
    std::vector<float> out(s.output(), s.output() + n);
    if (i == 0) first = out;
    else EXPECT_EQ(0, std::memcmp(first.data(), out.data(), sizeof(float) * first.size())) << "rerun " << i << " differs";
  }
  return first;
}

class Lowered : public testing::TestWithParam<Case> {};

TEST_P(Lowered, EveryRankMatchesTheOneProcessReferenceOfItsTokens) {
  const Case c = GetParam();
  const int w = world_size();
  if (w % c.tp != 0) GTEST_SKIP() << "tp " << c.tp << " does not divide " << w << " ranks";
  const MoEConfig config = small_qwen();
  ParallelLayout layout{.dp = w / c.tp, .tp = c.tp, .ep = c.ep, .dispatch = c.kind, .tp_dispatch = c.tp_dispatch, .tokens = {}};
  layout.tokens = uneven_tokens(layout.dp);
  check_layout(layout, config, w);
  RankComms comms = make_rank_comms(comm::mpi_world(), layout);
  const int rank = comms.world->rank();
  const std::vector<float> out = run_rank(config, layout, c, comms, 2);
  const CheckReport r = check_rank_output(out.data(), config, layout, rank, c.scope, 7, 1e-5);
  EXPECT_LT(r.comparison.rel_norm, 1e-5) << "rank " << rank << " " << layout.str();
  EXPECT_TRUE(r.pass) << "rank " << rank << " " << layout.str();
  if (std::getenv("MOEFLOW_TEST_VERBOSE")) std::fprintf(stderr, "rank %d %s rel_norm %.3g\n", rank, layout.str().c_str(), r.comparison.rel_norm);
}

std::vector<Case> cases() {
  std::vector<Case> all;
  for (DispatchKind k : {DispatchKind::allgather, DispatchKind::topk_allgather, DispatchKind::alltoall})
    for (bool ep : {false, true})
      for (int tp : {1, 2})
        for (int chunks : {1, 2}) all.push_back({k, ep, tp, chunks});
  // The TP leader instead of sequence-parallel slices, the concurrent plan, the experts-only scope.
  all.push_back({DispatchKind::alltoall, true, 2, 1, TpDispatch::leader});
  all.push_back({DispatchKind::topk_allgather, false, 2, 2, TpDispatch::leader});
  all.push_back({DispatchKind::alltoall, true, 1, 2, TpDispatch::slices, Policy::concurrent});
  all.push_back({DispatchKind::allgather, false, 2, 3, TpDispatch::slices, Policy::concurrent});
  all.push_back({DispatchKind::alltoall, true, 1, 1, TpDispatch::slices, Policy::serial, "experts"});
  all.push_back({DispatchKind::allgather, true, 2, 2, TpDispatch::slices, Policy::concurrent, "experts"});
  return all;
}

INSTANTIATE_TEST_SUITE_P(Layouts, Lowered, testing::ValuesIn(cases()),
                         [](const testing::TestParamInfo<Case>& i) { return case_name(i.param); });

}  // namespace
