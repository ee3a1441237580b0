// Whole layers on the GPU (bf16): every model family at test sizes, both plans, every experts kernel,
// checked against the fp64 reference on the same bf16-rounded data (relative norm error < 1e-2);
// repeated runs give identical bytes; a CUDA-graph replay gives the bytes of the stream execution.
#include <gtest/gtest.h>

#include <cstring>
#include <map>
#include <sstream>

#include "bench/cuda/cuda_session.hpp"
#include "bench/multi_rank.hpp"
#include "ops/comm_ops.hpp"
#include "tests/family_cases.hpp"
#include "graph/chunk.hpp"
#include "graph/error.hpp"
#include "kernels/cuda/cutlass_grouped.hpp"
#include "kernels/cuda/device.hpp"
#include "ops/kernel_registry.hpp"
#include "ops/moe_layer.hpp"
#include "tests/reference/reference.hpp"

using namespace moeflow;

namespace {

using testing_cases::family_cases;

using Param = std::tuple<int, std::string, std::string>;  // case, plan, experts kernel

class CudaLayer : public testing::TestWithParam<Param> {};

}  // namespace

TEST_P(CudaLayer, MatchesReferenceAndRepeatsBitForBit) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const auto& [index, plan, kernel] = GetParam();
  const testing_cases::FamilyCase& lc = family_cases()[static_cast<std::size_t>(index)];
  const MoEConfig config = load_config(lc.preset, lc.sets);
  CudaSessionOptions so;
  so.plan.policy = plan == "serial" ? Policy::serial : Policy::concurrent;
  so.plan.forced_kernels["experts"] = kernel;
  so.seed = 5;
  int ran = 0;
  for (int64_t T : {int64_t{1}, int64_t{37}, int64_t{96}}) {
    // One plan per T: a kernel may (honestly) refuse a plan's maximum T, e.g. rows_batched when
    // rows would share experts; the T = 1 plan must always be served.
    auto g = std::make_shared<const Graph>(build_moe_layer(config, {.max_tokens = T, .dtype = DType::bf16}));
    std::unique_ptr<CudaSession> session;
    try {
      session = std::make_unique<CudaSession>(g, so);
    } catch (const Error& e) {
      ASSERT_GT(T, 1) << e.what();
      ASSERT_NE(std::string(e.what()).find("cannot run it"), std::string::npos) << e.what();
      continue;
    }
    CudaSession& s = *session;
    s.set_tokens(T);
    s.run();
    const CheckReport r = s.check(1e-2);
    EXPECT_TRUE(r.pass) << lc.name << " T=" << T << " rel_norm " << r.comparison.rel_norm << " differing "
                        << r.agreement.tokens_differing << " adopted " << r.agreement.tokens_adopted;
    const std::vector<float> first = s.output();
    s.run();
    const std::vector<float> second = s.output();
    EXPECT_EQ(0, std::memcmp(first.data(), second.data(), first.size() * 4)) << "rerun differs, T=" << T;
    ++ran;
  }
  EXPECT_GE(ran, 1);
}

INSTANTIATE_TEST_SUITE_P(
    Families, CudaLayer,
    testing::Combine(testing::Range(0, 5), testing::Values("serial", "concurrent"),
                     testing::Values("cuda.cublas_grouped_batched", "cuda.cublas_per_expert_loop",
                                     "cuda.cublas_padded_strided", "cuda.cublas_rows_batched",
                                     "cuda.decode_gemv", "cuda.cutlass_grouped", "cuda.cutlass_grouped_narrow",
                                     "cuda.cutlass_grouped_wide_single", "cuda.cutlass_grouped_narrow_pair")),
    [](const testing::TestParamInfo<Param>& i) {
      const std::string& name = std::get<2>(i.param);
      const std::string cublas = "cuda.cublas_";
      std::string k = name.rfind(cublas, 0) == 0 ? name.substr(cublas.size()) : name.substr(std::string("cuda.").size());
      return family_cases()[static_cast<std::size_t>(std::get<0>(i.param))].name + "_" + std::get<1>(i.param) + "_" + k;
    });

TEST(CudaLayerGraph, ReplayEqualsStreamExecutionBitForBitAndServesEachT) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const MoEConfig config = load_config("qwen1.5-moe-a2.7b", {"hidden_size=256", "moe_intermediate_size=96",
                                                             "shared_expert_intermediate_size=192"});
  auto g = std::make_shared<const Graph>(build_moe_layer(config, {.max_tokens = 64, .dtype = DType::bf16}));
  CudaSessionOptions so;
  so.plan.policy = Policy::concurrent;
  so.plan.capturable = true;
  CudaSession s(g, so);
  EXPECT_FALSE(s.plan().has_host_sync());
  for (int64_t T : {int64_t{1}, int64_t{64}}) {
    s.set_tokens(T);
    s.run();
    const std::vector<float> eager = s.output();
    s.capture();
    s.replay();
    const std::vector<float> replayed = s.output();
    EXPECT_EQ(0, std::memcmp(eager.data(), replayed.data(), eager.size() * 4)) << "T=" << T;
    EXPECT_TRUE(s.check(1e-2).pass);
  }
}

