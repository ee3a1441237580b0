#include "kernels/cuda/measured_gemm.hpp"

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/cuda/blas_check.cuh"
#include "kernels/cuda/check.cuh"
#include "kernels/cuda/stopwatch.hpp"

namespace moeflow::cuda {

namespace {

constexpr int kTimedRuns = 2;  // per candidate, after one untimed run; the faster counts

struct Shape {
  int device, bucket, n, k, lda, ldb, ldc;
  bool c_is_f32;
  auto tie() const { return std::tie(device, bucket, n, k, lda, ldb, ldc, c_is_f32); }
  bool operator<(const Shape& o) const { return tie() < o.tie(); }
};

struct Choice {
  bool from_lt;              // a cuBLASLt algorithm; false: cuBLAS's own choice (cublasGemmEx)
  cublasLtMatmulAlgo_t algo;  // where from_lt
  int measured_rows;         // the row count it was timed at (others of the bucket are checked first)
};

std::mutex choices_mutex;
std::map<Shape, Choice> choices;
thread_local bool last_switched = false;

// One cuBLASLt handle per device for the process (cuBLASLt handles carry no stream).
cublasLtHandle_t lt_handle(int device) {
  static std::mutex mutex;
  static std::map<int, cublasLtHandle_t> handles;
  const std::lock_guard<std::mutex> lock(mutex);
  auto& h = handles[device];
  if (h == nullptr) MOEFLOW_CUBLAS_CHECK(cublasLtCreate(&h));
  return h;
}

// The column-major form of the row-major product (as gemm_nt_default calls cuBLAS): Cᵀ[n, m] =
// (B[n, k] read as a column-major k×n matrix, transposed) · (A read as a column-major k×m matrix).
class Problem {
 public:
  Problem(int m, int n, int k, int lda, int ldb, int ldc, bool c_is_f32) {
    try {
      MOEFLOW_CUBLAS_CHECK(cublasLtMatmulDescCreate(&op_, CUBLAS_COMPUTE_32F, CUDA_R_32F));
      const cublasOperation_t transposed = CUBLAS_OP_T, plain = CUBLAS_OP_N;
      MOEFLOW_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op_, CUBLASLT_MATMUL_DESC_TRANSA, &transposed, sizeof transposed));
      MOEFLOW_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op_, CUBLASLT_MATMUL_DESC_TRANSB, &plain, sizeof plain));
      MOEFLOW_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&b_, CUDA_R_16BF, k, n, ldb));
      MOEFLOW_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&a_, CUDA_R_16BF, k, m, lda));
      MOEFLOW_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&c_, c_is_f32 ? CUDA_R_32F : CUDA_R_16BF, n, m, ldc));
    } catch (...) {
      release();  // the destructor does not run for a constructor that throws
      throw;
    }
  }
  Problem(const Problem&) = delete;
  Problem& operator=(const Problem&) = delete;
  ~Problem() { release(); }

  // The heuristic's candidates, best first, within the workspace and without reductions in bf16.
  std::vector<cublasLtMatmulHeuristicResult_t> candidates(cublasLtHandle_t lt, std::size_t workspace, int most) const {
    cublasLtMatmulPreference_t pref = nullptr;
    MOEFLOW_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    std::vector<cublasLtMatmulHeuristicResult_t> found(static_cast<std::size_t>(most));
    int count = 0;
    cublasStatus_t status = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                                 &workspace, sizeof workspace);
    const uint32_t reductions = CUBLASLT_REDUCTION_SCHEME_MASK & ~static_cast<uint32_t>(CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE);
    if (status == CUBLAS_STATUS_SUCCESS)
      status = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &reductions,
                                                    sizeof reductions);
    if (status == CUBLAS_STATUS_SUCCESS)
      status = cublasLtMatmulAlgoGetHeuristic(lt, op_, b_, a_, c_, c_, pref, most, found.data(), &count);
    (void)cublasLtMatmulPreferenceDestroy(pref);
    if (status != CUBLAS_STATUS_SUCCESS && status != CUBLAS_STATUS_NOT_SUPPORTED) MOEFLOW_CUBLAS_CHECK(status);
    found.resize(static_cast<std::size_t>(std::max(count, 0)));
    found.erase(std::remove_if(found.begin(), found.end(),
                               [&](const auto& r) { return r.state != CUBLAS_STATUS_SUCCESS || r.workspaceSize > workspace; }),
                found.end());
    return found;
  }

  bool supports(cublasLtHandle_t lt, const cublasLtMatmulAlgo_t& algo) const {
    cublasLtMatmulHeuristicResult_t result{};
    return cublasLtMatmulAlgoCheck(lt, op_, b_, a_, c_, c_, &algo, &result) == CUBLAS_STATUS_SUCCESS;
  }

  void run(cublasLtHandle_t lt, const cublasLtMatmulAlgo_t& algo, const void* a, const void* b, void* c,
           const LaneContext& ctx) const {
    const float alpha = 1.0f, beta = 0.0f;
    MOEFLOW_CUBLAS_CHECK(cublasLtMatmul(lt, op_, &alpha, b, b_, a, a_, &beta, c, c_, c, c_, &algo, ctx.blas_workspace,
                                        ctx.blas_workspace_bytes, ctx.stream));
  }

 private:
  void release() {
    if (c_) (void)cublasLtMatrixLayoutDestroy(c_);
    if (a_) (void)cublasLtMatrixLayoutDestroy(a_);
    if (b_) (void)cublasLtMatrixLayoutDestroy(b_);
    if (op_) (void)cublasLtMatmulDescDestroy(op_);
  }

  cublasLtMatmulDesc_t op_ = nullptr;
  cublasLtMatrixLayout_t a_ = nullptr, b_ = nullptr, c_ = nullptr;
};

