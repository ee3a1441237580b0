// The fused decode kernel (cuda.fused_decode): dispatch, SwiGLU MLP and combine of the experts path
// in one launch, planned by the fuse pass. Checked against the fp64 reference on random
// inputs (up to 256 choices, one block's work list) and on skewed routing (many rows on few experts:
// several groups per expert), with H and I multiples of 8 but of no tile; bit-identical reruns; one
// graph captured for any T gives the eager bytes at every T; and the planner's choice shows in the plan.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <tuple>

#include "bench/cuda/cuda_session.hpp"
#include "tests/gpu/bf16_graphs.hpp"
#include "tests/gpu/session_checks.hpp"
#include "graph/chunk.hpp"
#include "graph/error.hpp"
#include "kernels/cuda/device.hpp"
#include "kernels/cuda/fused_single_token.hpp"
#include "ops/fused_experts_op.hpp"
#include "ops/layer_builder.hpp"
#include "ops/moe_layer.hpp"
#include "tests/reference/reference.hpp"

using namespace moeflow;

namespace {

struct FusedCase {
  std::string name, preset;
  std::vector<std::string> sets;
  int64_t max_tokens;  // T·k <= E at the maximum, where the planner fuses
};

std::vector<FusedCase> fused_cases() {
  return {
      {"qwen3", "qwen3-30b-a3b", {"hidden_size=200", "moe_intermediate_size=136"}, 16},      // E 128, k 8
      {"qwen15", "qwen1.5-moe-a2.7b", {"hidden_size=264", "moe_intermediate_size=88"}, 15}, // E 60, k 4
      {"mixtral", "mixtral-8x7b", {"hidden_size=128", "intermediate_size=328"}, 4},         // E 8, k 2
      {"deepseek", "deepseek-v3", {"hidden_size=128", "moe_intermediate_size=40"}, 32},     // E 256, k 8: 256 choices
  };
}

bool plan_is_fused(const CudaSession& s) {
  for (const PlanStep& step : s.plan().steps)
    if (s.graph().node(step.node).op->kind() == "fused_experts") return step.kernel->name == "cuda.fused_decode";
  return false;
}

}  // namespace

TEST(CudaFusedDecode, MatchesReferenceAtEveryTAndRepeatsBitForBit) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (const FusedCase& fc : fused_cases()) {
    const MoEConfig config = load_config(fc.preset, fc.sets);
    auto g = std::make_shared<const Graph>(build_experts_graph(config, {.max_tokens = fc.max_tokens, .dtype = DType::bf16}));
    CudaSessionOptions so;
    so.seed = 3;
    CudaSession s(g, so);
    ASSERT_TRUE(plan_is_fused(s)) << fc.name;
    for (int64_t T : {int64_t{1}, int64_t{3}, fc.max_tokens}) {
      if (T > fc.max_tokens) continue;
      s.set_tokens(T);
      s.run();
      const CheckReport r = s.check(1e-2);
      EXPECT_TRUE(r.pass) << fc.name << " T=" << T << " rel_norm " << r.comparison.rel_norm;
      const std::vector<float> first = s.output();
      s.run();
      const std::vector<float> second = s.output();
      EXPECT_EQ(0, std::memcmp(first.data(), second.data(), first.size() * 4)) << fc.name << " rerun differs, T=" << T;
    }
  }
}

TEST(CudaFusedDecode, SkewedRoutingSplitsAnExpertIntoSeveralGroups) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const FusedCase fc = fused_cases()[1];  // qwen1.5: k = 4, up to 15 tokens
  const MoEConfig config = load_config(fc.preset, fc.sets);
  auto g = std::make_shared<const Graph>(build_experts_graph(config, {.max_tokens = fc.max_tokens, .dtype = DType::bf16}));
  CudaSession s(g, {});
  ASSERT_TRUE(plan_is_fused(s));
  const int k = config.top_k;
  for (const int64_t T : {fc.max_tokens, int64_t{5}}) {
    s.set_tokens(T);
    // Every token on experts 0..k-1 (in a rotating order): T rows each, so groups of 4 and a rest
    // (15 rows: 4 + 4 + 4 + 3; 5 rows: 4 + 1); the other experts get nothing.
    std::vector<int32_t> ids(static_cast<std::size_t>(T * k));
    for (int64_t t = 0; t < T; ++t)
      for (int j = 0; j < k; ++j) ids[static_cast<std::size_t>(t * k + j)] = static_cast<int32_t>((t + j) % k);
    s.write_input(*s.graph().find_value("route.ids"), ids.data(), ids.size() * sizeof(int32_t));
    s.run();
    const CheckReport r = s.check(1e-2);
    EXPECT_TRUE(r.pass) << "T=" << T << " rel_norm " << r.comparison.rel_norm;
  }
}

TEST(CudaFusedDecode, OneCaptureServesEveryTWithTheEagerBytesAndTheChainAgrees) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const FusedCase fc = fused_cases()[1];  // qwen1.5
  const MoEConfig config = load_config(fc.preset, fc.sets);
  auto g = std::make_shared<const Graph>(build_experts_graph(config, {.max_tokens = fc.max_tokens, .dtype = DType::bf16}));
  CudaSessionOptions so;
  so.plan.capturable = true;
  so.seed = 9;
  CudaSession s(g, so);
  ASSERT_TRUE(plan_is_fused(s));
  CudaSessionOptions unfused = so;
  unfused.plan.fuse = false;
  CudaSession chain(g, unfused, &s);
  ASSERT_FALSE(plan_is_fused(chain));
  s.set_tokens(fc.max_tokens);
  s.capture_any_tokens();
  for (int64_t T : {fc.max_tokens, int64_t{1}, int64_t{7}, int64_t{2}}) {
    s.set_tokens(T);
    s.replay();
    const std::vector<float> replayed = s.output();
    EXPECT_TRUE(s.check(1e-2).pass) << "T=" << T;
    s.run();
    const std::vector<float> eager = s.output();
    ASSERT_EQ(replayed.size(), eager.size());
    EXPECT_EQ(0, std::memcmp(replayed.data(), eager.data(), eager.size() * 4)) << "T=" << T;
    // The unfused chain (decode kernel, bf16 y rounded before the combine) on the same inputs.
    chain.set_tokens(T);
    chain.run();
    const std::vector<float> other = chain.output();
    const double rel_norm = reference::compare(eager.data(), std::vector<double>(other.begin(), other.end())).rel_norm;
    EXPECT_LT(rel_norm, 1e-2) << "fused vs chain, T=" << T;
  }
}