TEST(CudaLayerGraph, StampedReplayTracesEveryNodeAndComputesTheSameBytes) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const MoEConfig config = load_config("qwen1.5-moe-a2.7b", {"hidden_size=256", "moe_intermediate_size=96",
                                                             "shared_expert_intermediate_size=192"});
  auto g = std::make_shared<const Graph>(build_moe_layer(config, {.max_tokens = 16, .dtype = DType::bf16}));
  CudaSessionOptions so;
  so.plan.policy = Policy::concurrent;
  so.plan.capturable = true;
  CudaSession s(g, so);
  s.set_tokens(11);
  s.capture();
  s.replay();
  const std::vector<float> plain = s.output();
  Trace trace;
  EXPECT_THROW(s.replay(&trace), Error);  // an unstamped capture cannot be traced
  s.capture(/*stamped=*/true);
  s.replay(&trace);
  EXPECT_EQ(0, std::memcmp(plain.data(), s.output().data(), plain.size() * 4));
  ASSERT_EQ(trace.events.size(), s.plan().steps.size());
  EXPECT_EQ(trace.lanes.size(), s.plan().lanes.size());
  for (const PlanStep& step : s.plan().steps) {
    const TraceEvent& e = trace.events[static_cast<std::size_t>(&step - s.plan().steps.data())];
    EXPECT_GE(e.start_us, 0.0) << e.name;
    EXPECT_GT(e.duration_us, 0.0) << e.name;
    // A node starts after every node it depends on has ended.
    for (NodeId p : g->predecessors(step.node)) {
      const TraceEvent& before = trace.events[static_cast<std::size_t>(s.plan().step_of_node[static_cast<std::size_t>(p)])];
      EXPECT_GE(e.start_us, before.start_us + before.duration_us) << before.name << " -> " << e.name;
    }
  }
}

TEST(CudaLayerGraph, CaptureIsRefusedForAPlanWithAHostSync) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const MoEConfig config = load_config("mixtral-8x7b", {"hidden_size=128", "intermediate_size=64"});
  auto g = std::make_shared<const Graph>(build_moe_layer(config, {.max_tokens = 8, .dtype = DType::bf16}));
  CudaSessionOptions so;
  so.plan.forced_kernels["experts"] = "cuda.cublas_grouped_batched";
  CudaSession s(g, so);
  EXPECT_TRUE(s.plan().has_host_sync());
  s.set_tokens(8);
  try {
    s.capture();
    FAIL() << "capture should be refused";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::bad_input);
    EXPECT_NE(std::string(e.what()).find("host"), std::string::npos);
  }
}

TEST(CudaExpertsPaddedToMax, MatchesReferenceAndFallsBackToGroupedOnSkewedRouting) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  // 1024 tokens, k=2, E=8: 256 rows per expert on average, so the strategy is supported.
  const MoEConfig config = load_config("mixtral-8x7b", {"hidden_size=256", "intermediate_size=96"});
  auto g = std::make_shared<const Graph>(build_experts_graph(config, {.max_tokens = 1024, .dtype = DType::bf16}));
  CudaSessionOptions so;
  so.plan.forced_kernels["experts"] = "cuda.cublas_padded_to_max";
  CudaSession s(g, so);
  s.set_tokens(1024);
  s.run();
  CheckReport r = s.check(1e-2);
  EXPECT_TRUE(r.pass) << "uniform routing: rel_norm " << r.comparison.rel_norm;
  // Every token on experts 0 and 1: 1024 rows each, beyond the planned capacity -> grouped fallback.
  std::vector<int32_t> ids(2048);
  for (std::size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>(i % 2);
  s.write_input(*s.graph().find_value("route.ids"), ids.data(), ids.size() * sizeof(int32_t));
  s.run();
  r = s.check(1e-2);
  EXPECT_TRUE(r.pass) << "skewed routing: rel_norm " << r.comparison.rel_norm;
}

// One graph captured for any T (issue 7): replayed at several T it gives the bytes of an eager run at
// that T and passes the reference check; the wide CUTLASS tiles need >= 128 rows per expert, so
// they get a larger maximum.
TEST(CudaLayerGraph, OneCaptureForAnyTokensMatchesEagerRunsAtEveryT) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const MoEConfig config = load_config("qwen3-30b-a3b", {"hidden_size=256", "moe_intermediate_size=96"});
  struct Case {
    std::string kernel;
    int64_t max_tokens;
  };
  // qwen3: E = 128, k = 8. decode: T·k <= E at the maximum; wide: 2048·8/128 = 128 rows per expert.
  for (const Case& c : {Case{"cuda.decode_gemv", 16}, Case{"cuda.cutlass_grouped", 96},
                        Case{"cuda.cutlass_grouped_narrow", 96}, Case{"cuda.cutlass_grouped_wide", 2048},
                        Case{"cuda.cutlass_swiglu_narrow", 96}, Case{"cuda.cutlass_swiglu_wide_single", 2048},
                        Case{"cuda.cutlass_swiglu_narrow_pair", 96}, Case{"cuda.cutlass_tiles_narrow", 96},
                        Case{"cuda.cutlass_tiles_narrow_pair", 96}, Case{"cuda.cutlass_tiles_wide_single", 2048}}) {
    auto g = std::make_shared<const Graph>(build_experts_graph(config, {.max_tokens = c.max_tokens, .dtype = DType::bf16}));
    CudaSessionOptions so;
    so.plan.policy = Policy::concurrent;
    so.plan.capturable = true;
    so.plan.forced_kernels["experts"] = c.kernel;
    CudaSession s(g, so);
    s.set_tokens(c.max_tokens);
    s.capture_any_tokens();
    for (int64_t T : {c.max_tokens, int64_t{1}, c.max_tokens / 2 + 1, int64_t{3}, c.max_tokens}) {
      s.set_tokens(T);
      s.replay();
      const std::vector<float> replayed = s.output();
      EXPECT_TRUE(s.check(1e-2).pass) << c.kernel << " T=" << T;
      s.run();
      const std::vector<float> eager = s.output();
      ASSERT_EQ(replayed.size(), eager.size());
      EXPECT_EQ(0, std::memcmp(replayed.data(), eager.data(), eager.size() * 4)) << c.kernel << " T=" << T;
    }
  }
}

