#include "ops/model_config.hpp"

#include <algorithm>
#include <array>
#include <cfloat>
#include <climits>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>

#include "graph/error.hpp"
#include "graph/json_file.hpp"

namespace moeflow {
namespace {

using nlohmann::json;

// The presets are written as the config.json they stand for (only the fields one MoE layer reads),
// so a preset and a user's --hf-config go through exactly the same parsing and validation.
struct Preset {
  const char* name;
  const char* fields;
};
constexpr std::array kPresets{
    Preset{"mixtral-8x7b", R"({"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
        "num_local_experts": 8, "num_experts_per_tok": 2, "hidden_act": "silu"})"},
    Preset{"qwen3-30b-a3b", R"({"model_type": "qwen3_moe", "hidden_size": 2048, "moe_intermediate_size": 768,
        "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": true, "hidden_act": "silu"})"},
    Preset{"qwen1.5-moe-a2.7b", R"({"model_type": "qwen2_moe", "hidden_size": 2048, "moe_intermediate_size": 1408,
        "num_experts": 60, "num_experts_per_tok": 4, "shared_expert_intermediate_size": 5632,
        "norm_topk_prob": false, "hidden_act": "silu"})"},
    Preset{"deepseek-v3", R"({"model_type": "deepseek_v3", "hidden_size": 7168, "moe_intermediate_size": 2048,
        "n_routed_experts": 256, "num_experts_per_tok": 8, "n_shared_experts": 1, "scoring_func": "sigmoid",
        "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4, "norm_topk_prob": true,
        "routed_scaling_factor": 2.5, "hidden_act": "silu"})"},
};

enum class SharedKind { none, qwen_gated, deepseek };

// What differs between families: where E and I live, and the defaults of the optional fields.
// Defaults are Hugging Face transformers' config-class defaults, so a config.json that omits a
// field means what it means to transformers:
//   MixtralConfig: no routing fields at all; softmax top-k, always renormalised, no shared expert.
//   Qwen2MoeConfig: norm_topk_prob=False, shared_expert_intermediate_size=5632.
//   Qwen3MoeConfig: norm_topk_prob=False (the released checkpoints set it true in config.json),
//     no shared expert. Its attribute_map stores num_experts as num_local_experts, so a config.json
//     that transformers 5.x writes says "num_local_experts" (read here as the same field).
//   DeepseekV2Config: scoring_func="softmax", topk_method="greedy" (the class default; full V2
//     sets "group_limited_greedy" in its config.json), n_group/topk_group=None (read as 1),
//     norm_topk_prob=False, routed_scaling_factor=1.0, n_shared_experts=None (read as 0).
//   DeepseekV3Config: scoring_func="sigmoid", topk_method="noaux_tc", n_group=8, topk_group=4,
//     norm_topk_prob=True, routed_scaling_factor=2.5, n_shared_experts=1.
struct Family {
  ModelFamily family;
  const char* model_type;
  const char* experts_field;
  const char* intermediate_field;
  Scoring scoring;
  TopKMethod method;
  int n_group;
  int topk_group;
  bool norm_topk_prob;
  double routed_scaling_factor;
  SharedKind shared;
  int shared_default;  // shared_expert_intermediate_size (Qwen2) or n_shared_experts (DeepSeek)
};
constexpr std::array kFamilies{
    Family{ModelFamily::mixtral, "mixtral", "num_local_experts", "intermediate_size", Scoring::softmax,
           TopKMethod::greedy, 1, 1, true, 1.0, SharedKind::none, 0},
    Family{ModelFamily::qwen2_moe, "qwen2_moe", "num_experts", "moe_intermediate_size", Scoring::softmax,
           TopKMethod::greedy, 1, 1, false, 1.0, SharedKind::qwen_gated, 5632},
    Family{ModelFamily::qwen3_moe, "qwen3_moe", "num_experts", "moe_intermediate_size", Scoring::softmax,
           TopKMethod::greedy, 1, 1, false, 1.0, SharedKind::none, 0},
    Family{ModelFamily::deepseek_v2, "deepseek_v2", "n_routed_experts", "moe_intermediate_size",
           Scoring::softmax, TopKMethod::greedy, 1, 1, false, 1.0, SharedKind::deepseek, 0},
    Family{ModelFamily::deepseek_v3, "deepseek_v3", "n_routed_experts", "moe_intermediate_size",
           Scoring::sigmoid, TopKMethod::noaux_tc, 8, 4, true, 2.5, SharedKind::deepseek, 1},
};