// Times cuBLAS's own choice and every candidate (one untimed run, then the faster of kTimedRuns)
// and returns the kept choice: the fastest candidate where it takes at most kMeasuredSwitchGain of
// cuBLAS's own choice's time, else cuBLAS's own choice.
template <class Default>
Choice measure(cublasLtHandle_t lt, const Problem& p, const std::vector<cublasLtMatmulHeuristicResult_t>& found, int m,
               const void* a, const void* b, void* c, const LaneContext& ctx, Default run_default) {
  Stopwatch watch;
  const auto fastest_of = [&](const auto& run) {
    run();
    float best = watch.milliseconds(ctx.stream, run);
    for (int r = 1; r < kTimedRuns; ++r) best = std::min(best, watch.milliseconds(ctx.stream, run));
    return best;
  };
  const float own = fastest_of(run_default);
  Choice choice{false, {}, m};
  float best = own;
  for (const auto& candidate : found) {
    const float t = fastest_of([&] { p.run(lt, candidate.algo, a, b, c, ctx); });
    if (t < best) best = t, choice.algo = candidate.algo;
  }
  choice.from_lt = best < own && best <= kMeasuredSwitchGain * own;
  return choice;
}

bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  MOEFLOW_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

}  // namespace

void gemm_nt_default(const LaneContext& ctx, int m, int n, int k, const void* a, int lda, const void* b, int ldb, void* c,
                     bool c_is_f32, int ldc) {
  if (ctx.blas == nullptr) fail_input("cuBLAS GEMM: the lane has no cuBLAS handle");
  const float alpha = 1.0f, beta = 0.0f;
  // Row-major C[m, n] = A[m, k]·B[n, k]ᵀ is column-major Cᵀ[n, m] = (Bᵀ)ᵀ·Aᵀ: B read transposed.
  MOEFLOW_CUBLAS_CHECK(cublasGemmEx(ctx.blas, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &alpha, b, CUDA_R_16BF, ldb, a,
                                    CUDA_R_16BF, lda, &beta, c, c_is_f32 ? CUDA_R_32F : CUDA_R_16BF, ldc,
                                    CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

void gemm_nt_measured(const LaneContext& ctx, int m, int n, int k, const void* a, int lda, const void* b, int ldb, void* c,
                      bool c_is_f32, int ldc) {
  if (m < 0 || n < 0 || k <= 0)
    fail_input("gemm_nt_measured: m = " + std::to_string(m) + ", n = " + std::to_string(n) + ", k = " +
               std::to_string(k) + " (m, n >= 0 and k > 0)");
  last_switched = false;
  if (m == 0 || n == 0) return;
  const auto run_default = [&] { gemm_nt_default(ctx, m, n, k, a, lda, b, ldb, c, c_is_f32, ldc); };
  if (m >= kMeasuredBelowRows) return run_default();
  const Shape shape{ctx.device, (m + kMeasuredRowBucket - 1) / kMeasuredRowBucket, n, k, lda, ldb, ldc, c_is_f32};
  Choice choice{};
  bool known = false;
  {
    const std::lock_guard<std::mutex> lock(choices_mutex);
    if (const auto it = choices.find(shape); it != choices.end()) choice = it->second, known = true;
  }
  if (known ? !choice.from_lt : capturing(ctx.stream)) return run_default();  // nothing is timed under capture
  const cublasLtHandle_t lt = lt_handle(ctx.device);
  const Problem p(m, n, k, lda, ldb, ldc, c_is_f32);
  if (!known) {
    // Timed without the lock: the stream may wait for work other host threads are still issuing.
    choice = measure(lt, p, p.candidates(lt, ctx.blas_workspace_bytes, kMeasuredCandidates), m, a, b, c, ctx, run_default);
    const std::lock_guard<std::mutex> lock(choices_mutex);
    choice = choices.emplace(shape, choice).first->second;  // another thread's choice, if it came first
  }
  // The result comes from the choice kept (after a measurement, it overwrites the candidates' output).
  if (!choice.from_lt || (choice.measured_rows != m && !p.supports(lt, choice.algo))) return run_default();
  p.run(lt, choice.algo, a, b, c, ctx);
  last_switched = true;
}

MeasuredGemmStats measured_gemm_stats() {
  const std::lock_guard<std::mutex> lock(choices_mutex);
  return {static_cast<int>(choices.size()), last_switched};
}

}  // namespace moeflow::cuda
