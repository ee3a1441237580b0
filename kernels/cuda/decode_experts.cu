#include "kernels/cuda/decode_experts.hpp"

#include <cuda_runtime.h>

#include <string>

#include "graph/error.hpp"
#include "kernels/cuda/bf16_vec.cuh"
#include "kernels/cuda/warp_gemv.cuh"
#include "kernels/cuda/check.cuh"

namespace moeflow::cuda {

namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = kDecodeRowsPerPass;
// Output features per warp (a warp reads kOutputs weight rows, twice that for gate and up). H and I
// are multiples of 8 (decode_experts_supported), so a warp's features are all in range. Two per warp
// halve the reads of x (measured on the H100: one per warp with 4-deep unrolling was 3-8% slower at
// T = 8..32).
constexpr int kOutputs = 2;

// The expert owning permuted row r: the largest e with offsets[e] <= r (empty experts before it
// share its offset and are passed over). -1 when r lies past every expert (offsets[E] <= r).
__device__ __forceinline__ int expert_of(const int32_t* offsets, int experts, int r) {
  if (r >= offsets[experts]) return -1;
  int lo = 0, hi = experts - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (offsets[mid] <= r) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// Which rows this block works on: blockIdx.y is a permuted row; the block runs only when that row
// starts a group of up to kRows rows of one expert (its first row, or kRows, 2·kRows... after it),
// so every group is handled by exactly one column of blocks and each weight row is read once per group.
struct Group {
  int expert = -1;
  int first = 0, count = 0;
};

__device__ __forceinline__ Group group_of(const int32_t* offsets, int experts) {
  Group g;
  const int r = static_cast<int>(blockIdx.y);
  const int e = expert_of(offsets, experts, r);
  if (e < 0) return g;
  const int begin = offsets[e], end = offsets[e + 1];
  if ((r - begin) % kRows != 0) return g;
  g.expert = e;
  g.first = r;
  g.count = min(kRows, end - r);
  return g;
}

// act[r, j] = silu(w1_j · x_r) · (w3_j · x_r) for the block's kWarps × kOutputs features j.
__global__ void __launch_bounds__(kThreads)
    decode_gate_up_kernel(const uint16_t* __restrict__ rows, const int32_t* __restrict__ offsets, int experts,
                          int hidden, int inter, const uint16_t* __restrict__ w13, uint16_t* __restrict__ act) {
  const Group g = group_of(offsets, experts);
  if (g.expert < 0) return;
  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
  const int j0 = static_cast<int>(blockIdx.x) * kWarps * kOutputs + warp * kOutputs;
  if (j0 >= inter) return;
  const int vecs = hidden / 8;
  const uint4* w = reinterpret_cast<const uint4*>(w13 + static_cast<int64_t>(g.expert) * 2 * inter * hidden);
  const ContiguousRows x{reinterpret_cast<const uint4*>(rows + static_cast<int64_t>(g.first) * hidden), vecs};
  float gate[kRows][kOutputs] = {}, up[kRows][kOutputs] = {};
  gate_up_dot<kRows, kOutputs, ActLoad::read_only>(w, j0, inter, vecs, x, g.count, lane, gate, up);
#pragma unroll
  for (int q = 0; q < kRows; ++q) {
    if (q >= g.count) break;
#pragma unroll
    for (int o = 0; o < kOutputs; ++o) {
      const float gs = warp_sum(gate[q][o]), us = warp_sum(up[q][o]);
      if (lane == 0) act[static_cast<int64_t>(g.first + q) * inter + j0 + o] = float_to_bf16_bits(silu_mul(gs, us));
    }
  }
}

// y[r, h] = w2_h · act_r for the block's kWarps × kOutputs features h.
__global__ void __launch_bounds__(kThreads)
    decode_down_kernel(const uint16_t* __restrict__ act, const int32_t* __restrict__ offsets, int experts, int hidden,
                       int inter, const uint16_t* __restrict__ w2, uint16_t* __restrict__ y) {
  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
  const int h0 = static_cast<int>(blockIdx.x) * kWarps * kOutputs + warp * kOutputs;
  if (h0 >= hidden) return;
  if (static_cast<int>(blockIdx.y) >= offsets[experts]) {  // a row no expert owns (an id outside [0, E)): zeros
    if (lane < kOutputs) y[static_cast<int64_t>(blockIdx.y) * hidden + h0 + lane] = 0;
    return;
  }
  const Group g = group_of(offsets, experts);
  if (g.expert < 0) return;
  const int vecs = inter / 8;
  const uint4* w = reinterpret_cast<const uint4*>(w2 + static_cast<int64_t>(g.expert) * hidden * inter);
  const ContiguousRows a{reinterpret_cast<const uint4*>(act + static_cast<int64_t>(g.first) * inter), vecs};
  float acc[kRows][kOutputs] = {};
  rows_dot<kRows, kOutputs, ActLoad::plain>(w, h0, vecs, vecs, a, g.count, lane, acc);  // act: the previous kernel's
#pragma unroll
  for (int q = 0; q < kRows; ++q) {
    if (q >= g.count) break;
#pragma unroll
    for (int o = 0; o < kOutputs; ++o) {
      const float s = warp_sum(acc[q][o]);
      if (lane == 0) y[static_cast<int64_t>(g.first + q) * hidden + h0 + o] = float_to_bf16_bits(s);
    }
  }
}

}  // namespace

bool decode_experts_supported(int hidden, int intermediate) {
  return hidden > 0 && intermediate > 0 && hidden % 8 == 0 && intermediate % 8 == 0;
}

void experts_decode(const LaneContext& ctx, const uint16_t* rows, const int32_t* offsets, int experts,
                    int64_t total_rows, int hidden, int intermediate, const uint16_t* w13, const uint16_t* w2,
                    uint16_t* act, uint16_t* y) {
  if (!decode_experts_supported(hidden, intermediate))
    fail_input("experts_decode: H = " + std::to_string(hidden) + " and I = " + std::to_string(intermediate) +
               " must be positive multiples of 8 (16-byte loads)");
  if (experts <= 0) fail_input("experts_decode: " + std::to_string(experts) + " experts");
  if (total_rows > 65535)
    fail_input("experts_decode: " + std::to_string(total_rows) + " rows exceed one grid's y extent (65535)");
  if (total_rows == 0) return;
  constexpr int per_block = kWarps * kOutputs;
  const dim3 up_grid((intermediate + per_block - 1) / per_block, static_cast<unsigned>(total_rows));
  decode_gate_up_kernel<<<up_grid, kThreads, 0, ctx.stream>>>(rows, offsets, experts, hidden, intermediate, w13, act);
  MOEFLOW_CUDA_LAUNCH_CHECK();
  const dim3 down_grid((hidden + per_block - 1) / per_block, static_cast<unsigned>(total_rows));
  decode_down_kernel<<<down_grid, kThreads, 0, ctx.stream>>>(act, offsets, experts, hidden, intermediate, w2, y);
  MOEFLOW_CUDA_LAUNCH_CHECK();
}

}  // namespace moeflow::cuda
