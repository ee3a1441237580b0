#pragma once
// One layer per model family at test sizes (H <= 512, I <= 256), shared by the CPU and GPU
// whole-layer tests so both backends are held to the same cases.
#include <string>
#include <vector>

namespace moeflow::testing_cases {

struct FamilyCase {
  std::string name;    // test-name fragment
  std::string preset;  // preset the overrides start from
  std::vector<std::string> sets;
};

inline const std::vector<FamilyCase>& family_cases() {
  static const std::vector<FamilyCase> cases{
      {"mixtral", "mixtral-8x7b", {"hidden_size=256", "intermediate_size=128"}},
      {"qwen2_moe_gated_shared", "qwen1.5-moe-a2.7b",
       {"hidden_size=256", "moe_intermediate_size=96", "shared_expert_intermediate_size=192"}},
      {"qwen3_moe", "qwen3-30b-a3b", {"hidden_size=192", "moe_intermediate_size=64", "num_experts=32"}},
      {"deepseek_v2_group_limited", "deepseek-v3",
       {"model_type=deepseek_v2", "scoring_func=softmax", "topk_method=group_limited_greedy", "n_routed_experts=32",
        "n_group=8", "topk_group=3", "num_experts_per_tok=6", "norm_topk_prob=false", "routed_scaling_factor=16",
        "n_shared_experts=2", "hidden_size=256", "moe_intermediate_size=64"}},
      {"deepseek_v3_noaux_tc", "deepseek-v3", {"hidden_size=512", "moe_intermediate_size=128"}},
  };
  return cases;
}

}  // namespace moeflow::testing_cases
