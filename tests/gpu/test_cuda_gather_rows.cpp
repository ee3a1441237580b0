// GEMM 1 gathering its rows from x (cuda.cutlass_gather_tiles_narrow, cuda.cutlass_gather_swiglu_narrow,
// cuda.cutlass_gather_swiglu_wide_single; kernels/cuda/cutlass_gather_rows.cuh): the fused node runs
// the chain on the 64x256 tiles (two copying warps) or the 128x256 ones (three) without the
// dispatch's permuted copy of x. Planned below 56 and from 96 to 192 rows per expert, huge experts
// included; the 128x256 tiles' gather passed over everywhere (measured behind the chain), run where
// forced (planning only, no device needed); on the GPU bit for bit the chain forced onto the same
// tiles, on random and skewed routing (most experts empty, a few with hundreds of rows), with H and I
// of no tile's multiple (K's last k-block and the packed I zero-filled), every T from 1 up; reruns
// bit-identical; one capture replayed at several T gives the eager bytes.
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "bench/cuda/cuda_session.hpp"
#include "tests/gpu/bf16_graphs.hpp"
#include "tests/gpu/session_checks.hpp"
#include "kernels/cuda/device.hpp"
#include "ops/fused_experts_op.hpp"
#include "ops/layer_builder.hpp"
#include "ops/moe_layer.hpp"
#include "scheduler/plan.hpp"
#include "tests/reference/reference.hpp"

using namespace moeflow;

namespace {

constexpr const char* kGatherTiles = "cuda.cutlass_gather_tiles_narrow";
constexpr const char* kGatherSwiglu = "cuda.cutlass_gather_swiglu_narrow";
constexpr const char* kGatherWide = "cuda.cutlass_gather_swiglu_wide_single";

using testing_gpu::expect_checked;
using testing_gpu::expect_replays_same;
using testing_gpu::expect_rerun_same;
using testing_gpu::expect_same_bytes;
using testing_gpu::experts_graph;
using testing_gpu::run_checked;
std::string experts_kernel(const Plan& plan) { return testing_gpu::routed_experts_kernel(plan); }

// qwen3-30b-a3b's routing (E = 128, k = 8: T / 16 rows per expert) at test sizes: H = 200 is no
// multiple of the 64-column k-block, I = 136 none of the 128 features the packed w13 pads to.
const std::vector<std::string> kQwen3Small = {"hidden_size=200", "moe_intermediate_size=136"};

std::string planned(const CudaSession& s) { return experts_kernel(s.plan()); }

// qwen1.5-moe-a2.7b's layer (E = 60, k = 4) with its shared expert, at a test size.
const MoEConfig& kSharedSmall() {
  static const MoEConfig c = load_config("qwen1.5-moe-a2.7b", {"hidden_size=256", "moe_intermediate_size=128",
                                                               "shared_expert_intermediate_size=256"});
  return c;
}

}  // namespace

