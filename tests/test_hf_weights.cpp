// Loading one layer of a Hugging Face checkpoint: every family's tensor names land in moeflow's
// w13 / w2 layout, only that layer is read, the layer runs and checks, and a missing or
// mis-shaped tensor is refused by name.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "bench/cpu_session.hpp"
#include "graph/error.hpp"
#include "kernels/common/random.hpp"
#include "ops/hf_weights.hpp"
#include "ops/moe_layer.hpp"
#include "ops/safetensors.hpp"
#include "tests/safetensors_writer.hpp"

using namespace moeflow;
namespace fs = std::filesystem;
using testing::HasSubstr;

namespace {

// An F32 checkpoint of the given tensors, each element value(name, index).
void write_safetensors(const fs::path& path, const std::vector<std::pair<std::string, std::vector<int64_t>>>& tensors,
                       const std::function<float(const std::string&, int64_t)>& value) {
  std::vector<testing_safetensors::Tensor> ts;
  for (const auto& [name, shape] : tensors) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    std::vector<float> data(static_cast<std::size_t>(n));
    for (int64_t i = 0; i < n; ++i) data[static_cast<std::size_t>(i)] = value(name, i);
    ts.push_back({name, "F32", shape, testing_safetensors::raw(data)});
  }
  testing_safetensors::write_st(path, ts, {{"format", "pt"}});
}

// Distinct, small, never-zero values keyed by tensor name and index.
float value_of(const std::string& name, int64_t i) {
  return 0.05f * rng::uniform_pm1(rng::stream_key(3, rng::name_key(name)), static_cast<uint64_t>(i));
}

fs::path temp_dir(const std::string& tag) {
  fs::path d = fs::temp_directory_path() / ("moeflow_hf_" + tag + "_" + std::to_string(::getpid()));
  fs::create_directories(d);
  return d;
}

// Writes layers 0 and 1 of `config`'s family (so a loader that reads the wrong layer is caught).
void write_checkpoint(const MoEConfig& c, const fs::path& file, const std::string& skip = "") {
  std::vector<std::pair<std::string, std::vector<int64_t>>> tensors;
  auto g = build_moe_layer(c, {.max_tokens = 4});
  for (int layer : {0, 1})
    for (ValueId v : g.graph_inputs())
      if (g.value(v).role == ValueRole::weight)
        for (const HfTensorPart& part : hf_parts(c, layer, g.value(v).name))
          if (part.hf_name != skip) tensors.push_back({part.hf_name, part.shape});
  write_safetensors(file, tensors, value_of);
}

}  // namespace

TEST(HfWeights, EveryFamilyLoadsIntoTheW13W2LayoutAndChecks) {
  const std::vector<std::pair<std::string, std::vector<std::string>>> families{
      {"mixtral-8x7b", {"hidden_size=48", "intermediate_size=24", "num_local_experts=4"}},
      {"qwen1.5-moe-a2.7b", {"hidden_size=48", "moe_intermediate_size=16", "num_experts=6", "shared_expert_intermediate_size=32"}},
      {"qwen3-30b-a3b", {"hidden_size=40", "moe_intermediate_size=16", "num_experts=8", "num_experts_per_tok=2"}},
      {"deepseek-v3", {"hidden_size=64", "moe_intermediate_size=16", "n_routed_experts=16", "n_group=4", "topk_group=2",
                       "num_experts_per_tok=4"}},
  };
  for (const auto& [preset, sets] : families) {
    SCOPED_TRACE(preset);
    const MoEConfig c = load_config(preset, sets);
    const fs::path file = temp_dir(preset) / "model.safetensors";
    write_checkpoint(c, file);
    const SafetensorsCheckpoint checkpoint = SafetensorsCheckpoint::open(file.string());
    auto g = std::make_shared<const Graph>(build_moe_layer(c, {.max_tokens = 16}));
    SessionOptions so;
    so.threads = 2;
    so.load_weights = [&](const Graph& graph, const std::function<float*(ValueId)>& data_of) {
      load_hf_layer(c, checkpoint, 1, graph, data_of);
    };
    CpuSession s(g, so);
    // Layout: expert e's rows [I, 2I) of w13 are its up projection (W3), row r, column h.
    const std::string p = "model.layers.1." + std::string(c.family == ModelFamily::mixtral ? "block_sparse_moe." : "mlp.");
    const std::string up = c.family == ModelFamily::mixtral ? "w3" : "up_proj";
    const int64_t e = c.experts - 1, r = 3, h = 5, I = c.intermediate, H = c.hidden;
    const auto* w13 = static_cast<const float*>(s.value_data(*s.plan().graph->find_value("experts.w13")));
    EXPECT_EQ(w13[e * 2 * I * H + (I + r) * H + h], value_of(p + "experts." + std::to_string(e) + "." + up + ".weight", r * H + h));
    s.set_tokens(16);
    s.run();
    EXPECT_TRUE(s.check(1e-5).pass);
  }
}

TEST(HfWeights, MissingAndMisShapedTensorsAreRefusedByName) {
  const MoEConfig c = load_config("qwen1.5-moe-a2.7b", {"hidden_size=32", "moe_intermediate_size=8", "num_experts=4",
                                                        "num_experts_per_tok=2", "shared_expert_intermediate_size=16"});
  const fs::path dir = temp_dir("bad");
  const std::string missing = "model.layers.0.mlp.experts.2.down_proj.weight";
  write_checkpoint(c, dir / "missing.safetensors", missing);
  auto g = build_moe_layer(c, {.max_tokens = 4});
  std::vector<float> sink(1 << 16);
  auto data_of = [&](ValueId) { return sink.data(); };
  try {
    load_hf_layer(c, SafetensorsCheckpoint::open((dir / "missing.safetensors").string()), 0, g, data_of);
    FAIL() << "a missing tensor must be refused";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::bad_input);
    EXPECT_THAT(e.what(), HasSubstr(missing));
  }
  // The config says I = 8; a checkpoint of a model with I = 12 is refused with both shapes.
  MoEConfig wider = load_config("qwen1.5-moe-a2.7b", {"hidden_size=32", "moe_intermediate_size=12", "num_experts=4",
                                                      "num_experts_per_tok=2", "shared_expert_intermediate_size=16"});
  write_checkpoint(wider, dir / "wider.safetensors");
  try {
    load_hf_layer(c, SafetensorsCheckpoint::open((dir / "wider.safetensors").string()), 0, g, data_of);
    FAIL() << "a mis-shaped tensor must be refused";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::bad_input);
    EXPECT_THAT(e.what(), HasSubstr("gate_proj"));
  }
}
