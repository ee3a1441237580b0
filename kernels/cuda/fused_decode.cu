#include "kernels/cuda/fused_decode.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <type_traits>

#include "graph/error.hpp"
#include "kernels/cuda/bf16_vec.cuh"
#include "kernels/cuda/warp_gemv.cuh"
#include "kernels/cuda/check.cuh"
#include "kernels/cuda/dependent_launch.cuh"
#include "kernels/cuda/device.hpp"
#include "kernels/cuda/fused_operands.hpp"
#include "kernels/cuda/grid_sync.cuh"

namespace moeflow::cuda {

namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = kFusedRowsPerGroup;
constexpr int kMaxPairs = kFusedMaxPairs;
// Features per warp: phase 1 reads 2 gate + 2 up rows of w13 per warp, phase 2 reads 4 rows of w2,
// so every warp streams four weight rows at once in both phases, and a tile is 16 features of I or
// 32 of H. Measured on the H100 (qwen1.5 T=1, experts path in a CUDA graph, items then dealt
// round-robin): 38.4 µs; one gate and one up row per warp with 4-deep unrolling 45.6 µs; the loads of
// 4 steps gathered in registers before use 51.4 µs (it spilled 88 bytes to the stack); two w2 rows
// per warp in phase 2 49.9 µs (bench/NOTES.md has every version).
constexpr int kUpPerWarp = 2;
constexpr int kDownPerWarp = 4;
constexpr int kUpTile = kWarps * kUpPerWarp;
constexpr int kDownTile = kWarps * kDownPerWarp;

struct Args : FusedOperands {  // plus this kernel's scratch and counters
  // A folded shared expert: S / I more choices per token (`parts`), experts E .. E + parts - 1, each
  // a slice of I features of the shared MLP (null pointers and parts 0 without one).
  FusedSharedWeights shared;
  int shared_inter, parts;
  int choices;    // per token: k + parts
  // Launched to start while the previous kernel of the lane (the gate) still runs: the shared
  // expert's gate/up items first, then wait for the routing (dependent_launch.cuh).
  bool early;
  uint16_t* act;  // [P, I] bf16, by (token, choice)
  float* y;       // [P, H] fp32, by (token, choice)
  int* up_done;   // [kMaxPairs]: phase-1 tiles finished per group
  int* down_done; // [H tiles]: groups whose phase-2 tile is finished, per slice of H
  int* next_item; // the work counter the blocks take items from
  int* done_blocks; // blocks that have finished; the last one zeroes every counter for the next launch
  int max_tokens;  // T of this launch (live_tokens, where set, may be lower)
};

// Choice p of a launch for T tokens: part p % parts of the shared expert for token p / parts below
// T·parts, then the routed choices, token-major (choice j of token t at T·parts + t·k + j). The shared
// choices come first so that their groups are numbered the same before the routing is known as after.
// The kernel is compiled twice: with a folded shared expert (kFolded) and without, where the code is
// the routed experts' alone (measured on the H100: one kernel for both was 1-5% slower on the
// routed experts alone, from the registers its choices took; 80 of them, 12 bytes spilled).
template <bool kFolded>
__device__ __forceinline__ int token_of(const Args& a, int p) {
  if constexpr (!kFolded) return p / a.top_k;
  const int shared = a.max_tokens * a.parts;
  return p < shared ? p / a.parts : (p - shared) / a.top_k;
}

// The work list every block derives from the ids, in shared memory. Groups are numbered by their
// first choice (in choice order), and every block computes the same numbering.
struct RoutedWorkList {
  int ids[kMaxPairs];
  int expert[kMaxPairs];           // per group
  int count[kMaxPairs];            // per group: 1..kRows choices
  int member[kMaxPairs][kRows];    // per group: its choices p
  int leader[kMaxPairs];           // per choice: the first choice of its group (-1: id out of range)
  int occurrence[kMaxPairs];       // per choice: earlier choices of the same expert
  int group_of[kMaxPairs];         // per leader choice: its group's number
  int groups;
};
// With a folded shared expert, per group also where its rows are (the item code reads them here
// rather than choosing in registers).
struct FoldedWorkList : RoutedWorkList {
  int token[kMaxPairs][kRows];     // its choices' tokens (token_of), the rows of x they read
  const uint4* gate_up[kMaxPairs];  // its expert's gate rows (a routed expert's, or a slice of the shared one's)
  int up_rows[kMaxPairs];           // how many rows further its up rows start: I, or S
  const uint4* down[kMaxPairs];     // its w2 rows
  int down_stride[kMaxPairs];       // how many 16-byte vectors apart they are: I / 8, or S / 8
};
template <bool kFolded>
using WorkListOf = std::conditional_t<kFolded, FoldedWorkList, RoutedWorkList>;

__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// Choices of one expert, in choice order, are cut into groups of kRows; a group's leader is its
// first choice. One thread per choice, O(P) over shared memory each: P <= 256, about a microsecond.
// `id`: this thread's choice's expert, loaded by the caller (tid < pairs).
template <bool kFolded>
__device__ void build_work_list(const Args& a, WorkListOf<kFolded>& w, int id, int pairs, int experts) {
  static_assert(kMaxPairs <= kThreads, "one thread per choice");
  const int tid = static_cast<int>(threadIdx.x);
  if (tid < pairs) w.ids[tid] = id;
  if (tid == 0) w.groups = 0;
  __syncthreads();
  int total = 0;  // choices of this thread's expert
  if (tid < pairs) {
    const int e = w.ids[tid];
    int leader = -1, occurrence = 0;
    if (e >= 0 && e < experts) {
      for (int q = 0; q < pairs; ++q) {
        if (w.ids[q] != e) continue;
        if (q < tid) {
          if (occurrence % kRows == 0) leader = q;
          ++occurrence;
        }
        ++total;
      }
      if (occurrence % kRows == 0) leader = tid;
    }
    w.leader[tid] = leader;
    w.occurrence[tid] = occurrence;
  }
  __syncthreads();
  if (tid < pairs && w.leader[tid] == tid) {
    int group = 0;  // leaders before this one: the same number in every block
    for (int q = 0; q < tid; ++q) group += w.leader[q] == q;
    w.group_of[tid] = group;
    const int e = w.ids[tid];
    w.expert[group] = e;
    w.count[group] = min(kRows, total - w.occurrence[tid]);
    if constexpr (kFolded) {
    const bool routed = e < a.experts;
    w.gate_up[group] = reinterpret_cast<const uint4*>(
        routed ? a.w13 + static_cast<int64_t>(e) * 2 * a.inter * a.hidden
               : a.shared.w13 + static_cast<int64_t>(e - a.experts) * a.inter * a.hidden);
    w.up_rows[group] = routed ? a.inter : a.shared_inter;
    w.down[group] = reinterpret_cast<const uint4*>(routed ? a.w2 + static_cast<int64_t>(e) * a.hidden * a.inter
                                                          : a.shared.w2 + static_cast<int64_t>(e - a.experts) * a.inter);
    w.down_stride[group] = (routed ? a.inter : a.shared_inter) / 8;
    }
    atomicAdd(&w.groups, 1);
  }
  __syncthreads();
  if (tid < pairs && w.leader[tid] >= 0) {
    const int group = w.group_of[w.leader[tid]], slot = w.occurrence[tid] % kRows;
    w.member[group][slot] = tid;
    if constexpr (kFolded) w.token[group][slot] = token_of<true>(a, tid);
  }
  __syncthreads();
}

// act[p, j] = silu(w1_j · x_t) · (w3_j · x_t) for the group's choices p (token t = token_of(p)), for the
// warp's two features j of the tile's 16. I is a multiple of 8: both are in range or neither.
template <bool kFolded>
__device__ void up_tile(const Args& a, const WorkListOf<kFolded>& w, int group, int tile) {
  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
  const int j0 = tile * kUpTile + warp * kUpPerWarp;
  if (j0 >= a.inter) return;
  const int count = w.count[group];
  const int vecs = a.hidden / 8;
  // A routed expert's [2I, H], or part e - E of the shared expert: its gate rows from row (e - E)·I
  // of the shared [2S, H], its up rows S further (build_work_list).
  GatheredRows<kRows> x;  // each choice's token row of x, read in place
#pragma unroll
  for (int q = 0; q < kRows; ++q) {
    const int slot = q < count ? q : 0;
    int t;
    if constexpr (kFolded) t = w.token[group][slot];
    else t = w.member[group][slot] / a.top_k;
    x.row[q] = reinterpret_cast<const uint4*>(a.x + static_cast<int64_t>(t) * a.hidden);
  }
  float gate[kRows][kUpPerWarp] = {}, up[kRows][kUpPerWarp] = {};
  if constexpr (kFolded) {
    gate_up_dot<kRows, kUpPerWarp, ActLoad::read_only>(w.gate_up[group], j0, w.up_rows[group], vecs, x, count, lane, gate, up);
  } else {
    const uint4* wt = reinterpret_cast<const uint4*>(a.w13 + static_cast<int64_t>(w.expert[group]) * 2 * a.inter * a.hidden);
    gate_up_dot<kRows, kUpPerWarp, ActLoad::read_only>(wt, j0, a.inter, vecs, x, count, lane, gate, up);
  }
#pragma unroll
  for (int q = 0; q < kRows; ++q) {
    if (q >= count) break;
#pragma unroll
    for (int o = 0; o < kUpPerWarp; ++o) {
      const float gs = warp_sum(gate[q][o]), us = warp_sum(up[q][o]);
      if (lane == 0)
        a.act[static_cast<int64_t>(w.member[group][q]) * a.inter + j0 + o] = float_to_bf16_bits(silu_mul(gs, us));
    }
  }
  if (lane == 0) __threadfence();  // the writer's stores before the block signals its group
}

// The w2 rows of a phase-2 tile into L2 while the block waits for its group's phase 1.
template <bool kFolded>
__device__ void prefetch_down_tile(const Args& a, const WorkListOf<kFolded>& w, int group, int tile) {
  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
  const int h0 = tile * kDownTile + warp * kDownPerWarp;
  if (h0 >= a.hidden) return;
  int stride = a.inter / 8;
  const uint4* expert_rows = reinterpret_cast<const uint4*>(a.w2 + static_cast<int64_t>(w.expert[group]) * a.hidden * a.inter);
  if constexpr (kFolded) {
    stride = w.down_stride[group];
    expert_rows = w.down[group];
  }
  const uint4* first = expert_rows + static_cast<int64_t>(h0) * stride;
  if (!kFolded || stride == a.inter / 8) {  // a routed expert's rows (or a shared slice of S = I): contiguous
    const char* bytes_at = reinterpret_cast<const char*>(first);
    const int64_t bytes = static_cast<int64_t>(kDownPerWarp) * a.inter * 2;
    for (int64_t off = static_cast<int64_t>(lane) * 128; off < bytes; off += 32 * 128) prefetch_l2(bytes_at + off);
    return;
  }
  for (int o = 0; o < kDownPerWarp; ++o)  // a slice of the shared expert's rows: I of every S features
    for (int64_t off = static_cast<int64_t>(lane) * 128; off < a.inter * 2; off += 32 * 128)
      prefetch_l2(reinterpret_cast<const char*>(first + static_cast<int64_t>(o) * stride) + off);
}

// y[p, h] = w2_h · act_p for the group's choices p and the warp's four features h of the tile's 32.
// H is a multiple of 8 (so of 4): all four are in range or none.
template <bool kFolded>
__device__ void down_tile(const Args& a, const WorkListOf<kFolded>& w, int group, int tile) {
  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
  const int h0 = tile * kDownTile + warp * kDownPerWarp;
  if (h0 >= a.hidden) return;
  const int count = w.count[group];
  const int vecs = a.inter / 8;
  // A routed expert's [H, I], or part e - E of the shared expert: columns (e - E)·I on of its [H, S].
  const uint4* wt;
  int stride;
  if constexpr (kFolded) {
    wt = w.down[group];
    stride = w.down_stride[group];
  } else {
    wt = reinterpret_cast<const uint4*>(a.w2 + static_cast<int64_t>(w.expert[group]) * a.hidden * a.inter);
    stride = vecs;
  }
  GatheredRows<kRows> act;
#pragma unroll
  for (int q = 0; q < kRows; ++q)
    act.row[q] = reinterpret_cast<const uint4*>(a.act + static_cast<int64_t>(w.member[group][q < count ? q : 0]) * a.inter);
  float acc[kRows][kDownPerWarp] = {};
  // act was written by other blocks of this launch: read from L2, not L1.
  rows_dot<kRows, kDownPerWarp, ActLoad::coherent>(wt, h0, vecs, stride, act, count, lane, acc);
#pragma unroll
  for (int q = 0; q < kRows; ++q) {
    if (q >= count) break;
#pragma unroll
    for (int o = 0; o < kDownPerWarp; ++o) {
      const float sum = warp_sum(acc[q][o]);
      if (lane == 0) a.y[static_cast<int64_t>(w.member[group][q]) * a.hidden + h0 + o] = sum;
    }
  }
  if (lane == 0) __threadfence();  // the writer's stores before the block counts its tile
}

// g_t = σ(x_t · gate_w) of a gated shared expert (1 without a gate) for every token, into `scale`:
// a warp per token, the sum in a fixed order.
__device__ void shared_scales(const Args& a, int tokens, float* scale) {
  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
  for (int t = warp; t < tokens; t += kWarps) {
    const float v = a.shared.gate ? warp_sigmoid_gate(reinterpret_cast<const uint4*>(a.x + static_cast<int64_t>(t) * a.hidden),
                                                      reinterpret_cast<const uint4*>(a.shared.gate), a.hidden / 8, lane)
                                  : 1.0f;
    if (lane == 0) scale[t] = v;
  }
}

// out[t, h] = Σ_j weight[t, j] · y[(t, j), h] over the token's k routed choices, then its shared parts
// (weight g_t), in that order, for the tile's 32 features h and every token: the same sum whichever
// block runs it. Every thread of the block calls it.
template <bool kFolded>
__device__ void combine_tile(const Args& a, const WorkListOf<kFolded>& w, int tokens, int tile) {
  __shared__ float scale[kFolded ? kMaxPairs : 1];
  if constexpr (kFolded) {
    shared_scales(a, tokens, scale);
    __syncthreads();
  }
  const int h0 = tile * kDownTile;
  for (int i = static_cast<int>(threadIdx.x); i < tokens * kDownTile; i += kThreads) {
    const int t = i / kDownTile, h = h0 + i % kDownTile;
    if (h >= a.hidden) continue;
    float sum = 0.0f;
    for (int j = 0; j < (kFolded ? a.choices : a.top_k); ++j) {
      const bool routed = !kFolded || j < a.top_k;
      const int p = !kFolded ? t * a.top_k + j : routed ? a.max_tokens * a.parts + t * a.top_k + j : t * a.parts + j - a.top_k;
      if (w.leader[p] < 0) continue;  // an id outside [0, E): no expert, no contribution
      const float weight = routed ? a.weights[t * a.top_k + j] : scale[t];
      sum = fmaf(weight, __ldcg(a.y + static_cast<int64_t>(p) * a.hidden + h), sum);
    }
    a.out[static_cast<int64_t>(t) * a.hidden + h] = float_to_bf16_bits(sum);
  }
}

// Every block on its way out: the last one to finish zeroes the counters (the groups' and the
// slices' counts, the work counter and this count), so the next launch on the lane finds them zero
// without a memset node before it (LaneContext::counters). Every block's last use of the work
// counter and of the counts precedes its arrival here.
__device__ void leave(const Args& a, int groups, int down_tiles) {
  __shared__ int last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicAdd(a.done_blocks, 1) == static_cast<int>(gridDim.x) - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();  // the zeroing after every other block's last count, not just after this block's
  for (int i = static_cast<int>(threadIdx.x); i < groups; i += kThreads) a.up_done[i] = 0;
  for (int i = static_cast<int>(threadIdx.x); i < down_tiles; i += kThreads) a.down_done[i] = 0;
  if (threadIdx.x == 0) {
    *a.next_item = 0;
    *a.done_blocks = 0;
  }
}

// Choice p's expert for the work list (token_of): its shared part E + p % parts, or its routed id
// (`routed`, loaded by the caller; null: the routing is not known yet, -1), -1 past the run's T and
// for a routed id outside [0, E) (it contributes nothing; E .. E + parts - 1 are the shared parts').
template <bool kFolded>
__device__ __forceinline__ int choice_id(const Args& a, int p, int tokens, const int* routed) {
  if (p >= a.max_tokens * a.choices || token_of<kFolded>(a, p) >= tokens) return -1;
  if (kFolded && p < a.max_tokens * a.parts) return a.experts + p % a.parts;
  return routed && *routed >= 0 && *routed < a.experts ? *routed : -1;
}

// One phase-1 item: the group's act values for one tile of 16 features of I, then the group's count.
template <bool kFolded>
__device__ void up_item(const Args& a, const WorkListOf<kFolded>& w, int item, int up_tiles) {
  const int group = item / up_tiles;
  up_tile<kFolded>(a, w, group, item % up_tiles);
  __syncthreads();
  if (threadIdx.x == 0) atomicAdd(a.up_done + group, 1);
}

template <bool kFolded>
__global__ void __launch_bounds__(kThreads, 3) fused_decode_kernel(Args a) {
  __shared__ WorkListOf<kFolded> w;
  __shared__ int flag, next;
  // Three independent round trips issued together before any is used (they were one after another):
  // this thread's id (up to the maximum T·k; entries past the run's T are never used), the run's T,
  // and the block's first item. With the counters left zero for the next launch (leave(), no memset
  // node), measured on the H100, experts path in a CUDA graph at T=1: qwen1.5 38.4-39.0 µs, qwen3
  // 40.7-40.8 (before: 38.7-40.7 and 40.5-42.8 over this session's and the last one's runs). The live
  // T was written before the previous kernel ran, so it is read before the wait of an early start.
  const int tid = static_cast<int>(threadIdx.x);
  const int pairs = a.max_tokens * a.choices;
  const int routed_id = !a.early && tid >= a.max_tokens * a.parts && tid < pairs ? a.ids[tid - a.max_tokens * a.parts] : -1;
  const int live = a.live_tokens ? *a.live_tokens : a.max_tokens;
  const int first = tid == 0 ? atomicAdd(a.next_item, 1) : 0;
  const int tokens = max(0, min(live, a.max_tokens));
  if (tid == 0) next = first;
  const int up_tiles = (a.inter + kUpTile - 1) / kUpTile;
  const int down_tiles = (a.hidden + kDownTile - 1) / kDownTile;
  // Started early, the block first works through the shared expert's gate/up items, which need no
  // routing: its groups are the first ones of the full list too (token_of), so the items keep their
  // numbers. Past them it waits for the routing and builds the full list. One loop serves both, so
  // the item code is compiled once (a second copy of it spilled registers in the main loop).
  bool routed = !kFolded || !a.early;
  build_work_list<kFolded>(a, w, choice_id<kFolded>(a, tid, tokens, routed ? &routed_id : nullptr), pairs, a.experts + a.parts);
  int groups = w.groups;
  int up_items = groups * up_tiles;
  int items = routed ? up_items + groups * down_tiles : up_items;
  int item = next;
  for (;;) {
    if (item >= items) {
      if (routed) break;
      __syncthreads();  // every thread has read w.groups and `next` before the full list overwrites them
      wait_for_previous_kernel();  // the routing: ids and weights
      // (the same load as routed_id's above; through a shared helper the folded kernel spilled more)
      const int routed_now = tid >= a.max_tokens * a.parts && tid < pairs ? a.ids[tid - a.max_tokens * a.parts] : -1;
      build_work_list<kFolded>(a, w, choice_id<kFolded>(a, tid, tokens, &routed_now), pairs, a.experts + a.parts);
      routed = true;
      groups = w.groups;
      up_items = groups * up_tiles;
      items = up_items + groups * down_tiles;
      continue;
    }
    // Blocks take items from one counter, every phase-1 item (group-major) before any phase-2 item
    // (group-major: the first groups' phase 1 ends first). A block waiting on a group waits only for
    // items that running blocks took and finish without waiting, so no residency guarantee is needed.
    // Measured on the H100 against dealing the same items round-robin over a cooperative grid: the
    // same at T=1 on qwen (40.3 / 42.5 against 37.1-38.8 / 41.8-42.7 µs), faster from T=2 and on
    // deepseek-v3 (qwen3 T=4 106.0 against 114.9 µs, deepseek-v3 T=1 243.5 against 256.8). The next
    // item is fetched while this one is worked on, hiding the atomic's latency (the first was fetched
    // at entry; build_work_list's barriers publish it).
    __syncthreads();  // every thread has read `next`
    if (threadIdx.x == 0) next = atomicAdd(a.next_item, 1);
    if (item < up_items) {
      up_item<kFolded>(a, w, item, up_tiles);
    } else {
      const int down = item - up_items;
      const int group = down / down_tiles, tile = down % down_tiles;
      if (threadIdx.x == 0) flag = load_acquire(a.up_done + group) >= up_tiles;
      __syncthreads();
      if (!flag) {
        prefetch_down_tile<kFolded>(a, w, group, tile);
        if (threadIdx.x == 0)
          while (load_acquire(a.up_done + group) < up_tiles) __nanosleep(100);
        __syncthreads();
      }
      down_tile<kFolded>(a, w, group, tile);
      __syncthreads();
      if (threadIdx.x == 0) flag = atomicAdd(a.down_done + tile, 1) == groups - 1;
      __syncthreads();
      if (flag) {
        __threadfence();
        combine_tile<kFolded>(a, w, tokens, tile);
      }
    }
    __syncthreads();  // `next` is written; `flag` is rewritten by the next item
    item = next;
  }
  if (groups == 0)  // nothing routed to an expert here: the output is zeros
    for (int tile = static_cast<int>(blockIdx.x); tile < down_tiles; tile += static_cast<int>(gridDim.x))
      combine_tile<kFolded>(a, w, tokens, tile);
  leave(a, groups, down_tiles);
}

constexpr int64_t align256(int64_t n) { return (n + 255) / 256 * 256; }

int shared_parts(const FusedDecodeShape& s) { return s.shared_intermediate > 0 ? s.shared_intermediate / s.intermediate : 0; }
int choices(const FusedDecodeShape& s) { return s.top_k + shared_parts(s); }
int64_t act_bytes(const FusedDecodeShape& s) { return align256(s.max_tokens * choices(s) * s.intermediate * 2); }
int64_t y_bytes(const FusedDecodeShape& s) { return align256(s.max_tokens * choices(s) * s.hidden * 4); }
int down_tile_count(const FusedDecodeShape& s) { return (s.hidden + kDownTile - 1) / kDownTile; }
int counter_words(const FusedDecodeShape& s) { return kMaxPairs + down_tile_count(s) + 2; }
int64_t counter_bytes(const FusedDecodeShape& s) { return align256(counter_words(s) * 4); }

std::atomic<int> blocks_per_sm{0}, folded_blocks_per_sm{0};


}  // namespace

