#include "scheduler/trace.hpp"

#include <fstream>
#include <nlohmann/json.hpp>

#include "graph/error.hpp"

namespace moeflow {

namespace {

void append_events(const Trace& t, nlohmann::json& events_json) {
  events_json.push_back({{"name", "process_name"}, {"ph", "M"}, {"pid", t.pid}, {"tid", 0}, {"args", {{"name", t.process}}}});
  for (std::size_t l = 0; l < t.lanes.size(); ++l)
    events_json.push_back(
        {{"name", "thread_name"}, {"ph", "M"}, {"pid", t.pid}, {"tid", l}, {"args", {{"name", t.lanes[l]}}}});
  for (const TraceEvent& e : t.events)
    events_json.push_back({{"name", e.name},
                           {"cat", e.op},
                           {"ph", "X"},
                           {"pid", t.pid},
                           {"tid", e.lane},
                           {"ts", e.start_us},
                           {"dur", e.duration_us},
                           {"args", {{"kernel", e.kernel}, {"chunk", e.chunk}, {"predicted_us", e.predicted_us},
                                     {"tokens", t.tokens}}}});
}

void write_events(std::ostream& out, const nlohmann::json& events_json) {
  out << nlohmann::json{{"traceEvents", events_json}, {"displayTimeUnit", "ms"}}.dump(1) << "\n";
}

}  // namespace

void Trace::write_chrome_json(std::ostream& out) const {
  nlohmann::json events_json = nlohmann::json::array();
  append_events(*this, events_json);
  write_events(out, events_json);
}

void Trace::write_merged_chrome_json(std::ostream& out, const std::vector<Trace>& traces) {
  nlohmann::json events_json = nlohmann::json::array();
  for (const Trace& t : traces) append_events(t, events_json);
  write_events(out, events_json);
}

Trace Trace::read_chrome_json(const std::string& path) {
  std::ifstream f(path);
  if (!f) fail_input("trace '" + path + "': cannot open");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(f);
  } catch (const nlohmann::json::exception& e) {
    fail_input("trace '" + path + "': not JSON: " + e.what());
  }
  if (!j.is_object() || !j.contains("traceEvents") || !j["traceEvents"].is_array())
    fail_input("trace '" + path + "': no traceEvents array");
  Trace t;
  try {
    for (const auto& e : j["traceEvents"]) {
      const std::string ph = e.at("ph");
      if (ph == "M" && e.at("name") == "process_name") t.process = e.at("args").at("name");
      if (ph == "M" && e.at("name") == "thread_name") {
        const std::size_t lane = e.at("tid");
        if (t.lanes.size() <= lane) t.lanes.resize(lane + 1);
        t.lanes[lane] = e.at("args").at("name");
      }
      if (ph != "X") continue;
      TraceEvent ev;
      ev.name = e.at("name");
      ev.op = e.value("cat", "");
      ev.lane = e.at("tid");
      ev.start_us = e.at("ts");
      ev.duration_us = e.at("dur");
      if (e.contains("args")) {
        ev.kernel = e["args"].value("kernel", "");
        ev.chunk = e["args"].value("chunk", -1);
        ev.predicted_us = e["args"].value("predicted_us", 0.0);
        t.tokens = e["args"].value("tokens", int64_t{0});
      }
      if (t.lanes.size() <= static_cast<std::size_t>(ev.lane)) t.lanes.resize(static_cast<std::size_t>(ev.lane) + 1);
      t.events.push_back(ev);
    }
  } catch (const nlohmann::json::exception& e) {
    fail_input("trace '" + path + "': malformed event: " + e.what());
  }
  return t;
}

}  // namespace moeflow
