#pragma once
// A check of a plan's buffer table that is independent of the memory planner: two values whose bytes
// overlap are never live together, judged only from the plan's lane order, waits and early starts.
// A view (Buffer::view_of) lies inside its root's bytes and counts as a use of the root; a value
// computed in place (Buffer::in_place_of) may be written by its input's last reader.
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <string>
#include <vector>

#include "scheduler/plan.hpp"

namespace moeflow::testing_buffers {

// Does step a finish before step b starts, following only the plan's lane order and waits? A step
// that starts early starts once the previous step of its lane has started (not finished), and ends
// after it.
inline bool finishes_before(const Plan& plan, std::size_t a, std::size_t b) {
  auto lane_pred = [&](std::size_t s) -> int {
    for (std::size_t p = s; p-- > 0;)
      if (plan.steps[p].lane == plan.steps[s].lane) return static_cast<int>(p);
    return -1;
  };
  std::vector<bool> finished(plan.steps.size(), false);
  std::function<void(std::size_t)> mark_finished;
  // What has finished when step s starts.
  std::function<void(std::size_t)> before_start = [&](std::size_t s) {
    const int p = lane_pred(s);
    if (p >= 0) {
      if (plan.steps[s].starts_early) before_start(static_cast<std::size_t>(p));
      else mark_finished(static_cast<std::size_t>(p));
    }
    for (NodeId w : plan.steps[s].waits) mark_finished(static_cast<std::size_t>(plan.step_of_node[static_cast<std::size_t>(w)]));
  };
  mark_finished = [&](std::size_t s) {
    if (finished[s]) return;
    finished[s] = true;
    before_start(s);
    if (plan.steps[s].starts_early && lane_pred(s) >= 0) mark_finished(static_cast<std::size_t>(lane_pred(s)));
  };
  before_start(b);
  return finished[a];
}

// Every workspace value with bytes of its own (views folded into their roots) must never be live
// together with another that shares its bytes; each view lies inside its root, in the root's
// arena; the values fit in the peak. Returns the number of views seen.
inline int expect_live_values_apart(const Plan& plan, const std::string& label) {
  const Graph& g = *plan.graph;
  auto root_of = [&](ValueId v) {
    while (plan.buffer(v).is_view()) v = plan.buffer(v).view_of;
    return v;
  };
  auto steps_of = [&](const Value& v) {
    std::vector<std::size_t> steps = {static_cast<std::size_t>(plan.step_of_node[static_cast<std::size_t>(v.producer)])};
    for (NodeId c : v.consumers) steps.push_back(static_cast<std::size_t>(plan.step_of_node[static_cast<std::size_t>(c)]));
    return steps;
  };
  struct Use {
    ValueId value = -1;
    std::string name;
    int64_t lo = 0, hi = 0;
    std::vector<std::size_t> steps;  // sorted: steps[0] is the first write
    bool output = false;
  };
  std::vector<int> use_of(g.values().size(), -1);
  std::vector<Use> uses;
  for (const Value& v : g.values()) {
    const Buffer& b = plan.buffer(v.id);
    if (b.arena != Arena::workspace || b.is_view()) continue;
    use_of[static_cast<std::size_t>(v.id)] = static_cast<int>(uses.size());
    uses.push_back({v.id, v.name, b.offset, b.offset + b.bytes, steps_of(v),
                    std::find(g.outputs().begin(), g.outputs().end(), v.id) != g.outputs().end()});
    EXPECT_LE(b.offset + b.bytes, plan.bytes(Arena::workspace)) << label << ": " << v.name;
  }
  int views = 0;
  for (const Value& v : g.values()) {
    const Buffer& b = plan.buffer(v.id);
    if (!b.is_view()) continue;
    ++views;
    const ValueId root = root_of(v.id);
    const Buffer& r = plan.buffer(root);
    EXPECT_EQ(b.arena, r.arena) << label << ": view " << v.name;
    EXPECT_GE(b.offset, r.offset) << label << ": view " << v.name << " starts before " << g.value(root).name;
    EXPECT_LE(b.offset + b.bytes, r.offset + r.bytes) << label << ": view " << v.name << " ends past " << g.value(root).name;
    EXPECT_EQ(b.offset % 256, 0) << label << ": view " << v.name;
    if (const int u = use_of[static_cast<std::size_t>(root)]; u >= 0) {
      const auto more = steps_of(v);
      uses[static_cast<std::size_t>(u)].steps.insert(uses[static_cast<std::size_t>(u)].steps.end(), more.begin(), more.end());
    }
  }
  for (Use& u : uses) std::sort(u.steps.begin(), u.steps.end());
  // All of x's uses are over before y is first written; where y is computed in place over x, the
  // step writing y may be x's last use.
  auto dead_before = [&](const Use& x, const Use& y) {
    const bool over_x = plan.buffer(y.value).in_place_of == x.value;
    for (std::size_t s : x.steps)
      if (!(over_x && s == y.steps.front()) && !finishes_before(plan, s, y.steps.front())) return false;
    return true;
  };
  for (std::size_t i = 0; i < uses.size(); ++i)
    for (std::size_t j = i + 1; j < uses.size(); ++j) {
      const Use& a = uses[i];
      const Use& b = uses[j];
      if (a.hi <= b.lo || b.hi <= a.lo) continue;  // no shared bytes
      EXPECT_FALSE(a.output || b.output) << label << ": " << a.name << " / " << b.name << ": an output shares bytes";
      EXPECT_TRUE(dead_before(a, b) || dead_before(b, a))
          << label << ": " << a.name << " and " << b.name << " share bytes but may be live together";
    }
  return views;
}

}  // namespace moeflow::testing_buffers
