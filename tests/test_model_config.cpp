// Model configurations: the presets of DESIGN.md's table, HF config.json files per family, --set
// overrides, and every refusal naming the field that caused it.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <unistd.h>

#include "graph/error.hpp"
#include "ops/model_config.hpp"
#include "tests/expect_error.hpp"

namespace moeflow {
namespace {

using nlohmann::json;
using testing::HasSubstr;

using testing_errors::bad_input_message;

// A config.json in a per-test temporary folder, removed with the fixture.
class TempDir {
 public:
  TempDir() {
    dir_ = std::filesystem::temp_directory_path() /
           ("moeflow_model_config_" + std::to_string(::getpid()) + "_" +
            testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(dir_);
  }
  ~TempDir() { std::filesystem::remove_all(dir_); }
  std::string write(const std::string& name, const std::string& text) const {
    const auto path = dir_ / name;
    std::ofstream(path) << text;
    return path.string();
  }

 private:
  std::filesystem::path dir_;
};

// ---- presets ----------------------------------------------------------------------------------

TEST(ModelConfigPresets, NamesAreTheDesignTable) {
  EXPECT_THAT(preset_names(),
              testing::ElementsAre("mixtral-8x7b", "qwen3-30b-a3b", "qwen1.5-moe-a2.7b", "deepseek-v3"));
}

TEST(ModelConfigPresets, Mixtral8x7b) {
  const MoEConfig c = load_config("mixtral-8x7b");
  EXPECT_EQ(c.name, "mixtral-8x7b");
  EXPECT_EQ(c.family, ModelFamily::mixtral);
  EXPECT_EQ(c.hidden, 4096);
  EXPECT_EQ(c.intermediate, 14336);
  EXPECT_EQ(c.experts, 8);
  EXPECT_EQ(c.top_k, 2);
  EXPECT_FALSE(c.has_shared_expert());
  EXPECT_FALSE(c.shared_gate);
  EXPECT_EQ(c.fields["model_type"], "mixtral");
  const RoutingRule r = c.routing();
  EXPECT_EQ(r.experts, 8);
  EXPECT_EQ(r.top_k, 2);
  EXPECT_EQ(r.scoring, Scoring::softmax);
  EXPECT_EQ(r.method, TopKMethod::greedy);
  EXPECT_EQ(r.n_group, 1);
  EXPECT_EQ(r.topk_group, 1);
  EXPECT_FALSE(r.use_bias);
  EXPECT_TRUE(r.renormalize);
  EXPECT_EQ(r.renorm_epsilon, 0.0f);
  EXPECT_EQ(r.scale, 1.0f);
}

TEST(ModelConfigPresets, Qwen3_30bA3b) {
  const MoEConfig c = load_config("qwen3-30b-a3b");
  EXPECT_EQ(c.family, ModelFamily::qwen3_moe);
  EXPECT_EQ(c.hidden, 2048);
  EXPECT_EQ(c.intermediate, 768);
  EXPECT_EQ(c.experts, 128);
  EXPECT_EQ(c.top_k, 8);
  EXPECT_FALSE(c.has_shared_expert());
  const RoutingRule r = c.routing();
  EXPECT_EQ(r.scoring, Scoring::softmax);
  EXPECT_EQ(r.method, TopKMethod::greedy);
  EXPECT_TRUE(r.renormalize);
  EXPECT_EQ(r.renorm_epsilon, 0.0f);
  EXPECT_EQ(r.scale, 1.0f);
  EXPECT_FALSE(r.use_bias);
}

TEST(ModelConfigPresets, Qwen15MoeA27b) {
  const MoEConfig c = load_config("qwen1.5-moe-a2.7b");
  EXPECT_EQ(c.family, ModelFamily::qwen2_moe);
  EXPECT_EQ(c.hidden, 2048);
  EXPECT_EQ(c.intermediate, 1408);
  EXPECT_EQ(c.experts, 60);
  EXPECT_EQ(c.top_k, 4);
  EXPECT_TRUE(c.has_shared_expert());
  EXPECT_EQ(c.shared_intermediate, 5632);
  EXPECT_TRUE(c.shared_gate);
  const RoutingRule r = c.routing();
  EXPECT_EQ(r.scoring, Scoring::softmax);
  EXPECT_EQ(r.method, TopKMethod::greedy);
  EXPECT_FALSE(r.renormalize);
  EXPECT_EQ(r.scale, 1.0f);
}

TEST(ModelConfigPresets, DeepseekV3) {
  const MoEConfig c = load_config("deepseek-v3");
  EXPECT_EQ(c.family, ModelFamily::deepseek_v3);
  EXPECT_EQ(c.hidden, 7168);
  EXPECT_EQ(c.intermediate, 2048);
  EXPECT_EQ(c.experts, 256);
  EXPECT_EQ(c.top_k, 8);
  EXPECT_EQ(c.shared_intermediate, 2048);
  EXPECT_FALSE(c.shared_gate);
  const RoutingRule r = c.routing();
  EXPECT_EQ(r.experts, 256);
  EXPECT_EQ(r.scoring, Scoring::sigmoid);
  EXPECT_EQ(r.method, TopKMethod::noaux_tc);
  EXPECT_EQ(r.n_group, 8);
  EXPECT_EQ(r.topk_group, 4);
  EXPECT_TRUE(r.use_bias);
  EXPECT_TRUE(r.renormalize);
  EXPECT_EQ(r.renorm_epsilon, 1e-20f);
  EXPECT_EQ(r.scale, 2.5f);
}

TEST(ModelConfigPresets, FamilyNamesAreModelTypes) {
  EXPECT_STREQ(to_string(ModelFamily::mixtral), "mixtral");
  EXPECT_STREQ(to_string(ModelFamily::qwen2_moe), "qwen2_moe");
  EXPECT_STREQ(to_string(ModelFamily::qwen3_moe), "qwen3_moe");
  EXPECT_STREQ(to_string(ModelFamily::deepseek_v2), "deepseek_v2");
  EXPECT_STREQ(to_string(ModelFamily::deepseek_v3), "deepseek_v3");
}

// ---- routing rules per family -------------------------------------------------------------------

MoEConfig deepseek_v2(bool norm, double factor, int k) {
  json f = {{"model_type", "deepseek_v2"},   {"hidden_size", 256},        {"moe_intermediate_size", 128},
            {"n_routed_experts", 16},        {"num_experts_per_tok", k},  {"norm_topk_prob", norm},
            {"routed_scaling_factor", factor}, {"topk_method", "group_limited_greedy"},
            {"n_group", 4},                  {"topk_group", 2}};
  return config_from_fields(f, "v2-test");
}

TEST(ModelConfigRouting, DeepseekV2ScalesOnlyWithoutRenormalising) {
  RoutingRule r = deepseek_v2(false, 16.0, 6).routing();
  EXPECT_FALSE(r.renormalize);
  EXPECT_EQ(r.scale, 16.0f);
  EXPECT_EQ(r.renorm_epsilon, 1e-20f);
  EXPECT_EQ(r.method, TopKMethod::group_limited_greedy);
  EXPECT_EQ(r.n_group, 4);
  EXPECT_EQ(r.topk_group, 2);
  EXPECT_FALSE(r.use_bias);

  r = deepseek_v2(true, 16.0, 6).routing();
  EXPECT_TRUE(r.renormalize);
  EXPECT_EQ(r.scale, 1.0f);

  // k = 1 is never renormalised, so the factor applies again.
  r = deepseek_v2(true, 16.0, 1).routing();
  EXPECT_FALSE(r.renormalize);
  EXPECT_EQ(r.scale, 16.0f);
}

TEST(ModelConfigRouting, DeepseekV3ScalesAlwaysAndSkipsRenormForK1) {
  const RoutingRule r = load_config("deepseek-v3", {"num_experts_per_tok=1"}).routing();
  EXPECT_FALSE(r.renormalize);
  EXPECT_EQ(r.scale, 2.5f);
}

TEST(ModelConfigRouting, QwenRenormalisesIffNormTopkProb) {
  EXPECT_FALSE(load_config("qwen3-30b-a3b", {"norm_topk_prob=false"}).routing().renormalize);
  EXPECT_TRUE(load_config("qwen1.5-moe-a2.7b", {"norm_topk_prob=true"}).routing().renormalize);
}

TEST(ModelConfigRouting, GreedyResetsGroups) {
  const MoEConfig c = load_config("deepseek-v3", {"topk_method=greedy"});
  const RoutingRule r = c.routing();
  EXPECT_EQ(r.method, TopKMethod::greedy);
  EXPECT_EQ(r.n_group, 1);
  EXPECT_EQ(r.topk_group, 1);
  EXPECT_FALSE(r.use_bias);
  EXPECT_EQ(r.scale, 2.5f);
}

TEST(ModelConfigRouting, CustomScoringHonouredOnAnyFamily) {
  const RoutingRule r = load_config("mixtral-8x7b", {"scoring_func=sigmoid"}).routing();
  EXPECT_EQ(r.scoring, Scoring::sigmoid);
  EXPECT_TRUE(r.renormalize);
}

// ---- overrides ------------------------------------------------------------------------------------

TEST(ModelConfigOverrides, ChangeFieldsAndKeepTheirTypes) {
  const MoEConfig c = load_config("deepseek-v3", {"hidden_size=512", "moe_intermediate_size=256",
                                                  "n_routed_experts=32", "routed_scaling_factor=1.5",
                                                  "norm_topk_prob=false", "n_shared_experts=2"});
  EXPECT_EQ(c.hidden, 512);
  EXPECT_EQ(c.intermediate, 256);
  EXPECT_EQ(c.experts, 32);
  EXPECT_EQ(c.shared_intermediate, 512);
  EXPECT_FALSE(c.norm_topk_prob);
  EXPECT_EQ(c.routing().scale, 1.5f);
  EXPECT_FALSE(c.routing().renormalize);
  EXPECT_EQ(c.fields["hidden_size"], 512);
  EXPECT_TRUE(c.fields["routed_scaling_factor"].is_number_float());
  EXPECT_TRUE(c.fields["norm_topk_prob"].is_boolean());
}

TEST(ModelConfigOverrides, BareAndQuotedStrings) {
  json f = preset_fields("deepseek-v3");
  apply_override(f, "scoring_func=softmax");
  EXPECT_EQ(f["scoring_func"], "softmax");
  apply_override(f, "topk_method=\"group_limited_greedy\"");
  EXPECT_EQ(f["topk_method"], "group_limited_greedy");
  const MoEConfig c = config_from_fields(f, "deepseek-v3");
  EXPECT_EQ(c.scoring, Scoring::softmax);
  EXPECT_EQ(c.method, TopKMethod::group_limited_greedy);
  EXPECT_FALSE(c.routing().use_bias);
}

TEST(ModelConfigOverrides, QwenSharedExpertCanBeRemoved) {
  const MoEConfig c = load_config("qwen1.5-moe-a2.7b", {"shared_expert_intermediate_size=0"});
  EXPECT_FALSE(c.has_shared_expert());
  EXPECT_FALSE(c.shared_gate);
}

TEST(ModelConfigOverrides, RevalidateAfterOverride) {
  const std::string msg = bad_input_message([] { load_config("mixtral-8x7b", {"num_experts_per_tok=9"}); });
  EXPECT_THAT(msg, HasSubstr("mixtral-8x7b"));
  EXPECT_THAT(msg, HasSubstr("'num_experts_per_tok' = 9"));
  EXPECT_THAT(msg, HasSubstr("num_local_experts = 8"));
  EXPECT_THAT(msg, HasSubstr("--set num_experts_per_tok=9"));
}

TEST(ModelConfigOverrides, UnknownFieldListsAccepted) {
  const std::string msg = bad_input_message([] { load_config("mixtral-8x7b", {"num_expert=4"}); });
  EXPECT_THAT(msg, HasSubstr("unknown field 'num_expert'"));
  EXPECT_THAT(msg, HasSubstr("num_experts_per_tok"));
  EXPECT_THAT(msg, HasSubstr("routed_scaling_factor"));
}

TEST(ModelConfigOverrides, MalformedAssignment) {
  json f = preset_fields("mixtral-8x7b");
  EXPECT_THAT(bad_input_message([&] { apply_override(f, "hidden_size"); }), HasSubstr("expected field=value"));
  EXPECT_THAT(bad_input_message([&] { apply_override(f, "=4"); }), HasSubstr("field name"));
}

TEST(ModelConfigOverrides, FieldTheFamilyDoesNotReadIsRefused) {
  const std::string msg = bad_input_message([] { load_config("qwen3-30b-a3b", {"intermediate_size=256"}); });
  EXPECT_THAT(msg, HasSubstr("'intermediate_size'"));
  EXPECT_THAT(msg, HasSubstr("moe_intermediate_size"));
}

// ---- HF config.json, one per family --------------------------------------------------------------

TEST(ModelConfigHf, MixtralConfigJson) {
  TempDir dir;
  const std::string path = dir.write("config.json", R"({
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_act": "silu",
    "hidden_size": 4096, "intermediate_size": 14336, "num_local_experts": 8, "num_experts_per_tok": 2,
    "num_attention_heads": 32, "rope_theta": 1000000.0, "torch_dtype": "bfloat16"})");
  const MoEConfig c = load_config(path);
  EXPECT_EQ(c.name, path);
  EXPECT_EQ(c.family, ModelFamily::mixtral);
  EXPECT_EQ(c.intermediate, 14336);
  EXPECT_TRUE(c.routing().renormalize);
  EXPECT_EQ(c.fields["rope_theta"], 1000000.0);  // fields are kept as read
}

TEST(ModelConfigHf, Qwen2MoeDefaults) {
  TempDir dir;
  // No norm_topk_prob and no shared_expert_intermediate_size: Qwen2MoeConfig's defaults apply.
  const std::string path = dir.write("config.json", R"({"model_type": "qwen2_moe", "hidden_size": 2048,
    "intermediate_size": 5632, "moe_intermediate_size": 1408, "num_experts": 60,
    "num_experts_per_tok": 4, "hidden_act": "silu"})");
  const MoEConfig c = load_config(path);
  EXPECT_EQ(c.family, ModelFamily::qwen2_moe);
  EXPECT_EQ(c.intermediate, 1408);
  EXPECT_EQ(c.shared_intermediate, 5632);
  EXPECT_TRUE(c.shared_gate);
  EXPECT_FALSE(c.routing().renormalize);
}

TEST(ModelConfigHf, Qwen3MoeConfigJson) {
  TempDir dir;
  const std::string path = dir.write("config.json", R"({"model_type": "qwen3_moe", "hidden_size": 2048,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
    "norm_topk_prob": true, "decoder_sparse_step": 1, "mlp_only_layers": []})");
  const MoEConfig c = load_config(path);
  EXPECT_EQ(c.family, ModelFamily::qwen3_moe);
  EXPECT_EQ(c.intermediate, 768);
  EXPECT_FALSE(c.has_shared_expert());
  EXPECT_TRUE(c.routing().renormalize);
}

