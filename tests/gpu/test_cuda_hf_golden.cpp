// The golden layers of tests/golden_hf (Hugging Face transformers' own MoE blocks, fp32) on the GPU:
// each loads through the checkpoint path of `moeflow run --backend cuda --weights` (fp32 on the
// host, bf16 in the device arena), runs under the serial and the concurrent plan, and must reproduce
// transformers' y for the same x within the bf16 tolerance (relative norm error < 1e-2). The golden
// x and weights are bf16-exact, so the device reads exactly the numbers transformers read.
#include <gtest/gtest.h>

#include <iostream>

#include "bench/cuda/cuda_session.hpp"
#include "kernels/cuda/bf16.hpp"
#include "kernels/cuda/device.hpp"
#include "ops/moe_layer.hpp"
#include "tests/golden_hf_cases.hpp"
#include "tests/reference/reference.hpp"

using namespace moeflow;
using testing_golden::golden_families;
using testing_golden::golden_io;
using testing_golden::golden_layer;
using testing_golden::GoldenLayer;

namespace {

using Param = std::tuple<std::string, std::string>;  // family, plan

class CudaHfGolden : public testing::TestWithParam<Param> {};

}  // namespace

TEST_P(CudaHfGolden, MatchesTransformersInBf16) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const auto& [family, plan] = GetParam();
  const GoldenLayer gl = golden_layer(family);
  const MoEConfig c = gl.config();
  auto g = std::make_shared<const Graph>(build_moe_layer(c, {.max_tokens = gl.max_tokens(), .dtype = DType::bf16}));
  CudaSessionOptions so;
  so.plan.policy = plan == "serial" ? Policy::serial : Policy::concurrent;
  so.load_weights = gl.loader(c);
  CudaSession s(g, so);
  const ValueId x = *s.graph().find_value("x");  // the plan's graph (passes may renumber values)
  for (int64_t T : gl.tokens) {
    const testing_golden::GoldenIo io = golden_io(gl, T, c.hidden);
    std::vector<uint16_t> bits(io.x.size());
    for (std::size_t i = 0; i < bits.size(); ++i) {
      bits[i] = float_to_bf16(io.x[i]);
      ASSERT_EQ(bf16_to_float(bits[i]), io.x[i]) << "golden x must be bf16-exact";
    }
    s.set_tokens(T);
    s.write_input(x, bits.data(), bits.size() * sizeof(uint16_t));
    s.run();
    const std::vector<float> y = s.output();
    const reference::Comparison vs = reference::compare(y.data(), std::vector<double>(io.y.begin(), io.y.end()));
    const CheckReport r = s.check(1e-2);
    std::cout << "[golden gpu bf16] " << family << " (transformers " << gl.transformers_version << ") " << plan
              << " T=" << T << " rel_norm " << vs.rel_norm << " rel_max " << vs.rel_max
              << "; vs moeflow's reference on the same bf16 data: rel_norm " << r.comparison.rel_norm << ", "
              << r.agreement.tokens_differing << " tokens' top-k sets differ\n";
    EXPECT_TRUE(vs.passes(1e-2)) << family << " " << plan << " T=" << T << ": rel_norm " << vs.rel_norm;
    EXPECT_TRUE(r.pass) << family << " T=" << T << " vs moeflow's reference: rel_norm " << r.comparison.rel_norm;
    EXPECT_EQ(r.agreement.tokens_differing, 0);
  }
}

INSTANTIATE_TEST_SUITE_P(Families, CudaHfGolden,
                         testing::Combine(testing::ValuesIn(golden_families()), testing::Values("serial", "concurrent")),
                         [](const testing::TestParamInfo<Param>& i) {
                           return std::get<0>(i.param) + "_" + std::get<1>(i.param);
                         });
