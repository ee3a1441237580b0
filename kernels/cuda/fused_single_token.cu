#include "kernels/cuda/fused_single_token.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <string>

#include "graph/error.hpp"
#include "kernels/cuda/bf16_vec.cuh"
#include "kernels/cuda/check.cuh"
#include "kernels/cuda/dependent_launch.cuh"
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
  float* partial;       // [k·I/16, H]: one partial y per item over all of H (folded: [units, H], one per unit)
  int* arrived;         // blocks done with their items (folded: units done)
  int* left;            // blocks done with everything: the last one zeroes the counters for the next launch
};

struct FoldedArgs : TransposedArgs {  // the w2t kernel with a shared expert folded in
  FusedSingleTokenShared shared;
  int shared_inter;    // S
  int early;           // launched to start while the gate runs: the routing is read after its wait
  int items_per_unit;  // consecutive items one block streams into one partial row (a unit)
  int* next_item;      // the work counter: units, then the sum's slices
};

// Routed expert e's w13 [2I, H] (its up rows I further), or null for an id outside [0, E): no expert,
// an item of zeros. (A folded shared expert's items read its [2S, H], up rows S further.)
__device__ __forceinline__ const uint16_t* routed_w13(const FusedOperands& a, int e) {
  return e >= 0 && e < a.experts ? a.w13 + static_cast<int64_t>(e) * 2 * a.inter * a.hidden : nullptr;
}

