#pragma once
// A value of the dataflow graph: SSA (written by at most one node), typed by shape and dtype,
// with a distribution over the parallel group. Graph inputs and weights are values without a
// producer, bound by name when a graph runs.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "graph/distribution.hpp"
#include "graph/dtype.hpp"
#include "graph/shape.hpp"

namespace moeflow {

using ValueId = int32_t;
using NodeId = int32_t;
inline constexpr NodeId kNoNode = -1;

// How random data for an input or weight is drawn, keyed by the value's name (DESIGN.md):
// uniform: U(-1, 1) × init_scale; unit_interval: U(0, 1) (routing weights of an experts-only run);
// expert_ids: per token, init_choices distinct expert ids drawn uniformly (ids of an experts-only run).
enum class ValueInit { uniform, unit_interval, expert_ids };

enum class ValueRole {
  input,       // bound per run (x; ids and weights for an experts-only graph)
  weight,      // bound once (router, expert and shared-expert weights)
  activation,  // produced by a node
};

struct ValueType {
  Shape shape;
  DType dtype = DType::f32;
  Distribution dist;
  bool host_memory = false;  // lives in (pinned) host memory even on a GPU backend (to_host's output)
};

// Where the random data of a value that is a slice of a larger tensor comes from (a rank's share of
// the weights, a data-parallel rank's rows of x): local index i of dimension d is index
// block·(full/blocks) + offset + (i mod (local/blocks)) of the tensor `source`, where block =
// i div (local/blocks). `blocks` > 1 splits each of equal blocks alike (w13 holds the gate and up
// projections one after the other). Drawing from the full tensor's counters gives every rank the
// same bits a single process draws, without shipping weights.
struct SliceDim {
  int64_t offset = 0;
  int64_t full = 0;  // the full tensor's extent; 0: the same as the local one
  int blocks = 1;
};
struct SourceSlice {
  std::string source;  // the full tensor's name (its random stream)
  std::vector<SliceDim> dims;
};

struct Value {
  ValueId id = -1;
  std::string name;
  ValueRole role = ValueRole::activation;
  std::optional<ValueType> type;  // empty until inferred (activations) or declared (inputs)
  ValueInit init = ValueInit::uniform;
  float init_scale = 1.0f;  // uniform: U(-1, 1) × init_scale
  int init_choices = 0;     // expert_ids: the number of experts to draw from
  NodeId producer = kNoNode;
  std::vector<NodeId> consumers;
  // Set by the chunk pass (graph/chunk.hpp): the value holds chunk `chunk`'s rows of the token
  // dimension, at most `chunk_rows` of them, starting at token chunk * chunk_rows.
  int chunk = -1;
  int64_t chunk_rows = 0;
  // Set by the parallel lowering (ops/lower_parallel.hpp): the value holds exactly this many token
  // rows whatever the run's T (rows gathered from every rank, fixed when the ranks' token counts are).
  int64_t fixed_rows = -1;
  std::optional<SourceSlice> source;  // a slice of a larger tensor (see SourceSlice)

  const Shape& shape() const { return type.value().shape; }
  DType dtype() const { return type.value().dtype; }
  bool is_graph_input() const { return role != ValueRole::activation; }
  // "[T,2048] f32", or "?" before inference.
  std::string type_str() const;
  std::string type_str(int64_t tokens) const;
  // The token rows this value holds when the graph runs `tokens` tokens (a chunk's share: possibly
  // 0). bytes() and shape().elements() take rows, not the graph's T: size a buffer with
  // bytes(tokens_in(T)).
  int64_t tokens_in(int64_t tokens) const {
    if (fixed_rows >= 0) return fixed_rows;
    if (chunk < 0) return tokens;
    const int64_t first = chunk * chunk_rows;
    return tokens <= first ? 0 : (tokens - first < chunk_rows ? tokens - first : chunk_rows);
  }
  int64_t bytes(int64_t rows) const { return shape().elements(rows) * static_cast<int64_t>(dtype_size(dtype())); }
};

}  // namespace moeflow