TEST(CudaGatherRows, PlannedWhereTheChainPlansTheNarrowTiles) {  // planning only: no device needed
  PlanOptions po;
  po.backend = Backend::cuda;
  // 1 row per expert: the decode kernel; 4, 40 and 128: the gather with the packed tiles; 64 (the
  // 64-row tiles in pairs) and 256 (128x256 tiles): the chain.
  EXPECT_EQ(experts_kernel(make_plan(experts_graph("qwen3-30b-a3b", kQwen3Small, 16), po)), "cuda.fused_decode");
  EXPECT_EQ(experts_kernel(make_plan(experts_graph("qwen3-30b-a3b", kQwen3Small, 64), po)), kGatherTiles);
  EXPECT_EQ(experts_kernel(make_plan(experts_graph("qwen3-30b-a3b", kQwen3Small, 640), po)), kGatherTiles);
  EXPECT_EQ(experts_kernel(make_plan(experts_graph("qwen3-30b-a3b", kQwen3Small, 1024), po)), "cuda.cutlass_swiglu_narrow_pair");
  EXPECT_EQ(experts_kernel(make_plan(experts_graph("qwen3-30b-a3b", kQwen3Small, 2048), po)), kGatherTiles);
  // From 96 rows with H above 4096: the unpacked tiles (the packed ones re-read their operands there).
  EXPECT_EQ(experts_kernel(make_plan(experts_graph("qwen3-30b-a3b", {"hidden_size=4104", "moe_intermediate_size=136"}, 2048), po)),
            kGatherSwiglu);
  EXPECT_EQ(experts_kernel(make_plan(experts_graph("qwen3-30b-a3b", {"hidden_size=4104", "moe_intermediate_size=136"}, 640), po)),
            kGatherTiles);
  // From 192 rows (256 here) the chain on the 128x256 tiles: their three-warp gather is passed over.
  EXPECT_EQ(experts_kernel(make_plan(experts_graph("qwen3-30b-a3b", kQwen3Small, 4096), po)), "cuda.cutlass_swiglu_wide_single");
  // The gather reads the packed copies: with packed weights off, or fusion off, the chain runs.
  PlanOptions unpacked = po;
  unpacked.packed_weights = false;
  EXPECT_EQ(experts_kernel(make_plan(experts_graph("qwen3-30b-a3b", kQwen3Small, 64), unpacked)),
            "cuda.cutlass_grouped_narrow_pair");
  PlanOptions unfused = po;
  unfused.fuse = false;
  EXPECT_EQ(experts_kernel(make_plan(experts_graph("qwen3-30b-a3b", kQwen3Small, 64), unfused)), "cuda.cutlass_tiles_narrow");
  // Huge experts (mixtral-8x7b's own sizes): the packed tiles' gather from two rows per expert (T=8)
  // below 56, the decode kernel at one (T=4), the chain at 512 rows (T=2048).
  EXPECT_EQ(experts_kernel(make_plan(experts_graph("mixtral-8x7b", {}, 4), po)), "cuda.decode_gemv");
  EXPECT_EQ(experts_kernel(make_plan(experts_graph("mixtral-8x7b", {}, 8), po)), kGatherTiles);
  EXPECT_EQ(experts_kernel(make_plan(experts_graph("mixtral-8x7b", {}, 128), po)), kGatherTiles);
  EXPECT_NE(experts_kernel(make_plan(experts_graph("mixtral-8x7b", {}, 2048), po)), kGatherSwiglu);
  EXPECT_NE(experts_kernel(make_plan(experts_graph("mixtral-8x7b", {}, 2048), po)), kGatherTiles);
  // Outside those ranges the planner passes the gathering kernels over (it does not refuse them):
  // --kernel runs one there, and so may a tuning cache, so `moeflow tune` measures them everywhere.
  PlanOptions forced = po;
  for (const char* kernel : {kGatherTiles, kGatherSwiglu, kGatherWide}) {
    forced.forced_kernels = {{"fused_experts", kernel}};
    EXPECT_EQ(experts_kernel(make_plan(experts_graph("qwen3-30b-a3b", kQwen3Small, 16), forced)), kernel);
    EXPECT_EQ(experts_kernel(make_plan(experts_graph("qwen3-30b-a3b", kQwen3Small, 4096), forced)), kernel);
    EXPECT_EQ(experts_kernel(make_plan(experts_graph("mixtral-8x7b", {}, 2048), forced)), kernel);
  }
  const Plan pairs = make_plan(experts_graph("qwen3-30b-a3b", kQwen3Small, 1024), po);
  for (const PlanStep& step : pairs.steps) {
    if (pairs.graph->node(step.node).op->kind() == "experts") {
      EXPECT_NE(step.reason.find(std::string(kGatherTiles) + ": 64 rows/expert at max T: the chain's tiles there (it runs "
                                 "here where forced or tuned)"),
                std::string::npos)
          << step.reason;
    }
  }
  // A layer with a shared expert: the routed chain is fused, the shared expert stays apart (the
  // gather runs the routed experts only) and, one lane in order, its add goes into the fused node's
  // combine; with the fold off (--no-fold-shared) the reduce stays.
  const auto layer_graph = std::make_shared<const Graph>(build_moe_layer(kSharedSmall(), {.max_tokens = 64, .dtype = DType::bf16}));
  for (bool fold : {true, false}) {
    PlanOptions o = po;
    o.fold_shared = fold;
    const Plan layer = make_plan(layer_graph, o);
    EXPECT_EQ(experts_kernel(layer), kGatherTiles);
    int shared_apart = 0, reduces = 0, addends = -1;
    for (const PlanStep& step : layer.steps) {
      const Node& n = layer.graph->node(step.node);
      shared_apart += n.op->kind() == "shared_expert";
      reduces += n.op->kind() == "reduce";
      if (n.op->kind() == "fused_experts") addends = static_cast<const FusedExpertsOp&>(*n.op).addends();
    }
    EXPECT_EQ(shared_apart, 1) << fold;
    EXPECT_EQ(reduces, fold ? 0 : 1);
    EXPECT_EQ(addends, fold ? 1 : 0);
  }
  // Concurrent: folded, the add would make the whole fused node wait for the shared expert, so both
  // graphs are planned, the one predicted faster kept, and a note says which and why.
  PlanOptions concurrent = po;
  concurrent.policy = Policy::concurrent;
  const Plan layer = make_plan(layer_graph, concurrent);
  std::string note;
  for (const std::string& n : layer.notes)
    if (n.find("the shared add") != std::string::npos) note = n;
  ASSERT_FALSE(note.empty());
  int reduces = 0;
  for (const PlanStep& step : layer.steps) reduces += layer.graph->node(step.node).op->kind() == "reduce";
  EXPECT_NE(note.find(reduces == 1 ? "kept as a reduce" : "folded into the fused node's combine"), std::string::npos) << note;
}

