#pragma once
// The communication ops the parallel lowering inserts (ops/lower_parallel.hpp), and the local row
// slice it uses for a TP rank's share of its tokens. Each communication node moves token rows over
// one group of ranks (the world, or this rank's TP group); row counts per member are attributes,
// fixed when the ranks' token counts are, and the same on every rank of the group. Kernels reach
// the group's communicator through KernelCall::comm.
#include <cstdint>
#include <vector>

#include "graph/op_schema.hpp"

namespace moeflow {

namespace comm {
class Communicator;
enum class Element;
}
struct KernelCall;

enum class CommGroup { world, tp };
const char* to_string(CommGroup g);

// The communicators of one rank's run (not owned).
struct CommGroups {
  comm::Communicator* world = nullptr;
  comm::Communicator* tp = nullptr;
  comm::Communicator& get(CommGroup g, const std::string& node) const;
};

// A communication node's group communicator (Error(bad_input) naming the node when the run has
// none), and the transport element type of a value's dtype.
comm::Communicator& group_of(const KernelCall& call, CommGroup group);
comm::Element element_of(const Value& value);

// Rows [first, first + count) of a token-indexed value, whatever else it holds (a TP rank's
// sequence-parallel slice of its tokens).
class TakeRowsOp final : public OpSchema {
 public:
  TakeRowsOp(int64_t first, int64_t count) : first_(first), count_(count) {}
  int64_t first() const { return first_; }
  int64_t count() const { return count_; }
  std::string kind() const override { return "take_rows"; }
  std::string summary() const override;
  std::vector<std::string> output_names() const override { return {"rows"}; }
  std::vector<ValueType> infer(const Node& node, std::span<const Value* const> inputs) const override;
  Cost cost(const OpOperands& operands, int64_t tokens) const override;
  bool token_parallel() const override { return false; }
  int min_inputs() const override { return 1; }
  std::string fill_color() const override { return "gray92"; }

 private:
  int64_t first_, count_;
};

// Base of the ops that move rows between ranks: the group and each member's row count.
class CommOp : public OpSchema {
 public:
  CommOp(CommGroup group, std::vector<int64_t> rows) : group_(group), rows_(std::move(rows)) {}
  CommGroup group() const { return group_; }
  const std::vector<int64_t>& rows() const { return rows_; }  // per member of the group
  int64_t total_rows() const;
  bool token_parallel() const override { return false; }
  bool communicates() const override { return true; }
  std::string fill_color() const override { return "gold"; }

 protected:
  std::string counts_str() const;
  CommGroup group_;
  std::vector<int64_t> rows_;
};

// all_gather: every member's rows of each input, packed in member order (x, and top-k ids and
// weights with it). Outputs are whole (Replicated over the group).
class AllGatherRowsOp final : public CommOp {
 public:
  AllGatherRowsOp(CommGroup group, std::vector<int64_t> rows, int values) : CommOp(group, std::move(rows)), values_(values) {}
  std::string kind() const override { return "all_gather"; }
  std::string summary() const override;
  std::vector<std::string> output_names() const override;
  std::vector<ValueType> infer(const Node& node, std::span<const Value* const> inputs) const override;
  Cost cost(const OpOperands& operands, int64_t tokens) const override;
  int min_inputs() const override { return values_; }

 private:
  int values_;
};

// reduce_scatter: sums a Partial [Σ rows, H] over the group; member m keeps its rows[m] rows.
class ReduceScatterRowsOp final : public CommOp {
 public:
  using CommOp::CommOp;
  std::string kind() const override { return "reduce_scatter"; }
  std::string summary() const override;
  std::vector<std::string> output_names() const override { return {"rows"}; }
  std::vector<ValueType> infer(const Node& node, std::span<const Value* const> inputs) const override;
  std::vector<Distribution> distribute(const Node& node, std::span<const Value* const> inputs) const override;
  Cost cost(const OpOperands& operands, int64_t tokens) const override;
  int min_inputs() const override { return 1; }
};

// alltoall_dispatch: sends each of this rank's rows (x, ids, weights) to the ranks owning one of
// its experts (comm/row_exchange.hpp). Outputs: received rows [capacity, H], their ids and
// weights [capacity, k] (rows past those received route nowhere), the exchange layout (where each
// row went), and the rows sent to and received from each rank (host memory: the way back reads
// them on the host without waiting for the device).
// rows: each member's rows to send (capacity = their sum: all of them could come here).
class AlltoallDispatchOp final : public CommOp {
 public:
  AlltoallDispatchOp(std::vector<int64_t> rows, int experts_per_rank, int top_k)
      : CommOp(CommGroup::world, std::move(rows)), experts_per_rank_(experts_per_rank), top_k_(top_k) {}
  int experts_per_rank() const { return experts_per_rank_; }  // 0: every rank holds a slice of every expert
  int top_k() const { return top_k_; }
  std::string kind() const override { return "alltoall_dispatch"; }
  std::string summary() const override;
  std::vector<std::string> output_names() const override { return {"rows", "ids", "weights", "layout", "counts"}; }
  std::vector<ValueType> infer(const Node& node, std::span<const Value* const> inputs) const override;
  Cost cost(const OpOperands& operands, int64_t tokens) const override;
  int min_inputs() const override { return 3; }

 private:
  int experts_per_rank_, top_k_;
};

// alltoall_combine: returns the rows computed here (Partial, in alltoall_dispatch's receive order)
// to their sources, which sum each token's parts in rank order: out [rows of this rank, H], whole.
class AlltoallCombineOp final : public CommOp {
 public:
  AlltoallCombineOp(std::vector<int64_t> rows, int top_k) : CommOp(CommGroup::world, std::move(rows)), top_k_(top_k) {}
  int top_k() const { return top_k_; }
  std::string kind() const override { return "alltoall_combine"; }
  std::string summary() const override;
  std::vector<std::string> output_names() const override { return {"out"}; }
  std::vector<ValueType> infer(const Node& node, std::span<const Value* const> inputs) const override;
  std::vector<Distribution> distribute(const Node& node, std::span<const Value* const> inputs) const override;
  Cost cost(const OpOperands& operands, int64_t tokens) const override;
  int min_inputs() const override { return 3; }  // rows, layout, counts

 private:
  int top_k_;
};

}  // namespace moeflow
