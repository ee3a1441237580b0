#include "kernels/cuda/fused_single_token.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <string>

#include "graph/error.hpp"
#include "kernels/cuda/bf16_vec.cuh"
#include "kernels/cuda/check.cuh"
#include "kernels/cuda/device.hpp"
#include "kernels/cuda/fused_operands.hpp"
#include "kernels/cuda/grid_sync.cuh"
#include "kernels/cuda/warp_gemv.cuh"

namespace moeflow::cuda {

namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kTileJ = 16;                 // features of I per item: two gate and two up rows per warp
constexpr int kOut = kTileJ / kWarps;
constexpr int kQuad = 4;                   // items sharing one w2 read: 64 features, 128 bytes per row
constexpr int kQuadJ = kTileJ * kQuad;
constexpr int kSliceH = 8;                 // features of H per reduction slice
constexpr int kSums = kThreads / kSliceH;  // partial sums per feature of H, added in order at the end

struct Args : FusedOperands {  // plus this kernel's scratch and counters
  float* act;       // [k, I]: the items' act values, read by their quads
  float* partial;   // [k·I/64, H]: one partial y per quad, each written by its four blocks by quarters of H
  int* quad_done;   // [k·I/64]: blocks of the quad whose act values are out
  int* arrived;     // blocks done with their items
  int* left;        // blocks done with everything: the last one zeroes every counter for the next launch
};

__global__ void __launch_bounds__(kThreads, 3) fused_single_token_kernel(Args a) {
  __shared__ float act[kQuadJ];
  __shared__ float red[kSums][kSliceH];
  // T = 0 (a graph captured for T <= 1 replayed with none): the same answer in every block.
  if (a.live_tokens != nullptr && *a.live_tokens <= 0) return;
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, lane = tid & 31;
  const int tiles = a.inter / kTileJ, items = a.top_k * tiles;
  const int quads_per_choice = tiles / kQuad, quads = a.top_k * quads_per_choice;
  const int hvecs = a.hidden / 8, ivecs = a.inter / 8, quarter = a.hidden / kQuad;
  // Items by index: block b takes b, b + grid, ...; the grid is a multiple of four, so the four items
  // of a quad run in the same round on four co-resident blocks (cooperative launch), and a block
  // waits only for blocks that are running the same round.
  for (int item = static_cast<int>(blockIdx.x); item < items; item += static_cast<int>(gridDim.x)) {
    const int choice = item / tiles, j0 = (item % tiles) * kTileJ;
    const int e = a.ids[choice];
    const bool routed = e >= 0 && e < a.experts;  // an id outside [0, E): no expert, no contribution
    float gate[1][kOut] = {}, up[1][kOut] = {};
    if (routed) {
      GatheredRows<1> x;
      x.row[0] = reinterpret_cast<const uint4*>(a.x);
      const auto* w13 = reinterpret_cast<const uint4*>(a.w13 + static_cast<int64_t>(e) * 2 * a.inter * a.hidden);
      gate_up_dot<1, kOut, ActLoad::read_only>(w13, j0 + warp * kOut, a.inter, hvecs, x, 1, lane, gate, up);
    }
#pragma unroll
    for (int o = 0; o < kOut; ++o) {
      const float gs = warp_sum(gate[0][o]), us = warp_sum(up[0][o]);
      // Rounded to bf16 as the chain's act buffer is, so every experts kernel computes the same values.
      if (lane == 0)
        __stcg(a.act + static_cast<int64_t>(choice) * a.inter + j0 + warp * kOut + o,
               bf16_bits_to_float(float_to_bf16_bits(silu_mul(gs, us))));
    }
    const int quad = item / kQuad, part = item % kQuad;
    __syncthreads();  // the block's act values before its count (CUTLASS's semaphore pattern)
    if (tid == 0) {
      __threadfence();
      atomicAdd(a.quad_done + quad, 1);
      while (load_acquire(a.quad_done + quad) < kQuad) __nanosleep(32);
    }
    __syncthreads();
    const int jq = (quad % quads_per_choice) * kQuadJ;
    if (tid < kQuadJ) act[tid] = __ldcg(a.act + static_cast<int64_t>(choice) * a.inter + jq + tid);
    __syncthreads();
    // y[h] = Σ_f act_f · w2[h, jq + f] over the quad's 64 features, for this block's quarter of H.
    const auto* w2 = reinterpret_cast<const uint4*>(a.w2 + static_cast<int64_t>(routed ? e : 0) * a.hidden * a.inter) + jq / 8;
    float* y = a.partial + static_cast<int64_t>(quad) * a.hidden;
    for (int h = part * quarter + tid; h < (part + 1) * quarter; h += kThreads) {
      float sum = 0.0f;
      if (routed) {
        uint4 raw[kQuadJ / 8];
#pragma unroll
        for (int c = 0; c < kQuadJ / 8; ++c) raw[c] = __ldg(w2 + static_cast<int64_t>(h) * ivecs + c);
#pragma unroll
        for (int c = 0; c < kQuadJ / 8; ++c) {
          float w[8];
          unpack8(raw[c], w);
#pragma unroll
          for (int i = 0; i < 8; ++i) sum = fmaf(act[c * 8 + i], w[i], sum);
        }
      }
      __stcg(y + h, sum);
    }
    __syncthreads();  // act[] is rewritten by the block's next item
  }
  // Every block's partials before any block sums them.
  __syncthreads();
  if (tid == 0) {
    __threadfence();
    atomicAdd(a.arrived, 1);
    while (load_acquire(a.arrived) < static_cast<int>(gridDim.x)) __nanosleep(32);
  }
  __syncthreads();
  // out[h] = Σ_quads weight[choice] · partial[quad, h]: thread (h, r) adds quads r, r + kSums, ... in
  // order, then thread h adds the kSums sums in order: the same bytes on every run.
  for (int s = static_cast<int>(blockIdx.x); s < a.hidden / kSliceH; s += static_cast<int>(gridDim.x)) {
    const int hl = tid % kSliceH, r = tid / kSliceH, h = s * kSliceH + hl;
    float sum = 0.0f;
    for (int q = r; q < quads; q += kSums) {
      const int choice = q / quads_per_choice, e = a.ids[choice];
      if (e >= 0 && e < a.experts)
        sum = fmaf(a.weights[choice], __ldcg(a.partial + static_cast<int64_t>(q) * a.hidden + h), sum);
    }
    red[r][hl] = sum;
    __syncthreads();
    if (tid < kSliceH) {
      float total = 0.0f;
      for (int i = 0; i < kSums; ++i) total += red[i][tid];
      a.out[h] = float_to_bf16_bits(total);
    }
    __syncthreads();
  }
  // The last block out: every other block is past its waits, so the counters can go back to zero.
  if (tid == 0 && atomicAdd(a.left, 1) == static_cast<int>(gridDim.x) - 1) {
    __threadfence();
    for (int q = 0; q < quads; ++q) a.quad_done[q] = 0;
    *a.arrived = 0;
    *a.left = 0;
  }
}

constexpr int64_t align256(int64_t n) { return (n + 255) / 256 * 256; }

int quad_count(const FusedSingleTokenShape& s) { return s.top_k * (s.intermediate / kQuadJ); }
int64_t act_bytes(const FusedSingleTokenShape& s) { return align256(int64_t{s.top_k} * s.intermediate * 4); }
int64_t partial_bytes(const FusedSingleTokenShape& s) { return align256(int64_t{quad_count(s)} * s.hidden * 4); }
int counter_words(const FusedSingleTokenShape& s) { return quad_count(s) + 2; }
int64_t counter_bytes(const FusedSingleTokenShape& s) { return align256(int64_t{counter_words(s)} * 4); }

std::atomic<int> blocks_per_sm{0};  // resident_blocks() of this kernel: the most a cooperative launch may have

}  // namespace

