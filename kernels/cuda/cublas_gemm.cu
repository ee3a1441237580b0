#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <limits>
#include <string>
#include <vector>

#include "kernels/cuda/blas_check.cuh"
#include "kernels/cuda/check.cuh"
#include "kernels/cuda/cublas_gemm.hpp"
#include "kernels/cuda/elementwise.hpp"
#include "kernels/cuda/measured_gemm.hpp"

namespace moeflow::cuda {

namespace {

// cuBLAS's legacy API takes int sizes; anything larger is refused rather than truncated.
int to_int(int64_t v, const char* what) {
  if (v < 0 || v > std::numeric_limits<int>::max())
    fail_input(std::string("cuBLAS GEMM: ") + what + " = " + std::to_string(v) + " is outside [0, INT_MAX]");
  return static_cast<int>(v);
}

cublasHandle_t handle_of(const LaneContext& ctx) {
  if (ctx.blas == nullptr) fail_input("cuBLAS GEMM: the lane has no cuBLAS handle");
  return ctx.blas;
}

bool aligned(const void* p, std::size_t bytes) { return reinterpret_cast<std::uintptr_t>(p) % bytes == 0; }

std::size_t align256(std::size_t bytes) { return (bytes + 255) & ~static_cast<std::size_t>(255); }

void check_shape(const char* who, int experts, int hidden, int intermediate) {
  if (experts < 0 || hidden <= 0 || intermediate <= 0)
    fail_input(std::string(who) + ": bad shape E=" + std::to_string(experts) + " H=" + std::to_string(hidden) +
               " I=" + std::to_string(intermediate));
}

// offsets[0] == 0 and non-decreasing; returns the row count offsets[E].
int64_t check_host_offsets(const char* who, const int32_t* host_offsets, int experts) {
  if (host_offsets == nullptr) fail_input(std::string(who) + ": no offsets");
  if (host_offsets[0] != 0) fail_input(std::string(who) + ": offsets[0] = " + std::to_string(host_offsets[0]) + ", not 0");
  for (int e = 0; e < experts; ++e)
    if (host_offsets[e + 1] < host_offsets[e])
      fail_input(std::string(who) + ": offsets decrease at expert " + std::to_string(e));
  return host_offsets[experts];
}

// The host scratch of experts_grouped_batched may only be rewritten once the copy that reads it has
// run: the event is recorded after that copy and waited on before the function returns, on error
// paths too (the destructor), so no caller can race it.
class CopyFence {
 public:
  CopyFence() = default;
  CopyFence(const CopyFence&) = delete;
  CopyFence& operator=(const CopyFence&) = delete;
  ~CopyFence() {
    if (event_ == nullptr) return;
    if (!waited_) (void)cudaEventSynchronize(event_);
    (void)cudaEventDestroy(event_);
  }
  void record(cudaStream_t stream) {
    MOEFLOW_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming));
    MOEFLOW_CUDA_CHECK(cudaEventRecord(event_, stream));
  }
  void wait() {
    if (event_ == nullptr) return;
    waited_ = true;
    MOEFLOW_CUDA_CHECK(cudaEventSynchronize(event_));
  }

 private:
  cudaEvent_t event_ = nullptr;
  bool waited_ = false;
};

// --- padded strategy: scatter into [E, C, H] and gather back -------------------------------------
// V is the access unit: uint4 (8 bf16) when rows are 16-byte aligned, else one bf16. A flat index
// walks (expert, slot, vector) so each warp reads and writes contiguous bytes.

// The routed row held by flat padded index i (expert e, slot s, vector v), or -1 for a padding slot.
__device__ __forceinline__ int64_t routed_row_of(int64_t i, const int32_t* offsets, int64_t capacity,
                                                 int64_t vecs_per_row) {
  const int64_t slot = i / vecs_per_row;
  const int64_t e = slot / capacity;
  const int64_t s = slot - e * capacity;
  const int64_t begin = offsets[e];
  return s < offsets[e + 1] - begin ? begin + s : -1;
}