// The layer with its shared add in the fused node's combine: right against the reference, reruns
// bit-identical, a graph captured at each T (the gate reads T on the host) replaying the eager bytes,
// and the chain (forced experts kernel, its combine adding the shared expert) within bf16 rounding.
TEST(CudaGatherRows, TheLayersSharedAddInTheFusedCombine) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  auto g = std::make_shared<const Graph>(build_moe_layer(kSharedSmall(), {.max_tokens = 64, .dtype = DType::bf16}));
  CudaSessionOptions so;
  so.seed = 13;
  CudaSession s(g, so);
  ASSERT_EQ(planned(s), kGatherTiles);
  CudaSessionOptions forced = so;
  forced.plan.forced_kernels["experts"] = "cuda.cutlass_tiles_narrow";
  CudaSession chain(g, forced, &s);
  for (int64_t T : {int64_t{64}, int64_t{1}, int64_t{37}}) {
    const std::string at = "T=" + std::to_string(T);
    const std::vector<float> eager = run_checked(s, T, at);
    expect_rerun_same(s, eager, at);
    expect_replays_same(s, eager, at);
    chain.set_tokens(T);
    chain.run();
    const std::vector<float> chained = chain.output();
    EXPECT_LT(reference::compare(eager.data(), std::vector<double>(chained.begin(), chained.end())).rel_norm, 1e-3)
        << "T=" << T;
  }
}

namespace {

struct GatherCase {
  std::string name, preset;
  std::vector<std::string> sets;
  int64_t max_tokens;
  const char* gather;  // the fused kernel planned at max_tokens (or forced, below)
  const char* chain;   // the experts kernel of the same tiles, forced on the chain
  bool forced = false;  // the gather is passed over there: forced onto the fused node
};

// The session options that plan (or force) the case's gathering kernel.
CudaSessionOptions gathering(const GatherCase& gc, CudaSessionOptions so) {
  if (gc.forced) so.plan.forced_kernels["fused_experts"] = gc.gather;
  return so;
}

std::vector<GatherCase> gather_cases() {
  return {
      {"qwen3 tiles", "qwen3-30b-a3b", kQwen3Small, 96, kGatherTiles, "cuda.cutlass_tiles_narrow"},
      // E 16, k 8: T / 2 rows per expert, 128 at T = 256; H = 4104 > 4096 takes the unpacked tiles.
      {"qwen3 swiglu", "qwen3-30b-a3b", {"hidden_size=4104", "moe_intermediate_size=40", "num_experts=16"}, 256,
       kGatherSwiglu, "cuda.cutlass_swiglu_narrow"},
      // E 256, k 8; I = 40 pads to 128 packed features.
      {"deepseek tiles", "deepseek-v3", {"hidden_size=128", "moe_intermediate_size=40"}, 160, kGatherTiles,
       "cuda.cutlass_tiles_narrow"},
      // E 60, k 4: 133 rows per expert at T = 2000; H = 264 leaves an 8-column last k-block.
      {"qwen1.5 tiles", "qwen1.5-moe-a2.7b", {"hidden_size=264", "moe_intermediate_size=88"}, 2000, kGatherTiles,
       "cuda.cutlass_tiles_narrow"},
      // The 128x256 tiles' three-warp gather (forced): 256 rows per expert at T = 4096 (qwen3's
      // routing; rows 44 / 44 / 40 of each tile by the three warps), 273 at T = 4096 on qwen1.5's.
      {"qwen3 wide", "qwen3-30b-a3b", kQwen3Small, 4096, kGatherWide, "cuda.cutlass_swiglu_wide_single", true},
      {"qwen1.5 wide", "qwen1.5-moe-a2.7b", {"hidden_size=264", "moe_intermediate_size=88"}, 4096, kGatherWide,
       "cuda.cutlass_swiglu_wide_single", true},
  };
}

}  // namespace

