#include "bench/pass_summary.hpp"

#include <algorithm>
#include <iomanip>
#include <ostream>
#include <string>

#include "bench/measure.hpp"

namespace moeflow {

namespace {

// What tells two rows of a sweep apart; the timings and what follows from them do not.
// (experts_kernel_asked: two rows that asked for different kernels stay apart even where the
// planner's choice, experts_kernel, is the same.)
constexpr const char* kKeyFields[] = {"scope", "preset", "T", "chunks", "plan", "experts_kernel_asked", "experts_kernel"};

nlohmann::json key_of(const nlohmann::json& row) {
  nlohmann::json key = nlohmann::json::object();
  for (const char* field : kKeyFields)
    if (row.contains(field)) key[field] = row[field];
  return key;
}

}  // namespace

std::vector<PassPoint> summarize_passes(const std::vector<nlohmann::json>& rows) {
  std::vector<PassPoint> points;
  std::vector<double> floors;  // per point: the smallest positive floor of its passes (0: none)
  for (const nlohmann::json& row : rows) {
    if (!row.contains("time_us")) continue;
    const nlohmann::json key = key_of(row);
    auto it = std::find_if(points.begin(), points.end(), [&](const PassPoint& p) { return p.key == key; });
    if (it == points.end()) {
      points.push_back(PassPoint{key, {}, 0.0, 0.0, 0.0});
      floors.push_back(0.0);
      it = points.end() - 1;
    }
    it->time_us.push_back(row["time_us"].get<double>());
    // Each pass measures the machine's rates again, and they move between passes (an H100 call
    // measured its copy rate 17% lower in its second and third passes than in its first). The
    // floor of the pass that measured the highest rates is the one no kernel should beat.
    double& floor = floors[static_cast<std::size_t>(it - points.begin())];
    if (const double f = row.value("floor_us", 0.0); f > 0 && (floor == 0 || f < floor)) floor = f;
  }
  for (std::size_t i = 0; i < points.size(); ++i) {
    PassPoint& p = points[i];
    const Timing t = timing_of(p.time_us);  // the runs' statistics, here over passes and in µs
    p.median_us = t.median_s;
    p.spread = p.median_us > 0 ? (t.max_s - t.min_s) / p.median_us : 0.0;
    p.ratio_floor = floors[i] > 0 ? p.median_us / floors[i] : 0.0;
  }
  return points;
}

void print_pass_summary(const std::vector<PassPoint>& points, std::ostream& out) {
  out << "over passes: median of the passes' medians, spread = (max - min) / median\n";
  for (const PassPoint& p : points) {
    std::string key;
    for (const char* field : kKeyFields) {
      if (!p.key.contains(field)) continue;
      const nlohmann::json& value = p.key[field];
      key += (key.empty() ? "" : " ") + std::string(field) + "=" + (value.is_string() ? value.get<std::string>() : value.dump());
    }
    out << "  " << std::left << std::setw(90) << key << std::right << std::fixed << std::setprecision(1)
        << std::setw(10) << p.median_us << " us  x floor " << std::setprecision(2) << p.ratio_floor << "  spread "
        << std::setprecision(1) << 100.0 * p.spread << "%  passes";
    for (double t : p.time_us) out << " " << std::setprecision(1) << t;
    out << "\n";
  }
}

}  // namespace moeflow
