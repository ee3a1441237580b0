#include "kernels/cpu/permute.hpp"

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "graph/error.hpp"

namespace moeflow::cpu {

// Serial on purpose: one pass over T·k ids is cheap next to the expert GEMMs, and a serial
// counting sort gives the (token, slot) order within each expert without any merge step.
void build_permutation(const int32_t* ids, int64_t tokens, int top_k, int experts, int32_t* offsets,
                       int32_t* slot_of, int first_expert, bool skip_foreign) {
  const int64_t total = tokens * top_k;
  if (total > std::numeric_limits<int32_t>::max()) {
    fail_input("build_permutation: " + std::to_string(tokens) + " tokens x top_k " + std::to_string(top_k) +
               " rows do not fit 32-bit offsets");
  }
  std::fill(offsets, offsets + experts + 1, 0);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int j = 0; j < top_k; ++j) {
      const int32_t e = ids[t * top_k + j] - first_expert;
      if (skip_foreign && (e < 0 || e >= experts)) continue;
      if (e < 0 || e >= experts) {
        fail_input("build_permutation: token " + std::to_string(t) + ", slot " + std::to_string(j) +
                   " has expert id " + std::to_string(e) + " outside [0, " + std::to_string(experts) + ")");
      }
      ++offsets[e + 1];
    }
  }
  for (int e = 0; e < experts; ++e) offsets[e + 1] += offsets[e];
  std::vector<int32_t> cursor(offsets, offsets + experts);
  for (int64_t i = 0; i < total; ++i) {
    const int32_t e = ids[i] - first_expert;
    slot_of[i] = e >= 0 && e < experts ? cursor[static_cast<std::size_t>(e)]++ : -1;
  }
}

void gather_rows(const float* x, const int32_t* slot_of, int64_t tokens, int top_k, int hidden, float* rows) {
  const size_t row_bytes = sizeof(float) * static_cast<size_t>(hidden);
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, tokens, 16), [&](const tbb::blocked_range<int64_t>& r) {
    for (int64_t t = r.begin(); t < r.end(); ++t) {
      for (int j = 0; j < top_k; ++j)
        if (const int32_t slot = slot_of[t * top_k + j]; slot >= 0)
          std::memcpy(rows + static_cast<int64_t>(slot) * hidden, x + t * hidden, row_bytes);
    }
  });
}

void combine_rows(const float* y_rows, const int32_t* slot_of, const float* weights, int64_t tokens, int top_k,
                  int hidden, float* out, std::span<const float* const> addends) {
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, tokens, 16), [&](const tbb::blocked_range<int64_t>& r) {
    // The choices' sum in a row of its own when there are addends: out may then lie over the first.
    std::vector<float> row(addends.empty() ? 0 : static_cast<std::size_t>(hidden));
    for (int64_t t = r.begin(); t < r.end(); ++t) {
      float* o = addends.empty() ? out + t * hidden : row.data();
      std::fill(o, o + hidden, 0.0f);
      for (int j = 0; j < top_k; ++j) {
        if (slot_of[t * top_k + j] < 0) continue;
        const float w = weights[t * top_k + j];
        const float* y = y_rows + static_cast<int64_t>(slot_of[t * top_k + j]) * hidden;
        for (int h = 0; h < hidden; ++h) o[h] += w * y[h];
      }
      for (const float* a : addends)
        for (int h = 0; h < hidden; ++h) o[h] += a[t * hidden + h];
      if (o != out + t * hidden) std::copy(o, o + hidden, out + t * hidden);
    }
  });
}

}  // namespace moeflow::cpu