// transformers 5.x writes Qwen3-MoE's expert count under its attribute_map name (num_local_experts).
TEST(ModelConfigHf, Qwen3MoeExpertCountAsTransformers5WritesIt) {
  TempDir dir;
  const std::string common = R"("model_type": "qwen3_moe", "hidden_size": 64, "moe_intermediate_size": 24,
    "num_experts_per_tok": 8, "norm_topk_prob": true, )";
  EXPECT_EQ(load_config(dir.write("a.json", "{" + common + R"("num_local_experts": 32})")).experts, 32);
  EXPECT_EQ(load_config(dir.write("b.json", "{" + common + R"("num_local_experts": 32, "num_experts": 32})")).experts, 32);
  const std::string msg =
      bad_input_message([&] { load_config(dir.write("c.json", "{" + common + R"("num_local_experts": 32, "num_experts": 16})")); });
  EXPECT_THAT(msg, HasSubstr("num_local_experts"));
  EXPECT_THAT(msg, HasSubstr("contradicts 'num_experts' = 16"));
}

TEST(ModelConfigHf, DeepseekV2LiteConfigJson) {
  TempDir dir;
  // As DeepSeek-V2-Lite writes it, nulls included (HF's None means "use the default").
  const std::string path = dir.write("config.json", R"({"model_type": "deepseek_v2", "hidden_size": 2048,
    "intermediate_size": 10944, "moe_intermediate_size": 1408, "n_routed_experts": 64,
    "n_shared_experts": 2, "num_experts_per_tok": 6, "topk_method": "greedy", "n_group": 1,
    "topk_group": 1, "norm_topk_prob": false, "routed_scaling_factor": 1.0, "scoring_func": "softmax",
    "hidden_act": "silu", "rope_scaling": null, "ep_size": 1})");
  const MoEConfig c = load_config(path);
  EXPECT_EQ(c.family, ModelFamily::deepseek_v2);
  EXPECT_EQ(c.experts, 64);
  EXPECT_EQ(c.shared_intermediate, 2 * 1408);
  EXPECT_FALSE(c.shared_gate);
  const RoutingRule r = c.routing();
  EXPECT_EQ(r.scoring, Scoring::softmax);
  EXPECT_EQ(r.method, TopKMethod::greedy);
  EXPECT_FALSE(r.renormalize);
  EXPECT_EQ(r.scale, 1.0f);
  EXPECT_EQ(r.renorm_epsilon, 1e-20f);
}

