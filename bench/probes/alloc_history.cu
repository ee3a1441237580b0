// Probe, not part of the build: does the history of device allocations slow the memory allocated
// after it? In `moeflow bench --passes 2` over the four presets, the copy that measures the
// machine's bandwidth read 2.6 TB/s right after a pass that ended with deepseek-v3 (tens of GB
// allocated and freed), against 3.0 at the start, and the first points measured after such a pass
// were slower (mixtral-8x7b T=1 290 against 247 µs; qwen1.5's one-token kernel after deepseek-v3,
// bench/NOTES.md). Here, in one process: a 1 GiB copy and a bare read of 75 MB (the one-token
// kernel's bytes at qwen3 T=1) in fresh cudaMalloc memory; then after allocating and freeing
// deepseek-v3-sized buffers (cudaMalloc / cudaFree of 22 GB of weights, 10 GB of workspace, a few
// small ones); then in memory mapped through the virtual memory API at the granularity it asks for
// (cuMemCreate / cuMemMap), after the same history; then after the GPU idled for 3 s, and after it
// ran GEMMs for a few seconds (compute, little memory traffic). nvidia-smi's memory temperature,
// clocks and power are printed at each step. Measured on nvidia-h100-x1 (2026-11-24,
// bench/results/h100_alloc_history_2026-11-24.txt): 3.00 TB/s and 50.3 µs fresh; 2.57 TB/s and
// 55-56 µs after the frees, whether the memory comes from cudaMalloc or cuMemCreate (2 MiB
// granularity); 3.00 TB/s and 50.0 µs in the same memory after 3 s idle; memory temperature 34-43 °C,
// clocks 1980 / 2619 MHz and no throttle reason throughout. So it is a passing state of the device
// after large frees, not where the later memory lies; the bench waits it out (settle_device_bandwidth).
// Built and run on the GPU machine from the repository root:
//   nvcc -O3 -std=c++17 -arch=sm_90a -I. bench/probes/alloc_history.cu -lcuda -lcublas -o /tmp/ah && /tmp/ah
#include <cublas_v2.h>
#include <cuda.h>

#include <chrono>
#include <cstdlib>
#include <thread>

#include "bench/probes/probe_common.cuh"

namespace {

// A 1 GiB copy (TB/s read + written) and a bare read of 75 MB spread as 8 blocks of 9.4 MB over
// 1.2 GB (TB/s read), in `base`, which holds at least 3.3 GB.
void measure(const char* what, std::byte* base, unsigned* sink) {
  const size_t copy = size_t{1} << 30;
  const float copy_us = median_us([&] { CK(cudaMemcpyAsync(base + copy, base, copy, cudaMemcpyDeviceToDevice)); }, 30, 3);
  const size_t expert = 9437184, spread = 150994944;  // 9 MiB read from every 144 MiB
  const float read_us = median_us([&] {
    for (int e = 0; e < 8; ++e)
      read_all<4><<<264, 512>>>(reinterpret_cast<const uint4*>(base + 2 * copy + e * spread), expert / 16, sink);
  }, 30, 3);
  std::printf("%-58s copy %5.2f TB/s   8 x 9 MiB read %6.1f us (%4.2f TB/s)\n", what, 2.0 * copy / copy_us / 1e6,
              read_us, 8.0 * expert / read_us / 1e6);
  std::fflush(stdout);
  if (std::system("nvidia-smi --query-gpu=temperature.gpu,temperature.memory,clocks.sm,clocks.mem,power.draw,"
                  "clocks_throttle_reasons.active --format=csv,noheader | sed 's/^/    nvidia-smi: /'") != 0)
    std::printf("    (no nvidia-smi)\n");
}

constexpr size_t kArena = size_t{4} << 30;

void churn() {  // deepseek-v3-like sessions: allocate, touch, free
  for (int round = 0; round < 3; ++round) {
    std::vector<void*> held;
    for (size_t bytes : {size_t{22} << 30, size_t{10} << 30, size_t{1} << 30, size_t{256} << 20, size_t{3} << 20}) {
      void* p = nullptr;
      CK(cudaMalloc(&p, bytes));
      CK(cudaMemset(p, round, bytes));
      held.push_back(p);
    }
    CK(cudaDeviceSynchronize());
    for (void* p : held) CK(cudaFree(p));
  }
}

}  // namespace

