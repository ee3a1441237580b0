#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>

#include "graph/error.hpp"
#include "kernels/cuda/bf16_vec.cuh"
#include "kernels/cuda/check.cuh"
#include "kernels/cuda/live_rows.cuh"
#include "kernels/cuda/permute.hpp"

namespace moeflow::cuda {

namespace {

// ---- permutation: a one-digit counting sort over expert ids -------------------------------------
//
// The n = T*k ids are cut into tiles, one warp per tile. (1) Each warp counts its tile per expert
// into hist[e][tile] (expert-major). (2) One block scans hist exclusively in that order, which gives
// for every (expert, tile) the first permuted row of that expert's ids in that tile, and offsets[e]
// = hist[e][0]. (3) Each warp walks its tile again in flat order, 32 ids at a time, and ranks each
// id among equal ids (__match_any_sync) on top of a running per-expert count in shared memory: the
// order within an expert is the flat order, exactly the CPU's counting sort. Only integer counts,
// no atomics on the output: deterministic. Invalid ids count as expert E, a bucket after all others.

// Tile lengths: each warp's rank pass walks its tile 32 ids per step, one dependent round trip to
// memory per step (~0.55 µs on the H100), while the single-block scan grows with the hist entries
// (E + 1 per tile: ~4 µs at 2K entries, ~12 at 16K, ~40 at 66K). Tiles as short as one step until
// the entries reach kScanEntries, then longer tiles up to kLongTile ids, then as many entries as
// kMaxScan allows (bench/probes/dispatch_parts.cu; the rank pass was 22-26 µs at every T with
// 1024-id tiles).
constexpr int64_t kMinTile = 32;        // ids per warp at least: one step
constexpr int64_t kScanEntries = 16384; // hist entries the short tiles stop at
constexpr int64_t kLongTile = 1024;     // ids per warp before the entries grow past kScanEntries
constexpr int64_t kMaxScan = 65536;     // hist entries the single-block scan handles comfortably
constexpr int kMaxWarpsPerBlock = 4;
constexpr size_t kSharedBudget = 48 * 1024;  // per block, without opting in to more
constexpr int kScanThreads = 1024;
// Chunks of kScanThreads * 4 entries one pass of the scan covers: 16K, what kScanEntries aims at.
// (16 contiguous entries per thread instead, one chunk, was slower than 4: a warp's loads then span
// 2 KB; bench/NOTES.md "Where the time still goes".)
constexpr int kScanChunks = 4;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t target_tiles(int experts) { return std::max<int64_t>(1, kScanEntries / (static_cast<int64_t>(experts) + 1)); }
int64_t cap_tiles(int experts) { return std::max<int64_t>(1, kMaxScan / (static_cast<int64_t>(experts) + 1)); }

// Tile length for n ids: n spread over target_tiles, but no tile shorter than kMinTile and none
// longer than kLongTile unless the tiles would pass cap_tiles; a multiple of 32 so that every warp
// step but the tile's last is full.
int64_t tile_length(int64_t n, int experts) {
  const int64_t longest = std::max(kLongTile, ceil_div(n, cap_tiles(experts)));
  const int64_t t = std::max(kMinTile, std::min(ceil_div(n, target_tiles(experts)), longest));
  return ceil_div(t, 32) * 32;
}

// Upper bound of the tile count for any n <= max_n. ceil(n / tile_length(n)) is at most
// target_tiles where n / target_tiles fits a long tile, else at most min(ceil(n / kLongTile), cap),
// and never more than ceil(n / kMinTile); each bound grows with n.
int64_t max_tiles(int64_t max_n, int experts) {
  const int64_t spread = std::max(target_tiles(experts), std::min(ceil_div(max_n, kLongTile), cap_tiles(experts)));
  return std::min(ceil_div(max_n, kMinTile), spread);
}

int warps_per_block(int experts) {
  const size_t per_warp = sizeof(int32_t) * (static_cast<size_t>(experts) + 1);
  return static_cast<int>(std::min<size_t>(kMaxWarpsPerBlock, kSharedBudget / per_warp));
}

__device__ __forceinline__ int bucket_of(int32_t id, int experts) { return (id >= 0 && id < experts) ? id : experts; }

// One warp's tile of the ids: ids [begin, end) of tile `w`, and its per-bucket counters (E + 1 of
// them, zeroed) in the block's shared memory. `active` is false for warps past the last tile.
struct WarpTile {
  int lane;
  int64_t w, begin, end;
  int32_t* cnt;
  bool active;
};

__device__ __forceinline__ WarpTile warp_tile(int64_t n, int experts, int64_t tile, int64_t num_tiles) {
  extern __shared__ int32_t counts_smem[];
  const int warp = static_cast<int>(threadIdx.x) / 32;
  WarpTile t;
  t.lane = static_cast<int>(threadIdx.x) % 32;
  t.w = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + warp;
  t.active = t.w < num_tiles;
  t.cnt = counts_smem + static_cast<size_t>(warp) * (experts + 1);
  t.begin = t.w * tile;
  t.end = t.begin + tile < n ? t.begin + tile : n;  // below begin past a live count: an empty tile
  if (t.active) {
    for (int e = t.lane; e <= experts; e += 32) t.cnt[e] = 0;
    __syncwarp();
  }
  return t;
}

__global__ void perm_count_kernel(const int32_t* __restrict__ ids, int64_t n, int experts, int64_t tile,
                                  int64_t num_tiles, int32_t* __restrict__ hist, LiveRows live) {
  const WarpTile t = warp_tile(live_bound(live, n), experts, tile, num_tiles);
  if (!t.active) return;
  const int lane = t.lane;
  const int64_t w = t.w, begin = t.begin, end = t.end;
  int32_t* cnt = t.cnt;
  for (int64_t i = begin + lane; i < end; i += 32) atomicAdd(&cnt[bucket_of(ids[i], experts)], 1);  // integer: exact
  __syncwarp();
  for (int e = lane; e <= experts; e += 32) hist[static_cast<int64_t>(e) * num_tiles + w] = cnt[e];
}

// Exclusive scan of data[0, m) in place by one block; offsets[idx / num_tiles] takes every entry
// whose idx is a multiple of num_tiles. A pass covers kChunks chunks of kScanThreads * 4 entries:
// each thread loads its four entries of every chunk as one 16-byte vector (a warp's 512 bytes in one
// request), all of the pass's loads in flight before any is used, and the chunks are scanned side by
// side, so a pass costs one round trip to L2 and two barriers whatever its chunks.
template <int kChunks>
__global__ void __launch_bounds__(kScanThreads)
    perm_scan_kernel(int32_t* __restrict__ data, int64_t m, int64_t num_tiles, int32_t* __restrict__ offsets) {
  __shared__ int32_t warp_sums[kChunks][kScanThreads / 32];
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % 32;
  const int warp = tid / 32;
  const bool vec = (reinterpret_cast<uintptr_t>(data) & 15u) == 0;
  constexpr int64_t kChunk = int64_t{kScanThreads} * 4;
  int32_t carry = 0;
  for (int64_t base = 0; base < m; base += kChunk * kChunks) {
    int32_t v[kChunks][4], local[kChunks], incl[kChunks];
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int64_t idx = base + c * kChunk + static_cast<int64_t>(tid) * 4;
      if (vec && idx + 3 < m) {
        const int4 q = *reinterpret_cast<const int4*>(data + idx);
        v[c][0] = q.x, v[c][1] = q.y, v[c][2] = q.z, v[c][3] = q.w;
      } else {
#pragma unroll
        for (int q = 0; q < 4; ++q) v[c][q] = idx + q < m ? data[idx + q] : 0;
      }
    }
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      local[c] = v[c][0] + v[c][1] + v[c][2] + v[c][3];
      incl[c] = local[c];
    }
#pragma unroll
    for (int o = 1; o < 32; o *= 2)
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const int32_t y = __shfl_up_sync(0xffffffffu, incl[c], o);
        if (lane >= o) incl[c] += y;
      }
    if (lane == 31)
#pragma unroll
      for (int c = 0; c < kChunks; ++c) warp_sums[c][warp] = incl[c];
    __syncthreads();
    if (warp < kChunks) {  // warp c scans chunk c's warp sums
      int32_t s = warp_sums[warp][lane];
#pragma unroll
      for (int o = 1; o < 32; o *= 2) {
        const int32_t y = __shfl_up_sync(0xffffffffu, s, o);
        if (lane >= o) s += y;
      }
      warp_sums[warp][lane] = s;
    }
    __syncthreads();
    int32_t chunk_base = carry;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      int32_t prefix = chunk_base + (warp > 0 ? warp_sums[c][warp - 1] : 0) + incl[c] - local[c];
      const int64_t idx = base + c * kChunk + static_cast<int64_t>(tid) * 4;
      int32_t out[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        out[q] = prefix;
        if (idx + q < m && (idx + q) % num_tiles == 0) offsets[(idx + q) / num_tiles] = prefix;
        prefix += v[c][q];
      }
      if (vec && idx + 3 < m) {
        *reinterpret_cast<int4*>(data + idx) = make_int4(out[0], out[1], out[2], out[3]);
      } else {
#pragma unroll
        for (int q = 0; q < 4; ++q)
          if (idx + q < m) data[idx + q] = out[q];
      }
      chunk_base += warp_sums[c][kScanThreads / 32 - 1];
    }
    carry = chunk_base;
    __syncthreads();  // warp_sums is rewritten by the next pass
  }
}