TEST(ModelConfigHf, DeepseekV3DefaultsFromClass) {
  TempDir dir;
  // Only the required fields: DeepseekV3Config's defaults supply the router.
  const std::string path = dir.write("config.json", R"({"model_type": "deepseek_v3", "hidden_size": 512,
    "moe_intermediate_size": 128, "n_routed_experts": 32, "num_experts_per_tok": 8, "n_group": null})");
  const MoEConfig c = load_config(path);
  EXPECT_EQ(c.family, ModelFamily::deepseek_v3);
  EXPECT_EQ(c.shared_intermediate, 128);
  const RoutingRule r = c.routing();
  EXPECT_EQ(r.scoring, Scoring::sigmoid);
  EXPECT_EQ(r.method, TopKMethod::noaux_tc);
  EXPECT_EQ(r.n_group, 8);
  EXPECT_EQ(r.topk_group, 4);
  EXPECT_TRUE(r.use_bias);
  EXPECT_TRUE(r.renormalize);
  EXPECT_EQ(r.scale, 2.5f);
}

TEST(ModelConfigHf, OverridesApplyToFiles) {
  TempDir dir;
  const std::string path = dir.write("config.json", R"({"model_type": "qwen3_moe", "hidden_size": 2048,
    "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8})");
  const MoEConfig c = load_config(path, {"hidden_size=256", "num_experts=16", "num_experts_per_tok=2"});
  EXPECT_EQ(c.hidden, 256);
  EXPECT_EQ(c.experts, 16);
  EXPECT_EQ(c.top_k, 2);
  EXPECT_EQ(c.fields["num_experts"], 16);
}

