#pragma once
// Dispatch and combine on the GPU: the permutation of cpu::build_permutation (expert-major; within
// an expert by flat index t*k + j ascending), built on the device without floating-point atomics
// or host synchronisation, so one captured CUDA graph serves any T. Pointers are device pointers.
#include <cstddef>
#include <cstdint>

#include "kernels/cuda/lane_context.hpp"
#include "kernels/cuda/live_rows.hpp"

namespace moeflow::cuda {

// Device workspace build_permutation needs for up to max_tokens tokens (a pure host computation).
std::size_t permutation_workspace_bytes(int64_t max_tokens, int top_k, int experts);

// offsets [E + 1]: offsets[e] = first permuted row of expert e, offsets[E] = rows of valid ids.
// slot_of [T, k]: the permuted row of (t, j). row_source [T * k]: the flat index t*k + j each
// permuted row holds (the inverse of slot_of).
// Ids outside [0, E) are not an error here (the device cannot throw): they contribute nothing. Their
// rows go after every valid row, to [offsets[E], T*k) in flat-index order (row_source set like any
// other, so a gather stays in bounds), no expert counts them, and their slot_of is -1, so the combine
// skips them whatever an experts kernel left in those rows. With valid ids offsets[E] = T*k and the
// result equals cpu::build_permutation's.
// Throws Error(bad_input) if T*k does not fit int32, or if workspace_bytes is too small.
// With a live count (live.per_count = k), `tokens` is the bound the launch is sized for and only the
// first live tokens are sorted: offsets[E] is then their row count.
void build_permutation(const int32_t* ids, int64_t tokens, int top_k, int experts, int32_t* offsets,
                       int32_t* slot_of, int32_t* row_source, void* workspace, std::size_t workspace_bytes,
                       Stream stream, LiveRows live = {});

// Rows [lo, hi) of a row-indexed buffer kept in another buffer, row lo first: the alltoall keeps
// the rows a rank routes to itself out of the transport (written, or read, where they are used).
// A gather given a window with no `rows` skips the window's rows (another launch writes them).
struct RowWindow {
  int64_t lo = 0, hi = 0;
  uint16_t* rows = nullptr;
};

// out[r, :] = x[row_source[r] / k, :] for r < rows; x bf16 [T, H], out bf16 [rows, H]. A copy.
// Rows inside `window` go to window.rows instead of out.
// With a live count, `rows` is the bound and rows past the live ones are left as they are.
void gather_rows(const uint16_t* x, const int32_t* row_source, int64_t rows, int top_k, int hidden, uint16_t* out,
                 Stream stream, RowWindow window = {}, LiveRows live = {});

// out[t, :] = Σ_j weights[t, j] · y_rows[slot_of[t, j], :] over slot_of ≥ 0 (a choice with no row
// here is skipped), fp32 accumulation in j order and one rounding to bf16 at the end. y_rows bf16
// [T*k, H], out bf16 [T, H]; weights null: every weight 1 (the sum of a token's returned parts).
// Slots inside `window` are read from window.rows instead of y_rows.
// With a live count, `tokens` is the bound and tokens past the live ones are left as they are.
void combine_rows(const uint16_t* y_rows, const int32_t* slot_of, const float* weights, int64_t tokens, int top_k,
                  int hidden, uint16_t* out, Stream stream, RowWindow window = {}, LiveRows live = {});

// A rank's share of the experts (multi-rank): out[i] = ids[i] - first where that is in [0, experts),
// else -1 (build_permutation moves such ids out of the way and counts them for no expert).
void localize_ids(const int32_t* ids, int64_t n, int first, int experts, int32_t* out, Stream stream);
// slot_of[i] = -1 where local_ids[i] < 0: those choices have no row on this rank.
void drop_unrouted_slots(const int32_t* local_ids, int64_t n, int32_t* slot_of, Stream stream);
// dest[t, j] = the rank owning expert ids[t, j] (ids / experts_per_rank), or -1 where an earlier
// choice of token t already goes to that rank: each row goes once to each rank owning its experts.
void owner_ranks(const int32_t* ids, int64_t tokens, int top_k, int experts_per_rank, int32_t* dest, Stream stream);

// The alltoall in blocks of fixed size (each rank sends every rank `capacity` rows: as many as it
// has tokens, since a token goes at most once to each rank), so no count has to reach the host.
// One rank's block of rows [capacity, H] with their ids and weights [capacity, k].
struct RankBlocks {
  uint16_t* rows = nullptr;
  int32_t* ids = nullptr;
  float* weights = nullptr;
};
// slot_of [n] from build_permutation over owner ranks (dest [n], offsets [ranks + 1]): each routed
// slot s of rank r = dest[i] becomes r * capacity + (s - offsets[r]); -1 stays -1.
void place_by_rank(const int32_t* dest, int64_t n, const int32_t* offsets, int64_t capacity, int32_t* slot_of,
                   Stream stream);
// Row p = r * capacity + i of the blocks: rank r's i-th row in owner-rank order (x's token row
// row_source / k, its ids and weights), or, past rank r's count, ids -1 and weights 0 (its x row is
// left as it is: no expert reads it). Rank `me`'s block is written to `self` (rows 0..capacity),
// every other rank's to `send` at row p.
void pack_by_rank(const uint16_t* x, const int32_t* ids, const float* weights, const int32_t* row_source,
                  const int32_t* offsets, int ranks, int me, int64_t capacity, int top_k, int hidden,
                  const RankBlocks& send, const RankBlocks& self, Stream stream);

}  // namespace moeflow::cuda
