#pragma once
// What a CUDA kernel call gets besides its operands: the lane's stream and that stream's own cuBLAS
// handle and workspace (one per stream, so lanes never share cuBLAS state). No CUDA headers here:
// CUstream_st and cublasContext are the runtime's own opaque types, forward-declared.
#include <cstddef>
#include <cstdint>

struct CUstream_st;
struct CUevent_st;
struct cublasContext;

namespace moeflow::cuda {

using Stream = CUstream_st*;
using Event = CUevent_st*;
using BlasHandle = cublasContext*;

struct LaneContext {
  Stream stream = nullptr;
  BlasHandle blas = nullptr;            // bound to `stream`, workspace set
  void* blas_workspace = nullptr;       // device memory owned by the executor
  std::size_t blas_workspace_bytes = 0;
  int device = 0;
  int* error_flag = nullptr;            // device int: kernels set bits on overflow; checked after a run
  // Device ints that are zero whenever no kernel of the lane runs: a kernel may count in them (work
  // counters, arrivals) if it leaves them zero when it ends, which spares a memset before it. The
  // lane's kernels run one at a time, in stream order. Null or too small: use workspace and a memset.
  int* counters = nullptr;
  int counter_words = 0;
  // SMs a persistent kernel of this lane may fill (CUTLASS's grouped GEMM; cuBLAS's SM target is set
  // on `blas` alike); 0: all of them. Compute lanes leave some free where a communication lane runs
  // beside them, so that its NCCL kernels start while a GEMM runs instead of after it.
  int sm_count = 0;
  // A second stream for work a kernel runs beside its own (the alltoall's local copies beside the
  // transfer), forked from and joined back into `stream` through these two events.
  Stream side = nullptr;
  Event side_fork = nullptr, side_join = nullptr;
};

// Bits of LaneContext::error_flag.
inline constexpr int kErrorCapacityOverflow = 1;  // a padded strategy saw more rows than its capacity

// What the executor gives each lane as LaneContext::counters.
inline constexpr int kLaneCounterWords = 4096;

}  // namespace moeflow::cuda