// ---- refusals, each naming the field --------------------------------------------------------------

json qwen3_fields() { return preset_fields("qwen3-30b-a3b"); }

std::string refuse_fields(json f) {
  return bad_input_message([&] { config_from_fields(f, "config.json"); });
}

TEST(ModelConfigRefusals, UnknownPreset) {
  const std::string msg = bad_input_message([] { load_config("mixtral-8x22b"); });
  EXPECT_THAT(msg, HasSubstr("unknown preset 'mixtral-8x22b'"));
  EXPECT_THAT(msg, HasSubstr("mixtral-8x7b"));
  EXPECT_THAT(msg, HasSubstr("deepseek-v3"));
  EXPECT_THAT(bad_input_message([] { preset_fields("gpt-oss"); }), HasSubstr("unknown preset 'gpt-oss'"));
}

TEST(ModelConfigRefusals, MissingRequiredField) {
  json f = qwen3_fields();
  f.erase("moe_intermediate_size");
  std::string msg = refuse_fields(f);
  EXPECT_THAT(msg, HasSubstr("config.json"));
  EXPECT_THAT(msg, HasSubstr("required field 'moe_intermediate_size' is missing"));
  f = qwen3_fields();
  f.erase("model_type");
  EXPECT_THAT(refuse_fields(f), HasSubstr("'model_type' is missing"));
  f = qwen3_fields();
  f["num_experts_per_tok"] = nullptr;
  EXPECT_THAT(refuse_fields(f), HasSubstr("'num_experts_per_tok' is missing"));
}

