#pragma once
// The two structural ops of the chunk pass (graph/chunk.hpp): slice_rows takes one chunk's rows of
// a token-indexed value, concat_rows joins every chunk's rows back in order. They move rows and
// compute nothing; kernels for them are registered per backend like any op's. Where the memory
// planner can, it lays a chunk's rows out inside the whole value's bytes (a view), and the kernels
// then copy nothing (KernelEntry::row_views).
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

}  // namespace moeflow
