// Probe, not part of the build: does the layout of the expert weights limit how fast the 64x256
// CUTLASS tiles stream them? At T=2048 on qwen3 (128 rows per expert) GEMM 1 reads w13 at ~2.6 TB/s
// (Nsight Compute) where a bare read reaches more. Each k-block of a weight tile is 256 rows × 128
// bytes: with w13 stored [E, N, K] those are 256 pieces 2·K bytes apart; packed tile by tile
// ([E, N/256, K/64, 256, 64]) they would be one contiguous 32 KB. This reads the same 805 MB
// (qwen3's w13: E = 128, N = 1536, K = 2048, bf16) in the GEMM's order both ways, with the same
// per-instruction pattern (each lane 16 bytes, lanes 128 bytes apart), and a plain streaming read.
// Built and run on the GPU machine (bench/NOTES.md has its figures):
//   nvcc -O3 -std=c++17 -arch=sm_90a -I. bench/probes/tile_order_read.cu -o /tmp/tile_order && /tmp/tile_order
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "bench/probes/probe_common.cuh"

constexpr int kExperts = 128, kRows = 1536, kCols = 2048;  // qwen3-30b-a3b's w13, bf16
constexpr int kTileRows = 256, kTileCols = 64;             // the 64x256 tiles' B box: 256 rows x 128 bytes
constexpr int kTilesN = kRows / kTileRows, kBlocksK = kCols / kTileCols;

// One block per weight tile at a time (persistent, tiles strided by the grid), k-blocks in order as
// the GEMM's producer loads them; thread t reads row t's 128 bytes of the k-block (8 loads of 16
// bytes, two k-blocks in flight). `packed`: the k-block's 32 KB are contiguous, row t at t·128.
template <bool kPacked>
__global__ void __launch_bounds__(256) read_tiles(const uint4* w, unsigned* sink) {
  unsigned acc = 0;
  const int t = threadIdx.x;
  for (int tile = blockIdx.x; tile < kExperts * kTilesN; tile += gridDim.x) {
    const int e = tile / kTilesN, n = tile % kTilesN;
    for (int kb = 0; kb < kBlocksK; kb += 2) {
      uint4 v[16];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const size_t vec = kPacked ? ((static_cast<size_t>(tile) * kBlocksK + kb + h) * kTileRows + t) * 8
                                   : ((static_cast<size_t>(e) * kRows + n * kTileRows + t) * kCols + (kb + h) * kTileCols) / 8;
#pragma unroll
        for (int i = 0; i < 8; ++i) v[h * 8 + i] = __ldcs(w + vec + i);
      }
#pragma unroll
      for (int i = 0; i < 16; ++i) acc += v[i].x ^ v[i].y ^ v[i].z ^ v[i].w;
    }
  }
  if (acc == 0x9e3779b9u) *sink = acc;
}

int main() {
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const size_t bytes = static_cast<size_t>(kExperts) * kRows * kCols * 2;
  uint4* w = nullptr;
  unsigned* sink = nullptr;
  CK(cudaMalloc(&w, bytes));
  CK(cudaMalloc(&sink, 4));
  CK(cudaMemset(w, 1, bytes));
  std::printf("%zu MB of weights, %d SMs; median of 20 runs\n", bytes >> 20, sms);
  auto time_us = [](auto&& launch) { return median_us(launch, 20, 3); };
  for (int per_sm : {2, 4, 8}) {
    const float row_major = time_us([&] { read_tiles<false><<<sms * per_sm, 256>>>(w, sink); });
    const float packed = time_us([&] { read_tiles<true><<<sms * per_sm, 256>>>(w, sink); });
    std::printf("%d blocks/SM: [E,N,K] tile order %.1f us (%.2f TB/s), packed tiles %.1f us (%.2f TB/s)\n", per_sm,
                row_major, bytes / row_major / 1e6, packed, bytes / packed / 1e6);
  }
  const float plain = time_us([&] { read_all<4><<<sms * 4, 512>>>(w, bytes / 16, sink); });
  std::printf("plain streaming read: %.1f us (%.2f TB/s)\n", plain, bytes / plain / 1e6);
  CK(cudaGetLastError());
  return 0;
}