TEST(ModelConfigRefusals, UnknownModelType) {
  json f = qwen3_fields();
  f["model_type"] = "llama";
  const std::string msg = refuse_fields(f);
  EXPECT_THAT(msg, HasSubstr("'model_type' = \"llama\""));
  EXPECT_THAT(msg, HasSubstr("deepseek_v3"));
}

TEST(ModelConfigRefusals, HiddenActGelu) {
  json f = qwen3_fields();
  f["hidden_act"] = "gelu";
  EXPECT_THAT(refuse_fields(f), HasSubstr("'hidden_act' = \"gelu\""));
}

TEST(ModelConfigRefusals, UnknownScoringFunc) {
  const std::string msg = bad_input_message([] { load_config("deepseek-v3", {"scoring_func=tanh"}); });
  EXPECT_THAT(msg, HasSubstr("'scoring_func' = \"tanh\""));
  EXPECT_THAT(msg, HasSubstr("softmax, sigmoid"));
}

TEST(ModelConfigRefusals, UnknownTopkMethod) {
  json f = preset_fields("deepseek-v3");
  f["topk_method"] = "gready";
  const std::string msg = refuse_fields(f);
  EXPECT_THAT(msg, HasSubstr("'topk_method' = \"gready\""));
  EXPECT_THAT(msg, HasSubstr("noaux_tc"));
}

