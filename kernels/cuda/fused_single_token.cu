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

struct TransposedArgs : FusedOperands {  // w2 unused: w2t instead
  const uint16_t* w2t;  // bf16 [E, I, H] (pack_w2_transposed)
  float* partial;       // [k·I/16, H]: one partial y per item over all of H
  int* arrived;         // blocks done with their items
  int* left;            // blocks done with everything: the last one zeroes both counters for the next launch
};

// act = silu(x·w1ᵀ)·(x·w3ᵀ) of this warp's kOut features j0 + warp·kOut + o of expert e, rounded to
// bf16 as the chain's act buffer is (so every experts kernel computes the same values), zero where e
// is outside [0, E) (no expert); lane 0 hands each to store(o, act).
template <class Store>
__device__ __forceinline__ void warp_act(const FusedOperands& a, int e, int j0, int warp, int lane, Store store) {
  float gate[1][kOut] = {}, up[1][kOut] = {};
  if (e >= 0 && e < a.experts) {
    GatheredRows<1> x;
    x.row[0] = reinterpret_cast<const uint4*>(a.x);
    const auto* w13 = reinterpret_cast<const uint4*>(a.w13 + static_cast<int64_t>(e) * 2 * a.inter * a.hidden);
    gate_up_dot<1, kOut, ActLoad::read_only>(w13, j0 + warp * kOut, a.inter, a.hidden / 8, x, 1, lane, gate, up);
  }
#pragma unroll
  for (int o = 0; o < kOut; ++o) {
    const float gs = warp_sum(gate[0][o]), us = warp_sum(up[0][o]);
    if (lane == 0) store(o, bf16_bits_to_float(float_to_bf16_bits(silu_mul(gs, us))));
  }
}

// Every block's writes before any block reads them: the block's threads, then one arrival per block
// in `arrived`, polled until all have come (every block is resident: cooperative launch).
__device__ __forceinline__ void wait_for_every_block(int* arrived) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(arrived, 1);
    while (load_acquire(arrived) < static_cast<int>(gridDim.x)) __nanosleep(32);
  }
  __syncthreads();
}

// out[h] = Σ_rows weight[choice] · partial[row, h] over `rows` partial rows of H, `per_choice`
// consecutive rows per choice; a choice whose id is outside [0, E) weighs 0 (its partial rows must be
// zeros). Slices of kSliceH features of H dealt over the blocks; in a slice, thread (h, r) adds rows
// r, r + kSums, ... in order, then thread h adds the kSums sums in order: the same bytes on every
// run. The choices' weights are staged in shared memory first, so that no partial's load waits for
// an id read from L2 (measured on the H100, T=1: that chain cost 0.7-1.6 µs; the probe
// bench/probes/single_token_timeline.cu times this kernel beside a copy without it).
constexpr int kMostChoices = 64;
__device__ __forceinline__ void reduce_partials(const FusedOperands& a, const float* partial, int rows, int per_choice) {
  __shared__ float red[kSums][kSliceH];
  __shared__ float choice_weight[kMostChoices];
  const int tid = static_cast<int>(threadIdx.x), hl = tid % kSliceH, r = tid / kSliceH;
  if (tid < a.top_k) {
    const int e = a.ids[tid];
    choice_weight[tid] = e >= 0 && e < a.experts ? a.weights[tid] : 0.0f;
  }
  __syncthreads();
  for (int s = static_cast<int>(blockIdx.x); s < a.hidden / kSliceH; s += static_cast<int>(gridDim.x)) {
    const int h = s * kSliceH + hl;
    float sum = 0.0f;
    for (int q = r; q < rows; q += kSums)
      sum = fmaf(choice_weight[q / per_choice], __ldcg(partial + static_cast<int64_t>(q) * a.hidden + h), sum);
    red[r][hl] = sum;
    __syncthreads();
    if (tid < kSliceH) {
      float total = 0.0f;
      for (int i = 0; i < kSums; ++i) total += red[i][tid];
      a.out[s * kSliceH + tid] = float_to_bf16_bits(total);
    }
    __syncthreads();
  }
}

// True in thread 0 of the last block to get here: every other block is past its waits, so the
// launch's counters can go back to zero for the next one (`left` among them).
__device__ __forceinline__ bool last_block_out(int* left) {
  if (threadIdx.x != 0 || atomicAdd(left, 1) != static_cast<int>(gridDim.x) - 1) return false;
  __threadfence();
  return true;
}

