#pragma once
// The golden layers of tests/golden_hf, written by tools/hf_golden.py from Hugging Face transformers'
// own MoE blocks (fp32): per family a checkpoint of one layer under the HF names, its config.json,
// and io.safetensors with inputs x_T<T> and transformers' outputs y_T<T>. Shared by the CPU and GPU
// tests, so both backends are held to the same outside results, loaded as `moeflow run --weights`
// loads them.
#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "graph/error.hpp"
#include "ops/hf_weights.hpp"
#include "ops/model_config.hpp"
#include "ops/safetensors.hpp"

namespace moeflow::testing_golden {

struct GoldenLayer {
  std::string family;
  std::filesystem::path dir;
  int layer = 0;
  std::vector<int64_t> tokens;
  std::string transformers_version;
  // What `moeflow run --weights DIR --layer L` reads: DIR/config.json, and DIR's model.safetensors.
  MoEConfig config() const { return load_config((dir / "config.json").string()); }
  WeightLoader loader(const MoEConfig& c) const { return hf_layer_loader(c, dir.string(), layer); }
  int64_t max_tokens() const {
    int64_t m = 0;
    for (int64_t t : tokens) m = std::max(m, t);
    return m;
  }
};

inline std::filesystem::path golden_root() { return std::filesystem::path(MOEFLOW_SOURCE_DIR) / "tests" / "golden_hf"; }

inline const std::vector<std::string>& golden_families() {
  static const std::vector<std::string> f{"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"};
  return f;
}

// The family's layer index, token counts and transformers version, from its golden.json.
inline GoldenLayer golden_layer(const std::string& family) {
  GoldenLayer g;
  g.family = family;
  g.dir = golden_root() / family;
  std::ifstream in(g.dir / "golden.json");
  if (!in) fail_input("golden layer: cannot read " + (g.dir / "golden.json").string());
  const nlohmann::json j = nlohmann::json::parse(in);
  g.layer = j.at("layer").get<int>();
  g.tokens = j.at("tokens").get<std::vector<int64_t>>();
  g.transformers_version = j.at("transformers_version").get<std::string>();
  return g;
}

// x_T<T> and y_T<T> [T, H] in fp32 from io.safetensors.
struct GoldenIo {
  std::vector<float> x, y;
};
inline GoldenIo golden_io(const GoldenLayer& g, int64_t tokens, int64_t hidden) {
  const SafetensorsCheckpoint io = SafetensorsCheckpoint::open((g.dir / "io.safetensors").string());
  GoldenIo r;
  r.x.resize(static_cast<std::size_t>(tokens * hidden));
  r.y.resize(r.x.size());
  io.read_f32("x_T" + std::to_string(tokens), {tokens, hidden}, r.x.data());
  io.read_f32("y_T" + std::to_string(tokens), {tokens, hidden}, r.y.data());
  return r;
}

}  // namespace moeflow::testing_golden