// The scan of m hist entries on `stream`: one chunk per pass where one holds them all (the pass's
// other chunks would only cost their shuffles), else kScanChunks.
void launch_scan(int32_t* hist, int64_t m, int64_t num_tiles, int32_t* offsets, cudaStream_t stream) {
  if (m <= int64_t{kScanThreads} * 4) perm_scan_kernel<1><<<1, kScanThreads, 0, stream>>>(hist, m, num_tiles, offsets);
  else perm_scan_kernel<kScanChunks><<<1, kScanThreads, 0, stream>>>(hist, m, num_tiles, offsets);
}

__global__ void perm_rank_kernel(const int32_t* __restrict__ ids, int64_t n, int experts, int64_t tile,
                                 int64_t num_tiles, const int32_t* __restrict__ base, int32_t* __restrict__ slot_of,
                                 int32_t* __restrict__ row_source, LiveRows live) {
  const WarpTile t = warp_tile(live_bound(live, n), experts, tile, num_tiles);
  if (!t.active) return;
  const int lane = t.lane;
  const int64_t w = t.w, begin = t.begin, end = t.end;
  int32_t* cnt = t.cnt;
  const uint32_t lower_lanes = (1u << lane) - 1u;
  for (int64_t c = begin; c < end; c += 32) {  // the same trip count on every lane
    const int64_t i = c + lane;
    const bool valid = i < end;
    const int key = valid ? bucket_of(ids[i], experts) : experts + 1;  // padding lanes match only each other
    const uint32_t peers = __match_any_sync(0xffffffffu, key);
    if (valid) {
      const int32_t slot = base[static_cast<int64_t>(key) * num_tiles + w] + cnt[key] + __popc(peers & lower_lanes);
      slot_of[i] = key == experts ? -1 : slot;  // an id outside [0, E): no row for the combine to add
      if (row_source) row_source[slot] = static_cast<int32_t>(i);
    }
    __syncwarp();
    if (valid && lane == __ffs(peers) - 1) cnt[key] += __popc(peers);
    __syncwarp();
  }
}

