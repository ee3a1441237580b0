#include "kernels/comm/row_exchange.hpp"

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "graph/error.hpp"

namespace moeflow::comm {

RowBlocks row_blocks(const std::vector<int64_t>& rows, int64_t width) {
  RowBlocks b;
  int64_t at = 0;
  for (int64_t r : rows) {
    b.counts.push_back(r * width);
    b.offsets.push_back(at);
    at += r * width;
  }
  return b;
}

RowBlocks without_self(RowBlocks blocks, int me) {
  blocks.counts.at(static_cast<std::size_t>(me)) = 0;
  return blocks;
}

std::vector<int64_t> exchange_counts(Communicator& comm, const std::vector<int64_t>& send) {
  const auto n = static_cast<std::size_t>(comm.size());
  std::vector<int32_t> mine(send.begin(), send.end()), theirs(n);
  std::vector<int64_t> ones(n, 1), at(n);
  for (std::size_t r = 0; r < n; ++r) at[r] = static_cast<int64_t>(r);
  comm.all_to_all_v(mine.data(), ones.data(), at.data(), theirs.data(), ones.data(), at.data(), Element::i32);
  return std::vector<int64_t>(theirs.begin(), theirs.end());
}

int64_t exchange_sources_ints(int ranks, int64_t rows, int top_k) { return rows * std::max(ranks, top_k); }

int64_t dispatch_rows(Communicator& comm, const ExpertOwners& owners, const float* x, const int32_t* ids,
                      const float* weights, int64_t rows, int hidden, int top_k, int64_t capacity, float* x_out,
                      int32_t* ids_out, float* weights_out, int32_t* counts, int32_t* sources) {
  const int ranks = comm.size();
  // Which tokens go to which rank, in (rank, token) order.
  std::vector<std::vector<int64_t>> to(static_cast<std::size_t>(ranks));
  for (int64_t t = 0; t < rows; ++t)
    for (int r = 0; r < ranks; ++r)
      for (int j = 0; j < top_k; ++j)
        if (owners.owns(r, ids[t * top_k + j])) {
          to[static_cast<std::size_t>(r)].push_back(t);
          break;
        }
  const auto R = static_cast<std::size_t>(ranks);
  std::vector<int64_t> sent(R);
  for (std::size_t r = 0; r < R; ++r) sent[r] = static_cast<int64_t>(to[r].size());
  // Counts first: every rank learns how many rows each peer sends it.
  const std::vector<int64_t> received = exchange_counts(comm, sent);
  int64_t total_sent = 0, total_received = 0;
  for (std::size_t r = 0; r < R; ++r) {
    total_sent += sent[r];
    total_received += received[r];
  }
  if (total_received > capacity)
    fail_resource("alltoall dispatch on rank " + std::to_string(comm.rank()) + ": " + std::to_string(total_received) +
                  " rows arrive but the receive buffer holds " + std::to_string(capacity));
  // The layout for the way back.
  std::copy(sent.begin(), sent.end(), counts);
  std::copy(received.begin(), received.end(), counts + ranks);
  int32_t* source_token = sources;
  // Pack rows, ids and weights in (rank, token) order.
  std::vector<float> x_send(static_cast<std::size_t>(total_sent * hidden)), w_send(static_cast<std::size_t>(total_sent * top_k));
  std::vector<int32_t> ids_send(static_cast<std::size_t>(total_sent * top_k));
  int64_t row = 0;
  for (std::size_t r = 0; r < R; ++r)
    for (int64_t t : to[r]) {
      source_token[row] = static_cast<int32_t>(t);
      std::memcpy(&x_send[static_cast<std::size_t>(row * hidden)], x + t * hidden, sizeof(float) * static_cast<std::size_t>(hidden));
      std::memcpy(&ids_send[static_cast<std::size_t>(row * top_k)], ids + t * top_k, sizeof(int32_t) * static_cast<std::size_t>(top_k));
      std::memcpy(&w_send[static_cast<std::size_t>(row * top_k)], weights + t * top_k, sizeof(float) * static_cast<std::size_t>(top_k));
      ++row;
    }
  const RowBlocks out_rows = row_blocks(sent, hidden), in_rows = row_blocks(received, hidden);
  const RowBlocks out_k = row_blocks(sent, top_k), in_k = row_blocks(received, top_k);
  comm.group_start();
  comm.all_to_all_v(x_send.data(), out_rows.counts.data(), out_rows.offsets.data(), x_out, in_rows.counts.data(),
                    in_rows.offsets.data(), Element::f32);
  comm.all_to_all_v(ids_send.data(), out_k.counts.data(), out_k.offsets.data(), ids_out, in_k.counts.data(),
                    in_k.offsets.data(), Element::i32);
  comm.all_to_all_v(w_send.data(), out_k.counts.data(), out_k.offsets.data(), weights_out, in_k.counts.data(),
                    in_k.offsets.data(), Element::f32);
  comm.group_end();
  // Rows beyond those received route nowhere (and hold zeros, so nothing stale is ever read).
  std::fill(x_out + total_received * hidden, x_out + capacity * hidden, 0.0f);
  std::fill(ids_out + total_received * top_k, ids_out + capacity * top_k, -1);
  std::fill(weights_out + total_received * top_k, weights_out + capacity * top_k, 0.0f);
  return total_received;
}

void combine_rows_back(Communicator& comm, const float* y, int hidden, const int32_t* counts, const int32_t* sources,
                       int64_t rows, float* out, float* staging) {
  const int ranks = comm.size();
  const std::vector<int64_t> sent(counts, counts + ranks), received(counts + ranks, counts + 2 * ranks);
  int64_t total_sent = 0;
  for (int64_t s : sent) total_sent += s;
  // The way back mirrors the way out: what this rank received goes back to where it came from.
  const RowBlocks back = row_blocks(received, hidden), home = row_blocks(sent, hidden);
  comm.all_to_all_v(y, back.counts.data(), back.offsets.data(), staging, home.counts.data(), home.offsets.data(),
                    Element::f32);
  // Returned rows arrive by rank, each rank's in token order: summing them in arrival order adds each
  // token's parts in rank order.
  std::fill(out, out + rows * hidden, 0.0f);
  const int32_t* source_token = sources;
  for (int64_t i = 0; i < total_sent; ++i) {
    float* o = out + static_cast<int64_t>(source_token[i]) * hidden;
    const float* part = staging + i * hidden;
    for (int h = 0; h < hidden; ++h) o[h] += part[h];
  }
}

}  // namespace moeflow::comm
