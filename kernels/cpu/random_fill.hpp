#pragma once
// Random inputs beyond U(-1,1)·scale (elementwise.hpp): routing weights in (0, 1) and per-token
// distinct expert ids, both from the counter-based generator so any slice is reproducible.
#include <cstdint>

namespace moeflow::cpu {

// dst[i] = (U(-1,1) + 1) / 2, in (0, 1), drawn at counter first + i.
void fill_unit_interval(float* dst, int64_t n, uint64_t seed, uint64_t name_hash, int64_t first = 0);

// ids[t, :] = k distinct experts of [0, E), uniformly (a partial Fisher-Yates shuffle per token
// whose draws are keyed by t), for tokens [first_token, first_token + tokens) written from ids[0].
void fill_distinct_ids(int32_t* ids, int64_t tokens, int top_k, int experts, uint64_t seed, uint64_t name_hash,
                       int64_t first_token = 0);

}  // namespace moeflow::cpu