int main() {
  CK(cudaSetDevice(0));
  CU(cuInit(0));
  unsigned* sink = nullptr;
  CK(cudaMalloc(&sink, 4));
  {
    void* p = nullptr;
    CK(cudaMalloc(&p, kArena));
    CK(cudaMemset(p, 1, kArena));
    measure("cudaMalloc, first", static_cast<std::byte*>(p), sink);
    CK(cudaFree(p));
  }
  churn();
  {
    void* p = nullptr;
    CK(cudaMalloc(&p, kArena));
    CK(cudaMemset(p, 1, kArena));
    measure("cudaMalloc, after 3 x 33 GB allocated and freed", static_cast<std::byte*>(p), sink);
    CK(cudaFree(p));
  }
  {
    CUmemAllocationProp prop{};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = 0;
    size_t gran = 0;
    CU(cuMemGetAllocationGranularity(&gran, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED));
    CUmemGenericAllocationHandle handle;
    CU(cuMemCreate(&handle, kArena, &prop, 0));
    CUdeviceptr ptr = 0;
    CU(cuMemAddressReserve(&ptr, kArena, 0, 0, 0));
    CU(cuMemMap(ptr, kArena, 0, handle, 0));
    CUmemAccessDesc access{};
    access.location = prop.location;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    CU(cuMemSetAccess(ptr, kArena, &access, 1));
    CK(cudaMemset(reinterpret_cast<void*>(ptr), 1, kArena));
    char what[96];
    std::snprintf(what, sizeof what, "cuMemCreate + cuMemMap (granularity %zu KiB), after them", gran >> 10);
    measure(what, reinterpret_cast<std::byte*>(ptr), sink);
    CU(cuMemUnmap(ptr, kArena));
    CU(cuMemRelease(handle));
    CU(cuMemAddressFree(ptr, kArena));
  }
  churn();
  {
    void* p = nullptr;
    CK(cudaMalloc(&p, kArena));
    CK(cudaMemset(p, 1, kArena));
    measure("cudaMalloc, after 6 x 33 GB", static_cast<std::byte*>(p), sink);
    std::this_thread::sleep_for(std::chrono::seconds(3));
    measure("the same cudaMalloc memory, after 3 s idle", static_cast<std::byte*>(p), sink);
    churn();
    measure("the same memory, after 3 x 33 GB more allocated and freed", static_cast<std::byte*>(p), sink);
    // Heat: 8192^3 bf16 GEMMs for ~3 s, then the same memory again.
    cublasHandle_t h;
    CB(cublasCreate(&h));
    const int n = 8192;
    void *a = nullptr, *c = nullptr;
    CK(cudaMalloc(&a, size_t{n} * n * 2));
    CK(cudaMalloc(&c, size_t{n} * n * 2));
    CK(cudaMemset(a, 0x3c, size_t{n} * n * 2));
    const float one = 1.0f, zero = 0.0f;
    for (int i = 0; i < 2000; ++i)
      CB(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, n, n, n, &one, a, CUDA_R_16BF, n, a, CUDA_R_16BF, n, &zero, c,
                      CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    CK(cudaDeviceSynchronize());
    measure("the same cudaMalloc memory, right after ~2000 GEMMs", static_cast<std::byte*>(p), sink);
    cublasDestroy(h);
    cudaFree(a);
    cudaFree(c);
    CK(cudaFree(p));
  }
  {
    void* p = nullptr;
    CK(cudaMalloc(&p, kArena));
    CK(cudaMemset(p, 1, kArena));
    measure("cudaMalloc, fresh, at the end", static_cast<std::byte*>(p), sink);
    CK(cudaFree(p));
  }
  return 0;
}