// The kernel counts in its lane's counters and leaves them zero (no memset node): two fused nodes
// one after the other on one lane, run and replayed at changing T (an empty chunk included), each
// run right and every replay the same bytes. Counters left nonzero would skip items or hang.
TEST(CudaFusedDecode, FusedNodesSharingALaneFindItsCountersZeroRunAfterRun) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const FusedCase fc = fused_cases()[1];  // qwen1.5
  const MoEConfig config = load_config(fc.preset, fc.sets);
  auto g = std::make_shared<const Graph>(
      chunk_tokens(build_experts_graph(config, {.max_tokens = fc.max_tokens, .dtype = DType::bf16}), {.chunks = 2}));
  CudaSessionOptions so;
  so.plan.capturable = true;
  so.plan.policy = Policy::serial;  // one lane
  so.seed = 5;
  CudaSession s(g, so);
  int fused = 0;
  for (const PlanStep& step : s.plan().steps)
    fused += s.graph().node(step.node).op->kind() == "fused_experts" && step.kernel->name == "cuda.fused_decode";
  ASSERT_EQ(fused, 2);
  ASSERT_EQ(s.plan().lanes.size(), 1u);
  for (int64_t T : {fc.max_tokens, int64_t{1}, int64_t{8}, fc.max_tokens, int64_t{2}}) {
    s.set_tokens(T);
    s.run();
    EXPECT_TRUE(s.check(1e-2).pass) << "eager T=" << T;
    const std::vector<float> eager = s.output();
    s.capture();  // chunks slice x on the host's T: a graph per T
    for (int r = 0; r < 3; ++r) {
      s.replay();
      const std::vector<float> replayed = s.output();
      EXPECT_EQ(0, std::memcmp(replayed.data(), eager.data(), eager.size() * 4)) << "T=" << T << " replay " << r;
    }
  }
}

TEST(CudaFusedDecode, ChainIsKeptForMoreRowsThanExpertsHugeExpertsOrAForcedKernel) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const FusedCase fc = fused_cases()[0];
  const MoEConfig config = load_config(fc.preset, fc.sets);
  auto big = std::make_shared<const Graph>(build_experts_graph(config, {.max_tokens = 64, .dtype = DType::bf16}));
  EXPECT_FALSE(plan_is_fused(CudaSession(big, {})));  // 512 rows on 128 experts: a GEMM's job
  auto small = std::make_shared<const Graph>(build_experts_graph(config, {.max_tokens = 4, .dtype = DType::bf16}));
  EXPECT_TRUE(plan_is_fused(CudaSession(small, {})));
  CudaSessionOptions so;
  so.plan.forced_kernels["experts"] = "cuda.decode_gemv";
  EXPECT_FALSE(plan_is_fused(CudaSession(small, so)));
  // mixtral-8x7b's own 352 MB experts: planned only (nothing allocated), the chain stays and says why.
  PlanOptions po;
  po.backend = Backend::cuda;
  const auto mixtral = std::make_shared<const Graph>(
      build_experts_graph(load_config("mixtral-8x7b", {}), {.max_tokens = 1, .dtype = DType::bf16}));
  const Plan plan = make_plan(mixtral, po);
  bool chain = false;
  for (const PlanStep& step : plan.steps)
    if (plan.graph->node(step.node).op->kind() == "experts")
      chain = step.reason.find("MiB per expert") != std::string::npos;
  EXPECT_TRUE(chain);
}

// The single-token kernels: cuda.fused_single_token_w2t (w2 read transposed, from a copy packed
// once at bind time) and cuda.fused_single_token (w2 read in place, in quads). Planned ahead of the
// two-phase kernel where the graph's maximum T is 1, the w2t kernel first, its copy of w2 listed in
// the plan; checked against the fp64 reference, against each other and against the two-phase kernel
// on the same inputs (repeated and out-of-range ids included), bit-identical reruns, captured replays,
// shapes whose items outnumber the resident blocks (several rounds per block) or whose H is above
// 2048 and no multiple of it; and the packing against a host transpose.
namespace {

constexpr const char* kW2t = "cuda.fused_single_token_w2t";
constexpr const char* kQuads = "cuda.fused_single_token";

std::string fused_kernel(const Plan& plan) {
  for (const PlanStep& step : plan.steps)
    if (plan.graph->node(step.node).op->kind() == "fused_experts") return step.kernel->name;
  return "(not fused)";
}

using testing_gpu::experts_graph;

double rel_norm(const std::vector<float>& got, const std::vector<float>& want) {
  return reference::compare(got.data(), std::vector<double>(want.begin(), want.end())).rel_norm;
}

}  // namespace

