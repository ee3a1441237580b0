#include "scheduler/fluid_replay.hpp"

#include <algorithm>
#include <limits>
#include <string>

#include "graph/error.hpp"

namespace moeflow {

double fluid_makespan(const Graph& g, const std::vector<PlanStep>& steps,
                      const std::vector<std::vector<NodeId>>& lane_nodes) {
  const std::size_t count = steps.size();
  std::vector<bool> finished(count, false);
  std::vector<double> overhead_left(count), work_left(count);
  for (std::size_t i = 0; i < count; ++i) {
    work_left[i] = steps[i].work_s;
    overhead_left[i] = steps[i].predicted_s - steps[i].work_s;
  }
  std::vector<std::size_t> lane_of(count, lane_nodes.size());
  for (std::size_t l = 0; l < lane_nodes.size(); ++l)
    for (NodeId n : lane_nodes[l]) lane_of[static_cast<std::size_t>(n)] = l;
  for (std::size_t i = 0; i < count; ++i)
    if (lane_of[i] == lane_nodes.size())
      fail_input("fluid_makespan: node '" + g.node(static_cast<NodeId>(i)).name + "' of plan '" + g.name() + "' is on no lane");
  std::vector<std::size_t> next(lane_nodes.size(), 0);  // per lane, its node running or next to run
  double now = 0.0;
  for (;;) {
    // Each lane's node that runs now: its lane has reached it and its predecessors have finished.
    std::vector<NodeId> running;
    bool left = false;
    for (std::size_t l = 0; l < lane_nodes.size(); ++l) {
      if (next[l] >= lane_nodes[l].size()) continue;
      left = true;
      const NodeId n = lane_nodes[l][next[l]];
      bool ready = true;
      for (NodeId p : g.predecessors(n)) ready = ready && finished[static_cast<std::size_t>(p)];
      if (const NodeId h = steps[static_cast<std::size_t>(n)].holds_after; h != kNoNode)
        ready = ready && finished[static_cast<std::size_t>(h)];  // two grids holding every SM never share it
      if (ready) running.push_back(n);
    }
    if (!left) return now;
    if (running.empty())
      fail_input("fluid_makespan: every lane of plan '" + g.name() + "' waits for another (an order against the graph's edges)");
    int sharing = 0;  // nodes in their work, sharing the machine's ceilings
    for (NodeId n : running) {
      const auto i = static_cast<std::size_t>(n);
      if (overhead_left[i] <= 0.0 && work_left[i] > 0.0 && !g.node(n).op->communicates()) ++sharing;
    }
    auto rate_of = [&](NodeId n) {
      const auto i = static_cast<std::size_t>(n);
      return overhead_left[i] > 0.0 || g.node(n).op->communicates() ? 1.0 : 1.0 / std::max(sharing, 1);
    };
    // On to the first end of an overhead or of a node.
    double step = std::numeric_limits<double>::infinity();
    for (NodeId n : running) {
      const auto i = static_cast<std::size_t>(n);
      step = std::min(step, overhead_left[i] > 0.0 ? overhead_left[i] : work_left[i] / rate_of(n));
    }
    step = std::max(step, 0.0);
    for (NodeId n : running) {
      const auto i = static_cast<std::size_t>(n);
      if (overhead_left[i] > 0.0) {
        overhead_left[i] = std::max(0.0, overhead_left[i] - step);
        continue;
      }
      work_left[i] = std::max(0.0, work_left[i] - step * rate_of(n));
      if (work_left[i] <= 1e-15) {
        finished[i] = true;
        ++next[lane_of[i]];
      }
    }
    now += step;
  }
}

}  // namespace moeflow