TEST(CudaLayerGraph, CaptureForAnyTokensIsRefusedWhereAKernelNeedsTOnTheHost) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const MoEConfig config = load_config("qwen3-30b-a3b", {"hidden_size=256", "moe_intermediate_size=96"});
  auto g = std::make_shared<const Graph>(build_moe_layer(config, {.max_tokens = 16, .dtype = DType::bf16}));
  CudaSessionOptions so;
  so.plan.capturable = true;
  CudaSession s(g, so);
  s.set_tokens(16);
  try {
    s.capture_any_tokens();
    FAIL() << "the gate's cuBLAS GEMM needs T on the host";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::bad_input);
    EXPECT_NE(std::string(e.what()).find("node 'gate'"), std::string::npos) << e.what();
  }
  s.capture();  // for one T it still works, and replays only that T
  s.replay();
  EXPECT_TRUE(s.check(1e-2).pass);
  s.set_tokens(8);
  EXPECT_THROW(s.replay(), Error);
}

// Planning only (no device needed): experts above 128 MiB with hundreds of rows each go to cuBLAS's
// padded GEMM where a host sync is allowed (from a thousand rows, one cuBLAS GEMM per expert sized
// to its rows) and to CUTLASS in a CUDA graph; smaller experts keep
// CUTLASS either way, its tiles chosen by rows per expert (ops/cuda/cuda_kernels.cpp has the
// measurements).
TEST(CudaExpertsChoice, HugeExpertsTakeThePaddedGemmUnlessCaptured) {
  const KernelRegistry& r = KernelRegistry::builtin();
  auto experts_kernel = [&](const MoEConfig& config, int64_t tokens, bool capturable) {
    const Graph g = build_experts_graph(config, {.max_tokens = tokens, .dtype = DType::bf16});
    for (const Node& n : g.nodes())
      if (n.op->kind() == "experts") return r.select(g, n, Backend::cuda, {}, {.capturable = capturable});
    throw std::logic_error("no experts node");
  };
  const MoEConfig mixtral = load_config("mixtral-8x7b");  // 336 MiB per expert
  for (int64_t tokens : {512, 2048, 4096, 8192}) {
    const KernelChoice eager = experts_kernel(mixtral, tokens, false);
    if (tokens >= 4096) {  // 1024 rows per expert and more: exact sizes, one GEMM per expert
      EXPECT_EQ(eager.kernel->name, "cuda.cublas_per_expert_loop") << tokens << ": " << eager.reason;
      EXPECT_NE(eager.reason.find("ahead of padding"), std::string::npos) << eager.reason;
    } else {
      EXPECT_EQ(eager.kernel->name, "cuda.cublas_padded_to_max") << tokens << ": " << eager.reason;
      EXPECT_NE(eager.reason.find("ahead of CUTLASS on 336 MiB per expert"), std::string::npos) << eager.reason;
    }
    // In a graph: 64-row tiles below 192 rows per expert (T=512: 128), 128-row ones from there, both
    // with the SwiGLU epilogue (on huge experts too since its stores wait for the next tile's MMAs).
    EXPECT_EQ(experts_kernel(mixtral, tokens, true).kernel->name,
              tokens == 512 ? "cuda.cutlass_swiglu_narrow" : "cuda.cutlass_swiglu_wide_single")
        << tokens;
  }
  // Below 128 rows per expert the padded GEMM declines, as before.
  EXPECT_NE(experts_kernel(mixtral, 256, false).kernel->name, "cuda.cublas_padded_to_max");
  const MoEConfig qwen3 = load_config("qwen3-30b-a3b");  // 9 MiB per expert
  EXPECT_EQ(experts_kernel(qwen3, 8192, false).kernel->name, "cuda.cutlass_swiglu_wide_single");  // 512 rows per expert
  EXPECT_EQ(experts_kernel(qwen3, 2048, false).kernel->name, "cuda.cutlass_swiglu_narrow");  // 128
  EXPECT_EQ(experts_kernel(qwen3, 512, false).kernel->name, "cuda.cutlass_tiles_narrow");  // 32: weights in packed tiles
  EXPECT_EQ(experts_kernel(qwen3, 888, false).kernel->name, "cuda.cutlass_tiles_narrow");  // 55.5
  EXPECT_EQ(experts_kernel(qwen3, 896, false).kernel->name, "cuda.cutlass_swiglu_narrow_pair");  // 56: 2x1 clusters
  EXPECT_EQ(experts_kernel(qwen3, 1528, false).kernel->name, "cuda.cutlass_swiglu_narrow_pair");  // 95.5
  EXPECT_EQ(experts_kernel(qwen3, 1536, false).kernel->name, "cuda.cutlass_swiglu_narrow");       // 96
  const MoEConfig deepseek = load_config("deepseek-v3");
  EXPECT_EQ(experts_kernel(deepseek, 8192, true).kernel->name, "cuda.cutlass_swiglu_wide_single");  // 256
  EXPECT_EQ(experts_kernel(deepseek, 4096, true).kernel->name, "cuda.cutlass_swiglu_narrow");       // 128
  EXPECT_EQ(experts_kernel(deepseek, 256, true).kernel->name, "cuda.cutlass_tiles_narrow");  // 8
  EXPECT_EQ(experts_kernel(deepseek, 2048, true).kernel->name, "cuda.cutlass_swiglu_narrow_pair");  // 64
}