TEST(CudaFusedSingleToken, PlannedWhereTheMaximumTIsOneAndTheShapeAllows) {  // planning only: no device needed
  PlanOptions po;
  po.backend = Backend::cuda;
  const std::vector<std::string> sets = {"hidden_size=256", "moe_intermediate_size=128"};
  EXPECT_EQ(fused_kernel(make_plan(experts_graph("qwen1.5-moe-a2.7b", sets, 1), po)), kW2t);
  EXPECT_EQ(fused_kernel(make_plan(experts_graph("qwen1.5-moe-a2.7b", sets, 2), po)), "cuda.fused_decode");
  // I = 88 is no multiple of 16 (the w2t kernel's items) nor of 64 (the quads): the two-phase kernel runs it.
  EXPECT_EQ(fused_kernel(make_plan(experts_graph("qwen1.5-moe-a2.7b", {"hidden_size=256", "moe_intermediate_size=88"}, 1), po)),
            "cuda.fused_decode");
  // H = 200 and I = 80: multiples of 8 and 16 (the w2t kernel's) but not of 32 and 64 (the quads').
  const auto odd = experts_graph("qwen1.5-moe-a2.7b", {"hidden_size=200", "moe_intermediate_size=80"}, 1);
  EXPECT_EQ(fused_kernel(make_plan(odd, po)), kW2t);
  // 4 choices x 256 items: more than about one round of resident blocks, where the two-phase kernel
  // measured faster (deepseek-v3's 1024 items); either single-token kernel can still be forced there.
  const auto many_items = experts_graph("qwen1.5-moe-a2.7b", {"hidden_size=256", "moe_intermediate_size=4096"}, 1);
  EXPECT_EQ(fused_kernel(make_plan(many_items, po)), "cuda.fused_decode");
  // A layer with a shared expert: folded into the w2t kernel (the quads run the routed experts only;
  // CudaFusedSingleTokenShared below).
  const MoEConfig shared = load_config("qwen1.5-moe-a2.7b", {"hidden_size=256", "moe_intermediate_size=128",
                                                              "shared_expert_intermediate_size=256"});
  const auto layer = std::make_shared<const Graph>(build_moe_layer(shared, {.max_tokens = 1, .dtype = DType::bf16}));
  EXPECT_EQ(fused_kernel(make_plan(layer, po)), kW2t);
  const auto routed = std::make_shared<const Graph>(build_scope_graph(shared, "routed", {.max_tokens = 1, .dtype = DType::bf16}));
  EXPECT_EQ(fused_kernel(make_plan(routed, po)), kW2t);
  for (const char* kernel : {kW2t, kQuads}) {
    po.forced_kernels["fused_experts"] = kernel;
    EXPECT_EQ(fused_kernel(make_plan(many_items, po)), kernel);
    EXPECT_EQ(fused_kernel(make_plan(experts_graph("qwen1.5-moe-a2.7b", sets, 1), po)), kernel);
  }
  po.forced_kernels["fused_experts"] = "cuda.fused_decode";
  EXPECT_EQ(fused_kernel(make_plan(experts_graph("qwen1.5-moe-a2.7b", sets, 1), po)), "cuda.fused_decode");
}

// Planning only (no device needed): the w2t kernel's plan holds exactly one packed copy, w2
// transposed (as large as w2), read by its step and listed in the summary; the quads read w2 in place
// and pack nothing, and are what a plan without packed weights runs.
TEST(CudaFusedSingleToken, TheW2tKernelReadsOneTransposedCopyOfW2ListedInThePlan) {
  PlanOptions po;
  po.backend = Backend::cuda;
  const MoEConfig config = load_config("qwen1.5-moe-a2.7b", {"hidden_size=256", "moe_intermediate_size=128"});
  const auto g = std::make_shared<const Graph>(build_experts_graph(config, {.max_tokens = 1, .dtype = DType::bf16}));
  const Plan plan = make_plan(g, po);
  ASSERT_EQ(fused_kernel(plan), kW2t);
  ASSERT_EQ(plan.packed.size(), 1u);
  const int64_t bytes = int64_t{config.experts} * 256 * 128 * 2;
  EXPECT_EQ(plan.packed[0].bytes, bytes);
  EXPECT_EQ(plan.packed_bytes, bytes);
  EXPECT_EQ(plan.packed[0].layout, "w2 transposed [E, I, H]");
  EXPECT_EQ(plan.graph->value(plan.packed[0].source).name, "experts.w2");
  int readers = 0;
  for (const PlanStep& step : plan.steps)
    if (step.packed >= 0) {
      ++readers;
      EXPECT_EQ(step.packed, 0);
      EXPECT_EQ(step.kernel->name, kW2t);
      EXPECT_NE(step.reason.find("w2 read transposed, from a copy packed once at bind time"), std::string::npos) << step.reason;
    }
  EXPECT_EQ(readers, 1);
  std::ostringstream summary;
  plan.write_summary(summary);
  EXPECT_NE(summary.str().find("once, when the weights are bound: experts.w2 packed as w2 transposed [E, I, H]"),
            std::string::npos) << summary.str();
  po.forced_kernels["fused_experts"] = kQuads;
  const Plan quads = make_plan(g, po);
  EXPECT_EQ(fused_kernel(quads), kQuads);
  EXPECT_TRUE(quads.packed.empty());
  EXPECT_EQ(quads.packed_bytes, 0);
  po.forced_kernels.clear();
  po.packed_weights = false;  // --no-packed-weights, or a device the copy does not fit on
  const Plan unpacked = make_plan(g, po);
  EXPECT_EQ(fused_kernel(unpacked), kQuads);
  EXPECT_TRUE(unpacked.packed.empty());
}

