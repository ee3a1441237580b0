#include "graph/chunk.hpp"

#include <map>
#include <memory>

#include "graph/error.hpp"
#include "graph/row_ops.hpp"

namespace moeflow {

namespace {

std::string chunk_name(const std::string& name, int k) { return name + "\u00b7c" + std::to_string(k); }

bool token_indexed(const Value& v) { return v.type && v.shape().rank() > 0 && v.shape()[0].symbolic(); }

}  // namespace

Graph chunk_tokens(const Graph& g, const ChunkOptions& o) {
  if (!g.validated()) fail_input("chunk: graph '" + g.name() + "' is not validated");
  if (g.chunks() > 0) fail_input("chunk: graph '" + g.name() + "' is already split into " + std::to_string(g.chunks()) + " chunks");
  if ((o.chunks > 0) == (o.chunk_tokens > 0))
    fail_input("chunk: give exactly one of --chunks N (>= 1) and --chunk-tokens C (>= 1); got chunks = " +
               std::to_string(o.chunks) + ", chunk tokens = " + std::to_string(o.chunk_tokens));
  const int64_t max_tokens = g.max_tokens();
  if (o.chunk_tokens > max_tokens)
    fail_input("chunk: --chunk-tokens = " + std::to_string(o.chunk_tokens) + " exceeds the maximum tokens " +
               std::to_string(max_tokens) + " of graph '" + g.name() + "' (one chunk would hold them all)");
  const int64_t rows = o.chunks > 0 ? (max_tokens + o.chunks - 1) / o.chunks : o.chunk_tokens;
  // --chunks N keeps all N chunks, even where the last ones can never see a token (N > max T).
  const int chunks = o.chunks > 0 ? o.chunks : static_cast<int>((max_tokens + rows - 1) / rows);
  if (chunks == 1) return g;
  for (const Node& n : g.nodes())
    if (!n.op->token_parallel())
      fail_input("chunk: node '" + n.name + "' (" + n.op->kind() + ") is not token-parallel; its rows cannot be split");

  Graph out(g.name(), max_tokens);
  out.set_description(g.description() + (g.description().empty() ? "" : " ") + std::to_string(chunks) + " chunks of " +
                      std::to_string(rows) + " tokens");
  out.set_chunking(chunks, rows);
  // For each value of g: its one copy (weights, inputs without a token dimension) or one per chunk.
  std::map<ValueId, std::vector<ValueId>> copies;
  std::vector<ValueId> sliced;  // token-indexed graph inputs of g
  for (ValueId id : g.graph_inputs()) {
    const Value& v = g.value(id);
    const ValueId in = out.copy_input(v);
    copies[id] = {in};
    if (v.role == ValueRole::input && token_indexed(v)) sliced.push_back(id);
  }
  auto operand = [&](ValueId v, int k) {
    const std::vector<ValueId>& c = copies.at(v);
    return c.size() == 1 ? c[0] : c[static_cast<std::size_t>(k) + (g.value(v).is_graph_input() ? 1 : 0)];
  };
  // Chunk by chunk, so that the topological order (and so the serial plan) finishes chunk k before
  // chunk k+1 starts: that is what lets the memory planner reuse chunk k's buffers.
  for (int k = 0; k < chunks; ++k) {
    for (ValueId id : sliced) {
      const Value& v = g.value(id);
      const ValueId part = out.add_value(chunk_name(v.name, k));
      const NodeId slice =
          out.add_node(chunk_name("slice_" + v.name, k), std::make_shared<SliceRowsOp>(k, rows), {copies[id][0]}, {part});
      out.set_chunk(slice, k);
      copies[id].push_back(part);
    }
    for (const Node& n : g.nodes()) {  // ids are topological indices
      std::vector<ValueId> inputs, outputs;
      for (ValueId v : n.inputs) inputs.push_back(operand(v, k));
      for (ValueId v : n.outputs) {
        outputs.push_back(out.add_value(chunk_name(g.value(v).name, k)));
        copies[v].push_back(outputs.back());
      }
      const NodeId copy = out.add_node(chunk_name(n.name, k), n.op, inputs, outputs);
      out.set_chunk(copy, k);
    }
  }
  for (ValueId v : g.outputs()) {
    const Value& val = g.value(v);
    std::vector<ValueId> parts = copies.at(v);
    if (val.is_graph_input()) fail_input("chunk: graph output '" + val.name + "' is a graph input");
    const ValueId joined = out.add_value(val.name);
    out.add_node("concat_" + val.name, std::make_shared<ConcatRowsOp>(chunks, rows), parts, {joined});
    out.mark_output(joined);
  }
  out.validate();
  return out;
}

}  // namespace moeflow