__global__ void __launch_bounds__(kThreads, 3) fused_single_token_kernel(Args a) {
  __shared__ float act[kQuadJ];
  // T = 0 (a graph captured for T <= 1 replayed with none): the same answer in every block.
  if (a.live_tokens != nullptr && *a.live_tokens <= 0) return;
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, lane = tid & 31;
  const int tiles = a.inter / kTileJ, items = a.top_k * tiles;
  const int quads_per_choice = tiles / kQuad, quads = a.top_k * quads_per_choice;
  const int ivecs = a.inter / 8, quarter = a.hidden / kQuad;
  // Items by index: block b takes b, b + grid, ...; the grid is a multiple of four, so the four items
  // of a quad run in the same round on four co-resident blocks (cooperative launch), and a block
  // waits only for blocks that are running the same round.
  for (int item = static_cast<int>(blockIdx.x); item < items; item += static_cast<int>(gridDim.x)) {
    const int choice = item / tiles, j0 = (item % tiles) * kTileJ;
    const int e = a.ids[choice];
    const bool routed = e >= 0 && e < a.experts;  // an id outside [0, E): no expert, no contribution
    warp_act(a, e, j0, warp, lane, [&](int o, float v) {
      __stcg(a.act + static_cast<int64_t>(choice) * a.inter + j0 + warp * kOut + o, v);  // read by the quad's blocks
    });
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
  wait_for_every_block(a.arrived);  // every block's partials before any block sums them
  reduce_partials(a, a.partial, quads, quads_per_choice);
  if (last_block_out(a.left)) {
    for (int q = 0; q < quads; ++q) a.quad_done[q] = 0;
    *a.arrived = 0;
    *a.left = 0;
  }
}

__global__ void __launch_bounds__(kThreads, 3) fused_single_token_w2t_kernel(TransposedArgs a) {
  __shared__ float act[kTileJ];
  // T = 0 (a graph captured for T <= 1 replayed with none): the same answer in every block.
  if (a.live_tokens != nullptr && *a.live_tokens <= 0) return;
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, lane = tid & 31;
  const int tiles = a.inter / kTileJ, items = a.top_k * tiles, hvecs = a.hidden / 8;
  // Items by index: block b takes b, b + grid, ...; no item waits for another.
  for (int item = static_cast<int>(blockIdx.x); item < items; item += static_cast<int>(gridDim.x)) {
    const int choice = item / tiles, j0 = (item % tiles) * kTileJ;
    const int e = a.ids[choice];
    auto* y = reinterpret_cast<float4*>(a.partial + static_cast<int64_t>(item) * a.hidden);
    if (e < 0 || e >= a.experts) {  // no expert, no contribution: a partial of zeros (weighed 0)
      for (int hv = tid; hv < hvecs; hv += kThreads) {
        __stcg(y + 2 * hv, make_float4(0.0f, 0.0f, 0.0f, 0.0f));
        __stcg(y + 2 * hv + 1, make_float4(0.0f, 0.0f, 0.0f, 0.0f));
      }
      continue;
    }
    warp_act(a, e, j0, warp, lane, [&](int o, float v) { act[warp * kOut + o] = v; });
    __syncthreads();
    // y[h] = Σ_f act_f · w2t[e, j0 + f, h] over the item's 16 features, for all of H: each thread 8
    // neighbouring h at a time (one 16-byte load from each of the 16 rows), stored from its registers
    // with two 16-byte stores.
    const auto* w2t = reinterpret_cast<const uint4*>(a.w2t + (static_cast<int64_t>(e) * a.inter + j0) * a.hidden);
    for (int hv = tid; hv < hvecs; hv += kThreads) {
      uint4 raw[kTileJ];
#pragma unroll
      for (int j = 0; j < kTileJ; ++j) raw[j] = __ldg(w2t + static_cast<int64_t>(j) * hvecs + hv);
      float sum[8] = {};
#pragma unroll
      for (int j = 0; j < kTileJ; ++j) {
        float w[8];
        unpack8(raw[j], w);
#pragma unroll
        for (int i = 0; i < 8; ++i) sum[i] = fmaf(act[j], w[i], sum[i]);
      }
      __stcg(y + 2 * hv, make_float4(sum[0], sum[1], sum[2], sum[3]));
      __stcg(y + 2 * hv + 1, make_float4(sum[4], sum[5], sum[6], sum[7]));
    }
    __syncthreads();  // act[] is rewritten by the block's next item
  }
  wait_for_every_block(a.arrived);  // every block's partials before any block sums them
  reduce_partials(a, a.partial, items, tiles);
  if (last_block_out(a.left)) {
    *a.arrived = 0;
    *a.left = 0;
  }
}

// w2t[e, i, h] = w2[e, h, i] by tiles of kTransposeTile x kTransposeTile through shared memory: a
// tile's rows of w2 read along I and its rows of w2t written along H, both coalesced; the padding
// column keeps the column-wise reads of the tile free of bank conflicts. Tiles dealt over the grid.
constexpr int kTransposeTile = 32;
constexpr int kTransposeRows = 8;  // thread rows per block: each thread moves kTransposeTile / 8 elements
constexpr int64_t kTransposeMostBlocks = 4096;

__global__ void __launch_bounds__(kTransposeTile * kTransposeRows)
    transpose_w2(const uint16_t* __restrict__ w2, int hidden, int inter, int64_t tiles, uint16_t* __restrict__ w2t) {
  __shared__ uint32_t tile[kTransposeTile][kTransposeTile + 1];  // [h - h0][i - i0]
  const int tx = static_cast<int>(threadIdx.x), ty = static_cast<int>(threadIdx.y);
  const int tiles_h = (hidden + kTransposeTile - 1) / kTransposeTile, tiles_i = (inter + kTransposeTile - 1) / kTransposeTile;
  const int64_t per_expert = static_cast<int64_t>(tiles_h) * tiles_i;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t e = t / per_expert;
    const int within = static_cast<int>(t % per_expert);
    const int h0 = within / tiles_i * kTransposeTile, i0 = within % tiles_i * kTransposeTile;
    const uint16_t* src = w2 + e * hidden * inter;
    uint16_t* dst = w2t + e * inter * hidden;
    for (int r = ty; r < kTransposeTile; r += kTransposeRows) {
      const int h = h0 + r, i = i0 + tx;
      if (h < hidden && i < inter) tile[r][tx] = src[static_cast<int64_t>(h) * inter + i];
    }
    __syncthreads();
    for (int r = ty; r < kTransposeTile; r += kTransposeRows) {
      const int i = i0 + r, h = h0 + tx;
      if (i < inter && h < hidden) dst[static_cast<int64_t>(i) * hidden + h] = static_cast<uint16_t>(tile[tx][r]);
    }
    __syncthreads();  // the tile is rewritten for the block's next one
  }
}

