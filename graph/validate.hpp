#pragma once
// The validate pass: every value written at most once, every input produced or bound, no cycle,
// at least one output, shapes and dtypes inferred and checked node by node, and distributions
// checked (no Partial value may reach an output or a non-reducing op). Renumbers the nodes in a
// stable topological order, so node ids are topological indices. Throws Error(bad_input) whose
// message names the node, the value and the shapes.
namespace moeflow {
class Graph;
void validate_graph(Graph& g);
}  // namespace moeflow