TEST(CudaFusedSingleToken, MatchesReferenceEachOtherAndTheTwoPhaseKernelAndRepeatsBitForBit) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  struct Case {
    FusedCase shape;
    bool quads;  // the quads run it too (H a multiple of 32, I of 64)
  };
  const std::vector<Case> cases = {
      {{"qwen3", "qwen3-30b-a3b", {"hidden_size=256", "moe_intermediate_size=192"}, 1}, true},
      {{"qwen15", "qwen1.5-moe-a2.7b", {"hidden_size=320", "moe_intermediate_size=128"}, 1}, true},
      {{"deepseek", "deepseek-v3", {"hidden_size=128", "moe_intermediate_size=64"}, 1}, true},
      {{"mixtral", "mixtral-8x7b", {"hidden_size=96", "intermediate_size=320"}, 1}, true},
      // 8 choices x 256 items of 16 features: more items than resident blocks, several rounds each.
      {{"rounds", "qwen3-30b-a3b", {"hidden_size=64", "moe_intermediate_size=4096"}, 1}, true},
      // H above 2048 and no multiple of it: a w2t item's 320 vectors of 8 features of H take two
      // rounds of its 256 threads (the probe's kernel stopped at 2048).
      {{"wide", "qwen1.5-moe-a2.7b", {"hidden_size=2560", "moe_intermediate_size=128"}, 1}, true},
      // H and I multiples of 8 and 16 only (257 vectors of H, 5 items per choice): the w2t kernel alone.
      {{"odd", "qwen1.5-moe-a2.7b", {"hidden_size=2056", "moe_intermediate_size=80"}, 1}, false},
  };
  for (const Case& c : cases) {
    const FusedCase& fc = c.shape;
    const auto g = experts_graph(fc.preset, fc.sets, 1);
    CudaSessionOptions so;
    so.seed = 5;
    so.plan.forced_kernels["fused_experts"] = kW2t;  // "rounds" is planned two-phase
    CudaSession s(g, so);
    ASSERT_EQ(fused_kernel(s.plan()), kW2t) << fc.name;
    ASSERT_EQ(s.plan().packed.size(), 1u) << fc.name;
    CudaSessionOptions two_phase = so;
    two_phase.plan.forced_kernels["fused_experts"] = "cuda.fused_decode";
    CudaSession other(g, two_phase, &s);
    ASSERT_EQ(fused_kernel(other.plan()), "cuda.fused_decode") << fc.name;
    std::unique_ptr<CudaSession> quads;
    if (c.quads) {
      CudaSessionOptions in_place = so;
      in_place.plan.forced_kernels["fused_experts"] = kQuads;
      quads = std::make_unique<CudaSession>(g, in_place, &s);
      ASSERT_EQ(fused_kernel(quads->plan()), kQuads) << fc.name;
    }
    std::vector<CudaSession*> sessions = {&s, &other};
    if (quads) sessions.push_back(quads.get());
    for (CudaSession* session : sessions) session->set_tokens(1);
    // The w2t kernel twice (the same bytes), then the others on the same inputs: the two-phase kernel
    // within the usual bf16 tolerance; the quads, whose sums differ only in their order, closer.
    const auto compare = [&](const std::string& what) {
      s.run();
      const std::vector<float> first = s.output();
      s.run();
      const std::vector<float> second = s.output();
      EXPECT_EQ(0, std::memcmp(first.data(), second.data(), first.size() * 4)) << fc.name << what << ": rerun differs";
      other.run();
      EXPECT_LT(rel_norm(first, other.output()), 1e-2) << fc.name << what << ": against the two-phase kernel";
      if (quads) {
        quads->run();
        EXPECT_LT(rel_norm(first, quads->output()), 5e-3) << fc.name << what << ": against the quads";
      }
    };
    s.run();
    const CheckReport r = s.check(1e-2);
    EXPECT_TRUE(r.pass) << fc.name << " rel_norm " << r.comparison.rel_norm;
    if (quads) {
      quads->run();
      const CheckReport q = quads->check(1e-2);
      EXPECT_TRUE(q.pass) << fc.name << " (quads) rel_norm " << q.comparison.rel_norm;
    }
    compare("");
    // A repeated expert, -1 and E (ids outside [0, E) contribute nothing), the same routing for all.
    const MoEConfig config = load_config(fc.preset, fc.sets);
    const int k = config.top_k;
    std::vector<int32_t> ids(static_cast<std::size_t>(k));
    for (int j = 0; j < k; ++j) ids[static_cast<std::size_t>(j)] = j % std::max(1, k / 2);
    if (k >= 4) ids[1] = -1;
    ids.back() = config.experts;
    for (CudaSession* session : sessions)
      session->write_input(*session->graph().find_value("route.ids"), ids.data(), ids.size() * sizeof(int32_t));
    compare(" with repeated and out-of-range ids");
  }
}

TEST(CudaFusedSingleToken, OneCaptureReplaysTheEagerBytes) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (const char* kernel : {kW2t, kQuads})
    for (const char* hidden : {"hidden_size=256", "hidden_size=2560"}) {
      const auto g = experts_graph("qwen1.5-moe-a2.7b", {hidden, "moe_intermediate_size=128"}, 1);
      CudaSessionOptions so;
      so.plan.capturable = true;
      so.plan.forced_kernels["fused_experts"] = kernel;
      so.seed = 11;
      CudaSession s(g, so);
      ASSERT_EQ(fused_kernel(s.plan()), kernel);
      s.set_tokens(1);
      s.run();
      const std::vector<float> eager = s.output();
      s.capture_any_tokens();
      for (int replay = 0; replay < 3; ++replay) {  // the counters are left zero for the next replay
        s.replay();
        const std::vector<float> replayed = s.output();
        EXPECT_EQ(0, std::memcmp(replayed.data(), eager.data(), eager.size() * 4)) << kernel << " " << hidden << " replay " << replay;
      }
    }
}

