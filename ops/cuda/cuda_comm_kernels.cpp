// The parallel lowering's ops on the GPU: collectives through the communicator's device transport
// (NCCL), ordered on the node's lane stream. The alltoall dispatch routes rows by destination rank
// with the same permutation kernels as the expert dispatch (destination = owner rank, each row once
// per rank). nccl.alltoall_v needs the per-rank counts on the host (NCCL's send/receive sizes): it
// synchronises its stream once and exchanges them through MPI. nccl.alltoall_blocks sends every
// token row to every rank instead (those a rank does not need marked with id -1): no host round
// trip and no gather. Either way
// the counts (or block sizes) stay in pinned host memory, so the way back starts without waiting for
// the device.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <iomanip>
#include <sstream>
#include <string>
#include <vector>

#include "graph/error.hpp"
#include "kernels/comm/communicator.hpp"
#include "kernels/comm/row_exchange.hpp"
#include "kernels/cuda/check.cuh"
#include "kernels/cuda/lane_context.hpp"
#include "kernels/cuda/permute.hpp"
#include "ops/comm_ops.hpp"
#include "ops/kernel_registry.hpp"

namespace moeflow {

namespace {

const cuda::LaneContext& lane_of(const KernelCall& c) { return *static_cast<const cuda::LaneContext*>(c.lane); }
constexpr int64_t aligned(int64_t n) { return (n + 255) / 256 * 256; }
int64_t width_of(const Value& v) { return v.shape().elements(1); }

// The group's device communicator, ordered on this node's stream.
comm::Communicator& group(const KernelCall& c, CommGroup which) {
  comm::Communicator& g = group_of(c, which);
  if (g.transport() == "mpi")
    fail_input("node '" + c.node.name + "': the CUDA backend needs the NCCL transport, not MPI, for its device buffers");
  g.use_stream(lane_of(c).stream);
  return g;
}

Support device_transport(const Graph& g, const Node& n, const std::string& how) {
  for (const Value* v : g.input_values(n))
    if (v->dtype() == DType::f32 && v->shape().rank() == 2 && v->shape()[1].fixed > 64 && v->name.find("weights") == std::string::npos)
      return Support::no("CUDA runs store activations in bf16; '" + v->name + "' is " + v->type_str());
  return Support::yes(how);
}

std::function<Support(const Graph&, const Node&)> nccl_kernel(std::string how) {
  return [how = std::move(how)](const Graph& g, const Node& n) { return device_transport(g, n, how); };
}


// Workspace of the alltoall dispatch: owner ranks, their permutation and the packed send buffers.
struct DispatchScratch {
  int32_t* dest;
  int32_t* offsets;
  int32_t* row_source;
  void* sort;
  std::size_t sort_bytes;
  uint16_t* send_x;
  int32_t* send_ids;
  float* send_weights;
  int64_t bytes;
};

DispatchScratch dispatch_scratch(std::byte* base, int64_t rows, int top_k, int ranks, int hidden) {
  DispatchScratch s{};
  const int64_t n = rows * top_k;
  int64_t at = 0;
  auto take = [&](int64_t bytes) {
    std::byte* p = base ? base + at : nullptr;
    at += aligned(bytes);
    return p;
  };
  s.dest = reinterpret_cast<int32_t*>(take(4 * n));
  s.offsets = reinterpret_cast<int32_t*>(take(4 * (ranks + 1)));
  s.row_source = reinterpret_cast<int32_t*>(take(4 * n));
  s.sort_bytes = cuda::permutation_workspace_bytes(rows, top_k, ranks);
  s.sort = take(static_cast<int64_t>(s.sort_bytes));
  s.send_x = reinterpret_cast<uint16_t*>(take(2 * n * hidden));
  s.send_ids = reinterpret_cast<int32_t*>(take(4 * n * top_k));
  s.send_weights = reinterpret_cast<float*>(take(4 * n * top_k));
  s.bytes = at;
  return s;
}

// Workspace of the fixed-block alltoall dispatch: every rank's block of ids and weights ([rows, k]
// each; the rows themselves are sent from x as they are).
struct BlockScratch {
  cuda::TokenBlocks send;
  int64_t bytes;
};

BlockScratch block_scratch(std::byte* base, int64_t rows, int top_k, int ranks) {
  BlockScratch s{};
  int64_t at = 0;
  auto take = [&](int64_t bytes) {
    std::byte* p = base ? base + at : nullptr;
    at += aligned(bytes);
    return p;
  };
  s.send.ids = reinterpret_cast<int32_t*>(take(4 * ranks * rows * top_k));
  s.send.weights = reinterpret_cast<float*>(take(4 * ranks * rows * top_k));
  s.bytes = at;
  return s;
}

// What both alltoall dispatch kernels start from.
struct DispatchCall {
  const AlltoallDispatchOp& op;
  comm::Communicator& group;
  cudaStream_t stream;
  int ranks, me, k, hidden;
  int64_t rows, most;  // this rank's tokens, and the most any rank has (what the scratch is sized for)
};
DispatchCall dispatch_call(const KernelCall& c) {
  const auto& op = static_cast<const AlltoallDispatchOp&>(*c.node.op);
  comm::Communicator& g = group(c, op.group());
  return {op, g, lane_of(c).stream, g.size(), g.rank(), op.top_k(), static_cast<int>(width_of(c.input_value(0))),
          op.rows()[static_cast<std::size_t>(g.rank())], *std::max_element(op.rows().begin(), op.rows().end())};
}

// Rows, ids and weights (k-wide rows) to the other ranks in one NCCL group, one launch for all
// three: sent as out_rows and out_k lay them out, received into the node's first three outputs as
// in_rows and in_k say. The own rank's blocks are left out (each kernel places them itself).
void send_to_others(const DispatchCall& d, const KernelCall& c, const void* rows, const void* ids, const void* weights,
                    const comm::RowBlocks& out_rows, const comm::RowBlocks& out_k, const comm::RowBlocks& in_rows,
                    const comm::RowBlocks& in_k) {
  const comm::RowBlocks out_rows_p = comm::without_self(out_rows, d.me), in_rows_p = comm::without_self(in_rows, d.me);
  const comm::RowBlocks out_k_p = comm::without_self(out_k, d.me), in_k_p = comm::without_self(in_k, d.me);
  d.group.group_start();
  d.group.all_to_all_v(rows, out_rows_p.counts.data(), out_rows_p.offsets.data(), c.outputs[0], in_rows_p.counts.data(),
                       in_rows_p.offsets.data(), comm::Element::bf16);
  d.group.all_to_all_v(ids, out_k_p.counts.data(), out_k_p.offsets.data(), c.outputs[1], in_k_p.counts.data(),
                       in_k_p.offsets.data(), comm::Element::i32);
  d.group.all_to_all_v(weights, out_k_p.counts.data(), out_k_p.offsets.data(), c.outputs[2], in_k_p.counts.data(),
                       in_k_p.offsets.data(), comm::Element::f32);
  d.group.group_end();
}

// The share of fixed-block rows that carry nothing with uniform routing: a token has none of its
// k experts on a given other rank with probability about (1 - 1/ranks)^k.
double expected_padding(int ranks, int top_k) { return std::pow(1.0 - 1.0 / ranks, top_k); }
// Planned up to this much expected padding: k = 8 over 2 ranks (0.4%), measured on 2 × H200. (Over 4
// ranks k = 8 expects 10.01%, just past it: 4 GPUs were not at hand to weigh the padding against the
// counted protocol's host round trip there.)
constexpr double kMostPadding = 0.10;

}  // namespace

void register_cuda_comm_kernels(KernelRegistry& r) {
  r.add({"take_rows", Backend::cuda, "cuda.copy_rows", 0,
         nccl_kernel("one device copy of this TP rank's rows"), [](const KernelCall& c) {
           const auto& op = static_cast<const TakeRowsOp&>(*c.node.op);
           const Value& v = c.input_value(0);
           const std::size_t row = static_cast<std::size_t>(width_of(v)) * dtype_size(v.dtype());
           MOEFLOW_CUDA_CHECK(cudaMemcpyAsync(c.outputs[0],
                                              static_cast<const std::byte*>(c.inputs[0]) + static_cast<std::size_t>(op.first()) * row,
                                              static_cast<std::size_t>(op.count()) * row, cudaMemcpyDeviceToDevice,
                                              lane_of(c).stream));
         },
         {}});
  r.add({"all_gather", Backend::cuda, "nccl.all_gather_v", 0,
         nccl_kernel("NCCL group of broadcasts (one per rank's block), rows packed in rank order"), [](const KernelCall& c) {
           const auto& op = static_cast<const AllGatherRowsOp&>(*c.node.op);
           comm::Communicator& g = group(c, op.group());
           g.group_start();  // every value's blocks in one launch
           for (std::size_t i = 0; i < c.inputs.size(); ++i) {
             const Value& v = c.input_value(i);
             std::vector<int64_t> counts;
             for (int64_t rows : op.rows()) counts.push_back(rows * width_of(v));
             g.all_gather_v(c.inputs[i], c.outputs[i], counts.data(), element_of(v));
           }
           g.group_end();
         },
         {}});
  r.add({"reduce_scatter", Backend::cuda, "nccl.reduce_scatter_v", 0,
         nccl_kernel("NCCL group of reduces (sum, one per rank's block): the Partial paid once"), [](const KernelCall& c) {
           const auto& op = static_cast<const ReduceScatterRowsOp&>(*c.node.op);
           comm::Communicator& g = group(c, op.group());
           std::vector<int64_t> counts;
           for (int64_t rows : op.rows()) counts.push_back(rows * width_of(c.input_value(0)));
           g.reduce_scatter_sum_v(c.inputs[0], c.outputs[0], counts.data(), element_of(c.input_value(0)));
         },
         {}});

  KernelEntry dispatch{
      "alltoall_dispatch", Backend::cuda, "nccl.alltoall_v", 0,
      [](const Graph& g, const Node& n) {
        if (static_cast<const AlltoallDispatchOp&>(*n.op).experts_per_rank() == 0)
          return Support::no("alltoall without --ep sends every row to every rank: use allgather on the GPU");
        return device_transport(g, n, "rows permuted by owner rank on the device, counts to the host, NCCL send/recv "
                                      "(a rank's rows for itself copied beside the transfer)");
      },
      [](const KernelCall& c) {
        const DispatchCall d = dispatch_call(c);
        const auto& op = d.op;
        comm::Communicator& g = d.group;
        const cudaStream_t stream = d.stream;
        const int ranks = d.ranks, me = d.me, k = d.k, hidden = d.hidden;
        const int64_t rows = d.rows, most = d.most;
        const DispatchScratch s = dispatch_scratch(static_cast<std::byte*>(c.workspace), most, k, ranks, hidden);
        int32_t* slot_of = c.out<int32_t>(3);
        int32_t* counts = c.out<int32_t>(4);  // pinned host memory: written here, read by the way back
        std::vector<int64_t> sent(static_cast<std::size_t>(ranks), 0);
        int64_t total = 0;
        if (rows > 0) {
          cuda::owner_ranks(c.in<int32_t>(1), rows, k, op.experts_per_rank(), s.dest, stream);
          cuda::build_permutation(s.dest, rows, k, ranks, s.offsets, slot_of, s.row_source, s.sort, s.sort_bytes, stream);
          std::vector<int32_t> offsets(static_cast<std::size_t>(ranks + 1));
          MOEFLOW_CUDA_CHECK(cudaMemcpyAsync(offsets.data(), s.offsets, 4 * offsets.size(), cudaMemcpyDeviceToHost, stream));
          MOEFLOW_CUDA_CHECK(cudaStreamSynchronize(stream));
          for (int r = 0; r < ranks; ++r) sent[static_cast<std::size_t>(r)] = offsets[static_cast<std::size_t>(r) + 1] - offsets[static_cast<std::size_t>(r)];
          total = offsets[static_cast<std::size_t>(ranks)];
          cuda::drop_unrouted_slots(s.dest, rows * k, slot_of, stream);
        }
        // Counts travel on the host side; then the rows on the device.
        const std::vector<int64_t> received = comm::exchange_counts(g.host(), sent);
        int64_t total_received = 0;
        for (int64_t v : received) total_received += v;
        if (total_received > op.total_rows())
          fail_resource("node '" + c.node.name + "': " + std::to_string(total_received) + " rows arrive for " +
                        std::to_string(op.total_rows()) + " slots");
        const comm::RowBlocks out_rows = comm::row_blocks(sent, hidden), in_rows = comm::row_blocks(received, hidden);
        const comm::RowBlocks out_k = comm::row_blocks(sent, k), in_k = comm::row_blocks(received, k);
        const auto me_at = static_cast<std::size_t>(me);
        const int64_t self_lo = out_rows.offsets[me_at] / hidden, self_hi = self_lo + sent[me_at];
        const cuda::LaneContext& lane = lane_of(c);
        if (self_hi > self_lo) {
          // The rows this rank routes to itself skip NCCL: copied straight to where they are received,
          // on the lane's side stream, beside the packing and the transfer of the others.
          MOEFLOW_CUDA_CHECK(cudaEventRecord(lane.side_fork, stream));
          MOEFLOW_CUDA_CHECK(cudaStreamWaitEvent(lane.side, lane.side_fork, 0));
          const int32_t* self_source = s.row_source + self_lo;
          cuda::gather_rows(c.in<uint16_t>(0), self_source, sent[me_at], k, hidden,
                            c.out<uint16_t>(0) + in_rows.offsets[me_at], lane.side);
          cuda::gather_rows(reinterpret_cast<const uint16_t*>(c.in<int32_t>(1)), self_source, sent[me_at], k, 2 * k,
                            reinterpret_cast<uint16_t*>(c.out<int32_t>(1) + in_k.offsets[me_at]), lane.side);
          cuda::gather_rows(reinterpret_cast<const uint16_t*>(c.in<float>(2)), self_source, sent[me_at], k, 2 * k,
                            reinterpret_cast<uint16_t*>(c.out<float>(2) + in_k.offsets[me_at]), lane.side);
          MOEFLOW_CUDA_CHECK(cudaEventRecord(lane.side_join, lane.side));
        }
        if (total > self_hi - self_lo) {
          // The others' rows, ids and weights packed by destination (ids and weights as k-wide 4-byte
          // rows), the self window skipped.
          const cuda::RowWindow skip{self_lo, self_hi, nullptr};
          cuda::gather_rows(c.in<uint16_t>(0), s.row_source, total, k, hidden, s.send_x, stream, skip);
          cuda::gather_rows(reinterpret_cast<const uint16_t*>(c.in<int32_t>(1)), s.row_source, total, k, 2 * k,
                            reinterpret_cast<uint16_t*>(s.send_ids), stream, skip);
          cuda::gather_rows(reinterpret_cast<const uint16_t*>(c.in<float>(2)), s.row_source, total, k, 2 * k,
                            reinterpret_cast<uint16_t*>(s.send_weights), stream, skip);
        }
        send_to_others(d, c, s.send_x, s.send_ids, s.send_weights, out_rows, out_k, in_rows, in_k);
        if (self_hi > self_lo) MOEFLOW_CUDA_CHECK(cudaStreamWaitEvent(stream, lane.side_join, 0));
        // Slots past those received route nowhere: their ids are -1, so no expert reads their rows
        // (which stay as they are: clearing them would cost a write of the whole tail).
        const int64_t cap = op.total_rows();
        MOEFLOW_CUDA_CHECK(cudaMemsetAsync(c.out<int32_t>(1) + total_received * k, 0xff,
                                           static_cast<std::size_t>(4 * (cap - total_received) * k), stream));
        MOEFLOW_CUDA_CHECK(cudaMemsetAsync(c.out<float>(2) + total_received * k, 0,
                                           static_cast<std::size_t>(4 * (cap - total_received) * k), stream));
        // The counts, for the way back: host memory, so it never waits for the device to read them.
        std::copy(sent.begin(), sent.end(), counts);
        std::copy(received.begin(), received.end(), counts + ranks);
      },
      [](const Graph& gr, const Node& n, int64_t) {
        const auto& op = static_cast<const AlltoallDispatchOp&>(*n.op);
        const int64_t most = *std::max_element(op.rows().begin(), op.rows().end());
        return dispatch_scratch(nullptr, most, op.top_k(), static_cast<int>(op.rows().size()),
                                static_cast<int>(width_of(gr.value(n.inputs[0]))))
            .bytes;
      }};
  dispatch.launches = 8;
  r.add(std::move(dispatch));

  // The same exchange in blocks of fixed size: rank q sends every rank its T_q token rows as they are
  // (from x itself), with the ids and weights of each token where that rank owns one of its choices
  // and id -1 (a row no expert reads) elsewhere. Neither the receive layout nor NCCL's sizes depend
  // on the routing: no counts to the host, no synchronisation, no MPI exchange, no row gathered. It
  // moves the rows a rank does not need too, so it is planned where few are expected
  // (expected_padding).
  KernelEntry blocks{
      "alltoall_dispatch", Backend::cuda, "nccl.alltoall_blocks", 1,
      [](const Graph& g, const Node& n) {
        const auto& op = static_cast<const AlltoallDispatchOp&>(*n.op);
        if (op.experts_per_rank() == 0)
          return Support::no("alltoall without --ep sends every row to every rank: use allgather on the GPU");
        const int ranks = static_cast<int>(op.rows().size());
        if (ranks > cuda::kMostBlockRanks)
          return Support::no(std::to_string(ranks) + " ranks; the blocks take at most " + std::to_string(cuda::kMostBlockRanks));
        const double pad = expected_padding(ranks, op.top_k());
        std::ostringstream percent;
        percent << std::fixed << std::setprecision(1) << 100 * pad;
        return device_transport(g, n, "every token row to every rank as it is, ids -1 where that rank owns none of its "
                                      "choices (about " + percent.str() +
                                      "% of rows for k = " + std::to_string(op.top_k()) + " over " +
                                      std::to_string(ranks) + " ranks): no counts on the host, no synchronisation, "
                                      "no gather");
      },
      [](const KernelCall& c) {
        const DispatchCall d = dispatch_call(c);
        const auto& op = d.op;
        const cudaStream_t stream = d.stream;
        const int ranks = d.ranks, me = d.me, k = d.k, hidden = d.hidden;
        const int64_t rows = d.rows, most = d.most;
        const BlockScratch s = block_scratch(static_cast<std::byte*>(c.workspace), most, k, ranks);
        // Block sizes: `rows` to every rank, each rank's own token count from it (host values).
        const std::vector<int64_t> sent(static_cast<std::size_t>(ranks), rows);
        const std::vector<int64_t> received(op.rows().begin(), op.rows().end());
        const comm::RowBlocks in_rows = comm::row_blocks(received, hidden), in_k = comm::row_blocks(received, k);
        const comm::RowBlocks out_k = comm::row_blocks(sent, k);
        // x goes to every rank from x itself: every block starts at its first row.
        comm::RowBlocks out_rows{std::vector<int64_t>(static_cast<std::size_t>(ranks), rows * hidden),
                                 std::vector<int64_t>(static_cast<std::size_t>(ranks), 0)};
        const auto me_at = static_cast<std::size_t>(me);
        if (rows > 0) {
          const cuda::TokenBlocks self{c.out<int32_t>(1) + in_k.offsets[me_at], c.out<float>(2) + in_k.offsets[me_at]};
          cuda::mark_token_blocks(c.in<int32_t>(1), c.in<float>(2), rows, k, op.experts_per_rank(), ranks, me,
                                  c.out<int32_t>(3), s.send, self, stream);
          // The own block: x copied to where the others' blocks are received.
          MOEFLOW_CUDA_CHECK(cudaMemcpyAsync(c.out<uint16_t>(0) + in_rows.offsets[me_at], c.in<uint16_t>(0),
                                             static_cast<std::size_t>(rows * hidden) * 2, cudaMemcpyDeviceToDevice,
                                             stream));
        }
        send_to_others(d, c, c.inputs[0], s.send.ids, s.send.weights, out_rows, out_k, in_rows, in_k);
        // The way back uses the same blocks: sent[r] rows come back from each rank.
        int32_t* counts = c.out<int32_t>(4);
        std::copy(sent.begin(), sent.end(), counts);
        std::copy(received.begin(), received.end(), counts + ranks);
      },
      [](const Graph&, const Node& n, int64_t) {
        const auto& op = static_cast<const AlltoallDispatchOp&>(*n.op);
        const int64_t most = *std::max_element(op.rows().begin(), op.rows().end());
        return block_scratch(nullptr, most, op.top_k(), static_cast<int>(op.rows().size())).bytes;
      }};
  blocks.launches = 3;
  blocks.priority_on = [](const Graph&, const Node& n) {
    const auto& op = static_cast<const AlltoallDispatchOp&>(*n.op);
    return expected_padding(static_cast<int>(op.rows().size()), op.top_k()) <= kMostPadding ? 1 : -1;
  };
  r.add(std::move(blocks));

  KernelEntry back{
      "alltoall_combine", Backend::cuda, "nccl.alltoall_v", 0,
      nccl_kernel("NCCL send/recv back to the sources, each token's parts summed there in choice order (no atomics)"),
      [](const KernelCall& c) {
        const auto& op = static_cast<const AlltoallCombineOp&>(*c.node.op);
        comm::Communicator& g = group(c, op.group());
        const cudaStream_t stream = lane_of(c).stream;
        const int ranks = g.size(), me = g.rank();
        const int hidden = static_cast<int>(width_of(c.input_value(0)));
        const int32_t* slot_of = c.in<int32_t>(1);
        const int32_t* counts = c.in<int32_t>(2);  // host memory, written by the dispatch on the host
        const int64_t rows = op.rows()[static_cast<std::size_t>(me)];
        const std::vector<int64_t> sent(counts, counts + ranks), received(counts + ranks, counts + 2 * ranks);
        // Back where each row came from; the rows this rank computed for itself are read where they
        // are, not sent to itself.
        const comm::RowBlocks back = comm::row_blocks(received, hidden), home = comm::row_blocks(sent, hidden);
        auto* staging = static_cast<uint16_t*>(c.workspace);
        const comm::RowBlocks back_p = comm::without_self(back, me), home_p = comm::without_self(home, me);
        g.all_to_all_v(c.inputs[0], back_p.counts.data(), back_p.offsets.data(), staging, home_p.counts.data(),
                       home_p.offsets.data(), comm::Element::bf16);
        const auto me_at = static_cast<std::size_t>(me);
        const int64_t self_lo = home.offsets[me_at] / hidden;
        const cuda::RowWindow self{self_lo, self_lo + sent[me_at], static_cast<uint16_t*>(c.inputs[0]) + back.offsets[me_at]};
        if (rows > 0) cuda::combine_rows(staging, slot_of, nullptr, rows, op.top_k(), hidden, c.out<uint16_t>(0), stream, self);
      },
      [](const Graph& gr, const Node& n, int64_t) {
        const auto& op = static_cast<const AlltoallCombineOp&>(*n.op);
        const int64_t most = *std::max_element(op.rows().begin(), op.rows().end());
        // Rows coming home: at most one per (token, choice) with counted rows, one block of `most`
        // per rank with fixed blocks (nccl.alltoall_blocks).
        const int64_t blocks = std::max<int64_t>(op.top_k(), static_cast<int64_t>(op.rows().size()));
        return aligned(2 * most * blocks * width_of(gr.value(n.inputs[0])));
      }};
  back.launches = 2;
  r.add(std::move(back));
}

}  // namespace moeflow
