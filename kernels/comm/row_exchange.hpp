#pragma once
// The `alltoall` dispatch kind on any Communicator (host buffers): each token row goes once to every
// rank that owns one of its top-k experts, with its ids and weights, and the rows computed there
// come back and are summed at the source. Rows are exchanged in a fixed order (destination rank,
// then token), so the result does not depend on timing: repeated runs give identical bytes.
#include <cstdint>
#include <vector>

#include "kernels/comm/communicator.hpp"

namespace moeflow::comm {

// Which ranks own an expert: a contiguous block of experts_per_rank experts per rank (expert
// parallel), or every rank (experts_per_rank = 0: each holds a slice of every expert's I).
struct ExpertOwners {
  int experts_per_rank = 0;
  bool owns(int rank, int32_t expert) const {
    return experts_per_rank == 0 || (expert >= 0 && expert / experts_per_rank == rank);
  }
};

// Per-rank blocks of rows `width` elements wide, packed in rank order: the element counts and
// offsets all_to_all_v takes.
struct RowBlocks {
  std::vector<int64_t> counts, offsets;
};
RowBlocks row_blocks(const std::vector<int64_t>& rows, int64_t width);
// The same blocks with rank `me`'s emptied: what a rank moves to itself it copies, not transports.
RowBlocks without_self(RowBlocks blocks, int me);

// Every rank tells every other how many rows it sends it: send[r] rows go to rank r; returns the
// rows each rank sends here (on the host side, through `comm`).
std::vector<int64_t> exchange_counts(Communicator& comm, const std::vector<int64_t>& send);

// What the way back needs, filled by dispatch_rows: `counts` [2 · ranks] (rows sent to, then
// received from, each rank: host memory, read by the host) and `sources` (the source token of each
// row sent, in send order; a device transport keeps each (token, choice)'s send slot there
// instead). exchange_sources_ints is the length of `sources` for `rows` rows.
int64_t exchange_sources_ints(int ranks, int64_t rows, int top_k);

// Sends rows [0, rows) of x [rows, H] (ids and weights [rows, k]) to their owners. Receives into
// x_out [capacity, H], ids_out and weights_out [capacity, k] in (source rank, token) order, and
// fills the rows beyond those received with id -1 and weight 0 (they route nowhere). Returns the
// rows received; throws Error(resource) when they exceed capacity, naming both.
int64_t dispatch_rows(Communicator& comm, const ExpertOwners& owners, const float* x, const int32_t* ids,
                      const float* weights, int64_t rows, int hidden, int top_k, int64_t capacity, float* x_out,
                      int32_t* ids_out, float* weights_out, int32_t* counts, int32_t* sources);

// Returns each received row of y [capacity, H] (in dispatch_rows' receive order) to its source, and
// there sums the rows of each token over the ranks in rank order: out [rows, H]. `staging` holds
// rows · size() · H floats.
void combine_rows_back(Communicator& comm, const float* y, int hidden, const int32_t* counts, const int32_t* sources,
                       int64_t rows, float* out, float* staging);

}  // namespace moeflow::comm