// pack_w2_transposed on its own: random bits (any 16-bit pattern, NaNs included, moved as they are)
// into a poisoned buffer, against a host transpose; a shape of partial tiles on both sides, and one
// with more tiles than the packing's grid has blocks (each block several tiles).
TEST(CudaFusedSingleToken, PackW2TransposedMatchesAHostTranspose) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(20261124);
  for (const auto& [experts, hidden, inter] : {std::tuple{3, 40, 48}, std::tuple{5, 1000, 900}}) {
    SCOPED_TRACE("E = " + std::to_string(experts) + ", H = " + std::to_string(hidden) + ", I = " + std::to_string(inter));
    const std::size_t n = static_cast<std::size_t>(experts) * hidden * inter;
    ASSERT_EQ(cuda::packed_w2t_bytes(experts, hidden, inter), static_cast<int64_t>(n * 2));
    std::vector<uint16_t> w2(n);
    for (uint16_t& v : w2) v = static_cast<uint16_t>(rng());
    const auto device_bytes = [](std::size_t bytes) {
      void* p = nullptr;
      EXPECT_EQ(cudaMalloc(&p, bytes), cudaSuccess);
      return std::unique_ptr<void, cudaError_t (*)(void*)>(p, cudaFree);
    };
    const auto source = device_bytes(n * 2), packed = device_bytes(n * 2);
    ASSERT_EQ(cudaMemcpy(source.get(), w2.data(), n * 2, cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cudaMemset(packed.get(), 0xff, n * 2), cudaSuccess);  // poison: a place left unwritten shows
    cuda::pack_w2_transposed(static_cast<const uint16_t*>(source.get()), experts, hidden, inter,
                             static_cast<uint16_t*>(packed.get()), nullptr);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    std::vector<uint16_t> got(n);
    ASSERT_EQ(cudaMemcpy(got.data(), packed.get(), n * 2, cudaMemcpyDeviceToHost), cudaSuccess);
    for (int e = 0; e < experts; ++e)
      for (int i = 0; i < inter; ++i)
        for (int h = 0; h < hidden; ++h) {
          const std::size_t at = (static_cast<std::size_t>(e) * inter + i) * hidden + h;
          const std::size_t from = (static_cast<std::size_t>(e) * hidden + h) * inter + i;
          ASSERT_EQ(got[at], w2[from]) << "expert " << e << " i " << i << " h " << h;
        }
  }
}

// A shared expert folded into the two-phase kernel (ops/fuse_experts.hpp): S / I more choices per
// token whose weights stream in the same launch, the sigmoid gate (Qwen2-MoE) or 1 (DeepSeek) as
// their weight, the reduce gone. Planned where every token fits one group of rows; checked against
// the fp64 reference, against the same layer with the shared expert apart, bit-identical reruns and
// captured replays.
namespace {

const Node* fused_node(const Plan& plan, const PlanStep** step_out = nullptr) {
  for (const PlanStep& step : plan.steps)
    if (plan.graph->node(step.node).op->kind() == "fused_experts") {
      if (step_out) *step_out = &step;
      return &plan.graph->node(step.node);
    }
  return nullptr;
}

bool folds_shared(const Plan& plan) {
  const Node* n = fused_node(plan);
  return n && static_cast<const FusedExpertsOp&>(*n->op).shared().has_value();
}

int count_kind(const Plan& plan, const std::string& kind) {
  int n = 0;
  for (const Node& node : plan.graph->nodes()) n += node.op->kind() == kind;
  return n;
}

struct SharedCase {
  std::string name, preset;
  std::vector<std::string> sets;
};

std::vector<SharedCase> shared_cases() {
  return {
      // gated, S = 4 I (qwen1.5's own ratio), H and I multiples of 8 but of no tile
      {"qwen15", "qwen1.5-moe-a2.7b", {"hidden_size=264", "moe_intermediate_size=88", "shared_expert_intermediate_size=352"}},
      // ungated, 8 shared experts of the routed experts' size (S = 8 I: 8 + 8 choices per token; the
      // real model's one is too small a share of the bytes to be folded)
      {"deepseek", "deepseek-v3", {"hidden_size=128", "moe_intermediate_size=40", "n_shared_experts=8"}},
  };
}

std::shared_ptr<const Graph> layer_graph(const SharedCase& c, int64_t max_tokens) {
  return std::make_shared<const Graph>(build_moe_layer(load_config(c.preset, c.sets), {.max_tokens = max_tokens, .dtype = DType::bf16}));
}

// A layer whose route is a graph input (ids and weights written by the test): x, the shared expert,
// dispatch, experts, combine and the reduce adding the shared expert.
std::shared_ptr<const Graph> route_given_layer(const MoEConfig& c, int64_t max_tokens) {
  LayerBuilder b("qwen15.route_given", max_tokens);
  const ValueId x = b.input("x", Shape{Dim::tokens(), Dim::of(c.hidden)}, DType::bf16);
  const Route route = b.route_input("route", c.experts, c.top_k);
  const ValueId shared = b.shared_expert(x, {.intermediate = c.shared_intermediate, .gated = c.shared_gate});
  const ValueId out = b.reduce(b.combine(b.experts(b.dispatch(x, route), {.intermediate = c.intermediate}), route), {shared});
  return std::make_shared<const Graph>(std::move(b).finish({out}));
}

}  // namespace