// Planning only (no device needed): our decode kernel up to one row per expert on average anywhere,
// up to two on huge experts (mixtral-8x7b T=8: 16 rows on 8 experts of 336 MiB), with or without a
// host sync; on smaller experts at two rows per expert it runs only where forced, and beyond two
// rows per expert it declines, saying why.
TEST(CudaExpertsChoice, DecodeKernelUpToTwoRowsPerExpertOnHugeExperts) {
  const KernelRegistry& r = KernelRegistry::builtin();
  auto choice = [&](const MoEConfig& config, int64_t tokens, bool capturable, const std::string& forced = "") {
    const Graph g = build_experts_graph(config, {.max_tokens = tokens, .dtype = DType::bf16});
    for (const Node& n : g.nodes())
      if (n.op->kind() == "experts")
        return r.select(g, n, Backend::cuda, forced.empty() ? std::map<std::string, std::string>{}
                                                            : std::map<std::string, std::string>{{"experts", forced}},
                        {.capturable = capturable});
    throw std::logic_error("no experts node");
  };
  const MoEConfig mixtral = load_config("mixtral-8x7b");  // E = 8, k = 2
  for (const bool capturable : {false, true}) {
    for (const int64_t tokens : {1, 4, 8}) {
      const KernelChoice c = choice(mixtral, tokens, capturable);
      EXPECT_EQ(c.kernel->name, "cuda.decode_gemv") << tokens << (capturable ? " captured: " : ": ") << c.reason;
    }
    const KernelChoice eight = choice(mixtral, 8, capturable);
    EXPECT_NE(eight.reason.find("T*k = 16 <= 2E: our decode kernel streams"), std::string::npos) << eight.reason;
    EXPECT_NE(eight.reason.find("on 336 MiB per expert the weights read are all that counts"), std::string::npos)
        << eight.reason;
    EXPECT_NE(choice(mixtral, 16, capturable).kernel->name, "cuda.decode_gemv");
  }
  const MoEConfig qwen3 = load_config("qwen3-30b-a3b");  // E = 128, k = 8, 9 MiB per expert
  const KernelChoice two = choice(qwen3, 32, true);  // 256 rows = 2E
  EXPECT_NE(two.kernel->name, "cuda.decode_gemv") << two.reason;
  const KernelChoice forced = choice(qwen3, 32, true, "cuda.decode_gemv");
  EXPECT_EQ(forced.kernel->name, "cuda.decode_gemv");
  EXPECT_NE(forced.reason.find("planned only where forced"), std::string::npos) << forced.reason;
  try {
    (void)choice(qwen3, 33, true, "cuda.decode_gemv");
    ADD_FAILURE() << "the decode kernel accepted 264 rows on 128 experts";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("node 'experts': forced kernel 'cuda.decode_gemv' cannot run it: T*k = 264 > "
                                         "2E = 256: more than two rows per expert on average"),
              std::string::npos) << e.what();
  }
}

// Planning only (no device needed): a kernel that reads w13 packed gets one packed copy per (weight,
// layout), listed in the plan (summary, memory table, DOT as a node run once at bind time) and
// shared by the chunks of a chunked graph, outside the workspace.
TEST(CudaPlan, PackedWeightsAreListedOnceAndSharedByChunks) {
  const MoEConfig qwen3 = load_config("qwen3-30b-a3b");  // E = 128, H = 2048, I = 768
  for (int chunks : {1, 4}) {
    Graph g = build_experts_graph(qwen3, {.max_tokens = 8192, .dtype = DType::bf16});
    if (chunks > 1) g = chunk_tokens(g, {.chunks = chunks});
    PlanOptions o;
    o.backend = Backend::cuda;
    o.policy = Policy::concurrent;
    const Plan plan = make_plan(std::make_shared<const Graph>(std::move(g)), o);
    ASSERT_EQ(plan.packed.size(), 1u) << chunks << " chunks";
    // 512 rows per expert: the 128x256 tiles' chain, w13 packed for the SwiGLU epilogue (I = 768 is
    // six whole blocks of 128 features); 128 per chunk: the fused node of each chunk's chain, GEMM 1
    // gathering its rows, w13 and w2 packed tile by tile (one copy for the four chunks).
    const bool tiles = chunks > 1;
    const int64_t bytes = tiles ? cuda::weight_tiles_bytes(128, 2048, 768) : int64_t{128} * 2 * 768 * 2048 * 2;
    EXPECT_EQ(plan.packed[0].bytes, bytes);
    EXPECT_EQ(plan.packed_bytes, bytes);
    EXPECT_EQ(plan.graph->value(plan.packed[0].source).name, "experts.w13");
    int readers = 0;
    for (const PlanStep& s : plan.steps)
      if (s.packed >= 0) {
        ++readers;
        EXPECT_EQ(s.packed, 0);
        EXPECT_EQ(s.kernel->name, tiles ? "cuda.cutlass_gather_tiles_narrow" : "cuda.cutlass_swiglu_wide_single");
      }
    EXPECT_EQ(readers, chunks);
    std::ostringstream summary, memory, dot;
    plan.write_summary(summary);
    plan.write_memory(memory);
    plan.write_dot(dot);
    EXPECT_NE(summary.str().find(tiles ? "experts.w13 packed as w13 gate/up interleaved by 128 rows, then w2, in 256x64 tiles"
                                       : "once, when the weights are bound: experts.w13 packed as w13 gate/up interleaved by 128 rows"),
              std::string::npos) << summary.str();
    EXPECT_NE(summary.str().find("read by " + std::to_string(chunks) + " step(s)"), std::string::npos) << summary.str();
    if (!tiles) {
      EXPECT_NE(summary.str().find("(+ 768.00 MiB packed)"), std::string::npos) << summary.str();
    }
    EXPECT_NE(memory.str().find("packed     total " + std::to_string(bytes) + " bytes"), std::string::npos) << memory.str();
    EXPECT_NE(dot.str().find("cluster_bind"), std::string::npos);
  }
  // Forcing the unfused tiles packs nothing.
  PlanOptions o;
  o.backend = Backend::cuda;
  o.forced_kernels["experts"] = "cuda.cutlass_grouped_wide_single";
  const Plan plain = make_plan(std::make_shared<const Graph>(build_experts_graph(qwen3, {.max_tokens = 8192, .dtype = DType::bf16})), o);
  EXPECT_TRUE(plain.packed.empty());
  EXPECT_EQ(plain.packed_bytes, 0);
}

