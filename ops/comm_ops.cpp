#include "ops/comm_ops.hpp"

#include <cstring>
#include <functional>
#include <numeric>

#include "graph/error.hpp"
#include "graph/node.hpp"
#include "kernels/comm/communicator.hpp"
#include "kernels/comm/row_exchange.hpp"
#include "ops/kernel_registry.hpp"
#include "ops/op_checks.hpp"

namespace moeflow {

const char* to_string(CommGroup g) { return g == CommGroup::world ? "world" : "tp"; }

comm::Communicator& CommGroups::get(CommGroup g, const std::string& node) const {
  comm::Communicator* c = g == CommGroup::world ? world : tp;
  if (!c)
    fail_input("node '" + node + "' moves rows over the " + to_string(g) +
               " group, but this run has no communicator for it (start it under mpirun with --dp/--tp)");
  return *c;
}

namespace {

void require_token_rows(const Node& n, const Value& v) {
  if (v.shape().rank() < 1 || v.shape()[0] != Dim::tokens())
    fail_input("node '" + n.name + "' (" + n.op->kind() + "): '" + v.name + "' is " + v.type_str() +
               "; its first dimension must be the token dimension [T,...]");
}

// Elements per token row of a [T, ...] value.
int64_t row_width(const Value& v) { return v.shape().elements(1); }


void require_partial(const Node& n, const Value& v) {
  if (v.type && v.type->dist.kind != Distribution::Kind::partial)
    fail_input("node '" + n.name + "' (" + n.op->kind() + ") sums '" + v.name + "' over the ranks, but it is " +
               v.type->dist.str() + ", not Partial: it is already whole, and summing it again would count it once per rank");
}

double row_bytes(const Value& v) { return static_cast<double>(row_width(v)) * static_cast<double>(dtype_size(v.dtype())); }


}  // namespace

std::string TakeRowsOp::summary() const {
  return "rows [" + std::to_string(first_) + ", " + std::to_string(first_ + count_) + ")";
}

std::vector<ValueType> TakeRowsOp::infer(const Node& n, std::span<const Value* const> in) const {
  require_token_rows(n, *in[0]);
  if (first_ < 0 || count_ < 0) fail_input("node '" + n.name + "' (take_rows): negative rows " + summary());
  return {ValueType{in[0]->shape(), in[0]->dtype(), in[0]->type->dist}};
}

Cost TakeRowsOp::cost(const OpOperands& ops, int64_t) const {
  return {0.0, 2.0 * static_cast<double>(count_) * row_bytes(*ops.inputs[0])};
}

int64_t CommOp::total_rows() const { return std::accumulate(rows_.begin(), rows_.end(), int64_t{0}); }

std::string CommOp::counts_str() const {
  std::string s = std::string(to_string(group_)) + " rows ";
  for (std::size_t i = 0; i < rows_.size(); ++i) s += (i ? "+" : "") + std::to_string(rows_[i]);
  return s;
}

std::string AllGatherRowsOp::summary() const { return "all_gather over " + counts_str(); }

std::vector<std::string> AllGatherRowsOp::output_names() const {
  static const char* names[] = {"rows", "ids", "weights", "extra"};
  std::vector<std::string> out;
  for (int i = 0; i < values_; ++i) out.push_back(i < 4 ? names[i] : "v" + std::to_string(i));
  return out;
}

std::vector<ValueType> AllGatherRowsOp::infer(const Node& n, std::span<const Value* const> in) const {
  std::vector<ValueType> out;
  for (const Value* v : in) {
    require_token_rows(n, *v);
    out.push_back(ValueType{v->shape(), v->dtype(), {}});
  }
  return out;
}

Cost AllGatherRowsOp::cost(const OpOperands& ops, int64_t) const {
  double bytes = 0.0;
  for (const Value* v : ops.inputs) bytes += static_cast<double>(total_rows()) * row_bytes(*v);
  return {0.0, bytes};
}

std::string ReduceScatterRowsOp::summary() const { return "reduce_scatter (sum) over " + counts_str(); }

std::vector<ValueType> ReduceScatterRowsOp::infer(const Node& n, std::span<const Value* const> in) const {
  require_token_rows(n, *in[0]);
  expect_float(n, *in[0]);
  return {ValueType{in[0]->shape(), in[0]->dtype(), {}}};
}

std::vector<Distribution> ReduceScatterRowsOp::distribute(const Node& n, std::span<const Value* const> in) const {
  require_partial(n, *in[0]);
  return {Distribution::replicated()};
}

Cost ReduceScatterRowsOp::cost(const OpOperands& ops, int64_t) const {
  return {static_cast<double>(total_rows()) * static_cast<double>(row_width(*ops.inputs[0])),
          static_cast<double>(total_rows()) * row_bytes(*ops.inputs[0])};
}

std::string AlltoallDispatchOp::summary() const {
  return "alltoall rows to their experts' ranks (" +
         (experts_per_rank_ ? std::to_string(experts_per_rank_) + " experts per rank" : std::string("every rank")) +
         "), " + counts_str();
}

std::vector<ValueType> AlltoallDispatchOp::infer(const Node& n, std::span<const Value* const> in) const {
  require_token_rows(n, *in[0]);
  expect_float(n, *in[0]);
  expect_type(n, *in[1], Shape{Dim::tokens(), Dim::of(top_k_)}, DType::i32);
  expect_type(n, *in[2], Shape{Dim::tokens(), Dim::of(top_k_)}, DType::f32);
  const int64_t most_sent = *std::max_element(rows_.begin(), rows_.end());
  return {ValueType{in[0]->shape(), in[0]->dtype(), {}}, ValueType{in[1]->shape(), DType::i32, {}},
          ValueType{in[2]->shape(), DType::f32, {}},
          ValueType{Shape{Dim::of(std::max<int64_t>(1, comm::exchange_sources_ints(static_cast<int>(rows_.size()), most_sent, top_k_)))},
                    DType::i32, {}},
          ValueType{Shape{Dim::of(2 * static_cast<int64_t>(rows_.size()))}, DType::i32, {}, /*host_memory=*/true}};
}

Cost AlltoallDispatchOp::cost(const OpOperands& ops, int64_t) const {
  // Expected bytes: each row goes to about min(k, ranks) ranks; the rows an even routing sends here.
  const double ranks = static_cast<double>(rows_.size());
  const double fanout = experts_per_rank_ ? std::min<double>(top_k_, ranks) : ranks;
  return {0.0, static_cast<double>(total_rows()) / ranks * fanout * (row_bytes(*ops.inputs[0]) + 8.0 * top_k_)};
}

std::string AlltoallCombineOp::summary() const { return "alltoall rows back to their sources, summed there; " + counts_str(); }

std::vector<ValueType> AlltoallCombineOp::infer(const Node& n, std::span<const Value* const> in) const {
  require_token_rows(n, *in[0]);
  expect_float(n, *in[0]);
  for (const Value* v : {in[1], in[2]})
    if (v->dtype() != DType::i32 || v->shape().rank() != 1)
      fail_input("node '" + n.name + "' (alltoall_combine): '" + v->name + "' is " + v->type_str() +
                 ", expected [n] i32 from an alltoall_dispatch");
  return {ValueType{in[0]->shape(), in[0]->dtype(), {}}};
}

std::vector<Distribution> AlltoallCombineOp::distribute(const Node& n, std::span<const Value* const> in) const {
  require_partial(n, *in[0]);
  return {Distribution::replicated()};
}

Cost AlltoallCombineOp::cost(const OpOperands& ops, int64_t) const {
  return {0.0, static_cast<double>(total_rows()) * row_bytes(*ops.inputs[0])};
}

comm::Element element_of(const Value& v) {
  switch (v.dtype()) {
    case DType::i32: return comm::Element::i32;
    case DType::bf16: return comm::Element::bf16;  // device transports only; MPI refuses it by name
    case DType::f32: return comm::Element::f32;
  }
  fail_input("value '" + v.name + "' is " + v.type_str() + ": no transport moves that type");
}

comm::Communicator& group_of(const KernelCall& c, CommGroup group) {
  if (!c.comm)
    fail_input("node '" + c.node.name + "' (" + c.node.op->kind() +
               ") moves rows between ranks, but this run has no communicators (start it under mpirun with --dp/--tp)");
  return c.comm->get(group, c.node.name);
}

namespace {

int member(const KernelCall& c, comm::Communicator& group, const CommOp& op) {
  if (static_cast<int>(op.rows().size()) != group.size())
    fail_input("node '" + c.node.name + "' (" + c.node.op->kind() + ") was lowered for a group of " +
               std::to_string(op.rows().size()) + " ranks, but its communicator has " + std::to_string(group.size()));
  return group.rank();
}

// supports() of the host transport's kernels: f32 and i32 host buffers, and what the kernel does.
std::function<Support(const Graph&, const Node&)> host_transport(std::string how) {
  return [how = std::move(how)](const Graph& g, const Node& n) {
    const Support f32 = cpu_supports_f32(g, n);
    return f32.ok ? Support::yes(how) : f32;
  };
}

}  // namespace

void register_comm_kernels(KernelRegistry& r) {
  r.add({"take_rows", Backend::cpu, "cpu.copy_rows", 0, host_transport("one copy of this TP rank's rows"), [](const KernelCall& c) {
           const auto& op = static_cast<const TakeRowsOp&>(*c.node.op);
           const std::size_t row = static_cast<std::size_t>(row_width(c.input_value(0))) * dtype_size(c.input_value(0).dtype());
           std::memcpy(c.outputs[0], static_cast<const std::byte*>(c.inputs[0]) + static_cast<std::size_t>(op.first()) * row,
                       static_cast<std::size_t>(op.count()) * row);
         },
         {}});
  r.add({"all_gather", Backend::cpu, "host.all_gather_v", 0,
         host_transport("the communicator's all-gather-v (MPI_Allgatherv) per value, rows packed in rank order"), [](const KernelCall& c) {
           const auto& op = static_cast<const AllGatherRowsOp&>(*c.node.op);
           comm::Communicator& g = group_of(c, op.group());
           member(c, g, op);
           for (std::size_t i = 0; i < c.inputs.size(); ++i) {
             const Value& v = c.input_value(i);
             std::vector<int64_t> counts;
             for (int64_t rows : op.rows()) counts.push_back(rows * row_width(v));
             g.all_gather_v(c.inputs[i], c.outputs[i], counts.data(), element_of(v));
           }
         },
         {}});
  r.add({"reduce_scatter", Backend::cpu, "host.reduce_scatter_v", 0,
         host_transport("the communicator's reduce-scatter (MPI_Reduce_scatter, sum): the Partial paid once"), [](const KernelCall& c) {
           const auto& op = static_cast<const ReduceScatterRowsOp&>(*c.node.op);
           comm::Communicator& g = group_of(c, op.group());
           member(c, g, op);
           std::vector<int64_t> counts;
           for (int64_t rows : op.rows()) counts.push_back(rows * row_width(c.input_value(0)));
           g.reduce_scatter_sum_v(c.inputs[0], c.outputs[0], counts.data(), comm::Element::f32);
         },
         {}});
  r.add({"alltoall_dispatch", Backend::cpu, "host.alltoall_v", 0,
         host_transport("counts exchanged, then rows, ids and weights by all-to-all-v to their experts' ranks"), [](const KernelCall& c) {
           const auto& op = static_cast<const AlltoallDispatchOp&>(*c.node.op);
           comm::Communicator& g = group_of(c, op.group());
           const int me = member(c, g, op);
           const int hidden = static_cast<int>(row_width(c.input_value(0)));
           comm::dispatch_rows(g, {op.experts_per_rank()}, c.in<float>(0), c.in<int32_t>(1), c.in<float>(2),
                               op.rows()[static_cast<std::size_t>(me)], hidden, op.top_k(), op.total_rows(),
                               c.out<float>(0), c.out<int32_t>(1), c.out<float>(2), c.out<int32_t>(4), c.out<int32_t>(3));
         },
         {}});
  r.add({"alltoall_combine", Backend::cpu, "host.alltoall_v", 0,
         host_transport("all-to-all-v back to the sources, each token's parts summed there in rank order"),
         [](const KernelCall& c) {
           const auto& op = static_cast<const AlltoallCombineOp&>(*c.node.op);
           comm::Communicator& g = group_of(c, op.group());
           const int me = member(c, g, op);
           comm::combine_rows_back(g, c.in<float>(0), static_cast<int>(row_width(c.input_value(0))), c.in<int32_t>(2),
                                   c.in<int32_t>(1), op.rows()[static_cast<std::size_t>(me)], c.out<float>(0),
                                   static_cast<float*>(c.workspace));
         },
         [](const Graph& g, const Node& n, int64_t) {
           const auto& op = static_cast<const AlltoallCombineOp&>(*n.op);
           const int64_t most = *std::max_element(op.rows().begin(), op.rows().end());
           return most * static_cast<int64_t>(op.rows().size()) * row_width(g.value(n.inputs[0])) * 4;
         }});
}

}  // namespace moeflow