template <class V>
__global__ void scatter_padded_kernel(const V* __restrict__ rows, const int32_t* __restrict__ offsets, int experts,
                                      int64_t capacity, int64_t vecs_per_row, V* __restrict__ padded,
                                      int* __restrict__ error_flag, int overflow_bit) {
  const int64_t start = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = start; e < experts; e += stride)
    if (static_cast<int64_t>(offsets[e + 1]) - offsets[e] > capacity) atomicOr(error_flag, overflow_bit);
  const int64_t total = experts * capacity * vecs_per_row;
  for (int64_t i = start; i < total; i += stride) {
    const int64_t row = routed_row_of(i, offsets, capacity, vecs_per_row);
    padded[i] = row >= 0 ? rows[row * vecs_per_row + i % vecs_per_row] : V{};
  }
}

template <class V>
__global__ void gather_padded_kernel(const V* __restrict__ padded, const int32_t* __restrict__ offsets, int experts,
                                     int64_t capacity, int64_t vecs_per_row, V* __restrict__ out) {
  const int64_t start = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t total = experts * capacity * vecs_per_row;
  for (int64_t i = start; i < total; i += stride) {
    const int64_t row = routed_row_of(i, offsets, capacity, vecs_per_row);
    if (row >= 0) out[row * vecs_per_row + i % vecs_per_row] = padded[i];
  }
}

constexpr int kThreads = 256;

unsigned grid_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::clamp<int64_t>(blocks, 1, 65535 * 8));
}

void launch_scatter(const uint16_t* rows, const int32_t* offsets, int experts, int64_t capacity, int hidden,
                    uint16_t* padded, int* error_flag, cudaStream_t stream) {
  const bool vec = hidden % 8 == 0 && aligned(rows, 16) && aligned(padded, 16);
  const int64_t vecs_per_row = vec ? hidden / 8 : hidden;
  const unsigned grid = grid_for(std::max<int64_t>(experts * capacity * vecs_per_row, experts));
  if (vec)
    scatter_padded_kernel<uint4><<<grid, kThreads, 0, stream>>>(reinterpret_cast<const uint4*>(rows), offsets, experts,
                                                                capacity, vecs_per_row, reinterpret_cast<uint4*>(padded),
                                                                error_flag, kErrorCapacityOverflow);
  else
    scatter_padded_kernel<uint16_t><<<grid, kThreads, 0, stream>>>(rows, offsets, experts, capacity, vecs_per_row,
                                                                   padded, error_flag, kErrorCapacityOverflow);
  MOEFLOW_CUDA_LAUNCH_CHECK();
}

void launch_gather(const uint16_t* padded, const int32_t* offsets, int experts, int64_t capacity, int hidden,
                   uint16_t* out, cudaStream_t stream) {
  const bool vec = hidden % 8 == 0 && aligned(out, 16) && aligned(padded, 16);
  const int64_t vecs_per_row = vec ? hidden / 8 : hidden;
  const unsigned grid = grid_for(experts * capacity * vecs_per_row);
  if (vec)
    gather_padded_kernel<uint4><<<grid, kThreads, 0, stream>>>(reinterpret_cast<const uint4*>(padded), offsets,
                                                               experts, capacity, vecs_per_row,
                                                               reinterpret_cast<uint4*>(out));
  else
    gather_padded_kernel<uint16_t><<<grid, kThreads, 0, stream>>>(padded, offsets, experts, capacity, vecs_per_row, out);
  MOEFLOW_CUDA_LAUNCH_CHECK();
}

}  // namespace

// --- handles ----------------------------------------------------------------------------------------

void set_blas_sm_target(BlasHandle h, int sms) { MOEFLOW_CUBLAS_CHECK(cublasSetSmCountTarget(h, sms)); }