// Planning only (no device needed): below 56 rows per expert the 64x256 tiles read w13 and w2 from one
// copy packed tile by tile, listed once with its size; with packed weights off the same rows take the
// unfused 2x1-cluster tiles, and huge experts never take the packed tiles.
TEST(CudaPlan, WeightTilesBelow56RowsPerExpertFromOneCopyOfBothWeights) {
  const MoEConfig qwen3 = load_config("qwen3-30b-a3b");  // E = 128, H = 2048, I = 768
  auto graph = std::make_shared<const Graph>(build_experts_graph(qwen3, {.max_tokens = 512, .dtype = DType::bf16}));
  PlanOptions o;
  o.backend = Backend::cuda;
  o.fuse = false;  // the chain's experts kernel (fused, the gather runs the same tiles: test_cuda_gather_rows.cpp)
  const Plan plan = make_plan(graph, o);
  EXPECT_EQ(plan.step_for(*graph->find_node("experts")).kernel->name, "cuda.cutlass_tiles_narrow");
  ASSERT_EQ(plan.packed.size(), 1u);
  // w13: 1536 rows (six tiles of 256) x 32 k-blocks of 64; w2: 2048 rows (eight) x 12 k-blocks; 32 KB each.
  const int64_t bytes = int64_t{128} * (6 * 32 + 8 * 12) * 256 * 64 * 2;
  EXPECT_EQ(plan.packed[0].bytes, bytes);
  EXPECT_EQ(cuda::weight_tiles_bytes(128, 2048, 768), bytes);
  EXPECT_EQ(plan.graph->value(plan.packed[0].source).name, "experts.w13");
  std::ostringstream summary;
  plan.write_summary(summary);
  EXPECT_NE(summary.str().find("then w2, in 256x64 tiles"), std::string::npos) << summary.str();
  // H and I not multiples of a tile: the copy is padded to whole tiles (H = 520, I = 200: w13 packed
  // to 2 x 256 features, two tiles of 9 k-blocks; w2 three tiles of 4 k-blocks).
  EXPECT_EQ(cuda::weight_tiles_bytes(3, 520, 200), int64_t{3} * (2 * 9 + 3 * 4) * 256 * 64 * 2);
  o.packed_weights = false;
  EXPECT_EQ(make_plan(graph, o).step_for(*graph->find_node("experts")).kernel->name, "cuda.cutlass_grouped_narrow_pair");
  const MoEConfig mixtral = load_config("mixtral-8x7b");  // 336 MiB per expert
  auto huge = std::make_shared<const Graph>(build_experts_graph(mixtral, {.max_tokens = 512, .dtype = DType::bf16}));
  PlanOptions graph_options;
  graph_options.backend = Backend::cuda;
  graph_options.capturable = true;
  graph_options.fuse = false;
  EXPECT_EQ(make_plan(huge, graph_options).step_for(*huge->find_node("experts")).kernel->name,
            "cuda.cutlass_swiglu_narrow");
}