constexpr int64_t align256(int64_t n) { return (n + 255) / 256 * 256; }

int quad_count(const FusedSingleTokenShape& s) { return s.top_k * (s.intermediate / kQuadJ); }
int64_t act_bytes(const FusedSingleTokenShape& s) { return align256(int64_t{s.top_k} * s.intermediate * 4); }
int64_t partial_bytes(const FusedSingleTokenShape& s) { return align256(int64_t{quad_count(s)} * s.hidden * 4); }
int counter_words(const FusedSingleTokenShape& s) { return quad_count(s) + 2; }
int64_t counter_bytes(const FusedSingleTokenShape& s) { return align256(int64_t{counter_words(s)} * 4); }

int item_count(const FusedSingleTokenShape& s) { return s.top_k * (s.intermediate / kTileJ); }
int64_t item_partial_bytes(const FusedSingleTokenShape& s) { return align256(int64_t{item_count(s)} * s.hidden * 4); }
constexpr int kTransposedCounterWords = 2;  // arrived, left

std::atomic<int> blocks_per_sm{0};  // resident_blocks() of each kernel: the most a cooperative launch may have
std::atomic<int> w2t_blocks_per_sm{0};

// Why a single-token kernel whose loads need H a multiple of `hidden_step` and whose items need I a
// multiple of `inter_step` cannot run `s` (each `why` says what needs it), or empty.
std::string shape_unsupported(const FusedSingleTokenShape& s, int hidden_step, const std::string& hidden_why,
                              int inter_step, const std::string& inter_why) {
  if (s.experts <= 0 || s.top_k <= 0) return "E = " + std::to_string(s.experts) + ", k = " + std::to_string(s.top_k);
  if (s.top_k > kMostChoices)
    return "k = " + std::to_string(s.top_k) + ": the single-token kernels weigh at most " + std::to_string(kMostChoices) +
           " choices";
  if (s.hidden <= 0 || s.hidden % hidden_step != 0)
    return "H = " + std::to_string(s.hidden) + ": the single-token kernel needs a multiple of " +
           std::to_string(hidden_step) + " (" + hidden_why + ")";
  if (s.intermediate <= 0 || s.intermediate % inter_step != 0)
    return "I = " + std::to_string(s.intermediate) + ": the single-token kernel needs a multiple of " +
           std::to_string(inter_step) + " (" + inter_why + ")";
  return {};
}

}  // namespace

