// Probe, not part of the build: how fast can ONE kernel that only reads N bytes from device memory run
// on this GPU, end to end, when replayed as a one-node CUDA graph (the way `moeflow bench` times the
// experts path)? That is the practical ceiling of any decode kernel streaming N bytes of weights: its
// launch, its ramp-up and its tail are in the number, as they are in ours. Each replay reads a fresh
// slice of a 2 GiB pool (no L2 reuse); sums of the words keep the loads alive.
// Built and run on the GPU machine (bench/NOTES.md has its figures):
//   nvcc -O3 -std=c++17 -arch=sm_90a -I. bench/probes/read_ceiling.cu -o /tmp/read_ceiling && /tmp/read_ceiling
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "bench/probes/probe_common.cuh"

struct Config {
  const char* name;
  void (*kernel)(const uint4*, size_t, unsigned*);
  int blocks_per_sm, threads;
};

int main() {
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  const size_t pool_bytes = size_t{2} << 30;
  char* pool = nullptr;
  unsigned* sink = nullptr;
  CK(cudaMalloc(&pool, pool_bytes));
  CK(cudaMalloc(&sink, 4));
  CK(cudaMemset(pool, 0x5a, pool_bytes));
  const Config configs[] = {
      {"unroll4 x2/SM", read_all<4>, 2, 512}, {"unroll4 x4/SM", read_all<4>, 4, 256}, {"unroll8 x2/SM", read_all<8>, 2, 512},
      {"unroll8 x4/SM", read_all<8>, 4, 256}, {"unroll8 x8/SM", read_all<8>, 8, 256}, {"unroll16 x2/SM", read_all<16>, 2, 512},
  };
  // qwen1.5-moe-a2.7b at T=1: w2 of 4 experts, w13 of 4, both; qwen3-30b-a3b both; twice qwen1.5.
  const double sizes_mb[] = {23.07, 46.14, 69.21, 75.50, 138.4};
  cudaStream_t stream;
  CK(cudaStreamCreate(&stream));
  cudaEvent_t start, stop;
  CK(cudaEventCreate(&start));
  CK(cudaEventCreate(&stop));
  std::printf("%s, %d SMs, L2 %d MB: one-kernel CUDA graph replays reading N bytes, median of 200\n", prop.name, sms,
              prop.l2CacheSize >> 20);
  std::printf("%-9s %-16s %10s %9s %12s\n", "MB", "config", "median us", "TB/s", "x (N/3.0TB/s)");
  for (double mb : sizes_mb) {
    const size_t bytes = static_cast<size_t>(mb * 1e6) / 16 * 16, vecs = bytes / 16;
    const size_t slots = pool_bytes / bytes;
    double best = 1e30;
    const char* best_name = "";
    for (const Config& c : configs) {
      // One graph per slot of the pool, so every replay reads bytes no earlier replay left in L2.
      std::vector<cudaGraphExec_t> execs;
      for (size_t s = 0; s < std::min<size_t>(slots, 16); ++s) {
        cudaGraph_t graph;
        CK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
        c.kernel<<<sms * c.blocks_per_sm, c.threads, 0, stream>>>(reinterpret_cast<const uint4*>(pool + s * bytes), vecs, sink);
        CK(cudaStreamEndCapture(stream, &graph));
        cudaGraphExec_t exec;
        CK(cudaGraphInstantiate(&exec, graph, 0));
        CK(cudaGraphDestroy(graph));
        execs.push_back(exec);
      }
      std::vector<float> times;
      for (int r = 0; r < 220; ++r) {
        CK(cudaEventRecord(start, stream));
        CK(cudaGraphLaunch(execs[static_cast<size_t>(r) % execs.size()], stream));
        CK(cudaEventRecord(stop, stream));
        CK(cudaEventSynchronize(stop));
        float ms = 0;
        CK(cudaEventElapsedTime(&ms, start, stop));
        if (r >= 20) times.push_back(ms * 1000.0f);  // warm-up first
      }
      CK(cudaGetLastError());
      std::nth_element(times.begin(), times.begin() + times.size() / 2, times.end());
      const double us = times[times.size() / 2];
      std::printf("%-9.2f %-16s %10.1f %9.2f %12.2f\n", mb, c.name, us, bytes / us / 1e6, us / (bytes / 3.0e6));
      if (us < best) best = us, best_name = c.name;
      for (cudaGraphExec_t e : execs) CK(cudaGraphExecDestroy(e));
    }
    std::printf("best     %-16s %10.1f %9.2f %12.2f   <- %.2f MB\n", best_name, best, bytes / best / 1e6,
                best / (bytes / 3.0e6), mb);
  }
  return 0;
}
