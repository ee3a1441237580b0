// Probe, not part of the build: do the per-expert loop's cuBLAS GEMMs leave the machine idle in each
// GEMM's last wave, and would issuing the experts on several streams fill it? mixtral-8x7b's experts
// at ~512 rows each (T = 2048 unchunked, or each of 4 chunks of T = 8192; issue 5's 4-chunk ratio and
// the sweep's worst mixtral point): GEMM 1 [R, 4096] x [4096, 28672] has ~448 tiles of 128 x 256
// (3.4 waves on 132 SMs), GEMM 2 [R, 14336] x [14336, 4096] only ~64. Times, CUDA events around the
// whole set of 8 experts, median of 30 after 5: the loop on 1, 2, 4 and 8 streams (experts dealt
// round-robin, joined by events), and the strided-batched GEMM padded to the largest expert (what
// the engine plans there), for GEMM 1 and GEMM 2 alone and the two back to back.
// Built and run on the GPU machine from the repository root:
//   nvcc -O3 -std=c++17 -arch=sm_90a -I. bench/probes/loop_streams.cu -lcublas -o /tmp/loop && /tmp/loop
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "bench/probes/probe_common.cuh"

namespace {

__global__ void fill(uint16_t* p, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n; i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    uint64_t z = (i + seed) * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 31)) * 0xbf58476d1ce4e5b9ull;
    const float u = static_cast<float>((z >> 40) & 0xffffff) / 16777216.0f * 2.0f - 1.0f;
    p[i] = static_cast<uint16_t>(__float_as_uint(u * 0.05f) >> 16);
  }
}

// y [m, n] = x [m, k] · w [n, k]ᵀ, row-major bf16, fp32 accumulation.
void gemm(cublasHandle_t h, int m, int n, int k, const uint16_t* x, const uint16_t* w, uint16_t* y) {
  const float one = 1.0f, zero = 0.0f;
  CB(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &one, w, CUDA_R_16BF, k, x, CUDA_R_16BF, k, &zero, y, CUDA_R_16BF, n,
                  CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}
void gemm_batched(cublasHandle_t h, int batch, int m, int n, int k, const uint16_t* x, const uint16_t* w, uint16_t* y) {
  const float one = 1.0f, zero = 0.0f;
  CB(cublasGemmStridedBatchedEx(h, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &one, w, CUDA_R_16BF, k, int64_t{n} * k, x, CUDA_R_16BF, k,
                                int64_t{m} * k, &zero, y, CUDA_R_16BF, n, int64_t{m} * n, batch, CUBLAS_COMPUTE_32F,
                                CUBLAS_GEMM_DEFAULT));
}

}  // namespace