// Decode-sized permutations (n <= kSmallRows, the T·k of a few tokens) in one block and one launch
// instead of three: each row's key in shared memory, offsets[e] = the rows with a smaller key, a
// row's slot = its expert's offset + the rows before it with the same key. Quadratic in n, which is
// what makes it cheap at this size; the same permutation as the tiled path.
constexpr int kSmallRows = 256;

__global__ void __launch_bounds__(kSmallRows)
    perm_small_kernel(const int32_t* __restrict__ ids, int n_bound, int experts, int32_t* __restrict__ offsets,
                      int32_t* __restrict__ slot_of, int32_t* __restrict__ row_source, LiveRows live) {
  __shared__ int32_t keys[kSmallRows];
  const int n = static_cast<int>(live_bound(live, n_bound));
  const int i = static_cast<int>(threadIdx.x);
  if (i < n) keys[i] = bucket_of(ids[i], experts);
  __syncthreads();
  for (int e = i; e <= experts; e += blockDim.x) {
    int below = 0;
    for (int j = 0; j < n; ++j) below += keys[j] < e;
    offsets[e] = below;
  }
  if (i < n) {
    const int key = keys[i];
    int slot = 0, before = 0;
    for (int j = 0; j < n; ++j) {
      slot += keys[j] < key;
      before += j < i && keys[j] == key;
    }
    slot += before;
    slot_of[i] = key == experts ? -1 : slot;  // an id outside [0, E): no row for the combine to add
    if (row_source) row_source[slot] = i;
  }
}

// ---- permutation by buckets: one block per bucket, one launch -------------------------------------
//
// Block b (expert b; b = E: the ids outside [0, E)) reads every id. Its offset is the number of ids
// in lower buckets, so no block needs another's count: no workspace, no atomics, no second launch.
// Its own ids it ranks in flat order: each warp owns a contiguous run of the ids, walked in groups of
// 128 (four per lane, lane-major, so a group is one 512-byte load of the warp); pass 1 counts and
// keeps each group's four match masks (ballots) in shared memory, the warps' totals are scanned in
// the block, pass 2 turns the masks into slots. Every block reads all n ids from L2, so the method
// is taken while (E + 1)·n stays small (kBucketMaxReads), where it replaces three launches by one.
// Measured as CUDA graphs against the tiles (bench/probes/dispatch_parts.cu, H100): qwen3 T = 128 /
// 512 / 2048 / 8192 7.9 / 8.2 / 9.2 / 15.6 µs against 11.7 / 12.9 / 15.5 / 22.0; deepseek-v3 T=8192
// (257 blocks, 16.8 M ids read) 25.5 against 33.4.
constexpr int kBucketThreads = 1024;
constexpr int kBucketWarps = kBucketThreads / 32;
static_assert(kBucketWarps == 32, "the warps' totals are scanned by one warp, one per lane");
constexpr int kGroupIds = 128;                 // ids per warp step: four per lane
constexpr int kGroupsInFlight = 8;             // groups a warp loads before it uses any
constexpr int64_t kBucketMaxIds = 131072;      // masks in shared memory: n / 8 bytes, 16 KB at most
constexpr int64_t kBucketMaxReads = 1 << 25;   // (E + 1)·n: 128 MB read from L2 by all the blocks

// Groups per warp for n ids: the runs as even as whole groups allow.
__host__ __device__ __forceinline__ int64_t bucket_groups_per_warp(int64_t n) {
  return (n + int64_t{kGroupIds} * kBucketWarps - 1) / (int64_t{kGroupIds} * kBucketWarps);
}

// The kernel's dynamic shared memory for n ids: four masks per group of every warp.
size_t bucket_masks_bytes(int64_t n) {
  return sizeof(uint32_t) * 4 * kBucketWarps * static_cast<size_t>(bucket_groups_per_warp(n));
}

