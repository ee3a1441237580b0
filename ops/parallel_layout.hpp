#pragma once
// How one layer is spread over ranks (DESIGN.md, "Parallel layout"): world = dp × tp ranks; rank r
// is DP rank r / tp and TP rank r % tp (a TP group is consecutive ranks). Tokens differ across DP
// ranks (each has its own count) and are replicated across a TP group. With `ep`, the routed
// experts are split over all ranks in contiguous blocks; otherwise every expert's I is.
#include <cstdint>
#include <string>
#include <vector>

#include "ops/model_config.hpp"

namespace moeflow {

// How token rows reach the ranks that hold their experts.
enum class DispatchKind {
  allgather,       // gather rows from every rank, route them everywhere, reduce-scatter the outputs
  topk_allgather,  // route first; gather rows with their top-k ids and weights
  alltoall,        // send each row only to the ranks owning its experts, and back
};
const char* to_string(DispatchKind k);
DispatchKind parse_dispatch(const std::string& text);  // Error(bad_input) naming the choices

// Which rows of a TP group's (replicated) tokens each TP rank dispatches, so that each goes once.
enum class TpDispatch {
  slices,  // sequence-parallel: TP rank j sends the j-th slice of the rows
  leader,  // TP rank 0 sends all rows, the others none
};
const char* to_string(TpDispatch k);
TpDispatch parse_tp_dispatch(const std::string& text);

struct ParallelLayout {
  int dp = 1;
  int tp = 1;
  bool ep = false;
  DispatchKind dispatch = DispatchKind::allgather;
  TpDispatch tp_dispatch = TpDispatch::slices;
  std::vector<int64_t> tokens;  // per DP rank

  int world() const { return dp * tp; }
  int dp_rank(int rank) const { return rank / tp; }
  int tp_rank(int rank) const { return rank % tp; }
  int64_t tokens_of(int rank) const { return tokens.at(static_cast<std::size_t>(dp_rank(rank))); }
  int64_t max_tokens() const;
  // The first row of DP rank d's tokens in the batch of all DP ranks' tokens (what the single-process
  // reference of those tokens sees).
  int64_t first_token(int dp_rank) const;
  // Rows of `rows` replicated rows (one TP group's) that TP rank j dispatches.
  int64_t tp_share_first(int64_t rows, int j) const;
  int64_t tp_share_rows(int64_t rows, int j) const;
  // One line: "dp=2 tp=1 ep alltoall tokens 5,9".
  std::string str() const;
};

// Checks the layout against the world and the model: N = dp × tp, positive sizes, one token count
// or one per DP rank (expanded here), experts divisible by the ranks with ep, I (and nothing else)
// divisible by them without. Throws Error(bad_input) with a one-line message naming the values.
void check_layout(ParallelLayout& layout, const MoEConfig& config, int world_size);

}  // namespace moeflow
