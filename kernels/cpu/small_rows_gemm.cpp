// small_rows_gemm: y = x · wᵀ for a few rows of x, streaming each weight row once.
//
// Design (x86-64): for each group of up to 16 token rows, the weight rows are walked in tiles of
// 4 columns. k is cut into chunks of 256 floats so that one chunk of the 4 weight rows (4 KiB) and
// of the group's x rows (≤ 16 KiB) stay in L1 while every pair of token rows passes over them: each
// weight element comes from DRAM once and from L1 n/2 times. The register tile is 4 columns ×
// 2 rows = 8 independent 8-float accumulators (enough chains to cover FMA latency on two FMA
// pipes); narrower tail tiles (columns % 4, odd n) split each sum over 2 or 4 accumulators
// instead. Accumulators live in a small stack buffer between chunks, so chunking does not change
// the summation order: lane j of a (row, column, split s) accumulator sums the i ≡ 8s + j terms in
// increasing i; the splits and lanes are then added in a fixed tree and the k % 8 tail is added
// last, in order. Same inputs -> same bits on every call. When a chunk takes several register
// passes (n ≥ 3), prefetches of the next chunk are spread over those passes so that the DRAM
// stream overlaps the arithmetic.
//
// The public function is multiversioned (target_clones): an x86-64-v3 (AVX2 + FMA) clone and a
// baseline clone, chosen once at load time by the CPU; all helpers are always_inline so they are
// compiled inside each clone. FMA contraction is enabled for this file only (the project builds
// with -std=c++20, under which GCC does not contract a*b+c).
//
// Measured (lscpu: "AMD EPYC", family 25 model 17 = Zen 4, 2 vCPUs under KVM, 2.6 GHz TSC; one
// thread; OpenBLAS 0.3.21 pthread build set to 1 thread; g++ 12.2 -O2; y = x · wᵀ with 20 distinct
// weight matrices in rotation so they come from DRAM; median of 9 repeats; GB/s = weight bytes /
// time). The machine was shared (load average ~2.7 on 2 cores), so expect ±15% noise per entry.
//
//        k=2048, cols=2816 (23.1 MB)          k=1408, cols=2048 (11.5 MB)
//    n   this ms  GB/s   sgemm ms  GB/s       this ms  GB/s   sgemm ms  GB/s
//    1    1.53    15.1    5.76      4.0        0.93    12.5    1.98      5.8
//    2    1.68    13.7    5.48      4.2        1.18     9.8    2.05      5.6
//    3    1.84    12.6    5.87      3.9        1.11    10.4    2.18      5.3
//    4    1.90    12.1    5.87      3.9        1.22     9.5    2.16      5.3
//    6    2.04    11.3    6.82      3.4        1.02    11.4    2.10      5.5
//    8    2.36     9.8    6.49      3.6        1.15    10.0    2.11      5.5
//   12    2.93     7.9    7.19      3.2        1.54     7.5    2.49      4.6
//   16    3.90     5.9    7.73      3.0        1.98     5.8    2.73      4.2
//   24    5.59     4.1    8.02      2.9        2.99     3.9    3.07      3.8
//   32    7.65     3.0    9.86      2.3        3.40     3.4    3.66      3.2
// A second run past 32: k=1408 n=40 3.92 vs sgemm 3.82, n=48 5.62 vs 4.74 (sgemm ahead);
// k=2048 n=48 9.71 vs 10.94, n=64 12.87 vs 12.13. Beyond 16 rows the weights are streamed once per
// 16-row group, so the margin there is small (5-10% at k=1408) next to 1.4-4x at n ≤ 16.
// Without the pre-RA scheduling pragma below, n = 16 took ~4.8 ms / 2.6 ms; without the prefetch
// of the next chunk, n = 4..8 took ~2.1-2.9 ms / 1.3-1.8 ms.
//
// kSmallRowsMax (small_rows_gemm.hpp) is the largest measured n at which this kernel is faster in
// both shapes: 32.
#include "kernels/cpu/small_rows_gemm.hpp"

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__)
#define MOEFLOW_SRG_X86 1
#else
#define MOEFLOW_SRG_X86 0
#endif

#if MOEFLOW_SRG_X86
#if defined(__clang__)
#pragma clang fp contract(fast)
#else
// fp-contract: a*b+c -> FMA (off by default under -std=c++20). schedule-insns + sched-pressure:
// pre-RA scheduling keeps the 4 weight vectors of a step in registers instead of re-loading
// them for each token row (6 instead of 10 loads per 8 FMAs in the 4×2 tile; ~1.4× at n = 16).
#pragma GCC optimize("fp-contract=fast", "schedule-insns", "sched-pressure")
#endif
#pragma GCC diagnostic ignored "-Wpsabi"  // internal always_inline helpers pass 32-byte vectors
#endif

