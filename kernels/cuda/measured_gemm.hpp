#pragma once
// A GEMM whose cuBLASLt algorithm is chosen by measurement instead of by cuBLAS's heuristic alone.
//
// Why: the heuristic has cliffs. Mixtral-8x7b's expert GEMM x·w13ᵀ (N = 28672, K = 4096) at ~500 rows,
// the per-expert loop's size in a 4-chunk layer, runs 158 µs with one kernel and 283-293 µs with the
// one the heuristic picks for some row counts (3 of 8 experts in one chunk; bench/NOTES.md, "cuBLAS's
// heuristic cliffs"), while another of its own candidates takes ~160.
//
// How: the first call of a shape below kMeasuredBelowRows rows (row count rounded up to a bucket of
// kMeasuredRowBucket rows, and N, K, leading dimensions, output type, device) times cuBLAS's own
// choice (cublasGemmEx, what gemm_nt_default runs) and cuBLASLt's first kMeasuredCandidates
// candidates on the caller's stream with its own operands, and keeps for the bucket the fastest, but
// cuBLAS's own choice unless a candidate takes at most kMeasuredSwitchGain of its time. Later
// calls of the bucket run the kept choice (a cuBLASLt algorithm after cuBLASLt's check that it
// supports their row count, else cuBLAS's own choice). While the stream is being captured into a
// CUDA graph nothing is timed: a known choice runs, else cuBLAS's own.
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
// A candidate replaces cuBLAS's own choice where it takes at most 97% of its time, and only below
// kMeasuredBelowRows rows. Measured on the H100 (mixtral-8x7b's per-expert loop, same call, two
// processes each, bench/NOTES.md "cuBLAS's heuristic cliffs and measured algorithms"): at ~512 rows
// per expert (T=2048, and T=8192 in 4 chunks) the loop ran 5-9% / 3-7% faster; at 2048 rows (T=8192)
// 5.5% slower, its choices timed back to back (operands warm in L2) not holding in the loop, with
// the threshold at 97% and at 90% alike; with it at 90% the gains at 512 rows went too. The cliffs
// were at 384-1056 rows.
inline constexpr double kMeasuredSwitchGain = 0.97;
inline constexpr int kMeasuredBelowRows = 1024;

// Row-major C[m, n] = A[m, k]·B[n, k]ᵀ: A, B bf16 (leading dimensions lda, ldb), C bf16 or fp32 (ldc),
// fp32 accumulation, on ctx.stream with the lane's cuBLAS handle and workspace. Device pointers.
void gemm_nt_measured(const LaneContext& ctx, int m, int n, int k, const void* a, int lda, const void* b, int ldb, void* c,
                      bool c_is_f32, int ldc);

// The same product with cuBLAS's own choice of algorithm (cublasGemmEx), never timed.
void gemm_nt_default(const LaneContext& ctx, int m, int n, int k, const void* a, int lda, const void* b, int ldb, void* c,
                     bool c_is_f32, int ldc);

// What the process has chosen so far (for tests and reports): the number of buckets measured, and
// whether the last gemm_nt_measured call of this thread ran a cuBLASLt algorithm instead of
// cuBLAS's own choice.
struct MeasuredGemmStats {
  int buckets_measured = 0;
  bool last_call_switched = false;
};
MeasuredGemmStats measured_gemm_stats();

}  // namespace moeflow::cuda
