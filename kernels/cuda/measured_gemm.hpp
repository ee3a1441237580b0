#pragma once
// A GEMM whose cuBLASLt algorithm is chosen by measurement instead of by cuBLAS's heuristic alone.
//
// Why: the heuristic has cliffs. Mixtral-8x7b's expert GEMM x·w13ᵀ (N = 28672, K = 4096) at ~500 rows,
// the per-expert loop's size in a 4-chunk layer, runs 158 µs with one kernel and 283-293 µs with the
// one the heuristic picks for some row counts (3 of 8 experts in one chunk; bench/NOTES.md, "cuBLAS's
// heuristic cliffs"), while another of its own candidates takes ~160.
//
// How: the first call of a shape (row count rounded up to a bucket of kMeasuredRowBucket rows, and
// N, K, leading dimensions, output type, device) times the heuristic's first candidates on the
// caller's stream with its own operands and keeps the fastest for the bucket; later calls of the
// bucket run it (after cuBLASLt's check that it supports their row count, else the heuristic's first
// for that count). Another candidate replaces the heuristic's first only when it is clearly faster
// (kMeasuredSwitchGain), so near-ties keep cuBLAS's own choice. While the stream is being captured
// into a CUDA graph nothing is timed: a known choice runs, else the heuristic's first.
//
// The measurement waits for the caller's stream (once per bucket), so it suits the strategies that
// already wait for the host (the per-expert loop reads its counts on the host). Choices are per
// process: within one, a shape always runs the same algorithm (identical bytes run to run); another
// process may time a near-tie the other way. Split-K candidates that reduce in the output type are
// excluded (fp32 accumulation throughout, as the cuBLAS handles are set up).
#include <cstdint>

#include "kernels/cuda/lane_context.hpp"

namespace moeflow::cuda {

inline constexpr int kMeasuredRowBucket = 32;
inline constexpr int kMeasuredCandidates = 8;
inline constexpr double kMeasuredSwitchGain = 0.97;  // another candidate must take at most 97% of the first's time

// Row-major C[m, n] = A[m, k]·B[n, k]ᵀ: A, B bf16 (leading dimensions lda, ldb), C bf16 or fp32 (ldc),
// fp32 accumulation, on ctx.stream with ctx.blas_workspace. Device pointers.
void gemm_nt_measured(const LaneContext& ctx, int m, int n, int k, const void* a, int lda, const void* b, int ldb, void* c,
                      bool c_is_f32, int ldc);

// What the process has chosen so far (for tests and reports): the number of buckets measured, and
// whether the last gemm_nt_measured call of this thread ran an algorithm other than the heuristic's
// first.
struct MeasuredGemmStats {
  int buckets_measured = 0;
  bool last_call_switched = false;
};
MeasuredGemmStats measured_gemm_stats();

}  // namespace moeflow::cuda