TEST(ModelConfigRefusals, TopKAboveExperts) {
  json f = qwen3_fields();
  f["num_experts"] = 8;
  f["num_experts_per_tok"] = 9;
  EXPECT_THAT(refuse_fields(f), HasSubstr("config.json: field 'num_experts_per_tok' = 9 must be in [1, num_experts = 8]"));
}

TEST(ModelConfigRefusals, TopKNotPositive) {
  json f = qwen3_fields();
  f["num_experts_per_tok"] = 0;
  EXPECT_THAT(refuse_fields(f), HasSubstr("'num_experts_per_tok' = 0 must be in [1, num_experts = 128]"));
  f["num_experts_per_tok"] = -2;
  EXPECT_THAT(refuse_fields(f), HasSubstr("'num_experts_per_tok' = -2"));
}

TEST(ModelConfigRefusals, SizesNotPositive) {
  json f = qwen3_fields();
  f["hidden_size"] = 0;
  EXPECT_THAT(refuse_fields(f), HasSubstr("'hidden_size' = 0 must be > 0"));
  f = qwen3_fields();
  f["moe_intermediate_size"] = -1;
  EXPECT_THAT(refuse_fields(f), HasSubstr("'moe_intermediate_size' = -1 must be > 0"));
  f = qwen3_fields();
  f["num_experts"] = 0;
  EXPECT_THAT(refuse_fields(f), HasSubstr("'num_experts' = 0 must be > 0"));
}

