#pragma once
// The two structural ops of the chunk pass (graph/chunk.hpp): slice_rows takes one chunk's rows of
// a token-indexed value, concat_rows joins every chunk's rows back in order. They move rows and
// compute nothing; kernels for them are registered per backend like any op's. Where the memory
// planner can, it lays a chunk's rows out inside the whole value's bytes (a view), and the kernels
// then copy nothing (KernelEntry::row_views).
#include <cstddef>
#include <span>

#include "graph/graph.hpp"
#include "graph/op_schema.hpp"

namespace moeflow {

// Rows [chunk * rows, chunk * rows + rows) of the input's token dimension (fewer, or none, when the
// run has fewer tokens).
class SliceRowsOp final : public OpSchema {
 public:
  SliceRowsOp(int chunk, int64_t rows) : chunk_(chunk), rows_(rows) {}
  int chunk() const { return chunk_; }
  int64_t rows() const { return rows_; }
  // Where the chunk's rows start in the input's bytes (`row_bytes` per token row).
  int64_t first_byte(int64_t row_bytes) const { return chunk_ * rows_ * row_bytes; }
  std::string kind() const override { return "slice_rows"; }
  std::string summary() const override;
  std::vector<std::string> output_names() const override { return {"rows"}; }
  std::vector<ValueType> infer(const Node& node, std::span<const Value* const> inputs) const override;
  Cost cost(const OpOperands& operands, int64_t tokens) const override;
  bool token_parallel() const override { return false; }  // already one chunk's share
  int min_inputs() const override { return 1; }
  std::string fill_color() const override { return "gray92"; }

 private:
  int chunk_;
  int64_t rows_;
};

// Input i holds rows [i * rows, ...) of the output's token dimension.
class ConcatRowsOp final : public OpSchema {
 public:
  ConcatRowsOp(int chunks, int64_t rows) : chunks_(chunks), rows_(rows) {}
  int64_t rows() const { return rows_; }
  // Where input `chunk`'s rows start in the output's bytes (`row_bytes` per token row).
  int64_t first_byte(int chunk, int64_t row_bytes) const { return chunk * rows_ * row_bytes; }
  std::string kind() const override { return "concat_rows"; }
  std::string summary() const override;
  std::vector<std::string> output_names() const override { return {"joined"}; }
  std::vector<ValueType> infer(const Node& node, std::span<const Value* const> inputs) const override;
  Cost cost(const OpOperands& operands, int64_t tokens) const override;
  bool token_parallel() const override { return false; }  // joins chunks: not split again
  int min_inputs() const override { return chunks_; }
  std::string fill_color() const override { return "gray92"; }

 private:
  int chunks_;
  int64_t rows_;
};

// Calls fn(part, whole, byte offset) for each chunk's rows of a slice_rows node (its output inside
// its input) or a concat_rows node (each input inside its output); nothing for other nodes. The one
// description of where a chunk's rows lie: the memory planner's views and the kernels' copies.
template <class Fn>
void for_each_row_part(const Graph& g, const Node& n, Fn&& fn) {
  if (const auto* slice = dynamic_cast<const SliceRowsOp*>(n.op.get())) {
    fn(n.outputs[0], n.inputs[0], slice->first_byte(g.value(n.inputs[0]).bytes(1)));
  } else if (const auto* concat = dynamic_cast<const ConcatRowsOp*>(n.op.get())) {
    const int64_t row_bytes = g.value(n.outputs[0]).bytes(1);
    for (std::size_t i = 0; i < n.inputs.size(); ++i)
      fn(n.inputs[i], n.outputs[0], concat->first_byte(static_cast<int>(i), row_bytes));
  }
}

// The byte ranges such a node moves when it runs `tokens` rows: copy(dst, src, bytes) once per part
// (a kernel skips ranges whose source and destination coincide: rows laid out as views).
template <class Copy>
void copy_chunk_rows(const Graph& g, const Node& n, std::span<void* const> in, std::span<void* const> out,
                     int64_t tokens, Copy&& copy) {
  const bool joins = dynamic_cast<const ConcatRowsOp*>(n.op.get()) != nullptr;
  std::size_t next = 0;  // a join's parts are its inputs, in order
  for_each_row_part(g, n, [&](ValueId part, ValueId, int64_t at) {
    const int64_t row_bytes = g.value(part).bytes(1);
    if (joins)
      copy(static_cast<std::byte*>(out[0]) + at, in[next++], g.value(part).tokens_in(tokens) * row_bytes);
    else
      copy(out[0], static_cast<const std::byte*>(in[0]) + at, tokens * row_bytes);
  });
}

}  // namespace moeflow
