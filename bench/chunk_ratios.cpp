#include "bench/chunk_ratios.hpp"

#include <algorithm>
#include <iomanip>
#include <map>
#include <ostream>
#include <tuple>

#include "bench/measure.hpp"

namespace moeflow {

namespace {

nlohmann::json point_of(const nlohmann::json& row) {
  return {{"scope", row.value("scope", "")}, {"preset", row.value("preset", "")}, {"T", row.value("T", int64_t{0})}};
}

std::string label_of(const nlohmann::json& row) {
  std::string label = row.value("plan", "");
  if (const std::string kernel = row.value("experts_kernel", ""); !kernel.empty()) label += " " + kernel;
  return label;
}

// The fastest row of each (point, chunks) in one pass.
struct Best {
  double time_us = 0.0;
  std::string label;
  int64_t fewest_expert_rows = 0;  // 0: none (fewer_rows)
};

}  // namespace

std::vector<ChunkRatio> chunk_ratios(const std::vector<std::vector<nlohmann::json>>& passes) {
  std::vector<ChunkRatio> ratios;
  std::vector<std::map<std::string, int>> labels;  // per ratio: how often each label was best
  for (const std::vector<nlohmann::json>& rows : passes) {
    // In first-seen order, so the lines follow the sweep's.
    std::vector<std::pair<nlohmann::json, int>> order;
    std::map<std::pair<std::string, int>, Best> best;  // (point dumped, chunks)
    for (const nlohmann::json& row : rows) {
      if (!row.contains("time_us") || !row.contains("chunks")) continue;
      const nlohmann::json point = point_of(row);
      const int chunks = row.at("chunks").get<int>();
      const double time = row.at("time_us").get<double>();
      auto [it, fresh] = best.try_emplace({point.dump(), chunks});
      if (fresh) order.emplace_back(point, chunks);
      Best& b = it->second;
      if (fresh || time < b.time_us) {
        b.time_us = time;
        b.label = label_of(row);
      }
      b.fewest_expert_rows = fewer_rows(b.fewest_expert_rows, row.value("fewest_expert_rows", int64_t{0}));
    }
    for (const auto& [point, chunks] : order) {
      if (chunks == 1) continue;
      const auto unchunked = best.find({point.dump(), 1});
      if (unchunked == best.end() || unchunked->second.time_us <= 0) continue;
      const Best& b = best.at({point.dump(), chunks});
      auto it = std::find_if(ratios.begin(), ratios.end(),
                             [&](const ChunkRatio& r) { return r.point == point && r.chunks == chunks; });
      if (it == ratios.end()) {
        ChunkRatio fresh_ratio;
        fresh_ratio.point = point;
        fresh_ratio.chunks = chunks;
        ratios.push_back(std::move(fresh_ratio));
        labels.emplace_back();
        it = ratios.end() - 1;
      }
      it->per_pass.push_back(b.time_us / unchunked->second.time_us);
      it->fewest_expert_rows = fewer_rows(it->fewest_expert_rows, b.fewest_expert_rows);
      ++labels[static_cast<std::size_t>(it - ratios.begin())][b.label];
    }
  }
  for (std::size_t i = 0; i < ratios.size(); ++i) {
    ChunkRatio& r = ratios[i];
    const Timing t = timing_of(r.per_pass);  // median, min and max, here of ratios
    r.median = t.median_s;
    r.low = t.min_s;
    r.high = t.max_s;
    // The label best in most passes (ties: the first in name order).
    r.best = std::max_element(labels[i].begin(), labels[i].end(),
                              [](const auto& a, const auto& b) { return a.second < b.second; })
                 ->first;
  }
  // A point's chunk counts together, in the order the points were first measured (a sweep measures
  // every T at one chunk count before the next count).
  std::vector<nlohmann::json> points;
  for (const ChunkRatio& r : ratios)
    if (std::find(points.begin(), points.end(), r.point) == points.end()) points.push_back(r.point);
  auto rank = [&](const ChunkRatio& r) {
    return std::pair(std::find(points.begin(), points.end(), r.point) - points.begin(), r.chunks);
  };
  std::stable_sort(ratios.begin(), ratios.end(), [&](const ChunkRatio& a, const ChunkRatio& b) { return rank(a) < rank(b); });
  return ratios;
}

void print_chunk_ratios(const std::vector<ChunkRatio>& ratios, std::ostream& out) {
  if (ratios.empty()) return;
  out << "chunked / unchunked: the best row at each chunk count over the best unchunked row (plans and experts "
         "kernels measured), median over passes\n";
  for (const ChunkRatio& r : ratios) {
    out << "  " << std::left << std::setw(8) << r.point.at("scope").get<std::string>() << std::setw(19)
        << r.point.at("preset").get<std::string>() << "T=" << std::setw(6) << r.point.at("T").get<int64_t>()
        << std::right << std::setw(3) << r.chunks << " chunks " << std::fixed << std::setprecision(3) << r.median;
    if (r.per_pass.size() > 1) {
      out << " (" << r.low << "-" << r.high << " over " << r.per_pass.size() << " passes:";
      for (double v : r.per_pass) out << " " << v;
      out << ")";
    }
    if (r.fewest_expert_rows > 0) out << "  fewest rows " << r.fewest_expert_rows;
    out << "  best: " << r.best << "\n";
  }
}

}  // namespace moeflow