TEST(ModelConfigRefusals, NGroupNotDividingExperts) {
  const std::string msg = bad_input_message([] { load_config("deepseek-v3", {"n_group=7"}); });
  EXPECT_THAT(msg, HasSubstr("'n_group' = 7 must be >= 1 and divide n_routed_experts = 256"));
  // A defaulted value is shown as such.
  json f = {{"model_type", "deepseek_v3"},
            {"hidden_size", 64},
            {"moe_intermediate_size", 32},
            {"n_routed_experts", 12},
            {"num_experts_per_tok", 2}};
  EXPECT_THAT(refuse_fields(f), HasSubstr("'n_group' = 8 (default for deepseek_v3)"));
}

TEST(ModelConfigRefusals, TopkGroupAboveNGroup) {
  const std::string msg = bad_input_message([] { load_config("deepseek-v3", {"topk_group=9"}); });
  EXPECT_THAT(msg, HasSubstr("'topk_group' = 9 must be in [1, n_group = 8]"));
}

TEST(ModelConfigRefusals, TooFewExpertsInKeptGroups) {
  // 256 experts in 8 groups of 32, keep 1 group: k = 33 cannot be met.
  const std::string msg =
      bad_input_message([] { load_config("deepseek-v3", {"topk_group=1", "num_experts_per_tok=33"}); });
  EXPECT_THAT(msg, HasSubstr("'num_experts_per_tok' = 33"));
  EXPECT_THAT(msg, HasSubstr("32 experts"));
}

TEST(ModelConfigRefusals, RoutedScalingFactorNotPositive) {
  EXPECT_THAT(bad_input_message([] { load_config("deepseek-v3", {"routed_scaling_factor=0"}); }),
              HasSubstr("'routed_scaling_factor' = 0 must be a finite number > 0"));
}

TEST(ModelConfigRefusals, WrongJsonType) {
  json f = qwen3_fields();
  f["hidden_size"] = "2048";
  EXPECT_THAT(refuse_fields(f), HasSubstr("'hidden_size' = \"2048\" must be an integer"));
  f = qwen3_fields();
  f["norm_topk_prob"] = "yes";
  EXPECT_THAT(refuse_fields(f), HasSubstr("'norm_topk_prob' = \"yes\" must be a boolean"));
  EXPECT_THAT(bad_input_message([] { load_config("deepseek-v3", {"routed_scaling_factor=big"}); }),
              HasSubstr("'routed_scaling_factor' = \"big\" must be a number"));
  EXPECT_THAT(bad_input_message([] { load_config("deepseek-v3", {"scoring_func=1"}); }),
              HasSubstr("'scoring_func' = 1 must be a string"));
  EXPECT_THAT(bad_input_message([] { load_config("mixtral-8x7b", {"hidden_size=4096.5"}); }),
              HasSubstr("'hidden_size' = 4096.5 must be an integer"));
  EXPECT_THAT(refuse_fields(json::array()), HasSubstr("must be a JSON object"));
}

TEST(ModelConfigRefusals, MalformedJson) {
  TempDir dir;
  const std::string path = dir.write("config.json", "{\"model_type\": \"mixtral\",\n  \"hidden_size\": }");
  const std::string msg = bad_input_message([&] { load_config(path); });
  EXPECT_THAT(msg, HasSubstr(path));
  EXPECT_THAT(msg, HasSubstr("malformed JSON"));
  EXPECT_THAT(msg, HasSubstr("line 2"));
}

TEST(ModelConfigRefusals, MissingFile) {
  const std::string msg = bad_input_message([] { load_config("/nonexistent/dir/config.json"); });
  EXPECT_THAT(msg, HasSubstr("/nonexistent/dir/config.json"));
  EXPECT_THAT(msg, HasSubstr("not found"));
}

}  // namespace
}  // namespace moeflow