std::string fused_single_token_unsupported(const FusedSingleTokenShape& s) {
  if (s.experts <= 0 || s.top_k <= 0) return "E = " + std::to_string(s.experts) + ", k = " + std::to_string(s.top_k);
  if (s.hidden <= 0 || s.hidden % 32 != 0)
    return "H = " + std::to_string(s.hidden) + ": the single-token kernel needs a multiple of 32 (quarters of 16-byte loads)";
  if (s.intermediate <= 0 || s.intermediate % kQuadJ != 0)
    return "I = " + std::to_string(s.intermediate) + ": the single-token kernel needs a multiple of " +
           std::to_string(kQuadJ) + " (quads of " + std::to_string(kQuadJ) + " features read from each row of w2)";
  return {};
}

int64_t fused_single_token_workspace_bytes(const FusedSingleTokenShape& s) {
  return act_bytes(s) + partial_bytes(s) + counter_bytes(s);
}

void experts_fused_single_token(const LaneContext& ctx, const FusedSingleTokenShape& s, int64_t tokens,
                                const int32_t* live_tokens, const uint16_t* x, const int32_t* ids, const float* weights,
                                const uint16_t* w13, const uint16_t* w2, uint16_t* out, void* workspace) {
  if (const std::string why = fused_single_token_unsupported(s); !why.empty())
    fail_input("experts_fused_single_token: " + why);
  if (tokens < 0 || tokens > 1) fail_input("experts_fused_single_token: T = " + std::to_string(tokens) + " outside [0, 1]");
  if (tokens == 0 && !live_tokens) return;
  auto* bytes = static_cast<std::byte*>(workspace);
  Args a{};
  static_cast<FusedOperands&>(a) = {x, ids, weights, w13, w2, out, s.experts, s.top_k, s.hidden, s.intermediate, live_tokens};
  a.act = reinterpret_cast<float*>(bytes);
  a.partial = reinterpret_cast<float*>(bytes + act_bytes(s));
  a.quad_done = launch_counters(ctx, counter_words(s), reinterpret_cast<int*>(bytes + act_bytes(s) + partial_bytes(s)));
  a.arrived = a.quad_done + quad_count(s);
  a.left = a.arrived + 1;
  // A multiple of four blocks (a quad's items in one round), all resident at once.
  const int items = s.top_k * (s.intermediate / kTileJ);
  const int resident = resident_blocks(fused_single_token_kernel, kThreads, ctx.device, blocks_per_sm);
  const int grid = std::max(kQuad, std::min(items, resident / kQuad * kQuad));
  void* params[] = {&a};
  MOEFLOW_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(fused_single_token_kernel), dim3(grid),
                                                 dim3(kThreads), params, 0, ctx.stream));
}

}  // namespace moeflow::cuda