int main() {
  constexpr int E = 8, H = 4096, I = 14336, kStreamsMax = 8;
  for (const int mean_rows : {512, 1024, 2048}) {
    // Rows per expert as a random top-2 routing of E·mean/2 tokens gives them.
    std::mt19937 rng(7 + mean_rows);
    std::vector<int> rows(E, 0);
    for (int t = 0; t < E * mean_rows / 2; ++t) {
      const int a = static_cast<int>(rng() % E);
      int b = static_cast<int>(rng() % (E - 1));
      if (b >= a) ++b;
      ++rows[a];
      ++rows[b];
    }
    const int most = *std::max_element(rows.begin(), rows.end());
    int total = 0;
    for (int r : rows) total += r;
    uint16_t *w13, *w2, *x, *h, *act, *y;
    CK(cudaMalloc(&w13, size_t(E) * 2 * I * H * 2));
    CK(cudaMalloc(&w2, size_t(E) * H * I * 2));
    CK(cudaMalloc(&x, size_t(E) * most * H * 2));
    CK(cudaMalloc(&h, size_t(E) * most * 2 * I * 2));
    CK(cudaMalloc(&act, size_t(E) * most * I * 2));
    CK(cudaMalloc(&y, size_t(E) * most * H * 2));
    fill<<<1024, 256>>>(w13, size_t(E) * 2 * I * H, 1);
    fill<<<1024, 256>>>(w2, size_t(E) * H * I, 2);
    fill<<<1024, 256>>>(x, size_t(E) * most * H, 3);
    fill<<<1024, 256>>>(act, size_t(E) * most * I, 4);
    CK(cudaDeviceSynchronize());
    cudaStream_t streams[kStreamsMax];
    cublasHandle_t handles[kStreamsMax];
    cudaEvent_t fork, joins[kStreamsMax];
    CK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
    for (int s = 0; s < kStreamsMax; ++s) {
      CK(cudaStreamCreateWithFlags(&streams[s], cudaStreamNonBlocking));
      CB(cublasCreate(&handles[s]));
      CB(cublasSetStream(handles[s], streams[s]));
      CK(cudaEventCreateWithFlags(&joins[s], cudaEventDisableTiming));
    }
    const double flops1 = 2.0 * total * H * 2.0 * I, flops2 = 2.0 * total * I * H;
    std::printf("mixtral-8x7b experts at %d rows on average (most %d): GEMM 1 %.0f GFLOP, GEMM 2 %.0f GFLOP\n", mean_rows, most,
                flops1 * 1e-9, flops2 * 1e-9);
    // which: 1 GEMM 1 only, 2 GEMM 2 only, 3 both (each expert's GEMM 2 after its GEMM 1 on its stream).
    const auto loop = [&](int nstreams, int which) {
      CK(cudaEventRecord(fork, streams[0]));
      for (int s = 1; s < nstreams; ++s) CK(cudaStreamWaitEvent(streams[s], fork, 0));
      for (int e = 0; e < E; ++e) {
        const int s = e % nstreams;
        const size_t xo = size_t(e) * most;
        if (which & 1) gemm(handles[s], rows[e], 2 * I, H, x + xo * H, w13 + size_t(e) * 2 * I * H, h + xo * 2 * I);
        if (which & 2) gemm(handles[s], rows[e], H, I, act + xo * I, w2 + size_t(e) * H * I, y + xo * H);
      }
      for (int s = 1; s < nstreams; ++s) {
        CK(cudaEventRecord(joins[s], streams[s]));
        CK(cudaStreamWaitEvent(streams[0], joins[s], 0));
      }
    };
    const auto padded = [&](int which) {
      if (which & 1) gemm_batched(handles[0], E, most, 2 * I, H, x, w13, h);
      if (which & 2) gemm_batched(handles[0], E, most, H, I, act, w2, y);
    };
    const auto timed = [&](auto launch) {
      cudaEvent_t a, b;
      CK(cudaEventCreate(&a));
      CK(cudaEventCreate(&b));
      std::vector<float> t;
      for (int r = 0; r < 35; ++r) {
        CK(cudaEventRecord(a, streams[0]));
        launch();
        CK(cudaEventRecord(b, streams[0]));
        CK(cudaEventSynchronize(b));
        float ms;
        CK(cudaEventElapsedTime(&ms, a, b));
        if (r >= 5) t.push_back(ms * 1000);
      }
      std::sort(t.begin(), t.end());
      return t[t.size() / 2];
    };
    for (int which : {1, 2, 3}) {
      const double flops = (which & 1 ? flops1 : 0) + (which & 2 ? flops2 : 0);
      const char* what = which == 1 ? "GEMM 1" : which == 2 ? "GEMM 2" : "both";
      for (int ns : {1, 2, 4, 8}) {
        const float us = timed([&] { loop(ns, which); });
        std::printf("  %-7s loop on %d stream(s)      %8.1f us  %6.1f TFLOP/s\n", what, ns, us, flops / us * 1e-6);
      }
      const float us = timed([&] { padded(which); });
      std::printf("  %-7s padded strided-batched %8.1f us  %6.1f TFLOP/s (on the routed rows)\n", what, us, flops / us * 1e-6);
    }
    for (int s = 0; s < kStreamsMax; ++s) {
      CB(cublasDestroy(handles[s]));
      CK(cudaStreamDestroy(streams[s]));
    }
    CK(cudaFree(w13));
    CK(cudaFree(w2));
    CK(cudaFree(x));
    CK(cudaFree(h));
    CK(cudaFree(act));
    CK(cudaFree(y));
  }
  return 0;
}
