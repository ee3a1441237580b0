#pragma once
// The chunk pass: splits the token dimension of a graph into sub-DAGs, one per chunk, so that a
// planner can pipeline them (chunk c+1's gate and dispatch beside chunk c's expert GEMMs) and the
// memory planner can reuse one chunk's buffers for the next. Chunk k owns token rows
// [k*C, (k+1)*C); a run with fewer tokens leaves the last chunks empty, and they run and produce
// nothing (ranks of a data-parallel group must all enter the same number of chunks).
#include <cstdint>

#include "graph/graph.hpp"

namespace moeflow {

struct ChunkOptions {
  int chunks = 0;            // n: C = ceil(max T / n)
  int64_t chunk_tokens = 0;  // C: n = ceil(max T / C); give one of the two
};

// Every node is copied once per chunk (named `name·cK`, tagged with chunk K, its outputs `value·cK`);
// weights are shared; each token-indexed graph input gets a slice_rows node per chunk and each
// graph output a concat_rows node keeping the output's name, so inputs bind and results read as
// before. One chunk returns an unchanged copy. Refuses a graph already chunked, a node that is not
// token-parallel, and a chunk count or size below 1, naming the node or value.
Graph chunk_tokens(const Graph& g, const ChunkOptions& options);

}  // namespace moeflow