std::string fused_single_token_unsupported(const FusedSingleTokenShape& s) {
  return shape_unsupported(s, 32, "quarters of 16-byte loads", kQuadJ,
                           "quads of " + std::to_string(kQuadJ) + " features read from each row of w2");
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
  const int items = item_count(s);
  const int resident = resident_blocks(fused_single_token_kernel, kThreads, ctx.device, blocks_per_sm);
  const int grid = std::max(kQuad, std::min(items, resident / kQuad * kQuad));
  void* params[] = {&a};
  MOEFLOW_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(fused_single_token_kernel), dim3(grid),
                                                 dim3(kThreads), params, 0, ctx.stream));
}

std::string fused_single_token_w2t_unsupported(const FusedSingleTokenShape& s) {
  return shape_unsupported(s, 8, "16-byte loads of the rows of w13 and of w2 transposed", kTileJ,
                           "items of " + std::to_string(kTileJ) + " features");
}

int64_t fused_single_token_w2t_workspace_bytes(const FusedSingleTokenShape& s) {
  return item_partial_bytes(s) + align256(kTransposedCounterWords * 4);
}

void experts_fused_single_token_w2t(const LaneContext& ctx, const FusedSingleTokenShape& s, int64_t tokens,
                                    const int32_t* live_tokens, const uint16_t* x, const int32_t* ids,
                                    const float* weights, const uint16_t* w13, const uint16_t* w2t, uint16_t* out,
                                    void* workspace) {
  if (const std::string why = fused_single_token_w2t_unsupported(s); !why.empty())
    fail_input("experts_fused_single_token_w2t: " + why);
  if (tokens < 0 || tokens > 1)
    fail_input("experts_fused_single_token_w2t: T = " + std::to_string(tokens) + " outside [0, 1]");
  if (tokens == 0 && !live_tokens) return;
  auto* bytes = static_cast<std::byte*>(workspace);
  TransposedArgs a{};
  static_cast<FusedOperands&>(a) = {x, ids, weights, w13, nullptr, out, s.experts, s.top_k, s.hidden, s.intermediate, live_tokens};
  a.w2t = w2t;
  a.partial = reinterpret_cast<float*>(bytes);
  a.arrived = launch_counters(ctx, kTransposedCounterWords, reinterpret_cast<int*>(bytes + item_partial_bytes(s)));
  a.left = a.arrived + 1;
  // Every block resident at once; more items than blocks take several rounds.
  const int items = item_count(s);
  const int resident = resident_blocks(fused_single_token_w2t_kernel, kThreads, ctx.device, w2t_blocks_per_sm);
  const int grid = std::min(items, resident);
  void* params[] = {&a};
  MOEFLOW_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(fused_single_token_w2t_kernel), dim3(grid),
                                                 dim3(kThreads), params, 0, ctx.stream));
}

int64_t packed_w2t_bytes(int experts, int hidden, int inter) { return int64_t{experts} * hidden * inter * 2; }

void pack_w2_transposed(const uint16_t* w2, int experts, int hidden, int inter, uint16_t* w2t, Stream stream) {
  if (experts <= 0 || hidden <= 0 || inter <= 0)
    fail_input("pack_w2_transposed: E = " + std::to_string(experts) + ", H = " + std::to_string(hidden) + ", I = " +
               std::to_string(inter) + " (all must be positive)");
  const int64_t tiles = int64_t{experts} * ((hidden + kTransposeTile - 1) / kTransposeTile) *
                        ((inter + kTransposeTile - 1) / kTransposeTile);
  transpose_w2<<<static_cast<unsigned>(std::min(tiles, kTransposeMostBlocks)), dim3(kTransposeTile, kTransposeRows), 0,
                 stream>>>(w2, hidden, inter, tiles, w2t);
  MOEFLOW_CUDA_LAUNCH_CHECK();
}

}  // namespace moeflow::cuda