namespace moeflow::cpu {

#if MOEFLOW_SRG_X86
namespace {

#define SRG_INLINE inline __attribute__((always_inline))
#define SRG_LAMBDA_INLINE __attribute__((always_inline))

typedef float v8 __attribute__((vector_size(32)));
// Unaligned, aliasing view for loads from arbitrary float pointers.
typedef float v8u __attribute__((vector_size(32), aligned(4), may_alias));

constexpr int kColTile = 4;    // weight rows per register tile
constexpr int kRowGroup = 16;  // token rows sharing one pass over the weights
constexpr int kChunk = 256;    // floats of k per L1 block; a multiple of 8 · 4 (lanes · max split)
constexpr int kSlots = 16;     // accumulator slots per token row in the stack buffer (≥ split · C)

// Independent accumulators per (row, column) sum: at least 8 chains in a tile where possible.
template <int C, int R>
inline constexpr int kSplit = C * R >= 8 ? 1 : (C * R >= 4 ? 2 : 4);

SRG_INLINE v8 load8(const float* p) { return *reinterpret_cast<const v8u*>(p); }

// Fixed-order horizontal sum.
SRG_INLINE float hsum(const v8& v) { return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7])); }

// acc[r * kSlots + s * C + c] += Σ over i in [i0, i1) (a multiple of 8 wide) of the (r, c) products,
// the 8-float step at i going to split s = ((i - i0) / 8) % A. i0 is a multiple of 8 · A, so the split
// of a step depends only on i: chunking does not change the order.
template <int C, int R>
SRG_INLINE void tile(const float* x, int64_t ldx, const float* w, int64_t ldw, int i0, int i1, v8* acc, bool first) {
  constexpr int A = kSplit<C, R>;
  v8 a[A][R][C];
#pragma GCC unroll 16
  for (int s = 0; s < A; ++s)
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c) a[s][r][c] = first ? v8{} : acc[r * kSlots + s * C + c];

  int i = i0;
  for (; i + 8 * A <= i1; i += 8 * A) {
#pragma GCC unroll 16
    for (int s = 0; s < A; ++s) {
      v8 wv[C];
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c) wv[c] = load8(w + c * ldw + i + 8 * s);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const v8 xv = load8(x + r * ldx + i + 8 * s);
#pragma GCC unroll 16
        for (int c = 0; c < C; ++c) a[s][r][c] += xv * wv[c];
      }
    }
  }
  // At most A - 1 steps of 8 remain (only in the last chunk); they go to splits 0, 1, ...
#pragma GCC unroll 16
  for (int s = 0; s < A - 1; ++s) {
    if (i + 8 > i1) break;
    v8 wv[C];
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) wv[c] = load8(w + c * ldw + i);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const v8 xv = load8(x + r * ldx + i);
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c) a[s][r][c] += xv * wv[c];
    }
    i += 8;
  }

#pragma GCC unroll 16
  for (int s = 0; s < A; ++s)
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c) acc[r * kSlots + s * C + c] = a[s][r][c];
}

// y[r, c] for the R rows and C columns of one tile: splits and lanes in a fixed tree, then the
// k % 8 tail in order.
template <int C, int R>
SRG_INLINE void finish(const float* x, int64_t ldx, const float* w, int64_t ldw, int k, int k8, const v8* acc,
                       float* y, int64_t ldy) {
  constexpr int A = kSplit<C, R>;
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      float sum = 0.0f;
      if (k8 > 0) {
        const v8* a = acc + r * kSlots + c;
        v8 v;
        if constexpr (A == 1) {
          v = a[0];
        } else if constexpr (A == 2) {
          v = a[0] + a[C];
        } else {
          v = (a[0] + a[C]) + (a[2 * C] + a[3 * C]);
        }
        sum = hsum(v);
      }
      const float* xr = x + r * ldx;
      const float* wc = w + c * ldw;
      for (int i = k8; i < k; ++i) sum += xr[i] * wc[i];
      y[r * ldy + c] = sum;
    }
  }
}