__device__ __forceinline__ int warp_total(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__global__ void __launch_bounds__(kBucketThreads)
    perm_bucket_kernel(const int32_t* __restrict__ ids, int64_t n_bound, int experts, int32_t* __restrict__ offsets,
                       int32_t* __restrict__ slot_of, int32_t* __restrict__ row_source, LiveRows live) {
  extern __shared__ uint32_t group_masks[];  // [warp][group][4]
  __shared__ int32_t warp_lower[kBucketWarps], warp_equal[kBucketWarps];
  const int bucket = static_cast<int>(blockIdx.x);
  const int64_t n = live_bound(live, n_bound);
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int64_t groups = bucket_groups_per_warp(n);
  const int64_t begin = warp * groups * kGroupIds;
  const int64_t end = begin + groups * kGroupIds < n ? begin + groups * kGroupIds : n;
  const bool vec = (reinterpret_cast<uintptr_t>(ids) & 15u) == 0;
  uint32_t* masks = group_masks + warp * groups * 4;

  // Pass 1: ids of lower buckets counted per lane, this bucket's matches as masks.
  int lower = 0, equal = 0;
  for (int64_t g0 = 0; g0 < groups; g0 += kGroupsInFlight) {
    int keys[kGroupsInFlight][4];
#pragma unroll
    for (int b = 0; b < kGroupsInFlight; ++b) {
      const int64_t i = begin + (g0 + b) * kGroupIds + 4 * lane;
      if (vec && i + 3 < end) {
        const int4 q = *reinterpret_cast<const int4*>(ids + i);
        keys[b][0] = bucket_of(q.x, experts), keys[b][1] = bucket_of(q.y, experts);
        keys[b][2] = bucket_of(q.z, experts), keys[b][3] = bucket_of(q.w, experts);
      } else {
#pragma unroll
        for (int q = 0; q < 4; ++q) keys[b][q] = i + q < end ? bucket_of(ids[i + q], experts) : experts + 1;  // past the run: no bucket
      }
    }
#pragma unroll
    for (int b = 0; b < kGroupsInFlight; ++b)
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        lower += keys[b][q] < bucket;
        const uint32_t m = __ballot_sync(0xffffffffu, keys[b][q] == bucket);
        equal += __popc(m);
        if (lane == 0 && g0 + b < groups) masks[(g0 + b) * 4 + q] = m;
      }
  }
  lower = warp_total(lower);
  if (lane == 0) warp_lower[warp] = lower, warp_equal[warp] = equal;
  __syncthreads();

  // The bucket's first row, and this warp's first slot in it (the warps before it, in flat order).
  const int32_t first_row = warp_total(warp_lower[lane]);
  int32_t next = first_row + warp_total(lane < warp ? warp_equal[lane] : 0);
  if (threadIdx.x == 0) offsets[bucket] = first_row;  // offsets[E]: the valid ids

  // Pass 2: a match's slot = the rows before its group + the matches before it in the group (lanes
  // below it, then its own earlier ids).
  const uint32_t lower_lanes = (1u << lane) - 1u;
  for (int64_t g = 0; g < groups; ++g) {
    uint32_t m[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) m[q] = masks[g * 4 + q];
    if ((m[0] | m[1] | m[2] | m[3]) == 0) continue;
    int32_t slot = next;
#pragma unroll
    for (int q = 0; q < 4; ++q) slot += __popc(m[q] & lower_lanes);
    const int64_t i0 = begin + g * kGroupIds + 4 * lane;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      if ((m[q] >> lane) & 1u) {
        slot_of[i0 + q] = bucket == experts ? -1 : slot;  // an id outside [0, E): no row for the combine to add
        if (row_source) row_source[slot] = static_cast<int32_t>(i0 + q);
        ++slot;
      }
      next += __popc(m[q]);
    }
  }
}

// ---- rows: gather and combine ---------------------------------------------------------------------

constexpr int kRowThreads = 256;
constexpr int kRowThreadsLog2 = 8;
static_assert(kRowThreads == 1 << kRowThreadsLog2);

// Threads per row (a power of two, up to the block) and rows per block for `per_row` work items.
struct RowGrid {
  int shift;  // log2(threads per row)
  int rows_per_block;
  unsigned blocks;
};

RowGrid row_grid(int64_t rows, int64_t per_row, const char* what) {
  int shift = 0;
  while ((int64_t{1} << shift) < per_row && (1 << shift) < kRowThreads) ++shift;
  const int rpb = kRowThreads >> shift;
  const int64_t blocks = (rows + rpb - 1) / rpb;
  if (blocks > 0x7fffffff) fail_input(std::string(what) + ": " + std::to_string(rows) + " rows exceed one grid");
  return {shift, rpb, static_cast<unsigned>(blocks)};
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }




// Row r of a buffer whose rows [window.lo, window.hi) live in window.rows.
__device__ __forceinline__ uint16_t* row_at(uint16_t* rows, RowWindow window, int64_t r, int hidden) {
  return r >= window.lo && r < window.hi ? window.rows + (r - window.lo) * hidden : rows + r * hidden;
}

