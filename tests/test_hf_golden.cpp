// An outside referee: each family's golden layer (tests/golden_hf, Hugging Face transformers' own
// MoE block run in fp32 by tools/hf_golden.py) loads through the checkpoint path of
// `moeflow run --weights` (config.json beside it, load_hf_layer), runs on the CPU backend under the
// serial and the concurrent plan, and must reproduce transformers' output y for the same x
// (relative norm error < 1e-5). Negative controls show that the comparison does fail when the
// layout or the routing rule is wrong.
#include <gtest/gtest.h>

#include <cstring>
#include <iostream>
#include <memory>

#include "bench/cpu_session.hpp"
#include "ops/moe_layer.hpp"
#include "tests/golden_hf_cases.hpp"
#include "tests/reference/reference.hpp"

using namespace moeflow;
using testing_golden::golden_families;
using testing_golden::golden_io;
using testing_golden::golden_layer;
using testing_golden::GoldenLayer;

namespace {

struct GoldenRun {
  int64_t tokens = 0;
  reference::Comparison vs_transformers;
  CheckReport vs_reference;  // moeflow's own fp64 reference on the same data, for the routing report
};

// Every golden T through one session: one graph and plan built for the largest T serve them all.
std::vector<GoldenRun> run_golden(const GoldenLayer& gl, const MoEConfig& c, Policy policy, const WeightLoader& load) {
  auto g = std::make_shared<const Graph>(build_moe_layer(c, {.max_tokens = gl.max_tokens()}));
  SessionOptions so;
  so.plan.policy = policy;
  so.threads = 2;
  so.load_weights = load;
  CpuSession s(g, so);
  const ValueId x = *g->find_value("x");
  std::vector<GoldenRun> runs;
  for (int64_t T : gl.tokens) {
    const testing_golden::GoldenIo io = golden_io(gl, T, c.hidden);
    s.set_tokens(T);
    std::memcpy(s.input_data(x), io.x.data(), io.x.size() * sizeof(float));
    s.run();
    GoldenRun r;
    r.tokens = T;
    r.vs_transformers = reference::compare(s.output(), std::vector<double>(io.y.begin(), io.y.end()));
    r.vs_reference = s.check(1e-5);
    runs.push_back(r);
  }
  return runs;
}

using Param = std::tuple<std::string, std::string>;  // family, plan

class HfGolden : public testing::TestWithParam<Param> {};

}  // namespace

TEST_P(HfGolden, MatchesTransformersInFp32) {
  const auto& [family, plan] = GetParam();
  const GoldenLayer gl = golden_layer(family);
  const MoEConfig c = gl.config();
  const auto runs = run_golden(gl, c, plan == "serial" ? Policy::serial : Policy::concurrent, gl.loader(c));
  ASSERT_EQ(runs.size(), gl.tokens.size());
  for (const GoldenRun& r : runs) {
    std::cout << "[golden cpu fp32] " << family << " (transformers " << gl.transformers_version << ") " << plan
              << " T=" << r.tokens << " rel_norm " << r.vs_transformers.rel_norm << " rel_max "
              << r.vs_transformers.rel_max << "; routing vs moeflow's reference: "
              << r.vs_reference.agreement.tokens_differing << " tokens differ, closest call "
              << r.vs_reference.agreement.min_margin << "\n";
    EXPECT_TRUE(r.vs_transformers.passes(1e-5))
        << family << " " << plan << " T=" << r.tokens << ": rel_norm " << r.vs_transformers.rel_norm << " rel_max "
        << r.vs_transformers.rel_max;
    EXPECT_TRUE(r.vs_reference.pass) << family << " T=" << r.tokens << " vs moeflow's reference: rel_norm "
                                     << r.vs_reference.comparison.rel_norm;
    EXPECT_EQ(r.vs_reference.agreement.tokens_differing, 0);
  }
}

INSTANTIATE_TEST_SUITE_P(Families, HfGolden,
                         testing::Combine(testing::ValuesIn(golden_families()), testing::Values("serial", "concurrent")),
                         [](const testing::TestParamInfo<Param>& i) {
                           return std::get<0>(i.param) + "_" + std::get<1>(i.param);
                         });

TEST(HfGoldenFiles, RecordTheTransformersVersionAndHoldTheLayerOnly) {
  for (const std::string& family : golden_families()) {
    SCOPED_TRACE(family);
    const GoldenLayer gl = golden_layer(family);
    EXPECT_FALSE(gl.transformers_version.empty());
    for (const char* file : {"model.safetensors", "io.safetensors"}) {
      const SafetensorsCheckpoint st = SafetensorsCheckpoint::open((gl.dir / file).string());
      EXPECT_EQ(st.metadata("transformers_version"), gl.transformers_version) << file;
      EXPECT_FALSE(st.metadata("torch_version").empty()) << file;
    }
    // Every tensor of the checkpoint is layer L's, under the family's checkpoint prefix.
    const MoEConfig c = gl.config();
    const std::string prefix = "model.layers." + std::to_string(gl.layer) +
                               (c.family == ModelFamily::mixtral ? ".block_sparse_moe." : ".mlp.");
    for (const std::string& name : SafetensorsCheckpoint::open((gl.dir / "model.safetensors").string()).names())
      EXPECT_EQ(name.rfind(prefix, 0), 0u) << name;
  }
}

// The comparison can fail: with gate_proj and up_proj swapped in w13, or with the routing rule's
// renormalisation flipped, transformers' y is missed by far more than the tolerance.
TEST(HfGoldenControls, WrongLayoutOrRoutingMissesTransformers) {
  {
    const GoldenLayer gl = golden_layer("mixtral");
    const MoEConfig c = gl.config();
    const WeightLoader load = gl.loader(c);
    const WeightLoader swapped = [&](const Graph& g, const std::function<float*(ValueId)>& data_of) {
      load(g, data_of);
      float* w13 = data_of(*g.find_value("experts.w13"));
      const int64_t IH = static_cast<int64_t>(c.intermediate) * c.hidden;
      for (int64_t e = 0; e < c.experts; ++e) std::swap_ranges(w13 + 2 * e * IH, w13 + (2 * e + 1) * IH, w13 + (2 * e + 1) * IH);
    };
    for (const GoldenRun& r : run_golden(gl, c, Policy::serial, swapped))
      EXPECT_GT(r.vs_transformers.rel_norm, 0.1) << "mixtral, gate/up swapped, T=" << r.tokens;
  }
  {
    const GoldenLayer gl = golden_layer("qwen3_moe");
    const MoEConfig c = load_config((gl.dir / "config.json").string(), {"norm_topk_prob=false"});
    for (const GoldenRun& r : run_golden(gl, c, Policy::serial, gl.loader(c)))
      EXPECT_GT(r.vs_transformers.rel_norm, 0.1) << "qwen3_moe without renormalising, T=" << r.tokens;
  }
  {
    // DeepSeek-V2 with norm_topk_prob: moeflow (DESIGN.md, DeepSeek's code) renormalises and does not
    // scale; transformers' golden layer has norm_topk_prob false (as released V2 checkpoints do).
    const GoldenLayer gl = golden_layer("deepseek_v2");
    const MoEConfig c = load_config((gl.dir / "config.json").string(), {"norm_topk_prob=true"});
    for (const GoldenRun& r : run_golden(gl, c, Policy::serial, gl.loader(c)))
      EXPECT_GT(r.vs_transformers.rel_norm, 0.1) << "deepseek_v2 renormalised, T=" << r.tokens;
  }
}
