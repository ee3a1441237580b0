#pragma once
// Small element-wise kernels (oneTBB-parallel).
#include <cstdint>

namespace moeflow::cpu {

// out[i] = Σ_a addends[a][i] for i < n, summed in addend order. out may alias addends[0].
void sum_arrays(const float* const* addends, int count, int64_t n, float* out);

// dst[i] = U(-1, 1) · scale from the counter-based generator keyed by (seed, name_hash), at flat
// indices [first, first + n).
void fill_uniform(float* dst, int64_t n, uint64_t seed, uint64_t name_hash, float scale, int64_t first = 0);

// Makes CBLAS single-threaded (OpenBLAS otherwise starts its own pool and fights oneTBB).
void use_single_threaded_blas();

}  // namespace moeflow::cpu