// One tile of C weight rows against the gn (≤ kRowGroup) token rows of a group.
// One tile of C weight rows against the gn (≤ kRowGroup) token rows of a group. more_cols: weight
// rows after this tile (to prefetch the next tile's first chunk).
template <int C>
SRG_INLINE void column_tile(const float* x, int gn, int k, const float* w, int64_t ldw, float* y, int64_t ldy,
                            v8* acc, int more_cols) {
  const int k8 = k & ~7;
  const int pairs = gn & ~1;
  const int passes = (gn + 1) / 2;  // register-tile passes over each chunk
  for (int i0 = 0; i0 < k8; i0 += kChunk) {
    const int i1 = std::min(i0 + kChunk, k8);
    const bool first = i0 == 0;
    // With several passes per chunk the first one waits on DRAM and the rest compute from L1: spread
    // prefetches of the next chunk (same rows, or the next tile's rows) over the passes so the
    // memory traffic overlaps the arithmetic. A single pass is left to the hardware prefetcher.
    const float* next = nullptr;
    int next_rows = 0, next_lines = 0;
    if (passes >= 2) {
      if (i1 < k8) {
        next = w + i1;
        next_rows = C;
        next_lines = (std::min(i1 + kChunk, k8) - i1 + 15) / 16;
      } else if (more_cols > 0) {
        next = w + C * ldw;
        next_rows = std::min(more_cols, kColTile);
        next_lines = (std::min(kChunk, k8) + 15) / 16;
      }
    }
    int prefetched = 0;
    const auto prefetch_share = [&](int pass) SRG_LAMBDA_INLINE {
      const int upto = (pass + 1) * next_lines / passes;
      for (int l = prefetched; l < upto; ++l)
        for (int c = 0; c < next_rows; ++c) __builtin_prefetch(next + c * ldw + l * 16, 0, 3);
      prefetched = upto;
    };
    for (int r = 0; r < pairs; r += 2) {
      prefetch_share(r / 2);
      tile<C, 2>(x + int64_t{r} * k, k, w, ldw, i0, i1, acc + r * kSlots, first);
    }
    if (pairs < gn) {
      prefetch_share(passes - 1);
      tile<C, 1>(x + int64_t{pairs} * k, k, w, ldw, i0, i1, acc + pairs * kSlots, first);
    }
  }
  for (int r = 0; r < pairs; r += 2)
    finish<C, 2>(x + int64_t{r} * k, k, w, ldw, k, k8, acc + r * kSlots, y + r * ldy, ldy);
  if (pairs < gn) finish<C, 1>(x + int64_t{pairs} * k, k, w, ldw, k, k8, acc + pairs * kSlots, y + pairs * ldy, ldy);
}

SRG_INLINE void small_rows_gemm_body(const float* x, int n, int k, const float* w, int cols, int ldw, float* y,
                                     int ldy) {
  v8 acc[kRowGroup * kSlots];
  for (int g0 = 0; g0 < n; g0 += kRowGroup) {
    const int gn = std::min(kRowGroup, n - g0);
    const float* xg = x + int64_t{g0} * k;
    float* yg = y + int64_t{g0} * ldy;
    int c0 = 0;
    for (; c0 + kColTile <= cols; c0 += kColTile)
      column_tile<kColTile>(xg, gn, k, w + int64_t{c0} * ldw, ldw, yg + c0, ldy, acc, cols - c0 - kColTile);
    switch (cols - c0) {
      case 3: column_tile<3>(xg, gn, k, w + int64_t{c0} * ldw, ldw, yg + c0, ldy, acc, 0); break;
      case 2: column_tile<2>(xg, gn, k, w + int64_t{c0} * ldw, ldw, yg + c0, ldy, acc, 0); break;
      case 1: column_tile<1>(xg, gn, k, w + int64_t{c0} * ldw, ldw, yg + c0, ldy, acc, 0); break;
      default: break;
    }
  }
}

static_assert(kChunk % 32 == 0, "chunks must keep every split aligned");
static_assert(kSplit<3, 1> * 3 <= kSlots && kSplit<4, 1> * 4 <= kSlots && kSplit<2, 1> * 2 <= kSlots,
              "accumulator slots");

}  // namespace

__attribute__((target_clones("arch=x86-64-v3", "default"))) void small_rows_gemm(const float* x, int n, int k,
                                                                                const float* w, int cols, int ldw,
                                                                                float* y, int ldy) {
  small_rows_gemm_body(x, n, k, w, cols, ldw, y, ldy);
}

#else  // portable fallback

void small_rows_gemm(const float* x, int n, int k, const float* w, int cols, int ldw, float* y, int ldy) {
  for (int r = 0; r < n; ++r) {
    const float* xr = x + int64_t{r} * k;
    for (int c = 0; c < cols; ++c) {
      const float* wc = w + int64_t{c} * ldw;
      float sum = 0.0f;
      for (int i = 0; i < k; ++i) sum += xr[i] * wc[i];
      y[int64_t{r} * ldy + c] = sum;
    }
  }
}

#endif

}  // namespace moeflow::cpu