TEST(CudaGatherRows, BitsEqualTheChainOnTheSameTilesAndRepeat) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (const GatherCase& gc : gather_cases()) {
    const auto g = experts_graph(gc.preset, gc.sets, gc.max_tokens);
    CudaSessionOptions so;
    so.seed = 5;
    CudaSession s(g, gathering(gc, so));
    ASSERT_EQ(planned(s), gc.gather) << gc.name;
    CudaSessionOptions forced = so;
    forced.plan.forced_kernels["experts"] = gc.chain;
    CudaSession chain(g, forced, &s);  // the same weights and inputs
    ASSERT_EQ(planned(chain), gc.chain) << gc.name;
    for (int64_t T : {gc.max_tokens, gc.max_tokens - 3, int64_t{1}, int64_t{7}}) {
      const std::string at = gc.name + " T=" + std::to_string(T);
      const std::vector<float> gathered = run_checked(s, T, at);
      expect_rerun_same(s, gathered, at);
      chain.set_tokens(T);
      chain.run();
      expect_same_bytes(gathered, chain.output(), at + ": the chain differs");
    }
  }
}

// Every token on the same k experts (in a rotating order): T rows on each of them, several row tiles
// with a partial last one, and every other expert empty.
TEST(CudaGatherRows, SkewedRoutingFillsSomeExpertsAndLeavesTheRestEmpty) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (const GatherCase& gc : {gather_cases()[0], gather_cases()[1], gather_cases()[4]}) {
    const MoEConfig config = load_config(gc.preset, gc.sets);
    auto g = std::make_shared<const Graph>(build_experts_graph(config, {.max_tokens = gc.max_tokens, .dtype = DType::bf16}));
    CudaSession s(g, gathering(gc, {}));
    ASSERT_EQ(planned(s), gc.gather) << gc.name;
    CudaSessionOptions forced;
    forced.plan.forced_kernels["experts"] = gc.chain;
    CudaSession chain(g, forced, &s);
    const int k = config.top_k;
    for (const int64_t T : {gc.max_tokens, int64_t{77}}) {
      std::vector<int32_t> ids(static_cast<std::size_t>(T * k));
      for (int64_t t = 0; t < T; ++t)
        for (int j = 0; j < k; ++j) ids[static_cast<std::size_t>(t * k + j)] = static_cast<int32_t>((t + j) % k);
      for (CudaSession* session : {&s, &chain}) {
        session->set_tokens(T);
        session->write_input(*session->graph().find_value("route.ids"), ids.data(), ids.size() * sizeof(int32_t));
        session->run();
      }
      const std::string at = gc.name + " T=" + std::to_string(T);
      expect_checked(s, at);
      expect_same_bytes(s.output(), chain.output(), at + ": the chain differs");
    }
  }
}

TEST(CudaGatherRows, OneCaptureServesEveryTWithTheEagerBytes) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (const GatherCase& gc : {gather_cases()[0], gather_cases()[3], gather_cases()[5]}) {
    const auto g = experts_graph(gc.preset, gc.sets, gc.max_tokens);
    CudaSessionOptions so;
    so.plan.capturable = true;
    so.seed = 11;
    CudaSession s(g, gathering(gc, so));
    ASSERT_EQ(planned(s), gc.gather) << gc.name;
    s.set_tokens(gc.max_tokens);
    s.capture_any_tokens();
    for (int64_t T : {gc.max_tokens, int64_t{1}, int64_t{45}, gc.max_tokens / 2}) {
      s.set_tokens(T);
      const std::string at = gc.name + " T=" + std::to_string(T);
      s.replay();
      const std::vector<float> replayed = s.output();
      expect_checked(s, at);
      s.run();
      expect_same_bytes(replayed, s.output(), at + ": the eager run differs from the replay");
    }
  }
}
