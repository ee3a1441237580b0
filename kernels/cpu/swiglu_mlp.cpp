#include "kernels/cpu/swiglu_mlp.hpp"

#include <cblas.h>
#include <tbb/blocked_range.h>
#include <tbb/enumerable_thread_specific.h>
#include <tbb/parallel_for.h>
#include <tbb/task_arena.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/small_rows_gemm.hpp"

namespace moeflow::cpu {
namespace {

// Rows per block: at most what small_rows_gemm streams in one pass over the weights, so small
// blocks read each weight once; larger blocks go to CBLAS, whose packing then pays off.
constexpr int kRowBlock = 64;

// Rows of one expert (or of the shared MLP) handled together.
struct RowBlock {
  int64_t first_row;
  int rows;
  const float* w13;  // [2I, H]
  const float* w2;   // [H, I]
};

// y[n, cols] = x[n, k] · w[cols, k]ᵀ (w rows with stride ldw), y with stride ldy. Up to two passes
// of small_rows_gemm before CBLAS: OpenBLAS packs the weights for any n, which at 17-32 rows costs
// more than streaming them twice (2-core VM, qwen1.5 H=1024 I=256 experts: T=256 (17 rows per
// expert) 24.2 -> 16.6-20.8 ms, T=480 (32 rows) 36.2 -> 29.9-31.9 ms; T=128 unchanged). This is
// what keeps a chunk's experts, with half the rows, from paying the packing twice.
void project(const float* x, int n, int k, const float* w, int cols, int ldw, float* y, int ldy) {
  if (n <= 2 * kSmallRowsMax) {
    for (int r0 = 0; r0 < n; r0 += kSmallRowsMax)
      small_rows_gemm(x + static_cast<int64_t>(r0) * k, std::min(kSmallRowsMax, n - r0), k, w, cols, ldw,
                      y + static_cast<int64_t>(r0) * ldy, ldy);
    return;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, cols, k, 1.0f, x, k, w, ldw, 0.0f, y, ldy);
}

// Slabs per row block so that blocks × slabs gives every thread several tasks, never slabs
// narrower than 64 columns (a GEMM that thin is all overhead).
int slab_width(std::size_t blocks, int extent) {
  const std::size_t want = 4 * static_cast<std::size_t>(tbb::this_task_arena::max_concurrency());
  const int slabs = static_cast<int>(std::clamp<std::size_t>((want + blocks - 1) / blocks, 1, (extent + 63) / 64));
  return (extent + slabs - 1) / slabs;
}

void run_blocks(const std::vector<RowBlock>& blocks, const float* x, int hidden, int intermediate, float* out,
                float* act) {
  if (blocks.empty()) return;
  const int i_slab = slab_width(blocks.size(), intermediate);
  const int i_slabs = (intermediate + i_slab - 1) / i_slab;
  tbb::enumerable_thread_specific<std::vector<float>> scratch;
  // Phase 1: act[rows, slab] = silu(x·W1[slab]ᵀ) ⊙ x·W3[slab]ᵀ.
  tbb::parallel_for(tbb::blocked_range<std::size_t>(0, blocks.size() * static_cast<std::size_t>(i_slabs), 1),
                    [&](const tbb::blocked_range<std::size_t>& range) {
                      std::vector<float>& h3 = scratch.local();
                      h3.resize(static_cast<std::size_t>(kRowBlock) * static_cast<std::size_t>(i_slab));
                      for (std::size_t item = range.begin(); item < range.end(); ++item) {
                        const RowBlock& b = blocks[item / static_cast<std::size_t>(i_slabs)];
                        const int c0 = static_cast<int>(item % static_cast<std::size_t>(i_slabs)) * i_slab;
                        const int cols = std::min(i_slab, intermediate - c0);
                        const float* xb = x + b.first_row * hidden;
                        float* a = act + b.first_row * intermediate + c0;
                        project(xb, b.rows, hidden, b.w13 + static_cast<int64_t>(c0) * hidden, cols, hidden, a,
                                intermediate);
                        project(xb, b.rows, hidden, b.w13 + static_cast<int64_t>(intermediate + c0) * hidden, cols,
                                hidden, h3.data(), cols);
                        for (int r = 0; r < b.rows; ++r)
                          for (int c = 0; c < cols; ++c) {
                            float& g = a[static_cast<int64_t>(r) * intermediate + c];
                            g = g / (1.0f + std::exp(-g)) * h3[static_cast<std::size_t>(r * cols + c)];
                          }
                      }
                    });
  // Phase 2: out[rows, slab] = act[rows, :]·W2[slab, :]ᵀ.
  const int h_slab = slab_width(blocks.size(), hidden);
  const int h_slabs = (hidden + h_slab - 1) / h_slab;
  tbb::parallel_for(tbb::blocked_range<std::size_t>(0, blocks.size() * static_cast<std::size_t>(h_slabs), 1),
                    [&](const tbb::blocked_range<std::size_t>& range) {
                      for (std::size_t item = range.begin(); item < range.end(); ++item) {
                        const RowBlock& b = blocks[item / static_cast<std::size_t>(h_slabs)];
                        const int c0 = static_cast<int>(item % static_cast<std::size_t>(h_slabs)) * h_slab;
                        const int cols = std::min(h_slab, hidden - c0);
                        project(act + b.first_row * intermediate, b.rows, intermediate,
                                b.w2 + static_cast<int64_t>(c0) * intermediate, cols, intermediate,
                                out + b.first_row * hidden + c0, hidden);
                      }
                    });
}

}  // namespace

void grouped_swiglu_mlp(const float* rows, const int32_t* offsets, int experts, int hidden, int intermediate,
                        const float* w13, const float* w2, float* out, float* act) {
  const int64_t w13_size = 2 * static_cast<int64_t>(intermediate) * hidden;
  const int64_t w2_size = static_cast<int64_t>(hidden) * intermediate;
  std::vector<RowBlock> blocks;
  for (int e = 0; e < experts; ++e)
    for (int64_t b = offsets[e]; b < offsets[e + 1]; b += kRowBlock)
      blocks.push_back({b, static_cast<int>(std::min<int64_t>(kRowBlock, offsets[e + 1] - b)), w13 + e * w13_size,
                        w2 + e * w2_size});
  run_blocks(blocks, rows, hidden, intermediate, out, act);
}

void swiglu_mlp(const float* x, int64_t tokens, int hidden, int intermediate, const float* w13, const float* w2,
                const float* gate_w, float* out, float* act) {
  std::vector<RowBlock> blocks;
  for (int64_t b = 0; b < tokens; b += kRowBlock)
    blocks.push_back({b, static_cast<int>(std::min<int64_t>(kRowBlock, tokens - b)), w13, w2});
  run_blocks(blocks, x, hidden, intermediate, out, act);
  if (gate_w == nullptr) return;
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, tokens, 16), [&](const tbb::blocked_range<int64_t>& r) {
    for (int64_t t = r.begin(); t < r.end(); ++t) {
      // A double accumulator keeps the gate's dot product (H up to ~7k terms) at the reference's
      // accuracy, at a cost that is nothing next to the MLP's GEMMs.
      const float* xt = x + t * hidden;
      double dot = 0.0;
      for (int h = 0; h < hidden; ++h) dot += static_cast<double>(xt[h]) * gate_w[h];
      const float g = 1.0f / (1.0f + std::exp(-static_cast<float>(dot)));
      float* o = out + t * hidden;
      for (int h = 0; h < hidden; ++h) o[h] *= g;
    }
  });
}

}  // namespace moeflow::cpu