const Family& family_of(ModelFamily f) {
  for (const Family& fam : kFamilies)
    if (fam.family == f) return fam;
  return kFamilies.front();
}

constexpr std::array<const char*, 17> kAcceptedFields{
    "model_type",       "hidden_size",       "intermediate_size",      "moe_intermediate_size",
    "num_local_experts", "num_experts",      "n_routed_experts",       "num_experts_per_tok",
    "norm_topk_prob",   "scoring_func",      "topk_method",            "n_group",
    "topk_group",       "routed_scaling_factor", "n_shared_experts", "shared_expert_intermediate_size",
    "hidden_act"};

// Fields a family never reads. A --set of one of them would silently change nothing (e.g.
// intermediate_size on a Qwen preset, whose experts use moe_intermediate_size), so it is refused.
// A config.json may still carry them: real ones do (the dense MLP's intermediate_size).
bool family_ignores(ModelFamily f, const std::string& field) {
  const Family& fam = family_of(f);
  if (field == "intermediate_size" || field == "moe_intermediate_size") return field != fam.intermediate_field;
  if (field == "num_local_experts" || field == "num_experts" || field == "n_routed_experts")
    return field != fam.experts_field;
  if (field == "norm_topk_prob") return f == ModelFamily::mixtral;  // Mixtral always renormalises
  if (field == "routed_scaling_factor" || field == "n_shared_experts") return fam.shared != SharedKind::deepseek;
  if (field == "shared_expert_intermediate_size") return fam.shared != SharedKind::qwen_gated;
  return false;
}

// Another name under which transformers writes a family's expert count (its config's attribute_map):
// accepted from a config.json, while --set keeps the one name of the family.
const char* experts_alias(ModelFamily f) { return f == ModelFamily::qwen3_moe ? "num_local_experts" : nullptr; }

std::string join(auto begin, auto end) {
  std::string out;
  for (auto it = begin; it != end; ++it) {
    if (!out.empty()) out += ", ";
    out += *it;
  }
  return out;
}

std::string one_line(std::string s) {
  std::replace(s.begin(), s.end(), '\n', ' ');
  return s;
}

// Reads the optional and required fields of one dictionary with messages that name the source,
// the field and the value. JSON null counts as absent, as HF writes None.
class FieldReader {
 public:
  FieldReader(const json& fields, const std::string& source) : fields_(fields), source_(source) {}

  [[noreturn]] void fail(const std::string& field, const std::string& shown, const std::string& why) const {
    fail_input(one_line(source_ + ": field '" + field + "' = " + shown + " " + why));
  }
  [[noreturn]] void fail(const std::string& field, const std::string& why) const {
    fail(field, shown(field), why);
  }

  // The value as written, or the default it took ("8 (default for deepseek_v3)").
  std::string shown(const std::string& field) const {
    if (const json* v = find(field)) return v->dump();
    auto it = defaults_shown_.find(field);
    return it != defaults_shown_.end() ? it->second : "(absent)";
  }

  const json* find(const std::string& field) const {
    auto it = fields_.find(field);
    return it == fields_.end() || it->is_null() ? nullptr : &*it;
  }

  const json& required(const std::string& field, const std::string& why) const {
    const json* v = find(field);
    if (!v) fail_input(source_ + ": required field '" + field + "' is missing" + why);
    return *v;
  }

