#include "kernels/comm/row_exchange.hpp"

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "graph/error.hpp"

namespace moeflow::comm {

namespace {

// Element counts and offsets for rows of `width` elements, from per-rank row counts.
void scaled(const int64_t* row_counts, int ranks, int64_t width, std::vector<int64_t>& counts,
            std::vector<int64_t>& offsets) {
  counts.assign(static_cast<std::size_t>(ranks), 0);
  offsets.assign(static_cast<std::size_t>(ranks), 0);
  int64_t at = 0;
  for (int r = 0; r < ranks; ++r) {
    counts[static_cast<std::size_t>(r)] = row_counts[r] * width;
    offsets[static_cast<std::size_t>(r)] = at;
    at += row_counts[r] * width;
  }
}

}  // namespace

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
  std::vector<int32_t> send_rows(R), recv_rows(R);
  for (std::size_t r = 0; r < R; ++r) send_rows[r] = static_cast<int32_t>(to[r].size());
  // Counts first: every rank learns how many rows each peer sends it.
  {
    std::vector<int64_t> ones(R, 1), at(R);
    for (std::size_t r = 0; r < R; ++r) at[r] = static_cast<int64_t>(r);
    comm.all_to_all_v(send_rows.data(), ones.data(), at.data(), recv_rows.data(), ones.data(), at.data(), Element::i32);
  }
  std::vector<int64_t> sent(R), received(R);
  int64_t total_sent = 0, total_received = 0;
  for (std::size_t r = 0; r < R; ++r) {
    sent[r] = send_rows[r];
    received[r] = recv_rows[r];
    total_sent += sent[r];
    total_received += received[r];
  }
  if (total_received > capacity)
    fail_resource("alltoall dispatch on rank " + std::to_string(comm.rank()) + ": " + std::to_string(total_received) +
                  " rows arrive but the receive buffer holds " + std::to_string(capacity));
  // The layout for the way back.
  std::copy(send_rows.begin(), send_rows.end(), counts);
  std::copy(recv_rows.begin(), recv_rows.end(), counts + ranks);
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
  std::vector<int64_t> sc, so, rc, ro;
  scaled(sent.data(), ranks, hidden, sc, so);
  scaled(received.data(), ranks, hidden, rc, ro);
  comm.all_to_all_v(x_send.data(), sc.data(), so.data(), x_out, rc.data(), ro.data(), Element::f32);
  scaled(sent.data(), ranks, top_k, sc, so);
  scaled(received.data(), ranks, top_k, rc, ro);
  comm.all_to_all_v(ids_send.data(), sc.data(), so.data(), ids_out, rc.data(), ro.data(), Element::i32);
  comm.all_to_all_v(w_send.data(), sc.data(), so.data(), weights_out, rc.data(), ro.data(), Element::f32);
  // Rows beyond those received route nowhere (and hold zeros, so nothing stale is ever read).
  std::fill(x_out + total_received * hidden, x_out + capacity * hidden, 0.0f);
  std::fill(ids_out + total_received * top_k, ids_out + capacity * top_k, -1);
  std::fill(weights_out + total_received * top_k, weights_out + capacity * top_k, 0.0f);
  return total_received;
}

void combine_rows_back(Communicator& comm, const float* y, int hidden, const int32_t* counts, const int32_t* sources,
                       int64_t rows, float* out, float* staging) {
  const int ranks = comm.size();
  std::vector<int64_t> sent(static_cast<std::size_t>(ranks)), received(static_cast<std::size_t>(ranks));
  int64_t total_sent = 0;
  for (int r = 0; r < ranks; ++r) {
    sent[static_cast<std::size_t>(r)] = counts[r];
    received[static_cast<std::size_t>(r)] = counts[ranks + r];
    total_sent += counts[r];
  }
  // The way back mirrors the way out: what this rank received goes back to where it came from.
  std::vector<int64_t> sc, so, rc, ro;
  scaled(received.data(), ranks, hidden, sc, so);
  scaled(sent.data(), ranks, hidden, rc, ro);
  comm.all_to_all_v(y, sc.data(), so.data(), staging, rc.data(), ro.data(), Element::f32);
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
