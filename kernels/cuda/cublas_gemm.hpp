#pragma once
// cuBLAS-backed GEMMs: the dense bf16 product (router logits, shared experts) and three strategies
// for the routed experts' grouped SwiGLU MLP, which the kernel selection compares. No CUDA headers:
// handles and streams are the forward-declared types of lane_context.hpp, bf16 is raw uint16_t bits,
// and every pointer is device memory unless its name says host.
//
// Shared conventions of the experts strategies:
//   rows  [R, H]   bf16, grouped by expert: expert e owns rows [offsets[e], offsets[e+1]), R = offsets[E]
//   w13   [E, 2I, H] bf16 (rows [0, I) = W1 gate_proj, [I, 2I) = W3 up_proj);  w2 [E, H, I] bf16
//   out   [R, H]   bf16, row r holds (silu(x·W1ₑᵀ) ⊙ x·W3ₑᵀ)·W2ₑᵀ for x = rows[r], in the same order
// All products accumulate in fp32 (CUBLAS_COMPUTE_32F, reduced-precision split-K reductions
// disallowed on handles made by create_blas_handle); h and act are rounded to bf16 between stages.
// Everything is issued on ctx.stream through ctx.blas; nothing synchronises the device unless said.
#include <cstddef>
#include <cstdint>

#include "kernels/cuda/lane_context.hpp"

namespace moeflow::cuda {

// A cuBLAS handle bound to `s`, using `workspace` (device memory, 256-byte aligned, owned by the caller
// and outliving the handle; bytes == 0: no workspace, which is always capturable), default math mode
// with reduced-precision reductions disallowed. Throws Error(resource) on failure. Don't rebind it with
// cublasSetStream later: that silently drops the workspace back to cuBLAS's own pool (not capturable).
BlasHandle create_blas_handle(Stream s, void* workspace, std::size_t bytes);
// The SMs cuBLAS's kernels on `h` aim to use (0: all): LaneContext::sm_count.
void set_blas_sm_target(BlasHandle h, int sms);
// Null is a no-op. Never throws (used on teardown paths).
void destroy_blas_handle(BlasHandle handle);
// What NVIDIA recommends per handle on Hopper (32 MiB); enough for earlier GPUs as well.
std::size_t recommended_blas_workspace_bytes();

// C[m, n] = A[m, k] · B[n, k]ᵀ, all row-major; A and B bf16, C fp32 (c_is_f32) or bf16.
// m == 0 or n == 0: nothing; k == 0: C is zeroed.
void gemm_bf16_nt(const LaneContext& ctx, int64_t m, int64_t n, int64_t k, const uint16_t* a, const uint16_t* b,
                  void* c, bool c_is_f32);

// (a) One cublasGemmEx per touched expert for each layer, one swiglu over all R rows between them.
// host_offsets is HOST memory [E+1]; h [R, 2I] and act [R, I] are scratch given by the caller.
void experts_per_expert_loop(const LaneContext& ctx, const uint16_t* rows, const int32_t* host_offsets, int experts,
                             int hidden, int intermediate, const uint16_t* w13, const uint16_t* w2, uint16_t* h,
                             uint16_t* act, uint16_t* out);

// Bytes of each of the two pointer scratches of experts_grouped_batched (device and pinned host).
std::size_t grouped_pointer_bytes(int experts);
// (b) One cublasGemmGroupedBatchedEx per layer, one group (of one problem) per touched expert.
// cuBLAS reads the A/B/C pointer arrays from device memory: they are written into
// `host_pointer_scratch` (pinned, grouped_pointer_bytes(E), 8-byte aligned) and copied with one
// cudaMemcpyAsync on ctx.stream into `device_pointer_scratch` (same size, 8-byte aligned).
// Reuse safety: before returning, the function waits on an event recorded after that copy, so the
// host scratch may be rewritten (by the next call) as soon as this one returns. The wait is short:
// the caller has just synchronised this stream to read host_offsets, and the cuBLAS and swiglu
// launches are issued before it. Under stream capture there is no wait (nothing runs); the captured
// copy then reads the host scratch at every replay, so it belongs to that graph and must be left as is.
// The device scratch must not be touched by other work until this call's GEMMs have run (stream order).
void experts_grouped_batched(const LaneContext& ctx, const uint16_t* rows, const int32_t* host_offsets, int experts,
                             int hidden, int intermediate, const uint16_t* w13, const uint16_t* w2, uint16_t* h,
                             uint16_t* act, uint16_t* out, void* device_pointer_scratch, void* host_pointer_scratch);

// Bytes of the scratch of experts_padded_strided_batched: padded rows/out [E, C, H], padded h
// [E, C, 2I] and act [E, C, I], bf16, each region 256-byte aligned.
std::size_t padded_scratch_bytes(int experts, int64_t capacity, int hidden, int intermediate);
// (c) No host sync, so one captured graph serves any routing: `offsets` is DEVICE memory [E+1].
// Each expert's rows are scattered into a [E, capacity, H] buffer (zero-padded), two
// cublasGemmStridedBatchedEx (batch E) with swiglu between them, and a gather back into `out`.
// An expert with more than `capacity` rows sets kErrorCapacityOverflow in ctx.error_flag (required,
// non-null); only its first `capacity` rows are computed and its remaining rows of `out` are left
// unwritten, so the result is invalid and the caller must check the flag. scratch: 256-byte aligned,
// padded_scratch_bytes(E, capacity, H, I). Capacity is the caller's: max tokens unless proven lower.
void experts_padded_strided_batched(const LaneContext& ctx, const uint16_t* rows, const int32_t* offsets, int experts,
                                    int64_t capacity, int hidden, int intermediate, const uint16_t* w13,
                                    const uint16_t* w2, void* scratch, uint16_t* out);

// Bytes of the device pointer scratch of experts_rows_batched for `rows` permuted rows.
std::size_t rows_batched_pointer_bytes(int64_t rows);
// (d) For decode-sized batches: one cublasGemmBatchedEx per layer whose batch is the routed rows,
// each a 1-row product with its expert's weights; the pointer arrays are built on the device from
// `offsets` (DEVICE [E+1]), so there is no host sync and the call can be captured. Each row reads
// its expert's weights, so it pays when rows rarely share an expert (T·k <= E or so).
void experts_rows_batched(const LaneContext& ctx, const uint16_t* rows, const int32_t* offsets, int experts,
                          int64_t total_rows, int hidden, int intermediate, const uint16_t* w13, const uint16_t* w2,
                          uint16_t* h, uint16_t* act, uint16_t* out, void* pointer_scratch);

}  // namespace moeflow::cuda
