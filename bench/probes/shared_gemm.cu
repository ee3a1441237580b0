// Probe, not part of the build: how fast do cuBLAS's GEMMs run the shared expert's two products at
// small T, against a bare read of the same weights? The layer's shared branch (cuBLAS GEMM x·w13ᵀ,
// SwiGLU, GEMM act·w2ᵀ) took ~50 µs at every T ≤ 256 on qwen1.5-moe-a2.7b (69 MB of weights, 2.1×
// their read time), which is what keeps issue 3's overlap figure above 1.05. Per shape and T:
// cublasGemmEx as the executor calls it (CUBLAS_GEMM_DEFAULT), the best of cuBLASLt's heuristic
// candidates (each timed), and the bare read. Weights rotate over copies that exceed L2.
// Other shapes: `/tmp/sg NAME:N:K:T1,T2,...` (repeatable), e.g. mixtral's per-chunk expert GEMMs;
// TFLOP/s are printed where the GEMM is compute-bound.
// Built and run on the GPU machine (bench/NOTES.md has its figures):
//   nvcc -O3 -std=c++17 -arch=sm_90a -I. bench/probes/shared_gemm.cu -lcublas -lcublasLt -o /tmp/sg && /tmp/sg
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "bench/probes/probe_common.cuh"

namespace {

constexpr int kCopies = 4;  // 4 × 46 MB > L2 for the smallest weight here
constexpr int kReps = 40;

struct Shape {
  std::string name;
  int n, k;  // C[T, n] = X[T, k] · W[n, k]ᵀ
  std::vector<int> tokens;
};

// NAME:N:K:T1,T2,...
Shape parse_shape(const std::string& arg) {
  Shape s;
  std::size_t a = arg.find(':'), b = arg.find(':', a + 1), c = arg.find(':', b + 1);
  if (a == std::string::npos || b == std::string::npos || c == std::string::npos) {
    std::printf("bad shape '%s': NAME:N:K:T1,T2,...\n", arg.c_str());
    std::exit(2);
  }
  s.name = arg.substr(0, a);
  s.n = std::atoi(arg.substr(a + 1, b - a - 1).c_str());
  s.k = std::atoi(arg.substr(b + 1, c - b - 1).c_str());
  for (std::size_t p = c + 1; p < arg.size();) {
    std::size_t e = arg.find(',', p);
    if (e == std::string::npos) e = arg.size();
    s.tokens.push_back(std::atoi(arg.substr(p, e - p).c_str()));
    p = e + 1;
  }
  return s;
}

template <class F>
double median_us(cudaStream_t s, F&& launch) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  for (int i = 0; i < 5; ++i) launch(i);
  std::vector<float> ms;
  for (int i = 0; i < kReps; ++i) {
    CK(cudaEventRecord(a, s));
    launch(i);
    CK(cudaEventRecord(b, s));
    CK(cudaEventSynchronize(b));
    float t = 0;
    CK(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  CK(cudaEventDestroy(a));
  CK(cudaEventDestroy(b));
  return 1000.0 * ms[ms.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s\n", prop.name);
  cudaStream_t stream;
  CK(cudaStreamCreate(&stream));
  cublasHandle_t blas;
  CB(cublasCreate(&blas));
  CB(cublasSetStream(blas, stream));
  cublasLtHandle_t lt;
  CB(cublasLtCreate(&lt));
  const size_t ws_bytes = size_t{64} << 20;
  void* ws = nullptr;
  CK(cudaMalloc(&ws, ws_bytes));
  CB(cublasSetWorkspace(blas, ws, ws_bytes));
  unsigned* sink = nullptr;
  CK(cudaMalloc(&sink, 4));

  const std::vector<int> small = {1, 4, 8, 16, 32, 64, 128, 256};
  std::vector<Shape> shapes = {{"qwen1.5 shared w13", 11264, 2048, small}, {"qwen1.5 shared w2", 2048, 5632, small},
                               {"deepseek shared w13", 4096, 7168, small}, {"deepseek shared w2", 7168, 2048, small}};
  if (argc > 1) shapes.clear();
  for (int i = 1; i < argc; ++i) shapes.push_back(parse_shape(argv[i]));
  int most_tokens = 0;
  for (const Shape& sh : shapes)
    for (int T : sh.tokens) most_tokens = std::max(most_tokens, T);
  for (const Shape& sh : shapes) {
    const size_t w_elems = size_t(sh.n) * sh.k;
    uint16_t* w = nullptr;
    CK(cudaMalloc(&w, kCopies * w_elems * 2));
    CK(cudaMemset(w, 0x3c, kCopies * w_elems * 2));  // bf16 ~0.01: finite sums
    uint16_t *x = nullptr, *c = nullptr;
    CK(cudaMalloc(&x, size_t(most_tokens) * sh.k * 2));
    CK(cudaMalloc(&c, size_t(most_tokens) * sh.n * 2));
    CK(cudaMemset(x, 0x3c, size_t(most_tokens) * sh.k * 2));
    const double mb = w_elems * 2 / 1e6;
    const int sms = prop.multiProcessorCount;
    const double read_us = median_us(stream, [&](int i) {
      read_all<8><<<sms * 4, 256, 0, stream>>>(reinterpret_cast<const uint4*>(w + (i % kCopies) * w_elems),
                                              w_elems * 2 / 16, sink);
    });
    std::printf("\n%s: %.1f MB, bare read %.1f us (%.2f TB/s)\n", sh.name.c_str(), mb, read_us, mb / read_us);
    for (int T : sh.tokens) {
      const float alpha = 1.f, beta = 0.f;
      const double gemmex_us = median_us(stream, [&](int i) {
        CB(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, sh.n, T, sh.k, &alpha, w + (i % kCopies) * w_elems, CUDA_R_16BF,
                        sh.k, x, CUDA_R_16BF, sh.k, &beta, c, CUDA_R_16BF, sh.n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      });
      // cuBLASLt: the same column-major product C[n, T] = Wᵀ[n, k] · X[k, T].
      cublasLtMatmulDesc_t op;
      CB(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
      const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
      CB(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
      CB(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
      cublasLtMatrixLayout_t la, lb, lc;
      CB(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, sh.k, sh.n, sh.k));
      CB(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, sh.k, T, sh.k));
      CB(cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, sh.n, T, sh.n));
      cublasLtMatmulPreference_t pref;
      CB(cublasLtMatmulPreferenceCreate(&pref));
      CB(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes, sizeof ws_bytes));
      cublasLtMatmulHeuristicResult_t found[32];
      int count = 0;
      CB(cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, lc, lc, pref, 32, found, &count));
      double best = 1e30, first = 0;
      int best_i = -1;
      for (int a = 0; a < count; ++a) {
        if (found[a].state != CUBLAS_STATUS_SUCCESS) continue;
        const double us = median_us(stream, [&](int i) {
          CB(cublasLtMatmul(lt, op, &alpha, w + (i % kCopies) * w_elems, la, x, lb, &beta, c, lc, c, lc, &found[a].algo, ws,
                            ws_bytes, stream));
        });
        if (a == 0) first = us;
        if (us < best) best = us, best_i = a;
      }
      const double tflop = 2.0 * T * sh.n * sh.k / 1e12;
      // The heuristic's first choice for T rounded up to a multiple of 256, run at T (where valid).
      const int rounded = (T + 255) / 256 * 256;
      double rounded_us = -1;
      if (rounded != T) {
        cublasLtMatrixLayout_t lbr, lcr;
        CB(cublasLtMatrixLayoutCreate(&lbr, CUDA_R_16BF, sh.k, rounded, sh.k));
        CB(cublasLtMatrixLayoutCreate(&lcr, CUDA_R_16BF, sh.n, rounded, sh.n));
        cublasLtMatmulHeuristicResult_t r{};
        int n = 0;
        CB(cublasLtMatmulAlgoGetHeuristic(lt, op, la, lbr, lcr, lcr, pref, 1, &r, &n));
        cublasLtMatmulHeuristicResult_t check{};
        if (n > 0 && cublasLtMatmulAlgoCheck(lt, op, la, lb, lc, lc, &r.algo, &check) == CUBLAS_STATUS_SUCCESS)
          rounded_us = median_us(stream, [&](int i) {
            CB(cublasLtMatmul(lt, op, &alpha, w + (i % kCopies) * w_elems, la, x, lb, &beta, c, lc, c, lc, &r.algo, ws,
                              ws_bytes, stream));
          });
        cublasLtMatrixLayoutDestroy(lbr);
        cublasLtMatrixLayoutDestroy(lcr);
      } else {
        rounded_us = first;
      }
      std::printf("  T=%4d  rounded-to-256 choice %7.1f us (%5.0f TFLOP/s)\n", T, rounded_us,
                  2.0 * T * sh.n * sh.k / 1e12 / rounded_us * 1e6);
      std::printf("  T=%4d  GemmEx %7.1f us (%.2fx read, %5.0f TFLOP/s)  Lt first %7.1f  Lt best %7.1f (#%d of %d, %.2fx read, %5.0f TFLOP/s)\n",
                  T, gemmex_us, gemmex_us / read_us, tflop / gemmex_us * 1e6, first, best, best_i, count, best / read_us,
                  tflop / best * 1e6);
      cublasLtMatmulPreferenceDestroy(pref);
      cublasLtMatrixLayoutDestroy(la);
      cublasLtMatrixLayoutDestroy(lb);
      cublasLtMatrixLayoutDestroy(lc);
      cublasLtMatmulDescDestroy(op);
    }
    CK(cudaFree(w));
    CK(cudaFree(x));
    CK(cudaFree(c));
  }
  return 0;
}
