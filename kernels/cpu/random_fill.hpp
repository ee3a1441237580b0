#pragma once
// Random inputs beyond U(-1,1)·scale (elementwise.hpp): routing weights in (0, 1) and per-token
// distinct expert ids, both from the counter-based generator so any slice is reproducible.
#include <cstdint>

namespace moeflow::cpu {

// dst[i] = (U(-1,1) + 1) / 2, in (0, 1).
void fill_unit_interval(float* dst, int64_t n, uint64_t seed, uint64_t name_hash);

// ids[t, :] = k distinct experts of [0, E), uniformly (a partial Fisher-Yates shuffle per token
// whose draws are keyed by t), for tokens [0, T).
void fill_distinct_ids(int32_t* ids, int64_t tokens, int top_k, int experts, uint64_t seed, uint64_t name_hash);

}  // namespace moeflow::cpu
