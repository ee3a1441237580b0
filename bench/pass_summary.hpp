#pragma once
// One point of a benchmark sweep measured in several passes (`moeflow bench --passes N`): the sweep
// runs N times over, so each point is timed at N moments between the others' runs, and slow drift of
// the machine (clocks, temperature, a neighbour's load) shows as a spread instead of a bias against
// whichever rows came last. Per point: the median of the passes' medians and the spread
// (max - min) / median of them, which says which differences between points are noise.
#include <iosfwd>
#include <nlohmann/json.hpp>
#include <vector>

namespace moeflow {

struct PassPoint {
  nlohmann::json key;             // the row's identifying fields (scope, preset, T, chunks, plan, experts kernels)
  std::vector<double> time_us;    // one per pass, in pass order
  double median_us = 0.0;
  double spread = 0.0;            // (max - min) / median_us
  double ratio_floor = 0.0;       // median_us / the smallest of the passes' floors (the highest rates measured)
};

// Rows (with "time_us" and "floor_us") grouped by their identifying fields, in first-seen order.
std::vector<PassPoint> summarize_passes(const std::vector<nlohmann::json>& rows);

// One line per point: its key, the median over passes, the spread and each pass's time.
void print_pass_summary(const std::vector<PassPoint>& points, std::ostream& out);

}  // namespace moeflow