  int as_int(const std::string& field, const json& v) const {
    if (!v.is_number_integer()) fail(field, "must be an integer");
    if (v.is_number_unsigned() ? v.get<std::uint64_t>() > INT_MAX
                               : (v.get<std::int64_t>() > INT_MAX || v.get<std::int64_t>() < INT_MIN))
      fail(field, "is out of range for a 32-bit integer");
    return v.get<int>();
  }
  int required_int(const std::string& field, const std::string& why = "") const {
    return as_int(field, required(field, why));
  }
  int optional_int(const std::string& field, int fallback, const std::string& default_note) {
    if (const json* v = find(field)) return as_int(field, *v);
    defaults_shown_[field] = std::to_string(fallback) + " (" + default_note + ")";
    return fallback;
  }
  bool optional_bool(const std::string& field, bool fallback) const {
    const json* v = find(field);
    if (!v) return fallback;
    if (!v->is_boolean()) fail(field, "must be a boolean (true or false)");
    return v->get<bool>();
  }
  double optional_number(const std::string& field, double fallback) const {
    const json* v = find(field);
    if (!v) return fallback;
    if (!v->is_number()) fail(field, "must be a number");
    return v->get<double>();
  }
  std::optional<std::string> optional_string(const std::string& field) const {
    const json* v = find(field);
    if (!v) return std::nullopt;
    if (!v->is_string()) fail(field, "must be a string");
    return v->get<std::string>();
  }

 private:
  const json& fields_;
  const std::string& source_;
  std::map<std::string, std::string> defaults_shown_;
};

Scoring parse_scoring(const FieldReader& r, Scoring fallback) {
  auto s = r.optional_string("scoring_func");
  if (!s) return fallback;
  if (*s == "softmax") return Scoring::softmax;
  if (*s == "sigmoid") return Scoring::sigmoid;
  r.fail("scoring_func", "is not a known scoring function (softmax, sigmoid)");
}

TopKMethod parse_method(const FieldReader& r, TopKMethod fallback) {
  auto s = r.optional_string("topk_method");
  if (!s) return fallback;
  for (TopKMethod m : {TopKMethod::greedy, TopKMethod::group_limited_greedy, TopKMethod::noaux_tc})
    if (*s == to_string(m)) return m;
  r.fail("topk_method", "is not a known top-k method (greedy, group_limited_greedy, noaux_tc)");
}

std::string model_types() {
  std::vector<std::string> names;
  for (const Family& f : kFamilies) names.emplace_back(f.model_type);
  return join(names.begin(), names.end());
}

std::string preset_list() {
  auto names = preset_names();
  return join(names.begin(), names.end());
}

}  // namespace

const char* to_string(ModelFamily f) { return family_of(f).model_type; }

std::vector<std::string> preset_names() {
  std::vector<std::string> names;
  for (const Preset& p : kPresets) names.emplace_back(p.name);
  return names;
}

json preset_fields(const std::string& preset) {
  for (const Preset& p : kPresets)
    if (preset == p.name) return json::parse(p.fields);
  fail_input("unknown preset '" + preset + "'; presets: " + preset_list());
}

void apply_override(json& fields, const std::string& assignment) {
  const auto eq = assignment.find('=');
  if (eq == std::string::npos)
    fail_input(one_line("--set '" + assignment + "': expected field=value"));
  const std::string field = assignment.substr(0, eq);
  const std::string text = assignment.substr(eq + 1);
  if (field.empty()) fail_input(one_line("--set '" + assignment + "': the field name before '=' is empty"));
  if (std::find(kAcceptedFields.begin(), kAcceptedFields.end(), field) == kAcceptedFields.end())
    fail_input(one_line("--set '" + assignment + "': unknown field '" + field + "'; accepted fields: " +
                        join(kAcceptedFields.begin(), kAcceptedFields.end())));
  if (!fields.is_object()) fields = json::object();
  if (auto mt = fields.find("model_type"); mt != fields.end() && mt->is_string()) {
    for (const Family& fam : kFamilies)
      if (*mt == fam.model_type && family_ignores(fam.family, field))
        fail_input(one_line("--set '" + assignment + "': field '" + field + "' is not read for model_type " +
                            fam.model_type + " (its experts are '" + fam.experts_field + "' of size '" +
                            fam.intermediate_field + "')"));
  }
  // JSON first so numbers and booleans keep their type; a bare word (sigmoid) is a string.
  json value = json::parse(text, nullptr, /*allow_exceptions=*/false);
  fields[field] = value.is_discarded() ? json(text) : std::move(value);
}