// One row per 2^shift threads; kVec: 8 bf16 (16 bytes) per access.
template <bool kVec>
__global__ void __launch_bounds__(kRowThreads)
    gather_kernel(const uint16_t* __restrict__ x, const int32_t* __restrict__ row_source, int64_t rows, int top_k,
                  int hidden, int shift, uint16_t* __restrict__ out, RowWindow window, LiveRows live) {
  const int64_t r = (static_cast<int64_t>(blockIdx.x) << (kRowThreadsLog2 - shift)) + (threadIdx.x >> shift);
  if (r >= live_bound(live, rows)) return;
  if (window.rows == nullptr && r >= window.lo && r < window.hi) return;
  const int sub = static_cast<int>(threadIdx.x) & ((1 << shift) - 1);
  const int64_t src = row_source[r] / top_k;
  uint16_t* dst = row_at(out, window, r, hidden);
  if constexpr (kVec) {
    const uint4* s = reinterpret_cast<const uint4*>(x + src * hidden);
    uint4* d = reinterpret_cast<uint4*>(dst);
    for (int v = sub; v < hidden / 8; v += 1 << shift) d[v] = s[v];
  } else {
    const uint16_t* s = x + src * hidden;
    uint16_t* d = dst;
    for (int h = sub; h < hidden; h += 1 << shift) d[h] = s[h];
  }
}

// One token per 2^shift threads: its row of x read once, written to each of its k slots (slot_of
// < 0: no row). Where a gather by permuted row reads each row of x k times in expert order (from
// DRAM once x outgrows L2: deepseek-v3's 117 MB at T=8192), this reads x once and only writes.
// Streaming stores (evict first): 34.4 -> 29.3 us for qwen3's 67 MB at T=2048, the same at T=8192
// (bench/probes/dispatch_parts.cu).
template <bool kVec>
__global__ void __launch_bounds__(kRowThreads)
    scatter_kernel(const uint16_t* __restrict__ x, const int32_t* __restrict__ slot_of, int64_t tokens, int top_k,
                   int hidden, int shift, uint16_t* __restrict__ out, LiveRows live) {
  const int64_t t = (static_cast<int64_t>(blockIdx.x) << (kRowThreadsLog2 - shift)) + (threadIdx.x >> shift);
  if (t >= live_bound(live, tokens)) return;
  const int sub = static_cast<int>(threadIdx.x) & ((1 << shift) - 1);
  const int32_t* slots = slot_of + t * top_k;
  if constexpr (kVec) {
    const uint4* s = reinterpret_cast<const uint4*>(x + t * hidden);
    for (int v = sub; v < hidden / 8; v += 1 << shift) {
      const uint4 q = s[v];
      for (int j = 0; j < top_k; ++j)
        if (const int32_t slot = slots[j]; slot >= 0) __stcs(reinterpret_cast<uint4*>(out + static_cast<int64_t>(slot) * hidden) + v, q);
    }
  } else {
    for (int h = sub; h < hidden; h += 1 << shift) {
      const uint16_t q = x[t * hidden + h];
      for (int j = 0; j < top_k; ++j)
        if (const int32_t slot = slots[j]; slot >= 0) out[static_cast<int64_t>(slot) * hidden + h] = q;
    }
  }
}

template <bool kVec>
__global__ void __launch_bounds__(kRowThreads)
    combine_kernel(const uint16_t* __restrict__ y_rows, const int32_t* __restrict__ slot_of,
                   const float* __restrict__ weights, int64_t tokens, int top_k, int hidden, int shift,
                   uint16_t* out, RowWindow window, LiveRows live, RowAddends addends) {  // out may be addends.rows[0]
  uint16_t* const rows = const_cast<uint16_t*>(y_rows);
  const int64_t t = (static_cast<int64_t>(blockIdx.x) << (kRowThreadsLog2 - shift)) + (threadIdx.x >> shift);
  if (t >= live_bound(live, tokens)) return;
  const int sub = static_cast<int>(threadIdx.x) & ((1 << shift) - 1);
  const int32_t* slots = slot_of + t * top_k;
  const float* w = weights ? weights + t * top_k : nullptr;
  if constexpr (kVec) {
    // Every choice's 16-byte word (up to kBatch of them) and every addend's is loaded before any is
    // added: one round trip to memory per batch instead of one per choice (qwen3-30b-a3b T=8192:
    // 108 against 129 µs, bench/probes/dispatch_parts.cu). The adds keep the choice order.
    constexpr int kBatch = 8;
    for (int v = sub; v < hidden / 8; v += 1 << shift) {
      float acc[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
      for (int j0 = 0; j0 < top_k; j0 += kBatch) {
        int32_t slot[kBatch];
        uint4 q[kBatch];
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
          slot[b] = j0 + b < top_k ? slots[j0 + b] : -1;  // < 0: a choice with no row here (another rank's expert)
          q[b] = slot[b] >= 0 ? *reinterpret_cast<const uint4*>(row_at(rows, window, slot[b], hidden) + 8 * v)
                              : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
          if (slot[b] < 0) continue;
          float f[8];
          unpack8(q[b], f);
          const float wj = w ? w[j0 + b] : 1.0f;
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[i] = fmaf(wj, f[i], acc[i]);
        }
      }
      uint4 qa[RowAddends::kMax];
#pragma unroll
      for (int a = 0; a < RowAddends::kMax; ++a)
        qa[a] = a < addends.count ? *reinterpret_cast<const uint4*>(addends.rows[a] + t * hidden + 8 * v)
                                  : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int a = 0; a < RowAddends::kMax; ++a) {
        if (a >= addends.count) break;
        float f[8];
        unpack8(qa[a], f);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] += f[i];
      }
      *reinterpret_cast<uint4*>(out + t * hidden + 8 * v) = pack8(acc);
    }
  } else {
    for (int h = sub; h < hidden; h += 1 << shift) {
      float acc = 0.0f;
      for (int j = 0; j < top_k; ++j)
        if (slots[j] >= 0)
          acc = fmaf(w ? w[j] : 1.0f, bf16_bits_to_float(row_at(rows, window, slots[j], hidden)[h]), acc);
      for (int a = 0; a < addends.count; ++a) acc += bf16_bits_to_float(addends.rows[a][t * hidden + h]);
      out[t * hidden + h] = __bfloat16_as_ushort(__float2bfloat16_rn(acc));
    }
  }
}

