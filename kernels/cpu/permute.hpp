#pragma once
// Dispatch and combine in one process: rows grouped by expert, and back.
// Permuted order: expert-major; within an expert, by (token, slot j) ascending. Deterministic.
#include <cstdint>
#include <span>

namespace moeflow::cpu {

// offsets[E + 1]: offsets[e] = first permuted row of expert e; offsets[E] = T * k.
// slot_of[T, k]: the permuted row that holds (token t, choice j).
// Throws moeflow::Error (bad_input) naming the token if an id is outside [0, E).
// A rank's share of the experts (first_expert > 0 or skip_foreign): experts [first_expert,
// first_expert + E) are numbered 0..E-1 here; with skip_foreign, any other id (another rank's
// expert, or -1 for a padding row) gets slot_of = -1 and no row, so offsets[E] ≤ T·k.
void build_permutation(const int32_t* ids, int64_t tokens, int top_k, int experts, int32_t* offsets,
                       int32_t* slot_of, int first_expert = 0, bool skip_foreign = false);

// rows[slot_of[t, j], :] = x[t, :] for every (t, j) with slot_of ≥ 0; rows is [T * k, H].
void gather_rows(const float* x, const int32_t* slot_of, int64_t tokens, int top_k, int hidden, float* rows);

// out[t, :] = Σ_j weights[t, j] · y_rows[slot_of[t, j], :] over slot_of ≥ 0, then + addends[a][t, :]
// for each addend [T, H] in order; out is [T, H]. Summed in j order, then addend order (as a reduce
// over the combine's output and the addends would sum them). out may lie over addends[0].
void combine_rows(const float* y_rows, const int32_t* slot_of, const float* weights, int64_t tokens, int top_k,
                  int hidden, float* out, std::span<const float* const> addends = {});

}  // namespace moeflow::cpu
