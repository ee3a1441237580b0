#pragma once
// One layer's MoE weights from a Hugging Face checkpoint, by each family's own tensor names, into
// moeflow's layout: w13 = [W1 (gate_proj); W3 (up_proj)] per expert, w2 = down_proj.
//   Mixtral:        model.layers.L.block_sparse_moe.gate.weight, ...experts.E.w1|w3|w2.weight
//   Qwen2/3-MoE:    model.layers.L.mlp.gate.weight, ...mlp.experts.E.gate_proj|up_proj|down_proj.weight,
//                   ...mlp.shared_expert.*, ...mlp.shared_expert_gate.weight
//   DeepSeek-V2/V3: model.layers.L.mlp.gate.weight, ...mlp.gate.e_score_correction_bias,
//                   ...mlp.experts.E.*, ...mlp.shared_experts.*
// Only the tensors of layer L are read; every shape is checked against the config.
#include <functional>
#include <string>
#include <vector>

#include "graph/graph.hpp"
#include "ops/model_config.hpp"

namespace moeflow {

class SafetensorsCheckpoint;

// A part of a moeflow weight: `count` floats at element `offset` come from checkpoint tensor `hf_name`.
struct HfTensorPart {
  std::string hf_name;
  std::vector<int64_t> shape;  // as the checkpoint must hold it
  int64_t offset = 0;          // into the moeflow weight, in elements
};

// Where each part of the moeflow weight `weight_name` ("experts.w13", "gate.router", ...) of the
// standard layer (build_moe_layer) comes from, for layer `layer` of `config`'s family.
std::vector<HfTensorPart> hf_parts(const MoEConfig& config, int layer, const std::string& weight_name);

// Fills every weight of `graph` (a standard layer) from the checkpoint; data_of(v) is where weight
// v's fp32 data goes (a bf16 graph's session stages fp32 and rounds after). Throws Error(bad_input)
// naming the file and tensor that is missing or mis-shaped.
void load_hf_layer(const MoEConfig& config, const SafetensorsCheckpoint& checkpoint, int layer, const Graph& graph,
                   const std::function<float*(ValueId)>& data_of);

// What `run --weights PATH --layer L` hands a session (CPU or CUDA) as its weight source: opens the
// checkpoint now, so a bad file is refused before anything is allocated, and loads layer L when called.
using WeightLoader = std::function<void(const Graph&, const std::function<float*(ValueId)>&)>;
WeightLoader hf_layer_loader(const MoEConfig& config, const std::string& weights_path, int layer);

}  // namespace moeflow
