#pragma once
// Reuse of the workspace arena. Two workspace buffers (activations, or a kernel's scratch) may share
// bytes only when every use of one happens before the other is first written, where "happens
// before" is what the plan itself guarantees: a lane's issue order and its cross-lane waits (the
// events on the GPU, the task edges on the host). Reuse across lanes therefore only ever sits
// behind the wait that proves it. Graph outputs, and values the caller reads after a run
// (PlanOptions::keep_values), keep their own bytes. First fit, in issue order.
namespace moeflow {

class Plan;
// Rewrites the workspace offsets of `plan` (values and kernel scratch) and its workspace size.
void plan_workspace_reuse(Plan& plan);

}  // namespace moeflow
