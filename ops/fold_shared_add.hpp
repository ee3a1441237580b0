#pragma once
// The shared add folded into the combine: where a reduce adds the routed experts' combine output and
// the shared experts' outputs, and nothing else reads the combine's output, the combine takes the
// shared outputs as addends (ops/combine_op.hpp) and the reduce's place and output; the reduce goes.
// One launch less at the end of the layer, and on the GPU the sum is rounded to bf16 once instead of
// twice. Measured on the H100 (CUDA-graph replays, `moeflow run --trace`, qwen1.5-moe-a2.7b T=128):
// the reduce ran 3.3 µs after a 3.3 µs gap behind the combine, on the critical path.
//
// A reduce is folded only where every value involved is whole (no sum over ranks owed: a reduce
// that turns a Partial value whole is where the tensor-parallel all-reduce is paid), the nodes share
// a chunk and carry no fixed rows or order-only edges, the combine's output is the reduce's first
// input (so the fp32 sums run in the order the reduce ran them: on the CPU, the same bits), read by
// the reduce alone, not a graph output and not named in `keep_values`, and there are at most
// CombineOp::kMaxAddends addends. Returns the rewritten, validated graph, or null where none was folded.
//
// Where the fuse pass made the combine part of a fused_experts node (without a shared expert folded
// in), the reduce folds into that node the same way (FusedExpertsOp's addends), where `accept_fused`
// says a kernel runs the folded node (it sees a graph with that one fold made); without it, fused
// nodes keep their reduce. The folded node then waits for the shared experts as a whole, not only
// its sum, so the planner (make_plan) plans the graph both ways and keeps the one predicted faster.
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "graph/graph.hpp"

namespace moeflow {

using FoldFilter = std::function<bool(const Graph& folded_graph, const Node& folded_node)>;
std::shared_ptr<const Graph> fold_shared_add_into_combine(const Graph& g, const std::vector<std::string>& keep_values = {},
                                                          const FoldFilter& accept_fused = {});

// A reduce with nothing to add (one input: a layer without shared experts, on one process) folded the
// same way, into its combine or fused node, under the same conditions: the node then writes the
// layer's output itself, one launch and one copy of [T, H] fewer, the same bits. Null where none was.
std::shared_ptr<const Graph> fold_lone_reduces(const Graph& g, const std::vector<std::string>& keep_values = {});

}  // namespace moeflow