MoEConfig config_from_fields(const json& fields, const std::string& name) {
  if (!fields.is_object()) fail_input(name + ": the configuration must be a JSON object, got " + fields.type_name());
  FieldReader r(fields, name);

  const json& model_type_field = r.required("model_type", " (one of " + model_types() + ")");
  if (!model_type_field.is_string()) r.fail("model_type", "must be a string");
  const std::string model_type = model_type_field.get<std::string>();
  const Family* fam = nullptr;
  for (const Family& f : kFamilies)
    if (model_type == f.model_type) fam = &f;
  if (!fam) r.fail("model_type", "is not a supported MoE model type (" + model_types() + ")");

  if (auto act = r.optional_string("hidden_act"); act && *act != "silu")
    r.fail("hidden_act", "is not supported: experts are SwiGLU, hidden_act must be \"silu\"");

  const std::string family_note = std::string(" for model_type ") + fam->model_type;
  MoEConfig c;
  c.name = name;
  c.family = fam->family;
  c.fields = fields;
  c.hidden = r.required_int("hidden_size");
  c.intermediate = r.required_int(fam->intermediate_field, family_note);
  const char* alias = experts_alias(fam->family);
  const char* experts_field = fam->experts_field;
  if (alias && r.find(alias)) {
    if (r.find(experts_field) && *r.find(experts_field) != *r.find(alias))
      r.fail(alias, std::string("contradicts '") + experts_field + "' = " + r.shown(experts_field) +
                        " (both name the expert count of model_type " + fam->model_type + ")");
    if (!r.find(experts_field)) experts_field = alias;
  }
  c.experts = r.required_int(experts_field, family_note);
  c.top_k = r.required_int("num_experts_per_tok");
  c.scoring = parse_scoring(r, fam->scoring);
  c.method = parse_method(r, fam->method);
  const std::string default_note = std::string("default for ") + fam->model_type;
  c.n_group = r.optional_int("n_group", fam->n_group, default_note);
  c.topk_group = r.optional_int("topk_group", fam->topk_group, default_note);
  c.norm_topk_prob = r.optional_bool("norm_topk_prob", fam->norm_topk_prob);
  c.routed_scaling_factor = r.optional_number("routed_scaling_factor", fam->routed_scaling_factor);

  if (c.hidden <= 0) r.fail("hidden_size", "must be > 0");
  if (c.intermediate <= 0) r.fail(fam->intermediate_field, "must be > 0");
  if (c.experts <= 0) r.fail(experts_field, "must be > 0");
  if (c.top_k < 1 || c.top_k > c.experts)
    r.fail("num_experts_per_tok",
           "must be in [1, " + std::string(experts_field) + " = " + std::to_string(c.experts) + "]");
  if (!std::isfinite(c.routed_scaling_factor) || c.routed_scaling_factor <= 0 || c.routed_scaling_factor > FLT_MAX)
    r.fail("routed_scaling_factor", "must be a finite number > 0");

  if (c.method == TopKMethod::greedy) {
    // Group fields mean nothing to a plain top-k; V2-Lite writes n_group 1 anyway.
    c.n_group = c.topk_group = 1;
  } else {
    const std::string e = std::string(experts_field) + " = " + std::to_string(c.experts);
    if (c.n_group < 1 || c.experts % c.n_group != 0) r.fail("n_group", "must be >= 1 and divide " + e);
    if (c.topk_group < 1 || c.topk_group > c.n_group)
      r.fail("topk_group", "must be in [1, n_group = " + std::to_string(c.n_group) + "]");
    const int kept = c.topk_group * (c.experts / c.n_group);
    if (c.top_k > kept)
      r.fail("num_experts_per_tok", "exceeds the " + std::to_string(kept) + " experts in the topk_group = " +
                                        std::to_string(c.topk_group) + " kept groups of " +
                                        std::to_string(c.experts / c.n_group) + " experts each");
  }

  switch (fam->shared) {
    case SharedKind::none: break;
    case SharedKind::qwen_gated: {
      const int s = r.optional_int("shared_expert_intermediate_size", fam->shared_default, default_note);
      if (s < 0) r.fail("shared_expert_intermediate_size", "must be >= 0 (0: no shared expert)");
      c.shared_intermediate = s;
      c.shared_gate = s > 0;
      break;
    }
    case SharedKind::deepseek: {
      const int n = r.optional_int("n_shared_experts", fam->shared_default, default_note);
      if (n < 0) r.fail("n_shared_experts", "must be >= 0");
      if (static_cast<long long>(n) * c.intermediate > INT_MAX)
        r.fail("n_shared_experts", "times moe_intermediate_size overflows a 32-bit size");
      c.shared_intermediate = n * c.intermediate;
      break;
    }
  }
  return c;
}