// Planning only (no device needed): with packed weights off (--no-packed-weights, or a session whose
// device has no room for the copies) the same tiles run unfused and nothing is packed; forcing a
// packing kernel then is an error naming the node; the session's planner turns them off by itself
// only where the copies do not fit, and says so in a note.
TEST(CudaPlan, PackedWeightsOffWhereAskedOrWhereTheCopiesDoNotFit) {
  const MoEConfig qwen3 = load_config("qwen3-30b-a3b");
  auto graph = std::make_shared<const Graph>(build_experts_graph(qwen3, {.max_tokens = 8192, .dtype = DType::bf16}));
  PlanOptions o;
  o.backend = Backend::cuda;
  o.packed_weights = false;
  const Plan off = make_plan(graph, o);
  EXPECT_TRUE(off.packed.empty());
  EXPECT_EQ(off.packed_bytes, 0);
  const PlanStep& experts = off.step_for(*graph->find_node("experts"));
  EXPECT_EQ(experts.kernel->name, "cuda.cutlass_grouped_wide_single");  // the same tiles as the SwiGLU kernel's
  o.forced_kernels["experts"] = "cuda.cutlass_swiglu_wide_single";
  try {
    (void)make_plan(graph, o);
    ADD_FAILURE() << "a forced packing kernel with packed weights off planned";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("node 'experts': forced kernel 'cuda.cutlass_swiglu_wide_single' reads w13 "
                                         "gate/up interleaved by 128 rows, a packed copy, and packed weights are off"),
              std::string::npos)
        << e.what();
  }

  o = PlanOptions{};
  o.backend = Backend::cuda;
  const Plan with = make_plan(graph, o);
  ASSERT_GT(with.packed_bytes, 0);
  const int64_t everything = with.bytes(Arena::weights) + with.bytes(Arena::workspace) + with.bytes(Arena::inputs) +
                             with.packed_bytes + CudaExecutor::own_device_bytes(with) + kPackedWeightsHeadroom;
  EXPECT_EQ(session_device_bytes(with, false) + kPackedWeightsHeadroom, everything);
  const Plan roomy = plan_within_device_memory(graph, o, everything, false);
  EXPECT_EQ(roomy.packed_bytes, with.packed_bytes);
  EXPECT_TRUE(roomy.notes.empty());
  const Plan tight = plan_within_device_memory(graph, o, everything - 1, false);
  EXPECT_EQ(tight.packed_bytes, 0);
  EXPECT_EQ(tight.step_for(*graph->find_node("experts")).kernel->name, "cuda.cutlass_grouped_wide_single");
  ASSERT_EQ(tight.notes.size(), 1u);
  EXPECT_EQ(tight.notes[0].rfind("packed weights off: with them the plan needs ", 0), 0u) << tight.notes[0];
  // Weights another session holds are not counted again: the same free bytes then hold the copies.
  EXPECT_EQ(plan_within_device_memory(graph, o, everything - with.bytes(Arena::weights), true).packed_bytes,
            with.packed_bytes);
  // A tuning cache naming a packing kernel: with packed weights off, its unpacked twin (the same
  // tiles) runs, and the reason says so; with them on, the cached kernel itself.
  {
    PlanOptions tuned;
    tuned.backend = Backend::cuda;
    auto cache = std::make_shared<TuningCache>();
    cache->record({"any GPU", tuning_signature(*graph, graph->node(*graph->find_node("experts"))), 8192,
                   "cuda.cutlass_swiglu_narrow", 1.0});
    tuned.tuning = cache;
    EXPECT_EQ(make_plan(graph, tuned).step_for(*graph->find_node("experts")).kernel->name, "cuda.cutlass_swiglu_narrow");
    tuned.packed_weights = false;
    const Plan twin = make_plan(graph, tuned);
    const PlanStep& step = twin.step_for(*graph->find_node("experts"));
    EXPECT_EQ(step.kernel->name, "cuda.cutlass_grouped_narrow");
    EXPECT_NE(step.reason.find("as cuda.cutlass_swiglu_narrow, here without its packed copy"), std::string::npos)
        << step.reason;
    EXPECT_TRUE(twin.packed.empty());
  }
  // A forced packing kernel is kept: the session's memory check then says what is missing.
  o.forced_kernels["experts"] = "cuda.cutlass_swiglu_narrow";
  const Plan forced = plan_within_device_memory(graph, o, 1, false);
  EXPECT_GT(forced.packed_bytes, 0);
  EXPECT_TRUE(forced.notes.empty());
}

// Planning only (no device needed): a gate of at most 4 tokens takes the one-launch router, more
// tokens keep cuBLAS's logits and the routing kernel, on every preset.
TEST(CudaGateChoice, OneLaunchRouterUpToFourTokens) {
  const KernelRegistry& r = KernelRegistry::builtin();
  for (const char* preset : {"mixtral-8x7b", "qwen3-30b-a3b", "qwen1.5-moe-a2.7b", "deepseek-v3"}) {
    const MoEConfig config = load_config(preset);
    for (int64_t tokens : {1, 4, 5, 64}) {
      const Graph g = build_moe_layer(config, {.max_tokens = tokens, .dtype = DType::bf16});
      const Node& gate = g.node(*g.find_node("gate"));
      const KernelChoice choice = r.select(g, gate, Backend::cuda, {}, {.capturable = true});
      EXPECT_EQ(choice.kernel->name, tokens <= 4 ? "cuda.router_small" : "cuda.router_topk") << preset << " T=" << tokens;
    }
  }
  // The widest rule the routing warp takes (512 biased experts in 256 groups) fits one block's 48 KiB:
  // the routing scratch is reserved for the routing warps only (one per token).
  const MoEConfig wide = load_config("deepseek-v3", {"n_routed_experts=512", "n_group=256", "topk_group=128",
                                                     "hidden_size=256", "moe_intermediate_size=64"});
  const Graph g = build_moe_layer(wide, {.max_tokens = 1, .dtype = DType::bf16});
  const Node& gate = g.node(*g.find_node("gate"));
  EXPECT_EQ(r.select(g, gate, Backend::cuda, {}, {.capturable = true}).kernel->name, "cuda.router_small");
  // More experts than the routing warp takes: the two-launch router's question, and the plan says why.
  const MoEConfig wider = load_config("deepseek-v3", {"n_routed_experts=1024", "n_group=8", "topk_group=4",
                                                      "hidden_size=256", "moe_intermediate_size=64"});
  const Graph g2 = build_moe_layer(wider, {.max_tokens = 1, .dtype = DType::bf16});
  const Node& gate2 = g2.node(*g2.find_node("gate"));
  const KernelEntry* small = r.find("cuda.router_small", Backend::cuda);
  ASSERT_NE(small, nullptr);
  const Support s = small->supports(g2, gate2);
  EXPECT_FALSE(s.ok);
  EXPECT_NE(s.reason.find("experts; the routing warp takes at most"), std::string::npos) << s.reason;
}

