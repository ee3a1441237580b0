#pragma once
// A measured run: start and duration of every node on its lane, written as Chrome-trace JSON
// (opens in Perfetto and chrome://tracing): one thread row per lane.
#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

namespace moeflow {

struct TraceEvent {
  std::string name;    // node name
  std::string op;      // op kind
  std::string kernel;  // kernel name
  int lane = 0;
  int chunk = -1;
  double start_us = 0.0;  // from the run's start
  double duration_us = 0.0;
  double predicted_us = 0.0;
};

struct Trace {
  std::string process;  // "moeflow cpu qwen1.5-moe-a2.7b serial"
  int pid = 0;          // the process row in a merged view (a rank of a multi-rank run)
  std::vector<std::string> lanes;
  int64_t tokens = 0;
  std::vector<TraceEvent> events;

  void write_chrome_json(std::ostream& out) const;
  // Several traces (one per rank) as one view: each its own process row, by its pid.
  static void write_merged_chrome_json(std::ostream& out, const std::vector<Trace>& traces);
  // Reads what write_chrome_json wrote (for `moeflow trace`); throws Error(bad_input) otherwise.
  static Trace read_chrome_json(const std::string& path);
};

}  // namespace moeflow