// ---- the alltoall's fixed blocks ------------------------------------------------------------------

// Token t of `tokens`: each choice's slot (owner rank r's block, row t: r * tokens + t, for the
// first choice a rank owns; -1 for later choices of the same rank), and in every rank's block the
// token's ids and weights where that rank owns one of its choices, else ids -1 and weights 0.
__global__ void mark_token_blocks_kernel(const int32_t* __restrict__ ids, const float* __restrict__ weights,
                                         int64_t tokens, int top_k, int experts_per_rank, int ranks, int me,
                                         int32_t* __restrict__ slot_of, TokenBlocks send, TokenBlocks self) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= tokens) return;
  uint64_t owners = 0;
  for (int j = 0; j < top_k; ++j) {
    const int32_t id = ids[t * top_k + j];
    const int owner = id >= 0 && id / experts_per_rank < ranks ? id / experts_per_rank : -1;
    const bool first = owner >= 0 && !(owners >> owner & 1u);
    if (first) owners |= uint64_t{1} << owner;
    slot_of[t * top_k + j] = first ? static_cast<int32_t>(owner * tokens + t) : -1;
  }
  for (int r = 0; r < ranks; ++r) {
    const TokenBlocks& to = r == me ? self : send;
    const int64_t row = r == me ? t : r * tokens + t;
    const bool routed = owners >> r & 1u;
    for (int j = 0; j < top_k; ++j) {
      to.ids[row * top_k + j] = routed ? ids[t * top_k + j] : -1;
      to.weights[row * top_k + j] = routed ? weights[t * top_k + j] : 0.0f;
    }
  }
}

__global__ void localize_ids_kernel(const int32_t* __restrict__ ids, int64_t n, int first, int experts,
                                    int32_t* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int32_t e = ids[i] - first;
  out[i] = e >= 0 && e < experts ? e : -1;
}

__global__ void drop_unrouted_slots_kernel(const int32_t* __restrict__ local_ids, int64_t n, int32_t* __restrict__ slot_of) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n && local_ids[i] < 0) slot_of[i] = -1;
}

// One thread per token: its choices' owners, each rank once (k is small).
__global__ void owner_ranks_kernel(const int32_t* __restrict__ ids, int64_t tokens, int top_k, int experts_per_rank,
                                   int32_t* __restrict__ dest) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= tokens) return;
  for (int j = 0; j < top_k; ++j) {
    const int32_t id = ids[t * top_k + j];
    int32_t owner = id >= 0 ? id / experts_per_rank : -1;
    for (int i = 0; i < j && owner >= 0; ++i)
      if (dest[t * top_k + i] == owner || (ids[t * top_k + i] >= 0 && ids[t * top_k + i] / experts_per_rank == owner))
        owner = -1;
    dest[t * top_k + j] = owner;
  }
}

constexpr int kFlatThreads = 256;

int flat_blocks(int64_t n) { return static_cast<int>((n + kFlatThreads - 1) / kFlatThreads); }

}  // namespace

void localize_ids(const int32_t* ids, int64_t n, int first, int experts, int32_t* out, Stream stream) {
  if (n <= 0) return;
  localize_ids_kernel<<<flat_blocks(n), kFlatThreads, 0, stream>>>(ids, n, first, experts, out);
  MOEFLOW_CUDA_LAUNCH_CHECK();
}

void drop_unrouted_slots(const int32_t* local_ids, int64_t n, int32_t* slot_of, Stream stream) {
  if (n <= 0) return;
  drop_unrouted_slots_kernel<<<flat_blocks(n), kFlatThreads, 0, stream>>>(local_ids, n, slot_of);
  MOEFLOW_CUDA_LAUNCH_CHECK();
}

void owner_ranks(const int32_t* ids, int64_t tokens, int top_k, int experts_per_rank, int32_t* dest, Stream stream) {
  if (experts_per_rank <= 0) fail_input("cuda owner_ranks: experts_per_rank = " + std::to_string(experts_per_rank));
  if (tokens <= 0) return;
  owner_ranks_kernel<<<flat_blocks(tokens), kFlatThreads, 0, stream>>>(ids, tokens, top_k, experts_per_rank, dest);
  MOEFLOW_CUDA_LAUNCH_CHECK();
}

