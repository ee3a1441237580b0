#pragma once
// The parallel lowering: rewrites a one-process MoE graph (chunked or not) into the graph one rank
// of a ParallelLayout runs. Each routed block (dispatch → experts → combine, per chunk) becomes:
// this rank's share of the rows (a TP slice or the TP leader's rows), the dispatch kind's
// communication, the rank's experts (a share of them with ep, a slice of every expert's I without)
// whose output is Partial, the communication that pays that sum exactly once, and with tp > 1 an
// all-gather within the TP group, so the block's output is whole and replicated over the TP group
// again. Other nodes (shared experts, the gate where routing comes first, the final add, chunk
// slices and joins) are kept. Communication nodes are chained in one order, the same on every rank,
// so every rank enters the collectives in the same sequence whatever its scheduler does.
//
// Weights of the rank's experts are declared at their local shape as slices of the full tensors
// (Value::source), and x's rows as the DP rank's rows of the batch of all DP ranks' tokens, so
// every rank draws the bits a single process would draw. The rows of every communication are fixed
// by the layout's token counts: run the lowered graph at exactly layout.tokens_of(rank) tokens.
#include "graph/graph.hpp"
#include "ops/parallel_layout.hpp"

namespace moeflow {

// Throws Error(bad_input) naming the node when the graph has a routed block it cannot lower (a
// dispatch whose rows do not go through exactly one experts node into one combine), or when the
// layout's token counts exceed the graph's maximum.
Graph lower_parallel(const Graph& g, const ParallelLayout& layout, int rank);

}  // namespace moeflow