RoutingRule MoEConfig::routing() const {
  RoutingRule rule;
  rule.experts = experts;
  rule.top_k = top_k;
  rule.scoring = scoring;
  rule.method = method;
  const bool greedy = method == TopKMethod::greedy;
  rule.n_group = greedy ? 1 : n_group;
  rule.topk_group = greedy ? 1 : topk_group;
  rule.use_bias = method == TopKMethod::noaux_tc;
  switch (family) {
    case ModelFamily::mixtral:
      rule.renormalize = true;
      break;
    case ModelFamily::qwen2_moe:
    case ModelFamily::qwen3_moe:
      rule.renormalize = norm_topk_prob;
      break;
    case ModelFamily::deepseek_v2:
    case ModelFamily::deepseek_v3:
      // DeepSeek's own modeling code: a single expert's weight is never renormalised to 1.
      rule.renormalize = norm_topk_prob && top_k > 1;
      rule.renorm_epsilon = 1e-20f;
      // V2 folds the factor in only on the un-normalised path; V3 always multiplies.
      if (family == ModelFamily::deepseek_v3 || !rule.renormalize)
        rule.scale = static_cast<float>(routed_scaling_factor);
      break;
  }
  return rule;
}

MoEConfig load_config(const std::string& preset_or_path, const std::vector<std::string>& overrides) {
  json fields;
  const auto names = preset_names();
  if (std::find(names.begin(), names.end(), preset_or_path) != names.end()) {
    fields = preset_fields(preset_or_path);
  } else {
    namespace fs = std::filesystem;
    std::error_code ec;
    if (!fs::exists(preset_or_path, ec)) {
      // A name with a path separator or a .json suffix was meant as a file, anything else as a preset.
      const bool looks_like_path = preset_or_path.find('/') != std::string::npos ||
                                   fs::path(preset_or_path).extension() == ".json";
      if (looks_like_path) fail_input(preset_or_path + ": config file not found");
      fail_input("unknown preset '" + preset_or_path + "' (and no such config file); presets: " + preset_list());
    }
    if (fs::is_directory(preset_or_path, ec))
      fail_input(preset_or_path + ": is a directory, expected a config.json file");
    fields = read_json_file(preset_or_path, "config");
  }
  for (const std::string& o : overrides) {
    try {
      apply_override(fields, o);
    } catch (const Error& e) {
      fail_input(preset_or_path + ": " + e.what());
    }
  }
  if (overrides.empty()) return config_from_fields(fields, preset_or_path);
  try {
    return config_from_fields(fields, preset_or_path);
  } catch (const Error& e) {
    // The offending value may come from a --set, not from the file; say which were applied.
    fail_input(std::string(e.what()) + " (after --set " + join(overrides.begin(), overrides.end()) + ")");
  }
}

}  // namespace moeflow