// Planning only (no device needed): the alltoall dispatch moves rows in fixed blocks where a token
// seldom misses a rank (k = 8 over 2 ranks: 0.4% expected padding), and counts them on the host
// where blocks would carry more (k = 8 over 4 ranks: 10.01%, just past the 10% bound; k = 2: 56%).
TEST(CudaAlltoallChoice, FixedBlocksWhereLittlePaddingIsExpected) {
  struct Case {
    const char* preset;
    std::vector<std::string> sets;
    int ranks;
    const char* kernel;
  };
  const Case cases[] = {{"deepseek-v3", {}, 2, "nccl.alltoall_blocks"},
                        {"qwen3-30b-a3b", {}, 2, "nccl.alltoall_blocks"},
                        {"qwen3-30b-a3b", {}, 4, "nccl.alltoall_v"},
                        {"mixtral-8x7b", {}, 4, "nccl.alltoall_v"},
                        {"qwen3-30b-a3b", {"num_experts_per_tok=2"}, 4, "nccl.alltoall_v"}};
  for (const Case& c : cases) {
    MoEConfig config = load_config(c.preset, c.sets);
    ParallelLayout layout{.dp = c.ranks, .tp = 1, .ep = true, .dispatch = DispatchKind::alltoall, .tokens = {}};
    for (int r = 0; r < c.ranks; ++r) layout.tokens.push_back(64 + r);
    check_layout(layout, config, c.ranks);
    const auto g = rank_graph(config, layout, 1, {.scope = "layer", .dtype = DType::bf16});
    const Node* dispatch = nullptr;
    for (const Node& n : g->nodes())
      if (n.op->kind() == "alltoall_dispatch") dispatch = &n;
    ASSERT_NE(dispatch, nullptr) << c.preset;
    const KernelChoice choice = KernelRegistry::builtin().select(*g, *dispatch, Backend::cuda, {});
    EXPECT_EQ(choice.kernel->name, c.kernel) << c.preset << " over " << c.ranks << " ranks: " << choice.reason;
  }
}

// An id outside [0, E) contributes nothing, whichever experts kernel runs: the output of the same
// routing with that choice sent to a real expert at weight 0, to rounding (the GEMMs may order their
// sums differently for other row counts). The rows no expert owns hold whatever each kernel left
// there (stale rows of the previous run here); the permutation gives them no slot, so the combine
// never reads them.
TEST(CudaExpertsKernels, AnIdOutsideTheExpertsContributesNothing) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const MoEConfig config = load_config("qwen3-30b-a3b", {"hidden_size=200", "moe_intermediate_size=136"});  // E 128, k 8
  const int64_t T = 24;  // 192 rows on 128 experts: every kernel, the GEMMs included, can run it
  auto g = std::make_shared<const Graph>(build_experts_graph(config, {.max_tokens = T, .dtype = DType::bf16}));
  const int k = config.top_k, E = config.experts;
  std::vector<int32_t> ids(static_cast<std::size_t>(T * k));
  std::vector<float> weights(ids.size());
  for (int64_t t = 0; t < T; ++t)
    for (int j = 0; j < k; ++j) {
      const std::size_t i = static_cast<std::size_t>(t * k + j);
      ids[i] = static_cast<int32_t>((t * 37 + j * 11) % E);  // distinct within a token (11·j mod 128)
      weights[i] = 0.05f + 0.1f * static_cast<float>((t + 3 * j) % 7);
    }
  std::vector<int32_t> with_invalid = ids;
  std::vector<float> zero_weight = weights;
  for (std::size_t i : {std::size_t{3}, std::size_t{50}, std::size_t{51}, ids.size() - 1}) {
    with_invalid[i] = i % 2 ? -1 : E + 5;
    zero_weight[i] = 0.0f;
  }
  int tested = 0;
  for (const KernelEntry* kernel : KernelRegistry::builtin().candidates("experts", Backend::cuda)) {
    CudaSessionOptions so;
    so.plan.forced_kernels["experts"] = kernel->name;
    so.seed = 13;
    std::unique_ptr<CudaSession> s;
    try {
      s = std::make_unique<CudaSession>(g, so);
    } catch (const Error&) {
      continue;  // a kernel that cannot run this node (a GEMM built without CUTLASS, ...) says so at planning
    }
    ++tested;
    s->set_tokens(T);
    const ValueId route_ids = *s->graph().find_value("route.ids"), route_weights = *s->graph().find_value("route.weights");
    s->write_input(route_ids, ids.data(), ids.size() * 4);
    s->write_input(route_weights, zero_weight.data(), zero_weight.size() * 4);
    s->run();
    const std::vector<float> expected = s->output();
    s->write_input(route_ids, with_invalid.data(), with_invalid.size() * 4);
    s->write_input(route_weights, weights.data(), weights.size() * 4);
    s->run();
    const std::vector<float> got = s->output();
    ASSERT_EQ(got.size(), expected.size());
    const double rel_norm = reference::compare(got.data(), std::vector<double>(expected.begin(), expected.end())).rel_norm;
    EXPECT_LT(rel_norm, 2e-3) << kernel->name;  // a stale row added at its weight: ~3e-2
  }
  EXPECT_GE(tested, 5);  // decode, per-expert loop, grouped, padded, per-row batched (CUTLASS where built)
}