void mark_token_blocks(const int32_t* ids, const float* weights, int64_t tokens, int top_k, int experts_per_rank,
                       int ranks, int me, int32_t* slot_of, const TokenBlocks& send, const TokenBlocks& self,
                       Stream stream) {
  if (ranks <= 0 || ranks > kMostBlockRanks || me < 0 || me >= ranks || top_k <= 0 || experts_per_rank <= 0)
    fail_input("cuda mark_token_blocks: ranks = " + std::to_string(ranks) + " (at most " +
               std::to_string(kMostBlockRanks) + "), me = " + std::to_string(me) + ", top_k = " +
               std::to_string(top_k) + ", experts_per_rank = " + std::to_string(experts_per_rank));
  if (tokens <= 0) return;
  mark_token_blocks_kernel<<<flat_blocks(tokens), kFlatThreads, 0, stream>>>(ids, weights, tokens, top_k,
                                                                             experts_per_rank, ranks, me, slot_of,
                                                                             send, self);
  MOEFLOW_CUDA_LAUNCH_CHECK();
}

std::size_t permutation_workspace_bytes(int64_t max_tokens, int top_k, int experts) {
  if (max_tokens < 0 || top_k <= 0 || experts <= 0)
    fail_input("permutation_workspace_bytes: max_tokens = " + std::to_string(max_tokens) + ", top_k = " +
               std::to_string(top_k) + ", experts = " + std::to_string(experts));
  const int64_t n = max_tokens * top_k;
  const int64_t entries = (static_cast<int64_t>(experts) + 1) * max_tiles(n, experts);
  return (static_cast<std::size_t>(entries) * sizeof(int32_t) + 255) / 256 * 256;
}

const char* sort_method_name(SortMethod method) {
  switch (method) {
    case SortMethod::automatic: return "automatic";
    case SortMethod::small: return "small";
    case SortMethod::buckets: return "buckets";
    case SortMethod::tiles: return "tiles";
  }
  return "?";
}

bool sort_method_takes(SortMethod method, int64_t ids, int experts) {
  switch (method) {
    case SortMethod::automatic:
    case SortMethod::tiles: return true;
    case SortMethod::small: return ids <= kSmallRows;
    case SortMethod::buckets:
      return ids <= kBucketMaxIds && (static_cast<int64_t>(experts) + 1) * ids <= kBucketMaxReads;
  }
  return false;
}

SortMethod sort_method_for(int64_t ids, int experts) {
  if (sort_method_takes(SortMethod::small, ids, experts)) return SortMethod::small;
  if (sort_method_takes(SortMethod::buckets, ids, experts)) return SortMethod::buckets;
  return SortMethod::tiles;
}

void build_permutation(const int32_t* ids, int64_t tokens, int top_k, int experts, int32_t* offsets,
                       int32_t* slot_of, int32_t* row_source, void* workspace, std::size_t workspace_bytes,
                       Stream stream, LiveRows live, SortMethod method) {
  if (tokens < 0 || top_k <= 0 || experts <= 0)
    fail_input("cuda build_permutation: tokens = " + std::to_string(tokens) + ", top_k = " + std::to_string(top_k) +
               ", experts = " + std::to_string(experts));
  const int64_t n = tokens * top_k;
  if (n > std::numeric_limits<int32_t>::max())
    fail_input("cuda build_permutation: " + std::to_string(tokens) + " tokens x top_k " + std::to_string(top_k) +
               " rows do not fit 32-bit offsets");
  const int wpb = warps_per_block(experts);
  if (wpb < 1)
    fail_input("cuda build_permutation: experts = " + std::to_string(experts) +
               " need more shared memory per warp than a block has");
  if (n == 0) {
    MOEFLOW_CUDA_CHECK(cudaMemsetAsync(offsets, 0, sizeof(int32_t) * (static_cast<size_t>(experts) + 1), stream));
    return;
  }
  if (method == SortMethod::automatic) method = sort_method_for(n, experts);
  if (!sort_method_takes(method, n, experts))
    fail_input("cuda build_permutation: the " + std::string(sort_method_name(method)) + " sort does not take " +
               std::to_string(n) + " ids over " + std::to_string(experts) + " experts");
  if (method == SortMethod::small) {
    perm_small_kernel<<<1, kSmallRows, 0, stream>>>(ids, static_cast<int>(n), experts, offsets, slot_of, row_source,
                                                    live);
    MOEFLOW_CUDA_LAUNCH_CHECK();
    return;
  }
  // The workspace is checked for every method that may take it: a caller's workspace sized for fewer
  // tokens is refused whichever sort these ids happen to get.
  const int64_t tile = tile_length(n, experts);
  const int64_t num_tiles = (n + tile - 1) / tile;
  const int64_t entries = (static_cast<int64_t>(experts) + 1) * num_tiles;
  if (workspace == nullptr || workspace_bytes < sizeof(int32_t) * static_cast<size_t>(entries))
    fail_input("cuda build_permutation: workspace of " + std::to_string(workspace_bytes) + " bytes, " +
               std::to_string(sizeof(int32_t) * static_cast<size_t>(entries)) + " needed for " +
               std::to_string(tokens) + " tokens (see permutation_workspace_bytes)");
  if (method == SortMethod::buckets) {
    perm_bucket_kernel<<<static_cast<unsigned>(experts) + 1, kBucketThreads, bucket_masks_bytes(n), stream>>>(
        ids, n, experts, offsets, slot_of, row_source, live);
    MOEFLOW_CUDA_LAUNCH_CHECK();
    return;
  }
  auto* hist = static_cast<int32_t*>(workspace);
  const unsigned blocks = static_cast<unsigned>((num_tiles + wpb - 1) / wpb);
  const size_t smem = sizeof(int32_t) * (static_cast<size_t>(experts) + 1) * wpb;
  perm_count_kernel<<<blocks, wpb * 32, smem, stream>>>(ids, n, experts, tile, num_tiles, hist, live);
  MOEFLOW_CUDA_LAUNCH_CHECK();
  launch_scan(hist, entries, num_tiles, offsets, stream);
  MOEFLOW_CUDA_LAUNCH_CHECK();
  perm_rank_kernel<<<blocks, wpb * 32, smem, stream>>>(ids, n, experts, tile, num_tiles, hist, slot_of, row_source,
                                                       live);
  MOEFLOW_CUDA_LAUNCH_CHECK();
}