std::string fused_decode_unsupported(const FusedDecodeShape& s) {
  if (s.hidden <= 0 || s.intermediate <= 0 || s.hidden % 8 != 0 || s.intermediate % 8 != 0)
    return "H = " + std::to_string(s.hidden) + ", I = " + std::to_string(s.intermediate) +
           ": the fused decode kernel's 16-byte loads need positive multiples of 8";
  if (s.experts <= 0 || s.top_k <= 0) return "E = " + std::to_string(s.experts) + ", k = " + std::to_string(s.top_k);
  if (s.shared_intermediate < 0 || s.shared_intermediate % s.intermediate != 0)
    return "shared S = " + std::to_string(s.shared_intermediate) + " is not a multiple of I = " +
           std::to_string(s.intermediate) + ": the fused decode kernel folds a shared expert in as S / I experts of I";
  if (s.max_tokens * choices(s) > kMaxPairs)
    return "T*k = " + std::to_string(s.max_tokens * choices(s)) + (shared_parts(s) ? " (shared parts included)" : "") +
           " > " + std::to_string(kMaxPairs) + ": the fused decode kernel builds its work list in one block";
  return {};
}

int64_t fused_decode_workspace_bytes(const FusedDecodeShape& s) { return act_bytes(s) + y_bytes(s) + counter_bytes(s); }

