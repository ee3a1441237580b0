#include "scheduler/trace.hpp"

#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "graph/error.hpp"
#include "graph/json_file.hpp"

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
  const nlohmann::json j = read_json_file(path, "trace");
  if (!j.is_object() || !j.contains("traceEvents") || !j["traceEvents"].is_array())
    fail_input("trace '" + path + "': no traceEvents array");
  Trace t;
  try {
    // A merged trace (one process per rank) reads as one trace whose rows are every (process,
    // lane) pair, in that order, each named after both.
    std::map<int, std::string> processes;
    std::map<std::pair<int, int>, std::string> threads;
    for (const auto& e : j["traceEvents"]) {
      const std::string ph = e.at("ph");
      const int pid = e.value("pid", 0);
      if (ph == "M" && e.at("name") == "process_name") processes[pid] = e.at("args").at("name");
      if (ph == "M" && e.at("name") == "thread_name") threads[{pid, e.at("tid").get<int>()}] = e.at("args").at("name");
      if (ph == "X") threads.try_emplace({pid, e.at("tid").get<int>()}, "lane" + std::to_string(e.at("tid").get<int>()));
    }
    std::map<std::pair<int, int>, int> row;
    for (const auto& [key, name] : threads) {
      row[key] = static_cast<int>(t.lanes.size());
      t.lanes.push_back(processes.size() > 1 ? "rank " + std::to_string(key.first) + " " + name : name);
    }
    if (processes.size() == 1) t.process = processes.begin()->second;
    else if (processes.size() > 1) t.process = std::to_string(processes.size()) + " processes (ranks), merged";
    for (const auto& e : j["traceEvents"]) {
      if (e.at("ph") != "X") continue;
      TraceEvent ev;
      ev.name = e.at("name");
      ev.op = e.value("cat", "");
      ev.lane = row.at({e.value("pid", 0), e.at("tid").get<int>()});
      ev.start_us = e.at("ts");
      ev.duration_us = e.at("dur");
      if (e.contains("args")) {
        ev.kernel = e["args"].value("kernel", "");
        ev.chunk = e["args"].value("chunk", -1);
        ev.predicted_us = e["args"].value("predicted_us", 0.0);
        t.tokens = e["args"].value("tokens", int64_t{0});
      }
      t.events.push_back(ev);
    }
  } catch (const nlohmann::json::exception& e) {
    fail_input("trace '" + path + "': malformed event: " + e.what());
  }
  return t;
}

}  // namespace moeflow
