// The chunk pass on the GPU (bf16): every family split into chunks, including chunks the run's
// tokens never reach, checked against the fp64 reference (relative norm error < 1e-2) under both
// plans, with workspace reuse (chunks' rows laid out as views of the whole), and replayed from a CUDA
// graph bit for bit.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>

#include "bench/cuda/cuda_session.hpp"
#include "graph/chunk.hpp"
#include "kernels/cuda/device.hpp"
#include "ops/moe_layer.hpp"
#include "tests/family_cases.hpp"

using namespace moeflow;

namespace {

using Param = std::tuple<int, std::string>;  // family case, plan

class CudaChunkedLayer : public testing::TestWithParam<Param> {};

}  // namespace

TEST_P(CudaChunkedLayer, MatchesReferenceWithEmptyChunksAndReplaysBitForBit) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const auto& [index, plan] = GetParam();
  const auto& fc = testing_cases::family_cases()[static_cast<std::size_t>(index)];
  const MoEConfig config = load_config(fc.preset, fc.sets);
  auto g = std::make_shared<const Graph>(
      chunk_tokens(build_moe_layer(config, {.max_tokens = 64, .dtype = DType::bf16}), {.chunks = 4}));
  CudaSessionOptions so;
  so.plan.policy = plan == "serial" ? Policy::serial : Policy::concurrent;
  so.plan.reuse_memory = true;
  so.plan.capturable = true;
  so.seed = 11;
  CudaSession s(g, so);
  // The chunks' rows of x and of the output are views (the memory planner): nothing is copied.
  EXPECT_GT(std::count_if(s.plan().buffers.begin(), s.plan().buffers.end(), [](const Buffer& b) { return b.is_view(); }), 0);
  for (int64_t T : {int64_t{5}, int64_t{40}, int64_t{64}}) {  // T = 5: chunks 1..3 are empty
    s.set_tokens(T);
    s.run();
    const CheckReport r = s.check(1e-2);
    EXPECT_TRUE(r.pass) << fc.name << " T=" << T << " rel_norm " << r.comparison.rel_norm;
    const std::vector<float> eager = s.output();
    s.capture();
    s.replay();
    const std::vector<float> replayed = s.output();
    ASSERT_EQ(eager.size(), replayed.size());
    EXPECT_EQ(0, std::memcmp(eager.data(), replayed.data(), eager.size() * 4)) << "replay differs, T=" << T;
  }
}

INSTANTIATE_TEST_SUITE_P(Families, CudaChunkedLayer,
                         testing::Combine(testing::Range(0, 5), testing::Values("serial", "concurrent")),
                         [](const testing::TestParamInfo<Param>& i) {
                           return testing_cases::family_cases()[static_cast<std::size_t>(std::get<0>(i.param))].name +
                                  "_" + std::get<1>(i.param);
                         });
