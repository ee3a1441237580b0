#pragma once
// The dataflow graph as Graphviz DOT (style of shared/examples/graph-style.dot): inputs and weights
// in pink, one record per node (name | op summary | first output's shape at the maximum T),
// chunks as dashed clusters, edges labelled with the values they carry. Deterministic.
#include <ostream>
#include <string>

namespace moeflow {
class Graph;
void write_graph_dot(const Graph& g, std::ostream& out);
std::string graph_dot(const Graph& g);
}  // namespace moeflow