BlasHandle create_blas_handle(Stream s, void* workspace, std::size_t bytes) {
  if (bytes > 0 && workspace == nullptr) fail_input("create_blas_handle: workspace of " + std::to_string(bytes) + " bytes is null");
  if (!aligned(workspace, 256)) fail_input("create_blas_handle: the cuBLAS workspace must be 256-byte aligned");
  cublasHandle_t handle = nullptr;
  MOEFLOW_CUBLAS_CHECK(cublasCreate(&handle));
  try {
    // cublasSetStream resets the workspace to cuBLAS's own pool, so the workspace comes after it.
    MOEFLOW_CUBLAS_CHECK(cublasSetStream(handle, s));
    MOEFLOW_CUBLAS_CHECK(cublasSetWorkspace(handle, workspace, bytes));
    // fp32 accumulation throughout: no split-K reduction in the bf16 output type either.
    MOEFLOW_CUBLAS_CHECK(cublasSetMathMode(
        handle, static_cast<cublasMath_t>(CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)));
  } catch (...) {
    (void)cublasDestroy(handle);
    throw;
  }
  return handle;
}

void destroy_blas_handle(BlasHandle handle) {
  if (handle != nullptr) (void)cublasDestroy(handle);
}

std::size_t recommended_blas_workspace_bytes() { return std::size_t{32} << 20; }

// --- dense ------------------------------------------------------------------------------------------

void gemm_bf16_nt(const LaneContext& ctx, int64_t m, int64_t n, int64_t k, const uint16_t* a, const uint16_t* b,
                  void* c, bool c_is_f32) {
  const int mi = to_int(m, "m"), ni = to_int(n, "n"), ki = to_int(k, "k");
  if (mi == 0 || ni == 0) return;
  if (ki == 0) {  // an empty sum; both fp32 and bf16 zero are all-zero bits
    MOEFLOW_CUDA_CHECK(cudaMemsetAsync(c, 0, static_cast<std::size_t>(m) * n * (c_is_f32 ? 4 : 2), ctx.stream));
    return;
  }
  gemm_nt_default(ctx, mi, ni, ki, a, ki, b, ki, c, c_is_f32, ni);
}

// --- (a) per-expert loop ----------------------------------------------------------------------------

void experts_per_expert_loop(const LaneContext& ctx, const uint16_t* rows, const int32_t* host_offsets, int experts,
                             int hidden, int intermediate, const uint16_t* w13, const uint16_t* w2, uint16_t* h,
                             uint16_t* act, uint16_t* out) {
  check_shape("experts_per_expert_loop", experts, hidden, intermediate);
  const int64_t total = check_host_offsets("experts_per_expert_loop", host_offsets, experts);
  if (total == 0) return;
  const int64_t H = hidden, I = intermediate;
  const int two_i = to_int(2 * I, "2I");
  // Each expert's row count is its own GEMM size, where cuBLAS's heuristic has cliffs (2x at some
  // counts near 500 rows on mixtral-8x7b): the algorithms are chosen by measurement (cuBLAS's own
  // choice unless one of cuBLASLt's candidates is clearly faster).
  for (int e = 0; e < experts; ++e) {
    const int count = host_offsets[e + 1] - host_offsets[e];
    if (count == 0) continue;
    const int64_t first = host_offsets[e];
    gemm_nt_measured(ctx, count, two_i, hidden, rows + first * H, hidden, w13 + e * 2 * I * H, hidden, h + first * 2 * I,
                     false, two_i);
  }
  swiglu(h, total, intermediate, act, ctx.stream);
  for (int e = 0; e < experts; ++e) {
    const int count = host_offsets[e + 1] - host_offsets[e];
    if (count == 0) continue;
    const int64_t first = host_offsets[e];
    gemm_nt_measured(ctx, count, hidden, intermediate, act + first * I, intermediate, w2 + e * H * I, intermediate,
                     out + first * H, false, hidden);
  }
}

// --- (b) grouped batched ----------------------------------------------------------------------------

// Six arrays of E pointers: A, B, C of the first layer, then of the second.
std::size_t grouped_pointer_bytes(int experts) { return 6 * static_cast<std::size_t>(std::max(experts, 0)) * sizeof(void*); }