void gather_rows(const uint16_t* x, const int32_t* row_source, int64_t rows, int top_k, int hidden, uint16_t* out,
                 Stream stream, RowWindow window, LiveRows live) {
  if (rows < 0 || top_k <= 0 || hidden < 0)
    fail_input("cuda gather_rows: rows = " + std::to_string(rows) + ", top_k = " + std::to_string(top_k) +
               ", hidden = " + std::to_string(hidden));
  if (rows == 0 || hidden == 0) return;
  const bool vec = hidden % 8 == 0 && aligned16(x) && aligned16(out) && aligned16(window.rows);
  const RowGrid g = row_grid(rows, vec ? hidden / 8 : hidden, "cuda gather_rows");
  if (vec) gather_kernel<true><<<g.blocks, kRowThreads, 0, stream>>>(x, row_source, rows, top_k, hidden, g.shift, out, window, live);
  else gather_kernel<false><<<g.blocks, kRowThreads, 0, stream>>>(x, row_source, rows, top_k, hidden, g.shift, out, window, live);
  MOEFLOW_CUDA_LAUNCH_CHECK();
}

void scatter_rows(const uint16_t* x, const int32_t* slot_of, int64_t tokens, int top_k, int hidden, uint16_t* out,
                  Stream stream, LiveRows live) {
  if (tokens < 0 || top_k <= 0 || hidden < 0)
    fail_input("cuda scatter_rows: tokens = " + std::to_string(tokens) + ", top_k = " + std::to_string(top_k) +
               ", hidden = " + std::to_string(hidden));
  if (tokens == 0 || hidden == 0) return;
  const bool vec = hidden % 8 == 0 && aligned16(x) && aligned16(out);
  const RowGrid g = row_grid(tokens, vec ? hidden / 8 : hidden, "cuda scatter_rows");
  if (vec) scatter_kernel<true><<<g.blocks, kRowThreads, 0, stream>>>(x, slot_of, tokens, top_k, hidden, g.shift, out, live);
  else scatter_kernel<false><<<g.blocks, kRowThreads, 0, stream>>>(x, slot_of, tokens, top_k, hidden, g.shift, out, live);
  MOEFLOW_CUDA_LAUNCH_CHECK();
}

void combine_rows(const uint16_t* y_rows, const int32_t* slot_of, const float* weights, int64_t tokens, int top_k,
                  int hidden, uint16_t* out, Stream stream, RowWindow window, LiveRows live, RowAddends addends) {
  if (tokens < 0 || top_k <= 0 || hidden < 0 || addends.count < 0 || addends.count > RowAddends::kMax)
    fail_input("cuda combine_rows: tokens = " + std::to_string(tokens) + ", top_k = " + std::to_string(top_k) +
               ", hidden = " + std::to_string(hidden) + ", addends = " + std::to_string(addends.count));
  if (tokens == 0 || hidden == 0) return;
  bool addends_aligned = true;
  for (int a = 0; a < addends.count; ++a) addends_aligned = addends_aligned && aligned16(addends.rows[a]);
  const bool vec = hidden % 8 == 0 && aligned16(y_rows) && aligned16(out) && aligned16(window.rows) && addends_aligned;
  const RowGrid g = row_grid(tokens, vec ? hidden / 8 : hidden, "cuda combine_rows");
  if (vec)
    combine_kernel<true><<<g.blocks, kRowThreads, 0, stream>>>(y_rows, slot_of, weights, tokens, top_k, hidden,
                                                               g.shift, out, window, live, addends);
  else
    combine_kernel<false><<<g.blocks, kRowThreads, 0, stream>>>(y_rows, slot_of, weights, tokens, top_k, hidden,
                                                                g.shift, out, window, live, addends);
  MOEFLOW_CUDA_LAUNCH_CHECK();
}

}  // namespace moeflow::cuda
