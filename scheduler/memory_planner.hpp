#pragma once
// Reuse of the workspace arena. Two workspace buffers (activations, or a kernel's scratch) may share
// bytes only when every use of one happens before the other is first written, where "happens
// before" is what the plan itself guarantees: a lane's issue order and its cross-lane waits (the
// events on the GPU, the task edges on the host). Reuse across lanes therefore only ever sits
// behind the wait that proves it. Graph outputs, and values the caller reads after a run
// (PlanOptions::keep_values), keep their own bytes. First fit, in issue order.
//
// Some values get no bytes of their own but lie inside another's (Buffer::view_of): a chunk's rows
// of x or of the joined output, so the chunk pass's slice_rows and concat_rows copy nothing, and
// through a kernel computing in place, the input it overwrites. A view's uses count as its root's.
namespace moeflow {

class Graph;
class Plan;
struct KernelEntry;
struct Node;
struct PlanOptions;

// Rewrites the workspace offsets of `plan` (values and kernel scratch) and its workspace size.
void plan_workspace_reuse(Plan& plan);

// Whether the memory planner will lay every chunk's rows of this slice_rows or concat_rows node out
// as a view, so that `kernel` copies nothing (known from the graph before any scheduling: the
// planner costs such a step at nothing).
bool rows_become_views(const Graph& g, const Node& n, const KernelEntry& kernel, const PlanOptions& options);

}  // namespace moeflow