void experts_grouped_batched(const LaneContext& ctx, const uint16_t* rows, const int32_t* host_offsets, int experts,
                             int hidden, int intermediate, const uint16_t* w13, const uint16_t* w2, uint16_t* h,
                             uint16_t* act, uint16_t* out, void* device_pointer_scratch, void* host_pointer_scratch) {
  check_shape("experts_grouped_batched", experts, hidden, intermediate);
  const int64_t total = check_host_offsets("experts_grouped_batched", host_offsets, experts);
  if (total == 0) return;
  if (device_pointer_scratch == nullptr || host_pointer_scratch == nullptr || !aligned(device_pointer_scratch, 8) ||
      !aligned(host_pointer_scratch, 8))
    fail_input("experts_grouped_batched: pointer scratches must be non-null and 8-byte aligned");
  cublasHandle_t handle = handle_of(ctx);
  const int64_t H = hidden, I = intermediate;
  const int two_i = to_int(2 * I, "2I");

  // One group per touched expert, each of one problem. In column-major terms (see gemm_nt_default) the
  // weights are cuBLAS's A (transposed) and the rows its B, so only n (the row count) varies.
  std::vector<int> counts;
  counts.reserve(static_cast<std::size_t>(experts));
  for (int e = 0; e < experts; ++e)
    if (host_offsets[e + 1] > host_offsets[e]) counts.push_back(host_offsets[e + 1] - host_offsets[e]);
  const int groups = static_cast<int>(counts.size());

  // Pack the six arrays with stride `groups` so one copy of 6·groups pointers carries them all.
  void** host_ptrs = static_cast<void**>(host_pointer_scratch);
  void** a1 = host_ptrs;
  void** b1 = a1 + groups;
  void** c1 = b1 + groups;
  void** a2 = c1 + groups;
  void** b2 = a2 + groups;
  void** c2 = b2 + groups;
  for (int e = 0, g = 0; e < experts; ++e) {
    if (host_offsets[e + 1] == host_offsets[e]) continue;
    const int64_t first = host_offsets[e];
    a1[g] = const_cast<uint16_t*>(w13 + e * 2 * I * H);
    b1[g] = const_cast<uint16_t*>(rows + first * H);
    c1[g] = h + first * 2 * I;
    a2[g] = const_cast<uint16_t*>(w2 + e * H * I);
    b2[g] = act + first * I;
    c2[g] = out + first * H;
    ++g;
  }

  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  MOEFLOW_CUDA_CHECK(cudaStreamIsCapturing(ctx.stream, &capture));
  CopyFence fence;
  MOEFLOW_CUDA_CHECK(cudaMemcpyAsync(device_pointer_scratch, host_pointer_scratch,
                                     6 * static_cast<std::size_t>(groups) * sizeof(void*), cudaMemcpyHostToDevice,
                                     ctx.stream));
  if (capture == cudaStreamCaptureStatusNone) fence.record(ctx.stream);

  void** dev = static_cast<void**>(device_pointer_scratch);
  const std::vector<cublasOperation_t> trans_a(static_cast<std::size_t>(groups), CUBLAS_OP_T);
  const std::vector<cublasOperation_t> trans_b(static_cast<std::size_t>(groups), CUBLAS_OP_N);
  const std::vector<float> alpha(static_cast<std::size_t>(groups), 1.0f), beta(static_cast<std::size_t>(groups), 0.0f);
  const std::vector<int> group_size(static_cast<std::size_t>(groups), 1);
  const std::vector<int> hidden_v(static_cast<std::size_t>(groups), hidden);
  const std::vector<int> inter_v(static_cast<std::size_t>(groups), intermediate);
  const std::vector<int> two_i_v(static_cast<std::size_t>(groups), two_i);

  // h_e[count, 2I] = rows_e · W13ₑᵀ: m = 2I, n = count, k = H.
  MOEFLOW_CUBLAS_CHECK(cublasGemmGroupedBatchedEx(
      handle, trans_a.data(), trans_b.data(), two_i_v.data(), counts.data(), hidden_v.data(), alpha.data(),
      reinterpret_cast<const void* const*>(dev + 0 * groups), CUDA_R_16BF, hidden_v.data(),
      reinterpret_cast<const void* const*>(dev + 1 * groups), CUDA_R_16BF, hidden_v.data(), beta.data(),
      reinterpret_cast<void* const*>(dev + 2 * groups), CUDA_R_16BF, two_i_v.data(), groups, group_size.data(),
      CUBLAS_COMPUTE_32F));
  swiglu(h, total, intermediate, act, ctx.stream);
  // out_e[count, H] = act_e · W2ₑᵀ: m = H, n = count, k = I.
  MOEFLOW_CUBLAS_CHECK(cublasGemmGroupedBatchedEx(
      handle, trans_a.data(), trans_b.data(), hidden_v.data(), counts.data(), inter_v.data(), alpha.data(),
      reinterpret_cast<const void* const*>(dev + 3 * groups), CUDA_R_16BF, inter_v.data(),
      reinterpret_cast<const void* const*>(dev + 4 * groups), CUDA_R_16BF, inter_v.data(), beta.data(),
      reinterpret_cast<void* const*>(dev + 5 * groups), CUDA_R_16BF, hidden_v.data(), groups, group_size.data(),
      CUBLAS_COMPUTE_32F));
  fence.wait();
}