// act = silu(x·w1ᵀ)·(x·w3ᵀ) of this warp's kOut features j0 + warp·kOut + o of the expert whose w13
// rows start at `w13` (up rows `up_rows` further), rounded to bf16 as the chain's act buffer is (so
// every experts kernel computes the same values), zero where w13 is null (no expert); lane 0 hands
// each to store(o, act).
template <class Store>
__device__ __forceinline__ void warp_act(const FusedOperands& a, const uint16_t* w13, int up_rows, int j0, int warp,
                                         int lane, Store store) {
  float gate[1][kOut] = {}, up[1][kOut] = {};
  if (w13 != nullptr) {
    GatheredRows<1> x;
    x.row[0] = reinterpret_cast<const uint4*>(a.x);
    gate_up_dot<1, kOut, ActLoad::read_only>(reinterpret_cast<const uint4*>(w13), j0 + warp * kOut, up_rows,
                                             a.hidden / 8, x, 1, lane, gate, up);
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

// The routed choices' weights into `choice_weight` (0 for an id outside [0, E)); the caller
// synchronises the block before reading them.
__device__ __forceinline__ void stage_choice_weights(const FusedOperands& a, float* choice_weight) {
  const int tid = static_cast<int>(threadIdx.x);
  if (tid < a.top_k) {
    const int e = a.ids[tid];
    choice_weight[tid] = e >= 0 && e < a.experts ? a.weights[tid] : 0.0f;
  }
}

// out over slice s (kSliceH features of H) = Σ_q row_weight(q) · partial[q, h] over `rows` rows, in the
// fixed order above. Every thread of the block calls it.
template <class RowWeight>
__device__ __forceinline__ void reduce_slice(const FusedOperands& a, const float* partial, int rows, int s,
                                             RowWeight row_weight) {
  __shared__ float red[kSums][kSliceH];
  const int tid = static_cast<int>(threadIdx.x), hl = tid % kSliceH, r = tid / kSliceH;
  const int h = s * kSliceH + hl;
  float sum = 0.0f;
  for (int q = r; q < rows; q += kSums) sum = fmaf(row_weight(q), __ldcg(partial + static_cast<int64_t>(q) * a.hidden + h), sum);
  red[r][hl] = sum;
  __syncthreads();
  if (tid < kSliceH) {
    float total = 0.0f;
    for (int i = 0; i < kSums; ++i) total += red[i][tid];
    a.out[s * kSliceH + tid] = float_to_bf16_bits(total);
  }
  __syncthreads();
}

__device__ __forceinline__ void reduce_partials(const FusedOperands& a, const float* partial, int rows, int per_choice) {
  __shared__ float choice_weight[kMostChoices];
  stage_choice_weights(a, choice_weight);
  __syncthreads();
  for (int s = static_cast<int>(blockIdx.x); s < a.hidden / kSliceH; s += static_cast<int>(gridDim.x))
    reduce_slice(a, partial, rows, s, [&](int q) { return choice_weight[q / per_choice]; });
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
    warp_act(a, routed_w13(a, e), a.inter, j0, warp, lane, [&](int o, float v) {
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

// One item of the w2t kernels: y[h] = scale · Σ_f act_f · w2t[f, h] over the item's 16 features f
// (rows j0 .. j0 + 15 of the expert whose w13 rows start at `w13`, up rows `up_rows` further, and
// whose w2t rows j0 .. start at `w2t`), for all of H, stored into the partial row, or added to what
// the block stored there before where `add`; null w13: no expert, a partial of zeros (weighed 0), or
// nothing where `add`. Each thread takes 8 neighbouring h at a time (one 16-byte load from each of the
// 16 rows) and stores them from its registers with two 16-byte stores. Every thread of the block calls
// it; `act` is the block's kTileJ floats of shared memory.
__device__ __forceinline__ void w2t_item(const FusedOperands& a, const uint16_t* w13, int up_rows, const uint16_t* w2t_rows,
                                         int j0, float* partial_row, float* act, float scale = 1.0f, bool add = false) {
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, lane = tid & 31, hvecs = a.hidden / 8;
  auto* y = reinterpret_cast<float4*>(partial_row);
  if (w13 == nullptr) {
    if (add) return;
    for (int hv = tid; hv < hvecs; hv += kThreads) {
      __stcg(y + 2 * hv, make_float4(0.0f, 0.0f, 0.0f, 0.0f));
      __stcg(y + 2 * hv + 1, make_float4(0.0f, 0.0f, 0.0f, 0.0f));
    }
    return;
  }
  warp_act(a, w13, up_rows, j0, warp, lane, [&](int o, float v) { act[warp * kOut + o] = v; });
  __syncthreads();
  const auto* w2t = reinterpret_cast<const uint4*>(w2t_rows);
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
    // The same thread stored what it adds to (through L2 both times).
    const float4 lo = add ? __ldcg(y + 2 * hv) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    const float4 hi = add ? __ldcg(y + 2 * hv + 1) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    const float old[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
    for (int i = 0; i < 8; ++i) sum[i] = add ? fmaf(scale, sum[i], old[i]) : scale * sum[i];
    __stcg(y + 2 * hv, make_float4(sum[0], sum[1], sum[2], sum[3]));
    __stcg(y + 2 * hv + 1, make_float4(sum[4], sum[5], sum[6], sum[7]));
  }
  __syncthreads();  // act[] is rewritten by the block's next item
}

__global__ void __launch_bounds__(kThreads, 3) fused_single_token_w2t_kernel(TransposedArgs a) {
  __shared__ float act[kTileJ];
  // T = 0 (a graph captured for T <= 1 replayed with none): the same answer in every block.
  if (a.live_tokens != nullptr && *a.live_tokens <= 0) return;
  const int tiles = a.inter / kTileJ, items = a.top_k * tiles;
  // Items by index: block b takes b, b + grid, ...; no item waits for another.
  for (int item = static_cast<int>(blockIdx.x); item < items; item += static_cast<int>(gridDim.x)) {
    const int choice = item / tiles, j0 = (item % tiles) * kTileJ;
    const int e = a.ids[choice];
    const bool routed = e >= 0 && e < a.experts;
    w2t_item(a, routed_w13(a, e), a.inter,
             routed ? a.w2t + (static_cast<int64_t>(e) * a.inter + j0) * a.hidden : nullptr, j0,
             a.partial + static_cast<int64_t>(item) * a.hidden, act);
  }
  wait_for_every_block(a.arrived);  // every block's partials before any block sums them
  reduce_partials(a, a.partial, items, tiles);
  if (last_block_out(a.left)) {
    *a.arrived = 0;
    *a.left = 0;
  }
}

// σ(x · gate) of a gated shared expert (1 without a gate), summed by warp 0 in a fixed order; every
// thread of the block calls it and gets the value.
__device__ __forceinline__ float shared_expert_weight(const FoldedArgs& a) {
  __shared__ float weight;
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31;
  if (tid < 32) {
    const float v = a.shared.gate != nullptr ? warp_sigmoid_gate(reinterpret_cast<const uint4*>(a.x),
                                                                 reinterpret_cast<const uint4*>(a.shared.gate),
                                                                 a.hidden / 8, lane)
                                             : 1.0f;
    if (tid == 0) weight = v;
  }
  __syncthreads();
  return weight;
}

// The w2t kernel with the layer's shared expert folded in: its S / 16 items first (they need no
// routing, so a block started early streams them while the gate runs), then the k choices' items.
// Items come in units of consecutive ones, as many units as blocks fit at once, so that every block
// streams one unit in one round (items left for a second round after the first ended late: the
// stream slowed at the round's end and the sum grew with the rows; bench/NOTES.md); a unit's items
// are weighed (σ(x · gate) or 1 for the shared expert's, the routing weight for a choice's) and added
// into the unit's one partial row in order. Blocks take units from one counter, then the sum's
// slices, so every unit is taken before any slice: a block at a slice waits only for units that
// running blocks hold, and they finish without waiting for any block (the routed ones wait for the
// gate, which waits for nothing of this kernel). So no block needs another to be resident, and the
// launch need not be cooperative. Whichever block runs a unit, its row is the same bytes, and the
// slices add the rows in the fixed order of reduce_slice: repeated runs give identical bytes.
__global__ void __launch_bounds__(kThreads, 3) fused_single_token_w2t_folded_kernel(FoldedArgs a) {
  __shared__ float act[kTileJ];
  __shared__ float choice_weight[kMostChoices];
  __shared__ int next;
  const int tid = static_cast<int>(threadIdx.x);
  // Both round trips issued before either is used. The live T was written before the previous
  // kernel ran, so it may be read before an early start's wait.
  const int first = tid == 0 ? atomicAdd(a.next_item, 1) : 0;
  const int live = a.live_tokens != nullptr ? *a.live_tokens : 1;
  if (tid == 0) next = first;
  const int shared_items = a.shared_inter / kTileJ, tiles = a.inter / kTileJ;
  const int items = shared_items + a.top_k * tiles, per_unit = a.items_per_unit;
  // T = 0 (a graph captured for T <= 1 replayed with none): no work, only the counters' reset.
  const int units = live > 0 ? (items + per_unit - 1) / per_unit : 0;
  const int work = live > 0 ? units + a.hidden / kSliceH : 0;
  bool routing_known = false;      // the choices' weights staged (after the gate's wait where early)
  bool shared_known = false;
  float shared_weight = 0.0f;
  __syncthreads();
  int task = next;
  while (task < work) {
    __syncthreads();  // every thread has read `next`
    if (tid == 0) next = atomicAdd(a.next_item, 1);
    if (task < units) {
      float* row = a.partial + static_cast<int64_t>(task) * a.hidden;
      const int begin = task * per_unit, end = min(items, begin + per_unit);
      for (int item = begin; item < end; ++item) {
        if (item < shared_items) {
          if (!shared_known) {
            shared_weight = shared_expert_weight(a);  // synchronises the block
            shared_known = true;
          }
          const int j0 = item * kTileJ;
          w2t_item(a, a.shared.w13, a.shared_inter, a.shared.w2t + static_cast<int64_t>(j0) * a.hidden, j0, row, act,
                   shared_weight, item > begin);
        } else {
          if (!routing_known) {
            if (a.early) wait_for_previous_kernel();  // the gate's ids and weights
            stage_choice_weights(a, choice_weight);
            __syncthreads();
            routing_known = true;
          }
          const int choice = (item - shared_items) / tiles, j0 = (item - shared_items) % tiles * kTileJ;
          const int e = a.ids[choice];
          const bool routed = e >= 0 && e < a.experts;
          w2t_item(a, routed_w13(a, e), a.inter,
                   routed ? a.w2t + (static_cast<int64_t>(e) * a.inter + j0) * a.hidden : nullptr, j0, row, act,
                   choice_weight[choice], item > begin);
        }
      }
      __syncthreads();  // the block's partial row before its count (CUTLASS's semaphore pattern)
      if (tid == 0) {
        __threadfence();
        atomicAdd(a.arrived, 1);
      }
    } else {
      if (tid == 0)
        while (load_acquire(a.arrived) < units) __nanosleep(32);
      __syncthreads();
      reduce_slice(a, a.partial, units, task - units, [](int) { return 1.0f; });
    }
    __syncthreads();  // `next` is written
    task = next;
  }
  // Out: the last block zeroes the counters for the next launch. Every block's last use of them (its
  // last fetch, its counts, its waits) precedes its arrival here.
  __syncthreads();
  if (tid == 0) {
    __threadfence();
    if (atomicAdd(a.left, 1) == static_cast<int>(gridDim.x) - 1) {
      __threadfence();
      *a.next_item = 0;
      *a.arrived = 0;
      *a.left = 0;
    }
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

int item_count(const FusedSingleTokenShape& s) { return (s.shared_intermediate + s.top_k * s.intermediate) / kTileJ; }
int64_t item_partial_bytes(const FusedSingleTokenShape& s) { return align256(int64_t{item_count(s)} * s.hidden * 4); }
constexpr int kTransposedCounterWords = 3;  // arrived, left (and the folded kernel's next_item)

std::atomic<int> blocks_per_sm{0};  // resident_blocks() of each kernel: the most a cooperative launch may have
std::atomic<int> w2t_blocks_per_sm{0}, folded_blocks_per_sm{0};

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
  if (s.shared_intermediate < 0 || s.shared_intermediate % kTileJ != 0)
    return "shared S = " + std::to_string(s.shared_intermediate) + ": the single-token kernel needs a multiple of " +
           std::to_string(kTileJ) + " (items of " + std::to_string(kTileJ) + " features)";
  return shape_unsupported(s, 8, "16-byte loads of the rows of w13 and of w2 transposed", kTileJ,
                           "items of " + std::to_string(kTileJ) + " features");
}

int64_t fused_single_token_w2t_workspace_bytes(const FusedSingleTokenShape& s) {
  return item_partial_bytes(s) + align256(kTransposedCounterWords * 4);
}

void experts_fused_single_token_w2t(const LaneContext& ctx, const FusedSingleTokenShape& s, int64_t tokens,
                                    const int32_t* live_tokens, const uint16_t* x, const int32_t* ids,
                                    const float* weights, const uint16_t* w13, const uint16_t* w2t, uint16_t* out,
                                    void* workspace, const FusedSingleTokenShared& shared, bool start_early) {
  if (const std::string why = fused_single_token_w2t_unsupported(s); !why.empty())
    fail_input("experts_fused_single_token_w2t: " + why);
  if (tokens < 0 || tokens > 1)
    fail_input("experts_fused_single_token_w2t: T = " + std::to_string(tokens) + " outside [0, 1]");
  if (tokens == 0 && !live_tokens) return;
  if (s.shared_intermediate > 0 && (!shared.w13 || !shared.w2t || s.shared_gated != (shared.gate != nullptr)))
    fail_input("experts_fused_single_token_w2t: the shared expert's weights do not match its shape (S = " +
               std::to_string(s.shared_intermediate) + (s.shared_gated ? ", gated" : "") + ")");
  auto* bytes = static_cast<std::byte*>(workspace);
  FoldedArgs a{};
  static_cast<FusedOperands&>(a) = {x, ids, weights, w13, nullptr, out, s.experts, s.top_k, s.hidden, s.intermediate, live_tokens};
  a.w2t = w2t;
  a.partial = reinterpret_cast<float*>(bytes);
  const int items = item_count(s);
  if (s.shared_intermediate > 0) {
    a.shared = shared;
    a.shared_inter = s.shared_intermediate;
    a.early = start_early && early_start_supported<fused_single_token_w2t_folded_kernel>(ctx.device);
    a.arrived = launch_counters(ctx, kTransposedCounterWords, reinterpret_cast<int*>(bytes + item_partial_bytes(s)), a.early);
    a.left = a.arrived + 1;
    a.next_item = a.arrived + 2;
    // As many units as blocks fit at once, and a block per unit: each streams one unit, then takes
    // slices of the sum. No more blocks than units: a block without a unit would take a slice at
    // once and poll the count through the whole stream. Measured on the H100 (the probe
    // bench/probes/single_token_timeline.cu, S = k·I, three rounds): a block per unit 59.1-59.6 µs
    // (qwen1.5) and 62.9-63.4 (qwen3) against 60.3-60.7 and 63.4-63.7 with a block per slice too.
    const int resident = resident_blocks(fused_single_token_w2t_folded_kernel, kThreads, ctx.device, folded_blocks_per_sm);
    a.items_per_unit = (items + resident - 1) / resident;
    const int units = (items + a.items_per_unit - 1) / a.items_per_unit;
    const int grid = std::min(units, resident);
    launch_maybe_early(fused_single_token_w2t_folded_kernel, grid, kThreads, ctx.stream, a.early != 0, a);
    MOEFLOW_CUDA_LAUNCH_CHECK();
    return;
  }
  a.arrived = launch_counters(ctx, kTransposedCounterWords, reinterpret_cast<int*>(bytes + item_partial_bytes(s)));
  a.left = a.arrived + 1;
  // Every block resident at once; more items than blocks take several rounds.
  const int resident = resident_blocks(fused_single_token_w2t_kernel, kThreads, ctx.device, w2t_blocks_per_sm);
  const int grid = std::min(items, resident);
  TransposedArgs routed_only = a;  // the routed-only kernel's arguments
  void* params[] = {&routed_only};
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