TEST(CudaFusedDecodeShared, FoldedWhereEveryTokenFitsOneGroupAndThePlanSaysWhyNotElsewhere) {  // planning only
  PlanOptions po;
  po.backend = Backend::cuda;
  for (const SharedCase& c : shared_cases()) {
    for (int64_t T : {1, 2, 4}) {
      const Plan plan = make_plan(layer_graph(c, T), po);
      const PlanStep* step = nullptr;
      ASSERT_TRUE(fused_node(plan, &step)) << c.name << " T=" << T;
      EXPECT_EQ(step->kernel->name, "cuda.fused_decode") << c.name;
      EXPECT_TRUE(folds_shared(plan)) << c.name << " T=" << T;
      EXPECT_EQ(count_kind(plan, "shared_expert") + count_kind(plan, "reduce"), 0) << c.name;
      EXPECT_NE(step->reason.find("folded in as"), std::string::npos) << step->reason;
      // The one-launch gate before it releases it: the shared expert's gate/up rows stream meanwhile.
      EXPECT_TRUE(step->starts_early) << step->reason;
    }
  }
  // Five tokens would stream the shared weights twice: apart, and the fused step says why.
  const SharedCase qwen = shared_cases()[0];
  const Plan five = make_plan(layer_graph(qwen, 5), po);
  const PlanStep* step = nullptr;
  ASSERT_TRUE(fused_node(five, &step));
  EXPECT_FALSE(folds_shared(five));
  EXPECT_EQ(count_kind(five, "shared_expert"), 1);
  EXPECT_NE(step->reason.find("shared expert not folded in"), std::string::npos) << step->reason;
  EXPECT_NE(step->reason.find("5 tokens"), std::string::npos) << step->reason;
  // deepseek-v3 as it is: its shared expert's 88 MB are an eighth of the 704 MB of routed weights a
  // token touches, which hide beside them as well: apart, and the plan says why.
  const auto deepseek = std::make_shared<const Graph>(
      build_moe_layer(load_config("deepseek-v3", {}), {.max_tokens = 1, .dtype = DType::bf16}));
  const Plan real = make_plan(deepseek, po);
  ASSERT_TRUE(fused_node(real, &step));
  EXPECT_FALSE(folds_shared(real));
  EXPECT_NE(step->reason.find("its weights are 0.12 of the routed experts' expected at T=1"), std::string::npos) << step->reason;
  EXPECT_FALSE(step->starts_early) << "nothing to do before the routing: " << step->reason;
  // S not a multiple of I: apart.
  const SharedCase odd{"odd", "qwen1.5-moe-a2.7b", {"hidden_size=264", "moe_intermediate_size=88", "shared_expert_intermediate_size=120"}};
  EXPECT_FALSE(folds_shared(make_plan(layer_graph(odd, 1), po)));
  // The quads forced: they run routed experts only, so the shared expert stays apart; the w2t kernel
  // folds it (CudaFusedSingleTokenShared below).
  const SharedCase tiled{"tiled", "qwen1.5-moe-a2.7b", {"hidden_size=256", "moe_intermediate_size=128", "shared_expert_intermediate_size=256"}};
  for (const char* kernel : {kW2t, kQuads}) {
    po.forced_kernels["fused_experts"] = kernel;
    const Plan forced = make_plan(layer_graph(tiled, 1), po);
    EXPECT_EQ(folds_shared(forced), kernel == std::string(kW2t)) << kernel;
    EXPECT_EQ(fused_kernel(forced), kernel);
  }
  po.forced_kernels.clear();
  // Chunked (two chunks of 2 tokens, both folded): a step starts early only beside the previous step
  // of its lane in its own chunk (a step of a chunk the run's T does not reach launches nothing).
  for (const Policy policy : {Policy::serial, Policy::concurrent}) {
    po.policy = policy;
    const auto chunked = std::make_shared<const Graph>(chunk_tokens(*layer_graph(qwen, 4), {.chunks = 2}));
    const Plan plan = make_plan(chunked, po);
    int early = 0;
    for (std::size_t i = 0; i < plan.steps.size(); ++i) {
      if (!plan.steps[i].starts_early) continue;
      ++early;
      std::size_t p = i;
      while (p-- > 0 && plan.steps[p].lane != plan.steps[i].lane) {}
      ASSERT_LT(p, i);
      EXPECT_EQ(plan.graph->node(plan.steps[p].node).chunk, plan.graph->node(plan.steps[i].node).chunk);
      EXPECT_TRUE(plan.steps[p].kernel->releases_next);
    }
    EXPECT_GT(early, 0);
  }
  po.policy = Policy::serial;
  po.fold_shared = false;  // --no-fold-shared
  EXPECT_FALSE(folds_shared(make_plan(layer_graph(qwen, 1), po)));
}

TEST(CudaFusedDecodeShared, MatchesReferenceAndTheLayerWithTheSharedExpertApartRepeatsAndReplays) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (const SharedCase& c : shared_cases()) {
    const auto g = layer_graph(c, 4);
    CudaSessionOptions so;
    so.seed = 13;
    so.plan.capturable = true;
    CudaSession s(g, so);
    ASSERT_TRUE(folds_shared(s.plan())) << c.name;
    // The one-launch gate releases the fused kernel, which streams the shared expert's gate/up rows
    // while the gate runs (programmatic dependent launch).
    const PlanStep* step = nullptr;
    ASSERT_TRUE(fused_node(s.plan(), &step));
    EXPECT_TRUE(step->starts_early) << step->reason;
    CudaSessionOptions apart_options = so;
    apart_options.plan.fold_shared = false;
    CudaSession apart(g, apart_options, &s);
    ASSERT_FALSE(folds_shared(apart.plan())) << c.name;
    std::map<int64_t, std::vector<float>> eager;
    for (int64_t T : {int64_t{1}, int64_t{3}, int64_t{4}}) {
      s.set_tokens(T);
      s.run();
      const CheckReport r = s.check(1e-2);
      EXPECT_TRUE(r.pass) << c.name << " T=" << T << " rel_norm " << r.comparison.rel_norm;
      eager[T] = s.output();
      s.run();
      const std::vector<float> again = s.output();
      EXPECT_EQ(0, std::memcmp(again.data(), eager[T].data(), again.size() * 4)) << c.name << " rerun differs, T=" << T;
      apart.set_tokens(T);
      apart.run();
      const std::vector<float> other = apart.output();
      EXPECT_LT(reference::compare(eager[T].data(), std::vector<double>(other.begin(), other.end())).rel_norm, 1e-2)
          << c.name << " folded vs apart, T=" << T;
    }
    for (int64_t T : {int64_t{4}, int64_t{1}, int64_t{3}}) {  // the gate reads T on the host: a graph per T
      s.set_tokens(T);
      s.capture();
      for (int replay = 0; replay < 2; ++replay) {  // the kernel leaves its lane counters zero for the next
        s.replay();
        const std::vector<float> replayed = s.output();
        EXPECT_EQ(0, std::memcmp(replayed.data(), eager[T].data(), replayed.size() * 4)) << c.name << " replay T=" << T;
      }
    }
  }
}