// --- (c) padded strided batched ---------------------------------------------------------------------

std::size_t padded_scratch_bytes(int experts, int64_t capacity, int hidden, int intermediate) {
  const std::size_t slots = static_cast<std::size_t>(std::max(experts, 0)) * static_cast<std::size_t>(std::max<int64_t>(capacity, 0));
  const std::size_t h = static_cast<std::size_t>(std::max(hidden, 0)), i = static_cast<std::size_t>(std::max(intermediate, 0));
  return align256(slots * h * 2) + align256(slots * 2 * i * 2) + align256(slots * i * 2);
}

void experts_padded_strided_batched(const LaneContext& ctx, const uint16_t* rows, const int32_t* offsets, int experts,
                                    int64_t capacity, int hidden, int intermediate, const uint16_t* w13,
                                    const uint16_t* w2, void* scratch, uint16_t* out) {
  check_shape("experts_padded_strided_batched", experts, hidden, intermediate);
  if (capacity < 0) fail_input("experts_padded_strided_batched: negative capacity");
  if (ctx.error_flag == nullptr) fail_input("experts_padded_strided_batched: the lane has no error flag to report overflow");
  if (experts == 0) return;
  if (!aligned(scratch, 256)) fail_input("experts_padded_strided_batched: scratch must be 256-byte aligned");
  const int64_t H = hidden, I = intermediate, slots = experts * capacity;
  auto* padded_rows = static_cast<uint16_t*>(scratch);  // later the padded output: rows are dead after GEMM1
  auto* padded_h = reinterpret_cast<uint16_t*>(static_cast<char*>(scratch) + align256(slots * H * 2));
  auto* padded_act = reinterpret_cast<uint16_t*>(reinterpret_cast<char*>(padded_h) + align256(slots * 2 * I * 2));

  // Also flags overflow when capacity == 0; then there is nothing else to compute.
  launch_scatter(rows, offsets, experts, capacity, hidden, padded_rows, ctx.error_flag, ctx.stream);
  if (capacity == 0) return;
  cublasHandle_t handle = handle_of(ctx);
  const int cap = to_int(capacity, "capacity");
  const int two_i = to_int(2 * I, "2I");
  const float alpha = 1.0f, beta = 0.0f;
  // Per expert, column-major: h_eᵀ[2I, C] = W13ₑ(as k×m, transposed) · rows_eᵀ.
  MOEFLOW_CUBLAS_CHECK(cublasGemmStridedBatchedEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, two_i, cap, hidden, &alpha, w13,
                                                  CUDA_R_16BF, hidden, 2 * I * H, padded_rows, CUDA_R_16BF, hidden,
                                                  capacity * H, &beta, padded_h, CUDA_R_16BF, two_i, capacity * 2 * I,
                                                  experts, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  swiglu(padded_h, slots, intermediate, padded_act, ctx.stream);
  uint16_t* padded_out = padded_rows;
  MOEFLOW_CUBLAS_CHECK(cublasGemmStridedBatchedEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, hidden, cap, intermediate, &alpha,
                                                  w2, CUDA_R_16BF, intermediate, H * I, padded_act, CUDA_R_16BF,
                                                  intermediate, capacity * I, &beta, padded_out, CUDA_R_16BF, hidden,
                                                  capacity * H, experts, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  launch_gather(padded_out, offsets, experts, capacity, hidden, out, ctx.stream);
}

namespace {

// Pointer arrays of experts_rows_batched, one entry per permuted row r: the expert owning r is the
// last e with offsets[e] <= r (binary search). Rows past offsets[E] (ids the permutation set aside,
// which the dispatch's scatter leaves unwritten) point at a real expert and are computed harmlessly
// from whatever those rows hold: they have no slot, so the combine skips them.
__global__ void row_pointers_kernel(const int32_t* offsets, int experts, int64_t rows, int64_t hidden,
                                    int64_t intermediate, const uint16_t* x_rows, const uint16_t* w13, const uint16_t* w2,
                                    uint16_t* h, uint16_t* act, uint16_t* out, const void** ptrs) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= rows) return;
  int lo = 0, hi = experts - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= r) lo = mid;
    else hi = mid - 1;
  }
  const int64_t e = lo, H = hidden, I = intermediate;
  ptrs[0 * rows + r] = x_rows + r * H;
  ptrs[1 * rows + r] = w13 + e * 2 * I * H;
  ptrs[2 * rows + r] = h + r * 2 * I;
  ptrs[3 * rows + r] = act + r * I;
  ptrs[4 * rows + r] = w2 + e * H * I;
  ptrs[5 * rows + r] = out + r * H;
}

}  // namespace

