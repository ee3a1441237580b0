#include "ops/hf_weights.hpp"

#include <memory>

#include "graph/error.hpp"
#include "ops/safetensors.hpp"

namespace moeflow {

namespace {

bool is_mixtral(const MoEConfig& c) { return c.family == ModelFamily::mixtral; }
bool is_deepseek(const MoEConfig& c) {
  return c.family == ModelFamily::deepseek_v2 || c.family == ModelFamily::deepseek_v3;
}

std::string prefix(const MoEConfig& c, int layer) {
  return "model.layers." + std::to_string(layer) + (is_mixtral(c) ? ".block_sparse_moe." : ".mlp.");
}

// Names of an MLP's three projections in this family.
struct ProjectionNames {
  std::string gate, up, down;
};
ProjectionNames routed_names(const MoEConfig& c) {
  if (is_mixtral(c)) return {"w1", "w3", "w2"};
  return {"gate_proj", "up_proj", "down_proj"};
}

}  // namespace

std::vector<HfTensorPart> hf_parts(const MoEConfig& c, int layer, const std::string& weight) {
  if (layer < 0) fail_input("--layer " + std::to_string(layer) + " must be >= 0");
  const std::string p = prefix(c, layer);
  const int64_t H = c.hidden, I = c.intermediate, E = c.experts, Is = c.shared_intermediate;
  if (weight == "gate.router") return {{p + "gate.weight", {E, H}, 0}};
  if (weight == "gate.bias") return {{p + "gate.e_score_correction_bias", {E}, 0}};
  const ProjectionNames n = routed_names(c);
  if (weight == "experts.w13" || weight == "experts.w2") {
    std::vector<HfTensorPart> parts;
    for (int64_t e = 0; e < E; ++e) {
      const std::string base = p + "experts." + std::to_string(e) + ".";
      if (weight == "experts.w13") {
        parts.push_back({base + n.gate + ".weight", {I, H}, e * 2 * I * H});
        parts.push_back({base + n.up + ".weight", {I, H}, e * 2 * I * H + I * H});
      } else {
        parts.push_back({base + n.down + ".weight", {H, I}, e * H * I});
      }
    }
    return parts;
  }
  const std::string shared = p + (is_deepseek(c) ? "shared_experts." : "shared_expert.");
  if (weight == "shared_expert.w13")
    return {{shared + "gate_proj.weight", {Is, H}, 0}, {shared + "up_proj.weight", {Is, H}, Is * H}};
  if (weight == "shared_expert.w2") return {{shared + "down_proj.weight", {H, Is}, 0}};
  if (weight == "shared_expert.gate_w") return {{p + "shared_expert_gate.weight", {1, H}, 0}};
  fail_input("checkpoint: no Hugging Face tensor is known for moeflow weight '" + weight + "'");
}

void load_hf_layer(const MoEConfig& c, const SafetensorsCheckpoint& checkpoint, int layer, const Graph& g,
                   const std::function<float*(ValueId)>& data_of) {
  for (ValueId v : g.graph_inputs()) {
    const Value& w = g.value(v);
    if (w.role != ValueRole::weight) continue;
    if (w.dtype() != DType::f32 && w.dtype() != DType::bf16)
      fail_input("checkpoint: weights load as f32 or bf16; '" + w.name + "' is " + w.type_str());
    float* dst = data_of(v);
    for (const HfTensorPart& part : hf_parts(c, layer, w.name)) checkpoint.read_f32(part.hf_name, part.shape, dst + part.offset);
  }
}

WeightLoader hf_layer_loader(const MoEConfig& config, const std::string& weights_path, int layer) {
  if (layer < 0) fail_input("--layer " + std::to_string(layer) + " must be >= 0");
  auto checkpoint = std::make_shared<const SafetensorsCheckpoint>(SafetensorsCheckpoint::open(weights_path));
  return [checkpoint, config, layer](const Graph& g, const std::function<float*(ValueId)>& data_of) {
    load_hf_layer(config, *checkpoint, layer, g, data_of);
  };
}

}  // namespace moeflow