// Routed ids outside [0, E) contribute nothing in the folded kernel too, E .. E + parts - 1 (the
// shared parts' own numbers) included: a layer whose route is a graph input, the same routing with
// the shared expert folded in and apart, early start or not.
TEST(CudaFusedDecodeShared, RoutedIdsOutsideTheExpertsContributeNothing) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const MoEConfig c = load_config("qwen1.5-moe-a2.7b", {"hidden_size=264", "moe_intermediate_size=88",
                                                        "shared_expert_intermediate_size=352"});
  const auto g = route_given_layer(c, 3);
  CudaSessionOptions so;
  so.seed = 17;
  CudaSession folded(g, so);
  ASSERT_TRUE(folds_shared(folded.plan()));
  CudaSessionOptions apart_options = so;
  apart_options.plan.fold_shared = false;
  CudaSession apart(g, apart_options, &folded);
  ASSERT_FALSE(folds_shared(apart.plan()));
  const int k = c.top_k, E = c.experts;
  // Token 0: ids E (shared part 0's number), E + 3, -1 and a real expert; token 1: all real, one
  // repeated; token 2: E + 1 twice and two real.
  const std::vector<int32_t> ids = {E, E + 3, -1, 7, 1, 2, 2, 40, E + 1, 5, E + 1, 9};
  ASSERT_EQ(ids.size(), static_cast<std::size_t>(3 * k));
  for (CudaSession* s : {&folded, &apart}) {
    s->set_tokens(3);
    s->write_input(*s->graph().find_value("route.ids"), ids.data(), ids.size() * sizeof(int32_t));
    s->run();
  }
  const std::vector<float> mine = folded.output(), theirs = apart.output();
  EXPECT_LT(reference::compare(mine.data(), std::vector<double>(theirs.begin(), theirs.end())).rel_norm, 1e-2);
}

// The one-token w2t kernel with the layer's shared expert folded in: S / 16 more items ahead of the
// routed ones, streamed while the one-launch gate runs (early start), the sigmoid gate (Qwen2-MoE) or
// 1 (DeepSeek) as their weight in the same ordered sum. Planned at T=1 where the shapes allow;
// checked against the fp64 reference, against the same layer with the shared expert apart and against
// the two-phase kernel folded the same way, bit-identical reruns and captured replays; routed ids
// outside [0, E) contribute nothing.
namespace {

std::vector<SharedCase> single_token_shared_cases() {
  return {
      // gated, S = 4 I (qwen1.5's own ratio), I and S multiples of 16, H of 8 only
      {"qwen15", "qwen1.5-moe-a2.7b", {"hidden_size=264", "moe_intermediate_size=96", "shared_expert_intermediate_size=384"}},
      // ungated, 8 shared experts of the routed experts' size (S = 8 I)
      {"deepseek", "deepseek-v3", {"hidden_size=128", "moe_intermediate_size=48", "n_shared_experts=8"}},
      // H = 2560: each item's 320 vectors of H take two rounds of its 256 threads
      {"wide", "qwen1.5-moe-a2.7b", {"hidden_size=2560", "moe_intermediate_size=64", "shared_expert_intermediate_size=256"}},
  };
}

}  // namespace

TEST(CudaFusedSingleTokenShared, PlannedAtOneTokenStartingEarlyWithOneCopyOfBothW2Transposed) {  // planning only
  PlanOptions po;
  po.backend = Backend::cuda;
  for (const SharedCase& c : single_token_shared_cases()) {
    const Plan plan = make_plan(layer_graph(c, 1), po);
    const PlanStep* step = nullptr;
    ASSERT_TRUE(fused_node(plan, &step)) << c.name;
    EXPECT_EQ(step->kernel->name, kW2t) << c.name;
    EXPECT_TRUE(folds_shared(plan)) << c.name;
    EXPECT_EQ(count_kind(plan, "shared_expert") + count_kind(plan, "reduce"), 0) << c.name;
    EXPECT_TRUE(step->starts_early) << step->reason;
    EXPECT_NE(step->reason.find("folded in as"), std::string::npos) << step->reason;
    // One packed copy: the routed experts' w2 transposed, then the shared expert's.
    const MoEConfig config = load_config(c.preset, c.sets);
    ASSERT_EQ(plan.packed.size(), 1u) << c.name;
    EXPECT_EQ(plan.packed[0].bytes,
              (int64_t{config.experts} * config.intermediate + config.shared_intermediate) * config.hidden * 2)
        << c.name;
    EXPECT_EQ(plan.packed[0].layout, "w2 transposed [E, I, H], then the shared expert's w2 transposed [S, H]");
    // Two tokens: the two-phase kernel folds it.
    const Plan two = make_plan(layer_graph(c, 2), po);
    ASSERT_TRUE(fused_node(two, &step));
    EXPECT_EQ(step->kernel->name, "cuda.fused_decode") << c.name;
  }
  // The routed experts alone (no shared expert) keep the plain copy's layout, so a plan holding both
  // kinds of node would keep two copies apart.
  const SharedCase qwen = single_token_shared_cases()[0];
  const auto routed = std::make_shared<const Graph>(
      build_scope_graph(load_config(qwen.preset, qwen.sets), "routed", {.max_tokens = 1, .dtype = DType::bf16}));
  const Plan alone = make_plan(routed, po);
  ASSERT_EQ(alone.packed.size(), 1u);
  EXPECT_EQ(alone.packed[0].layout, "w2 transposed [E, I, H]");
  // --no-early-start: folded, not early.
  po.early_start = false;
  const Plan late = make_plan(layer_graph(qwen, 1), po);
  const PlanStep* step = nullptr;
  ASSERT_TRUE(fused_node(late, &step));
  EXPECT_EQ(step->kernel->name, kW2t);
  EXPECT_FALSE(step->starts_early);
}

