#pragma once
// Dispatch and combine on the GPU: the permutation of cpu::build_permutation (expert-major; within
// an expert by flat index t*k + j ascending), built on the device without floating-point atomics
// or host synchronisation, so one captured CUDA graph serves any T. Pointers are device pointers.
#include <cstddef>
#include <cstdint>

#include "kernels/cuda/lane_context.hpp"
#include "kernels/cuda/live_rows.hpp"

namespace moeflow::cuda {

// How build_permutation sorts. automatic: by size, as sort_method_for says (what the engine uses);
// tests and probes name a method to cover or time it.
//   small   one block, quadratic in n: up to 256 ids (a few tokens), one launch;
//   buckets one block per expert (and one for ids outside [0, E)), each reading every id: one launch
//           and no workspace, while n ≤ 131072 and (E + 1)·n ≤ 2^25;
//   tiles   count, scan and rank over tiles of the ids: three launches and the workspace, any n.
enum class SortMethod { automatic, small, buckets, tiles };
const char* sort_method_name(SortMethod method);
bool sort_method_takes(SortMethod method, int64_t ids, int experts);
SortMethod sort_method_for(int64_t ids, int experts);

// Device workspace build_permutation needs for up to max_tokens tokens (a pure host computation).
std::size_t permutation_workspace_bytes(int64_t max_tokens, int top_k, int experts);

// offsets [E + 1]: offsets[e] = first permuted row of expert e, offsets[E] = rows of valid ids.
// slot_of [T, k]: the permuted row of (t, j). row_source [T * k]: the flat index t*k + j each
// permuted row holds (the inverse of slot_of), or null where the caller needs only slot_of (a
// scatter by token).
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
                       Stream stream, LiveRows live = {}, SortMethod method = SortMethod::automatic);

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

// out[slot_of[t, j], :] = x[t, :] for every choice with slot_of ≥ 0 (the CPU's gather_rows): each row
// of x read once. Rows no choice maps to are left as they are (a permutation's rows of ids outside
// [0, E), which no expert reads). With a live count (per_count 1), `tokens` is the bound.
void scatter_rows(const uint16_t* x, const int32_t* slot_of, int64_t tokens, int top_k, int hidden, uint16_t* out,
                  Stream stream, LiveRows live = {});

// Rows [T, H] bf16 added to a combine's sum (the shared experts' outputs), by value: at most four.
struct RowAddends {
  static constexpr int kMax = 4;
  const uint16_t* rows[kMax] = {};
  int count = 0;
};

// out[t, :] = Σ_j weights[t, j] · y_rows[slot_of[t, j], :] over slot_of ≥ 0 (a choice with no row
// here is skipped), then + addends.rows[a][t, :] in addend order: fp32 accumulation in j order and
// one rounding to bf16 at the end. y_rows bf16 [T*k, H], out bf16 [T, H]; weights null: every weight
// 1 (the sum of a token's returned parts). Slots inside `window` are read from window.rows instead of
// y_rows. With a live count, `tokens` is the bound and tokens past the live ones are left as they are.
// out may lie over addends.rows[0] (each element of it is read by the thread that writes it).
void combine_rows(const uint16_t* y_rows, const int32_t* slot_of, const float* weights, int64_t tokens, int top_k,
                  int hidden, uint16_t* out, Stream stream, RowWindow window = {}, LiveRows live = {},
                  RowAddends addends = {});

// A rank's share of the experts (multi-rank): out[i] = ids[i] - first where that is in [0, experts),
// else -1 (build_permutation moves such ids out of the way and counts them for no expert).
void localize_ids(const int32_t* ids, int64_t n, int first, int experts, int32_t* out, Stream stream);
// slot_of[i] = -1 where local_ids[i] < 0: those choices have no row on this rank.
void drop_unrouted_slots(const int32_t* local_ids, int64_t n, int32_t* slot_of, Stream stream);
// dest[t, j] = the rank owning expert ids[t, j] (ids / experts_per_rank), or -1 where an earlier
// choice of token t already goes to that rank: each row goes once to each rank owning its experts.
void owner_ranks(const int32_t* ids, int64_t tokens, int top_k, int experts_per_rank, int32_t* dest, Stream stream);

// The alltoall in blocks of fixed size, in token order: rank q's block for every rank r is q's
// token rows x [T_q, H] as they are (sent from x itself, no copy), with ids and weights [T_q, k]
// that are the token's own where r owns one of its choices and -1 / 0 (a row no expert reads)
// elsewhere. So no count has to reach the host and no row is gathered.
struct TokenBlocks {
  int32_t* ids = nullptr;
  float* weights = nullptr;
};
inline constexpr int kMostBlockRanks = 64;  // a token's owner ranks fit one 64-bit mask
// slot_of [T, k]: the first choice of token t that rank r owns gets r * T + t (its row in the
// blocks coming back), later choices of that rank -1. send: every rank's block, rank r's rows at
// r * T (rank me's unused); self: rank me's own block.
void mark_token_blocks(const int32_t* ids, const float* weights, int64_t tokens, int top_k, int experts_per_rank,
                       int ranks, int me, int32_t* slot_of, const TokenBlocks& send, const TokenBlocks& self,
                       Stream stream);

}  // namespace moeflow::cuda