void experts_fused_decode(const LaneContext& ctx, const FusedDecodeShape& s, int64_t tokens, const int32_t* live_tokens,
                          const uint16_t* x, const int32_t* ids, const float* weights, const uint16_t* w13,
                          const uint16_t* w2, uint16_t* out, void* workspace, const FusedSharedWeights& shared,
                          bool start_early) {
  if (const std::string why = fused_decode_unsupported(s); !why.empty()) fail_input("experts_fused_decode: " + why);
  if (s.shared_intermediate > 0 && (!shared.w13 || !shared.w2 || s.shared_gated != (shared.gate != nullptr)))
    fail_input("experts_fused_decode: the shared expert's weights do not match its shape (S = " +
               std::to_string(s.shared_intermediate) + (s.shared_gated ? ", gated" : "") + ")");
  if (tokens < 0 || tokens > s.max_tokens)
    fail_input("experts_fused_decode: T = " + std::to_string(tokens) + " outside [0, " + std::to_string(s.max_tokens) + "]");
  if (tokens == 0 && !live_tokens) return;
  auto* bytes = static_cast<std::byte*>(workspace);
  Args a{};
  static_cast<FusedOperands&>(a) = {x, ids, weights, w13, w2, out, s.experts, s.top_k, s.hidden, s.intermediate, live_tokens};
  a.act = reinterpret_cast<uint16_t*>(bytes);
  a.y = reinterpret_cast<float*>(bytes + act_bytes(s));
  // The counters: the lane's, which the kernel leaves zero, where they fit; else the workspace's
  // (shared with other nodes' buffers), zeroed before every run by a memset.
  // Only the folded kernel has work before the routing, and only it waits for it.
  a.early = start_early && s.shared_intermediate > 0 && early_start_supported<fused_decode_kernel<true>>(ctx.device);
  a.up_done = launch_counters(ctx, counter_words(s), reinterpret_cast<int*>(bytes + act_bytes(s) + y_bytes(s)), a.early);
  a.down_done = a.up_done + kMaxPairs;
  a.next_item = a.down_done + down_tile_count(s);
  a.done_blocks = a.next_item + 1;
  a.max_tokens = static_cast<int>(tokens);
  a.shared = shared;
  a.shared_inter = s.shared_intermediate;
  a.parts = shared_parts(s);
  a.choices = choices(s);
  // Enough blocks for the most work the sizes allow, at most what is resident at once.
  const bool folded = a.parts > 0;
  const int64_t up_tiles = (s.intermediate + kUpTile - 1) / kUpTile;
  const int64_t most_items = tokens * choices(s) * (up_tiles + down_tile_count(s));
  const int resident = folded ? resident_blocks(fused_decode_kernel<true>, kThreads, ctx.device, folded_blocks_per_sm)
                              : resident_blocks(fused_decode_kernel<false>, kThreads, ctx.device, blocks_per_sm);
  const int grid = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(std::max<int64_t>(most_items, down_tile_count(s)), resident)));
  if (!folded) fused_decode_kernel<false><<<grid, kThreads, 0, ctx.stream>>>(a);
  else launch_maybe_early(fused_decode_kernel<true>, grid, kThreads, ctx.stream, a.early, a);
  MOEFLOW_CUDA_LAUNCH_CHECK();
}

}  // namespace moeflow::cuda