// A side lane with room to stretch (the shared expert beside the routed experts, their bytes made
// dear by a slow memory rate so that the routed chain dwarfs the shared lane) aims at half the SMs:
// planned so without a device; on one, its cuBLAS handle and persistent grids get half the device's
// SMs, and the layer still matches the reference and repeats bit for bit; the same layer with every
// SM on every lane agrees with it within the tolerance.
TEST(CudaPlan, SideLaneAimsAtHalfTheSmsAndTheLayerStillMatches) {
  const MoEConfig config = load_config("qwen1.5-moe-a2.7b", family_cases()[1].sets);
  auto g = std::make_shared<const Graph>(build_moe_layer(config, {.max_tokens = 96, .dtype = DType::bf16}));
  CudaSessionOptions so;
  so.plan.backend = Backend::cuda;
  so.plan.policy = Policy::concurrent;
  so.plan.rates = {.flops_per_s = 800e12, .bytes_per_s = 1e11, .overhead_s = 5e-6, .kernels_fill_machine = true};
  // The chain as such (unfused): its permuted rows' bytes are what make the routed lane dwarf the
  // shared one at these sizes; the fused node costs only the weights, x and its output.
  so.plan.fuse = false;
  so.seed = 21;
  {
    const Plan plan = make_plan(g, so.plan);  // its graph the fused one: nodes looked up by name there
    const int side = plan.step_for(*plan.graph->find_node("shared_expert")).lane;
    ASSERT_GT(side, 0) << "the shared expert is not on a side lane";
    EXPECT_EQ(plan.lanes[static_cast<std::size_t>(side)].sm_share, 0.5);
    EXPECT_EQ(plan.lanes[0].sm_share, 1.0);
  }
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  CudaSession halved(g, so);
  const Plan& plan = halved.plan();
  const int side = plan.step_for(*plan.graph->find_node("shared_expert")).lane;
  ASSERT_EQ(plan.lanes[static_cast<std::size_t>(side)].sm_share, 0.5);
  const int sms = cuda::multiprocessor_count(0);
  EXPECT_EQ(halved.executor().lane_sm_count(side), (sms + 1) / 2);
  EXPECT_EQ(halved.executor().lane_sm_count(0), 0);
  halved.set_tokens(96);
  halved.run();
  EXPECT_TRUE(halved.check(1e-2).pass);
  const std::vector<float> first = halved.output();
  halved.run();
  const std::vector<float> again = halved.output();
  EXPECT_EQ(0, std::memcmp(first.data(), again.data(), first.size() * 4));
  so.plan.share_side_lanes = false;
  CudaSession every_sm(g, so);
  EXPECT_EQ(every_sm.executor().lane_sm_count(side), 0);
  every_sm.set_tokens(96);
  every_sm.run();
  const std::vector<float> other = every_sm.output();
  const double rel_norm = reference::compare(other.data(), std::vector<double>(first.begin(), first.end())).rel_norm;
  EXPECT_LT(rel_norm, 1e-2);
}

// Planning only (no device needed): a communication lane beside compute lanes gets SMs of its own
// where the exchange is at least a third of the compute (qwen3-30b-a3b's rank at 4096 tokens), not
// where the compute dwarfs it (deepseek-v3's), and never in a serial plan.
TEST(CudaPlan, ComputeLanesLeaveSmsToCommunicationWhereTheExchangeIsWorthIt) {
  PlanOptions po;
  po.backend = Backend::cuda;
  po.policy = Policy::concurrent;
  po.rates.flops_per_s = 780e12;  // an H100's measured ceilings (README)
  po.rates.bytes_per_s = 3.0e12;
  po.rates.kernels_fill_machine = true;
  const ParallelLayout layout{.dp = 2, .tp = 1, .ep = true, .dispatch = DispatchKind::alltoall, .tokens = {4096, 4096}};
  auto rank0 = [&](const std::string& preset) {
    return rank_graph(load_config(preset), layout, 0, {.chunks = 2, .dtype = DType::bf16});
  };
  const Plan qwen3 = make_plan(rank0("qwen3-30b-a3b"), po);
  EXPECT_EQ(qwen3.sms_left_to_communication, 16);
  const Plan deepseek = make_plan(rank0("deepseek-v3"), po);
  EXPECT_EQ(deepseek.sms_left_to_communication, 0);
  bool said = false;
  for (const std::string& note : deepseek.notes) said = said || note.find("compute lanes keep every SM") != std::string::npos;
  EXPECT_TRUE(said);
  po.policy = Policy::serial;
  EXPECT_EQ(make_plan(rank0("qwen3-30b-a3b"), po).sms_left_to_communication, 0);
}
