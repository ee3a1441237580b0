#include "scheduler/tuning_cache.hpp"

#include <cmath>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "graph/error.hpp"
#include "graph/json_file.hpp"

namespace moeflow {

TuningCache TuningCache::load(const std::string& path) {
  TuningCache c;
  c.source_ = path;
  if (!std::filesystem::exists(path)) return c;
  const nlohmann::json j = read_json_file(path, "tuning cache");
  if (!j.is_object() || j.value("version", 0) != 1 || !j.contains("entries") || !j["entries"].is_array())
    fail_input("tuning cache '" + path + "': expected {\"version\": 1, \"entries\": [...]}");
  for (std::size_t i = 0; i < j["entries"].size(); ++i) {
    const auto& e = j["entries"][i];
    try {
      c.entries_.push_back({e.at("device").get<std::string>(), e.at("signature").get<std::string>(),
                            e.at("tokens").get<int64_t>(), e.at("kernel").get<std::string>(),
                            e.at("time_us").get<double>()});
    } catch (const nlohmann::json::exception& ex) {
      fail_input("tuning cache '" + path + "': entry " + std::to_string(i) + ": " + ex.what());
    }
    if (c.entries_.back().tokens < 1)
      fail_input("tuning cache '" + path + "': entry " + std::to_string(i) + " has tokens < 1");
  }
  return c;
}

void TuningCache::save(const std::string& path) const {
  nlohmann::json entries = nlohmann::json::array();
  for (const TunedKernel& k : entries_)
    entries.push_back({{"device", k.device}, {"signature", k.signature}, {"tokens", k.tokens}, {"kernel", k.kernel},
                       {"time_us", k.time_us}});
  std::ofstream out(path);
  if (!out) fail_input("tuning cache '" + path + "': cannot write it");
  out << nlohmann::json{{"version", 1}, {"entries", entries}}.dump(1) << "\n";
}

void TuningCache::record(TunedKernel k) {
  for (TunedKernel& e : entries_)
    if (e.device == k.device && e.signature == k.signature && e.tokens == k.tokens) {
      e = std::move(k);
      return;
    }
  entries_.push_back(std::move(k));
}

const TunedKernel* TuningCache::find(const std::string& device, const std::string& signature, int64_t tokens) const {
  const TunedKernel* best = nullptr;
  double nearest = 1.0 + 1e-9;  // log2 distance: within a factor of two
  for (const TunedKernel& e : entries_) {
    if (e.signature != signature || (!device.empty() && e.device != device)) continue;
    const double d = std::abs(std::log2(static_cast<double>(e.tokens)) - std::log2(static_cast<double>(tokens)));
    if (d <= nearest) {
      nearest = d;
      best = &e;
    }
  }
  return best;
}

std::string tuning_signature(const Graph& g, const Node& n) {
  std::string s = n.op->kind() + "(";
  for (std::size_t i = 0; i < n.inputs.size(); ++i) s += (i ? ", " : "") + g.value(n.inputs[i]).type_str();
  return s + ")";
}

}  // namespace moeflow
