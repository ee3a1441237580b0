#pragma once
// A plan replayed as a fluid schedule on a machine that one kernel fills (a GPU): what its lanes
// cost once the kernels running at the same time share the machine.
//
// Each lane runs its nodes in its order; a node starts when its lane has finished the one before
// and its predecessors (on any lane) have finished, and, where its kernel holds every SM, the step
// holding them before it (PlanStep::holds_after) has too. A node first spends its launch overhead
// (predicted_s - work_s: latency, which lanes hide behind each other), then its work (work_s, bound
// by a machine ceiling); the nodes in their work at one time share the machine equally, so two
// equal GEMMs on two lanes both end at twice one's time. A transfer between ranks (an op that
// communicates) moves over the link at its own pace and shares nothing.
//
// The planner weighs each side lane by it (scheduler/planner.cpp): a lane is kept where the replay
// ends sooner with it than with its branch in line. What it leaves out: kernels that share the
// machine also slow each other (caches), which it does not charge. Persistent grids it does not let
// share the machine at all (KernelEntry::holds_every_sm): the planner runs them one at a time.
#include <vector>

#include "graph/graph.hpp"
#include "scheduler/plan.hpp"

namespace moeflow {

// Seconds until every lane's last node has finished. `steps` is indexed by node id (predicted_s
// and work_s read); `lane_nodes` holds each lane's nodes in the order it runs them, every node on
// one lane. A node on no lane, or an order in which lanes wait on each other for ever, is refused
// (Error, bad input).
double fluid_makespan(const Graph& graph, const std::vector<PlanStep>& steps,
                      const std::vector<std::vector<NodeId>>& lane_nodes);

}  // namespace moeflow