std::size_t rows_batched_pointer_bytes(int64_t rows) { return 6 * static_cast<std::size_t>(std::max<int64_t>(rows, 0)) * sizeof(void*); }

void experts_rows_batched(const LaneContext& ctx, const uint16_t* rows, const int32_t* offsets, int experts,
                          int64_t total_rows, int hidden, int intermediate, const uint16_t* w13, const uint16_t* w2,
                          uint16_t* h, uint16_t* act, uint16_t* out, void* pointer_scratch) {
  check_shape("experts_rows_batched", experts, hidden, intermediate);
  if (experts == 0 || total_rows == 0) return;
  if (!aligned(pointer_scratch, 8)) fail_input("experts_rows_batched: pointer scratch must be 8-byte aligned");
  const int batch = to_int(total_rows, "rows");
  auto** ptrs = static_cast<const void**>(pointer_scratch);
  const int threads = 256;
  row_pointers_kernel<<<static_cast<unsigned>((total_rows + threads - 1) / threads), threads, 0, ctx.stream>>>(
      offsets, experts, total_rows, hidden, intermediate, rows, w13, w2, h, act, out, ptrs);
  MOEFLOW_CUDA_LAUNCH_CHECK();
  cublasHandle_t handle = handle_of(ctx);
  const float alpha = 1.0f, beta = 0.0f;
  const int two_i = to_int(2 * static_cast<int64_t>(intermediate), "2I");
  const void* const* a1 = ptrs + 0 * total_rows;
  const void* const* b1 = ptrs + 1 * total_rows;
  void* const* c1 = const_cast<void* const*>(ptrs + 2 * total_rows);
  const void* const* a2 = ptrs + 3 * total_rows;
  const void* const* b2 = ptrs + 4 * total_rows;
  void* const* c2 = const_cast<void* const*>(ptrs + 5 * total_rows);
  // Per row, column-major: h_rᵀ[2I, 1] = W13ₑ(as H×2I, transposed) · x_rᵀ; then out_rᵀ[H, 1] likewise.
  MOEFLOW_CUBLAS_CHECK(cublasGemmBatchedEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, two_i, 1, hidden, &alpha, b1, CUDA_R_16BF,
                                           hidden, a1, CUDA_R_16BF, hidden, &beta, c1, CUDA_R_16BF, two_i, batch,
                                           CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  swiglu(h, total_rows, intermediate, act, ctx.stream);
  MOEFLOW_CUBLAS_CHECK(cublasGemmBatchedEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, hidden, 1, intermediate, &alpha, b2,
                                           CUDA_R_16BF, intermediate, a2, CUDA_R_16BF, intermediate, &beta, c2,
                                           CUDA_R_16BF, hidden, batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace moeflow::cuda
