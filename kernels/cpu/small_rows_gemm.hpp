#pragma once
// A GEMM for a FEW token rows against large weight matrices (MoE decode on the CPU):
//   y[r*ldy + c] = Σ_i x[r*k + i] · w[c*ldw + i]   for r < n, c < cols,
// i.e. y = x · wᵀ with x [n, k] dense, w [cols, k] row-major with row stride ldw.
//
// OpenBLAS's sgemm packs the weights before multiplying, which at n ≤ 16 costs several times the
// weight read itself; this kernel streams every weight row once from memory instead (register
// tiles of 4 weight rows × 2 token rows, k blocked so the tile's x and w stay in L1).
// Single-threaded: callers parallelise over column slabs. Deterministic: the summation order
// depends only on (n, k, cols) and the CPU's instruction set, never on timing or alignment.
// Built with function multiversioning (x86-64-v3 AVX2/FMA clone + a baseline clone), so the
// binary still runs on any x86-64; other architectures get a portable loop.

namespace moeflow::cpu {

// y[r*ldy + c] = Σ_i x[r*k + i] · w[c*ldw + i] for r < n, c < cols. Any n >= 1, k >= 1, cols >= 0;
// ldw >= k, ldy >= cols. Reads no element of x or w outside those ranges; writes only y[r*ldy + c].
void small_rows_gemm(const float* x, int n, int k, const float* w, int cols, int ldw, float* y, int ldy);

// Rows up to which small_rows_gemm beats single-threaded CBLAS sgemm on the development machine
// (AMD EPYC Zen 4, OpenBLAS 0.3.21; table in small_rows_gemm.cpp). Above it, use sgemm. The win
// is 1.4-4x up to 16 rows (one pass over the weights) but only 5-10% at 17..32 for k = 1408.
inline constexpr int kSmallRowsMax = 16;

}  // namespace moeflow::cpu