TEST(CudaFusedSingleTokenShared, MatchesReferenceTheLayerApartAndTheTwoPhaseKernelRepeatsAndReplays) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (const SharedCase& c : single_token_shared_cases()) {
    for (const bool early : {true, false}) {
      SCOPED_TRACE(c.name + (early ? ", early start" : ", no early start"));
      const auto g = layer_graph(c, 1);
      CudaSessionOptions so;
      so.seed = 23;
      so.plan.capturable = true;
      so.plan.early_start = early;
      CudaSession s(g, so);
      const PlanStep* step = nullptr;
      ASSERT_TRUE(fused_node(s.plan(), &step));
      ASSERT_EQ(step->kernel->name, kW2t);
      ASSERT_TRUE(folds_shared(s.plan()));
      EXPECT_EQ(step->starts_early, early);
      CudaSessionOptions apart_options = so;
      apart_options.plan.fold_shared = false;
      CudaSession apart(g, apart_options, &s);
      ASSERT_FALSE(folds_shared(apart.plan()));
      CudaSessionOptions two_phase_options = so;
      two_phase_options.plan.forced_kernels["fused_experts"] = "cuda.fused_decode";
      CudaSession two_phase(g, two_phase_options, &s);
      ASSERT_TRUE(folds_shared(two_phase.plan()));
      for (CudaSession* session : {&s, &apart, &two_phase}) session->set_tokens(1);
      s.run();
      const CheckReport r = s.check(1e-2);
      EXPECT_TRUE(r.pass) << "rel_norm " << r.comparison.rel_norm;
      const std::vector<float> eager = s.output();
      s.run();
      const std::vector<float> again = s.output();
      EXPECT_EQ(0, std::memcmp(again.data(), eager.data(), eager.size() * 4)) << "rerun differs";
      apart.run();
      EXPECT_LT(rel_norm(eager, apart.output()), 1e-2) << "folded vs apart";
      two_phase.run();
      EXPECT_LT(rel_norm(eager, two_phase.output()), 1e-2) << "against the two-phase kernel";
      s.capture();
      for (int replay = 0; replay < 3; ++replay) {  // the kernel leaves its lane counters zero for the next
        s.replay();
        const std::vector<float> replayed = s.output();
        EXPECT_EQ(0, std::memcmp(replayed.data(), eager.data(), eager.size() * 4)) << "replay " << replay;
      }
    }
  }
}

TEST(CudaFusedSingleTokenShared, RoutedIdsOutsideTheExpertsContributeNothing) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const MoEConfig c = load_config("qwen1.5-moe-a2.7b", {"hidden_size=264", "moe_intermediate_size=96",
                                                        "shared_expert_intermediate_size=384"});
  const auto g = route_given_layer(c, 1);
  CudaSessionOptions so;
  so.seed = 29;
  CudaSession folded(g, so);
  ASSERT_TRUE(folds_shared(folded.plan()));
  ASSERT_EQ(fused_kernel(folded.plan()), kW2t);
  CudaSessionOptions apart_options = so;
  apart_options.plan.fold_shared = false;
  CudaSession apart(g, apart_options, &folded);
  ASSERT_FALSE(folds_shared(apart.plan()));
  const int E = c.experts;
  ASSERT_EQ(c.top_k, 4);
  const std::vector<int32_t> ids = {E, -1, 7, 7};  // out of range twice, a repeated real expert
  for (CudaSession* s : {&folded, &apart}) {
    s->set_tokens(1);
    s->write_input(*s->graph().find_value("route.ids"), ids.data(), ids.size() * sizeof(int32_t));
    s->run();
  }
  const std::vector<float> mine = folded.output(), theirs = apart.output();
  EXPECT_LT(reference::compare(mine.data(), std::vector<double>(theirs.begin(), theirs.end())).rel_norm, 1e-2);
}

// Two chunks of one token each, both folded into the w2t kernel (on two lanes in the concurrent
// plan, so the two launches may run at once: neither waits for a block that is not running): at
// T = 2 both chunks run, at T = 1 the second has no token. Against the fp64 reference, reruns and
// captured replays bit for bit.
TEST(CudaFusedSingleTokenShared, TwoChunksOfOneTokenMatchTheReferenceAndReplay) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const SharedCase c = single_token_shared_cases()[0];
  const auto chunked = std::make_shared<const Graph>(chunk_tokens(*layer_graph(c, 2), {.chunks = 2}));
  for (const Policy policy : {Policy::serial, Policy::concurrent}) {
    SCOPED_TRACE(policy == Policy::serial ? "serial" : "concurrent");
    CudaSessionOptions so;
    so.seed = 31;
    so.plan.policy = policy;
    so.plan.capturable = true;
    CudaSession s(chunked, so);
    int folded_w2t = 0;
    for (const PlanStep& step : s.plan().steps) {
      const Node& n = s.plan().graph->node(step.node);
      if (n.op->kind() == "fused_experts" && step.kernel->name == kW2t &&
          static_cast<const FusedExpertsOp&>(*n.op).shared().has_value())
        ++folded_w2t;
    }
    EXPECT_EQ(folded_w2t, 2) << "both chunks fold the shared expert into the one-token kernel";
    for (int64_t T : {int64_t{2}, int64_t{1}}) {
      const std::string at = "T=" + std::to_string(T);
      const std::vector<float> eager = testing_gpu::run_checked(s, T, at);
      testing_gpu::expect_rerun_same(s, eager, at);
      testing_gpu::expect_replays_same(s, eager, at, 2);
    }
  }
}
