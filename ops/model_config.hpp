#pragma once
// One MoE layer's configuration, read from a preset or a Hugging Face config.json, with `--set`
// overrides. Presets are such dictionaries, so both speak the same field names (DESIGN.md,
// "HF config fields"). Everything a kernel needs is resolved here (see routing()).
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "kernels/common/routing_rule.hpp"

namespace moeflow {

enum class ModelFamily { mixtral, qwen2_moe, qwen3_moe, deepseek_v2, deepseek_v3 };
const char* to_string(ModelFamily f);

struct MoEConfig {
  std::string name;  // preset name, or the config file's path
  ModelFamily family = ModelFamily::mixtral;
  int hidden = 0;        // H
  int intermediate = 0;  // I of one routed expert
  int experts = 0;       // E
  int top_k = 0;         // k
  Scoring scoring = Scoring::softmax;
  TopKMethod method = TopKMethod::greedy;
  int n_group = 1;
  int topk_group = 1;
  bool norm_topk_prob = false;
  double routed_scaling_factor = 1.0;
  int shared_intermediate = 0;  // 0: no shared expert
  bool shared_gate = false;     // Qwen2-MoE's sigmoid gate on the shared expert
  nlohmann::json fields;        // the dictionary after overrides, as read

  // The gate's resolved rule: renormalisation, epsilon and the effective scale per family.
  RoutingRule routing() const;
  bool has_shared_expert() const { return shared_intermediate > 0; }
};

// Names of the built-in presets (mixtral-8x7b, qwen3-30b-a3b, qwen1.5-moe-a2.7b, deepseek-v3).
std::vector<std::string> preset_names();
// The preset's dictionary; throws Error(bad_input) naming the unknown preset and the known ones.
nlohmann::json preset_fields(const std::string& preset);

// Parses "field=value" and writes it into `fields`; the value is read as JSON (number, bool,
// string) or else as a bare string. Unknown fields are refused by name.
void apply_override(nlohmann::json& fields, const std::string& assignment);

// Builds and validates a config from a dictionary (config.json or preset). Refuses, by field name:
// a missing required field, hidden_act != silu, an unknown scoring_func / topk_method / model_type,
// top-k <= 0 or > experts, sizes <= 0, n_group not dividing experts, topk_group > n_group, ...
MoEConfig config_from_fields(const nlohmann::json& fields, const std::string& name);

// A preset name or a path to a config.json, then the overrides in order.
MoEConfig load_config(const std::string& preset_or_path, const std::vector<std::string>& overrides = {});

}  // namespace moeflow
