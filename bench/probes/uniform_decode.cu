// Probe, not part of the build: can the decode experts path at T=1 stream its weights in ONE uniform
// wave? The kept kernel (kernels/cuda/fused_decode.cu) runs two waves (gate/up, then down, which waits
// for its group's gate/up) and measures 1.63-1.73x the floor on qwen at T=1 against 1.13x for a bare
// read of the same bytes. Here one item = (choice, kTileJ features j of I): it reads its w13 rows
// (gate and up of those features), computes their act values, and multiplies them straight into a
// partial y over all of H with w2's columns j, so no item waits for another. The partials [items, H]
// fp32 are summed in a fixed order by reduction items at the end (no atomics on floats).
// w2's columns j are read either from a transposed copy [E, I, H] (kTileJ contiguous rows) or in
// place from [E, H, I] (kTileJ·2 bytes per row of H, strided). Timed like `moeflow bench` times the
// experts path: a one-node CUDA graph, replays rotating over 8 routing sets, median of 200, beside a
// bare read of as many bytes. Checked against a host reference (fp32 from the same bf16 weights).
// Built and run on the GPU machine from the repository root (bench/NOTES.md has its figures):
//   nvcc -O3 -std=c++17 -arch=sm_90a -I. bench/probes/uniform_decode.cu kernels/cuda/fused_decode.cu \
//        kernels/cuda/device.cu -o /tmp/uniform && /tmp/uniform
// (the kept kernel is timed beside it, on the same machine, for comparison)
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "bench/probes/probe_common.cuh"
#include "kernels/cuda/bf16_vec.cuh"
#include "kernels/cuda/fused_decode.hpp"
#include "kernels/cuda/warp_gemv.cuh"

using namespace moeflow::cuda;
namespace cg = cooperative_groups;

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

struct Args {
  const uint16_t* x;   // [H]
  const int* ids;      // [k]
  const float* wts;    // [k]
  const uint16_t* w13; // [E, 2I, H]
  const uint16_t* w2;  // [E, H, I] in place, or [E, I, H] transposed
  float* partial;      // [k · I / kTileJ, H]
  float* out;          // [H]
  int* counters;       // next item, finished main items, finished blocks: left zero by the last block
  int k, hidden, inter;
  float* act = nullptr;  // quad_kernel: [k, I] act values handed between blocks
  int* flags = nullptr;  // quad_kernel: per quad, its blocks whose act values are out; left zero
};

__device__ __forceinline__ int load_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void prefetch_line_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }
__device__ __forceinline__ void bulk_prefetch_l2(const void* p, unsigned bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// kPrefetch: 3 the item's w2 bytes copied into shared memory (cp.async, no registers held) at its
// start, so they stream beside its gate/up rows; each thread later reads only the vectors it copied.
// kPrefetch: 0 none; 1 the item's w2 bytes into L2 at its start (read after its gate/up);
// 2 also its w13 rows (everything the item reads is requested at once).
// kSliceH: features of H per reduction item (0: no reduction, a diagnosis only). Within an item,
// thread (h = tid % kSliceH, r = tid / kSliceH) sums the partials p ≡ r (mod kThreads / kSliceH) in
// order, loading a batch of them at once; the kThreads / kSliceH sums of each h are then added in
// order of r: the same bytes every run.
template <int kTileJ, bool kTransposed, int kPrefetch, int kSliceH = 32>
__global__ void __launch_bounds__(kThreads, 3) uniform_kernel(Args a) {
  constexpr int kOut = kTileJ / kWarps;  // features per warp
  static_assert(kOut >= 1 && kTileJ % 8 == 0);
  __shared__ float act[kTileJ];
  constexpr int kSums = kSliceH > 0 ? kThreads / kSliceH : 1;  // partial sums per feature h
  __shared__ float red[kSums][kSliceH > 0 ? kSliceH : 1];
  __shared__ int next;
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, lane = tid & 31;
  const int tiles = a.inter / kTileJ;
  const int main_items = a.k * tiles;
  const int items = main_items + (kSliceH > 0 ? a.hidden / kSliceH : 0);
  if (tid == 0) next = atomicAdd(a.counters, 1);
  __syncthreads();
  int item = next;
  while (item < items) {
    __syncthreads();
    if (tid == 0) next = atomicAdd(a.counters, 1);
    if (item < main_items) {
      const int g = item / tiles, j0 = (item % tiles) * kTileJ;
      const int e = __ldg(a.ids + g);
      const uint16_t* w2e = a.w2 + static_cast<int64_t>(e) * a.hidden * a.inter;
      const uint16_t* w13e = a.w13 + static_cast<int64_t>(e) * 2 * a.inter * a.hidden;
      if constexpr (kPrefetch == 1 || kPrefetch == 2) {
        if constexpr (kTransposed) {
          if (tid < kTileJ) bulk_prefetch_l2(w2e + static_cast<int64_t>(j0 + tid) * a.hidden, a.hidden * 2);
        } else {
          for (int h = tid; h < a.hidden; h += kThreads) prefetch_line_l2(w2e + static_cast<int64_t>(h) * a.inter + j0);
        }
      }
      extern __shared__ uint4 stage[];
      if constexpr (kPrefetch == 3) {
        if constexpr (kTransposed) {
          const int hvecs = a.hidden / 8;
          const uint4* w2t = reinterpret_cast<const uint4*>(w2e + static_cast<int64_t>(j0) * a.hidden);
          for (int hv = tid; hv < hvecs; hv += kThreads)
#pragma unroll
            for (int j = 0; j < kTileJ; ++j) cp_async16(stage + j * hvecs + hv, w2t + static_cast<int64_t>(j) * hvecs + hv);
        } else {
          const int ivecs = a.inter / 8;
          const uint4* w2c = reinterpret_cast<const uint4*>(w2e) + j0 / 8;
          for (int h = tid; h < a.hidden; h += kThreads)
#pragma unroll
            for (int c = 0; c < kTileJ / 8; ++c) cp_async16(stage + h * (kTileJ / 8) + c, w2c + static_cast<int64_t>(h) * ivecs + c);
        }
        asm volatile("cp.async.commit_group;" ::: "memory");
      }
      if constexpr (kPrefetch == 2) {
        if (tid < 2 * kTileJ) {
          const int row = tid < kTileJ ? j0 + tid : a.inter + j0 + tid - kTileJ;
          bulk_prefetch_l2(w13e + static_cast<int64_t>(row) * a.hidden, a.hidden * 2);
        }
      }
      GatheredRows<1> x;
      x.row[0] = reinterpret_cast<const uint4*>(a.x);
      float gate[1][kOut] = {}, up[1][kOut] = {};
      if constexpr (kPrefetch == 4) {
        // Software-pipelined: the next step's 2·kOut weight vectors are requested before this
        // step's are used, so a warp always has loads in flight.
        const uint4* w = reinterpret_cast<const uint4*>(w13e);
        const int vecs = a.hidden / 8, jw = j0 + warp * kOut;
        uint4 cur[2 * kOut], nxt[2 * kOut];
#pragma unroll
        for (int o = 0; o < kOut; ++o) {
          cur[o] = __ldg(w + static_cast<int64_t>(jw + o) * vecs + lane);
          cur[kOut + o] = __ldg(w + static_cast<int64_t>(a.inter + jw + o) * vecs + lane);
        }
        for (int v = lane; v < vecs; v += 32) {
          const bool more = v + 32 < vecs;
#pragma unroll
          for (int o = 0; o < kOut; ++o) {
            nxt[o] = more ? __ldg(w + static_cast<int64_t>(jw + o) * vecs + v + 32) : cur[o];
            nxt[kOut + o] = more ? __ldg(w + static_cast<int64_t>(a.inter + jw + o) * vecs + v + 32) : cur[kOut + o];
          }
          float xv[8];
          unpack8(__ldg(x.row[0] + v), xv);
#pragma unroll
          for (int o = 0; o < kOut; ++o) {
            float wg[8], wu[8];
            unpack8(cur[o], wg);
            unpack8(cur[kOut + o], wu);
            gate[0][o] = dot8(wg, xv, gate[0][o]);
            up[0][o] = dot8(wu, xv, up[0][o]);
          }
#pragma unroll
          for (int o = 0; o < 2 * kOut; ++o) cur[o] = nxt[o];
        }
      } else {
        gate_up_dot<1, kOut, ActLoad::read_only>(reinterpret_cast<const uint4*>(w13e), j0 + warp * kOut, a.inter, a.hidden / 8, x,
                                                 1, lane, gate, up);
      }
#pragma unroll
      for (int o = 0; o < kOut; ++o) {
        const float gs = warp_sum(gate[0][o]), us = warp_sum(up[0][o]);
        if (lane == 0) act[warp * kOut + o] = bf16_bits_to_float(float_to_bf16_bits(silu_mul(gs, us)));
      }
      if constexpr (kPrefetch == 3) cp_async_wait_all();
      __syncthreads();
      float* part = a.partial + static_cast<int64_t>(item) * a.hidden;
      if constexpr (kTransposed) {
        const int hvecs = a.hidden / 8;
        const uint4* w2t = reinterpret_cast<const uint4*>(w2e + static_cast<int64_t>(j0) * a.hidden);
        for (int hv = tid; hv < hvecs; hv += kThreads) {
          uint4 raw[kTileJ];
#pragma unroll
          for (int j = 0; j < kTileJ; ++j)
            raw[j] = kPrefetch == 3 ? stage[j * hvecs + hv] : __ldg(w2t + static_cast<int64_t>(j) * hvecs + hv);
          float acc[8] = {};
#pragma unroll
          for (int j = 0; j < kTileJ; ++j) {
            float w[8];
            unpack8(raw[j], w);
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[i] = fmaf(act[j], w[i], acc[i]);
          }
          float4* dst = reinterpret_cast<float4*>(part + hv * 8);
          __stcg(dst, make_float4(acc[0], acc[1], acc[2], acc[3]));
          __stcg(dst + 1, make_float4(acc[4], acc[5], acc[6], acc[7]));
        }
      } else {
        const int ivecs = a.inter / 8;
        const uint4* w2c = reinterpret_cast<const uint4*>(w2e) + j0 / 8;
#pragma unroll 4
        for (int h = tid; h < a.hidden; h += kThreads) {
          float acc = 0.0f;
#pragma unroll
          for (int c = 0; c < kTileJ / 8; ++c) {
            float w[8];
            unpack8(kPrefetch == 3 ? stage[h * (kTileJ / 8) + c] : __ldg(w2c + static_cast<int64_t>(h) * ivecs + c), w);
#pragma unroll
            for (int i = 0; i < 8; ++i) acc = fmaf(act[c * 8 + i], w[i], acc);
          }
          __stcg(part + h, acc);
        }
      }
      // Every thread's partials before the count (CUTLASS's semaphore pattern): the barrier orders
      // them before thread 0, whose fence makes them visible before its increment.
      __syncthreads();
      if (tid == 0) {
        __threadfence();
        atomicAdd(a.counters + 1, 1);
      }
    } else if constexpr (kSliceH > 0) {
      // out[h] = Σ_items wts[choice] · partial[item, h].
      const int hl = tid % kSliceH, r = tid / kSliceH;
      const int h = (item - main_items) * kSliceH + hl;
      if (tid == 0)
        while (load_acquire(a.counters + 1) < main_items) __nanosleep(64);
      __syncthreads();
      constexpr int kBatch = 12;
      float acc = 0.0f;
      int p = r;
      for (; p + (kBatch - 1) * kSums < main_items; p += kBatch * kSums) {
        float v[kBatch];
#pragma unroll
        for (int u = 0; u < kBatch; ++u) v[u] = __ldcg(a.partial + static_cast<int64_t>(p + u * kSums) * a.hidden + h);
#pragma unroll
        for (int u = 0; u < kBatch; ++u) acc = fmaf(__ldg(a.wts + (p + u * kSums) / tiles), v[u], acc);
      }
      for (; p < main_items; p += kSums) acc = fmaf(__ldg(a.wts + p / tiles), __ldcg(a.partial + static_cast<int64_t>(p) * a.hidden + h), acc);
      red[r][hl] = acc;
      __syncthreads();
      if (tid < kSliceH) {
        float s = 0.0f;
#pragma unroll 8
        for (int q = 0; q < kSums; ++q) s += red[q][tid];
        a.out[h] = s;
      }
    }
    __syncthreads();
    item = next;
  }
  __shared__ int last;
  __syncthreads();
  if (tid == 0) {
    __threadfence();
    last = atomicAdd(a.counters + 2, 1) == static_cast<int>(gridDim.x) - 1;
  }
  __syncthreads();
  if (last && tid == 0) {
    __threadfence();
    a.counters[0] = 0;
    a.counters[1] = 0;
    a.counters[2] = 0;
  }
}

// The transposed j16 version with its partials reduced inside thread-block clusters and its items
// dealt statically. A cluster of kCluster blocks takes kCluster neighbouring tiles of one choice
// (block rank r: tile r); each block leaves its partial y [H] in its shared memory, then block r sums
// slice r of H over the cluster's blocks in rank order (distributed shared memory) and writes one
// partial per cluster: kCluster times fewer partials written and reduced. Items are dealt by index
// (cluster c: c, c + clusters, ...): every block is resident (the grid is at most what fits), so
// after its items a block waits for all blocks at one counter and then takes its reduction slices.
// kCluster = 1: no cluster, the static dealing alone.
// w2 read in place, no transposed copy: block b computes the act values of tile b (16 features j of
// one choice) and publishes them; then it takes part p = b % 4 of its quad q = b / 4 (64 features
// j, the four neighbouring tiles, which run in the same wave): the partial y over a quarter of H,
// w2[h, 64 j] for those rows h: 128 bytes of each row, whole lines, as many bytes as a transposed
// item reads. It waits only for its quad's other three blocks. Items dealt by index, every block
// resident; partials [quads, H] reduced as in cluster_kernel.
__global__ void __launch_bounds__(kThreads, 3) quad_kernel(Args a) {
  constexpr int kTileJ = 16, kOut = kTileJ / kWarps, kQuad = 4, kJ = kTileJ * kQuad, kSliceH = 8, kSums = kThreads / kSliceH;
  __shared__ float act[kJ];
  __shared__ float red[kSums][kSliceH];
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, lane = tid & 31;
  const int tiles = a.inter / kTileJ, hvecs = a.hidden / 8, items = a.k * tiles, quads_per_choice = tiles / kQuad;
  const int quads = a.k * quads_per_choice, rows = a.hidden / kQuad;
  for (int it = static_cast<int>(blockIdx.x); it < items; it += static_cast<int>(gridDim.x)) {
    const int g = it / tiles, j0 = (it % tiles) * kTileJ;
    const int e = __ldg(a.ids + g);
    const uint16_t* w13e = a.w13 + static_cast<int64_t>(e) * 2 * a.inter * a.hidden;
    GatheredRows<1> x;
    x.row[0] = reinterpret_cast<const uint4*>(a.x);
    float gate[1][kOut] = {}, up[1][kOut] = {};
    gate_up_dot<1, kOut, ActLoad::read_only>(reinterpret_cast<const uint4*>(w13e), j0 + warp * kOut, a.inter, hvecs, x, 1, lane,
                                             gate, up);
#pragma unroll
    for (int o = 0; o < kOut; ++o) {
      const float gs = warp_sum(gate[0][o]), us = warp_sum(up[0][o]);
      if (lane == 0) __stcg(a.act + static_cast<int64_t>(g) * a.inter + j0 + warp * kOut + o,
                            bf16_bits_to_float(float_to_bf16_bits(silu_mul(gs, us))));
    }
    const int q = it / kQuad, part = it % kQuad;
    __syncthreads();
    if (tid == 0) {
      __threadfence();
      atomicAdd(a.flags + q, 1);
      while (load_acquire(a.flags + q) < kQuad) __nanosleep(32);
    }
    __syncthreads();
    const int jq = (q % quads_per_choice) * kJ;
    if (tid < kJ) act[tid] = __ldcg(a.act + static_cast<int64_t>(g) * a.inter + jq + tid);
    __syncthreads();
    const uint4* w2q = reinterpret_cast<const uint4*>(a.w2 + static_cast<int64_t>(e) * a.hidden * a.inter + jq);
    const int ivecs = a.inter / 8;
    float* dst = a.partial + static_cast<int64_t>(q) * a.hidden;
    for (int h = part * rows + tid; h < (part + 1) * rows; h += kThreads) {
      uint4 raw[kJ / 8];
#pragma unroll
      for (int c = 0; c < kJ / 8; ++c) raw[c] = __ldg(w2q + static_cast<int64_t>(h) * ivecs + c);
      float acc = 0.0f;
#pragma unroll
      for (int c = 0; c < kJ / 8; ++c) {
        float w[8];
        unpack8(raw[c], w);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc = fmaf(act[c * 8 + i], w[i], acc);
      }
      __stcg(dst + h, acc);
    }
    __syncthreads();  // act[] is rewritten by the next item
  }
  __syncthreads();
  if (tid == 0) {
    __threadfence();
    atomicAdd(a.counters + 1, 1);
    while (load_acquire(a.counters + 1) < static_cast<int>(gridDim.x)) __nanosleep(32);
  }
  __syncthreads();
  for (int s = static_cast<int>(blockIdx.x); s < a.hidden / kSliceH; s += static_cast<int>(gridDim.x)) {
    const int hl = tid % kSliceH, r = tid / kSliceH, h = s * kSliceH + hl;
    float acc = 0.0f;
    for (int q = r; q < quads; q += kSums)
      acc = fmaf(__ldg(a.wts + q / quads_per_choice), __ldcg(a.partial + static_cast<int64_t>(q) * a.hidden + h), acc);
    red[r][hl] = acc;
    __syncthreads();
    if (tid < kSliceH) {
      float sum = 0.0f;
      for (int i = 0; i < kSums; ++i) sum += red[i][tid];
      a.out[h] = sum;
    }
    __syncthreads();
  }
  if (tid == 0 && atomicAdd(a.counters + 2, 1) == static_cast<int>(gridDim.x) - 1) {
    for (int q = 0; q < quads; ++q) a.flags[q] = 0;
    a.counters[1] = 0;
    a.counters[2] = 0;
  }
}

template <int kCluster>
__global__ void __launch_bounds__(kThreads, 3) cluster_kernel(Args a) {
  constexpr int kTileJ = 16, kOut = kTileJ / kWarps, kSliceH = 8, kSums = kThreads / kSliceH;
  constexpr int kMaxHidden = 2048;
  __shared__ float act[kTileJ];
  __shared__ __align__(16) float ybuf[kMaxHidden];
  __shared__ float red[kSums][kSliceH];
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, lane = tid & 31;
  const int tiles = a.inter / kTileJ, hvecs = a.hidden / 8;
  const int per_choice = tiles / kCluster;  // cluster items per choice (tiles % kCluster == 0 here)
  const int cluster_items = a.k * per_choice;
  const int rank = static_cast<int>(blockIdx.x) % kCluster, clusters = static_cast<int>(gridDim.x) / kCluster;
  for (int ci = static_cast<int>(blockIdx.x) / kCluster; ci < cluster_items; ci += clusters) {
    const int g = ci / per_choice, j0 = ((ci % per_choice) * kCluster + rank) * kTileJ;
    const int e = __ldg(a.ids + g);
    const uint16_t* w13e = a.w13 + static_cast<int64_t>(e) * 2 * a.inter * a.hidden;
    GatheredRows<1> x;
    x.row[0] = reinterpret_cast<const uint4*>(a.x);
    float gate[1][kOut] = {}, up[1][kOut] = {};
    gate_up_dot<1, kOut, ActLoad::read_only>(reinterpret_cast<const uint4*>(w13e), j0 + warp * kOut, a.inter, hvecs, x, 1, lane,
                                             gate, up);
#pragma unroll
    for (int o = 0; o < kOut; ++o) {
      const float gs = warp_sum(gate[0][o]), us = warp_sum(up[0][o]);
      if (lane == 0) act[warp * kOut + o] = bf16_bits_to_float(float_to_bf16_bits(silu_mul(gs, us)));
    }
    __syncthreads();
    const uint4* w2t = reinterpret_cast<const uint4*>(a.w2 + (static_cast<int64_t>(e) * a.inter + j0) * a.hidden);
    for (int hv = tid; hv < hvecs; hv += kThreads) {
      uint4 raw[kTileJ];
#pragma unroll
      for (int j = 0; j < kTileJ; ++j) raw[j] = __ldg(w2t + static_cast<int64_t>(j) * hvecs + hv);
      float y[8] = {};
#pragma unroll
      for (int j = 0; j < kTileJ; ++j) {
        float w[8];
        unpack8(raw[j], w);
#pragma unroll
        for (int i = 0; i < 8; ++i) y[i] = fmaf(act[j], w[i], y[i]);
      }
      float4* dst = reinterpret_cast<float4*>(ybuf + hv * 8);
      dst[0] = make_float4(y[0], y[1], y[2], y[3]);
      dst[1] = make_float4(y[4], y[5], y[6], y[7]);
    }
    float* part = a.partial + static_cast<int64_t>(ci) * a.hidden;
    if constexpr (kCluster > 1) {
      cg::cluster_group cluster = cg::this_cluster();
      cluster.sync();  // every block's ybuf is written
      const int slice = a.hidden / kCluster;
      for (int h = rank * slice + tid; h < (rank + 1) * slice; h += kThreads) {
        float sum = 0.0f;
#pragma unroll
        for (int r = 0; r < kCluster; ++r) sum += cluster.map_shared_rank(ybuf, r)[h];
        __stcg(part + h, sum);
      }
      cluster.sync();  // every block has read the others' ybuf before it is written again
    } else {
      __syncthreads();
      for (int h = tid; h < a.hidden; h += kThreads) __stcg(part + h, ybuf[h]);
      __syncthreads();
    }
  }
  // Every block's partials before the count; then all blocks' counts before any reduction.
  __syncthreads();
  if (tid == 0) {
    __threadfence();
    atomicAdd(a.counters + 1, 1);
    while (load_acquire(a.counters + 1) < static_cast<int>(gridDim.x)) __nanosleep(32);
  }
  __syncthreads();
  // out[h] = Σ_ci wts[choice] · partial[ci, h], thread (h, r) summing ci ≡ r (mod kSums) in order.
  for (int s = static_cast<int>(blockIdx.x); s < a.hidden / kSliceH; s += static_cast<int>(gridDim.x)) {
    const int hl = tid % kSliceH, r = tid / kSliceH, h = s * kSliceH + hl;
    float acc = 0.0f;
    for (int ci = r; ci < cluster_items; ci += kSums)
      acc = fmaf(__ldg(a.wts + ci / per_choice), __ldcg(a.partial + static_cast<int64_t>(ci) * a.hidden + h), acc);
    red[r][hl] = acc;
    __syncthreads();
    if (tid < kSliceH) {
      float sum = 0.0f;
      for (int q = 0; q < kSums; ++q) sum += red[q][tid];
      a.out[h] = sum;
    }
    __syncthreads();
  }
  // The last block out zeroes both counts for the next launch.
  if (tid == 0 && atomicAdd(a.counters + 2, 1) == static_cast<int>(gridDim.x) - 1) {
    a.counters[1] = 0;
    a.counters[2] = 0;
  }
}

// Diagnosis: uniform_kernel<16, true, 0>'s loads alone (same items, same rows per warp, same unrolling,
// the same 16 w2ᵀ loads per thread), the words xor-ed instead of multiplied; items dealt statically
// (block b: b, b + grid, ...) or from the counter, with or without the item's two barriers.
template <bool kCounter, bool kBarriers>
__global__ void __launch_bounds__(kThreads, 3) pattern_read(Args a) {
  constexpr int kTileJ = 16, kOut = 2;
  __shared__ int next;
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, lane = tid & 31;
  const int tiles = a.inter / kTileJ, items = a.k * tiles, hvecs = a.hidden / 8;
  unsigned acc = 0;
  int item = static_cast<int>(blockIdx.x);
  if constexpr (kCounter) {
    if (tid == 0) next = atomicAdd(a.counters, 1);
    __syncthreads();
    item = next;
  }
  while (item < items) {
    if constexpr (kCounter) {
      __syncthreads();
      if (tid == 0) next = atomicAdd(a.counters, 1);
    }
    const int g = item / tiles, j0 = (item % tiles) * kTileJ;
    const int e = __ldg(a.ids + g);
    const uint4* w13 = reinterpret_cast<const uint4*>(a.w13 + static_cast<int64_t>(e) * 2 * a.inter * a.hidden);
    const int j = j0 + warp * kOut;
#pragma unroll 2
    for (int v = lane; v < hvecs; v += 32) {
#pragma unroll
      for (int o = 0; o < kOut; ++o) {
        const uint4 gw = __ldg(w13 + static_cast<int64_t>(j + o) * hvecs + v);
        const uint4 uw = __ldg(w13 + static_cast<int64_t>(a.inter + j + o) * hvecs + v);
        acc += gw.x ^ gw.y ^ gw.z ^ gw.w ^ uw.x ^ uw.y ^ uw.z ^ uw.w;
      }
    }
    if constexpr (kBarriers) __syncthreads();
    const uint4* w2t = reinterpret_cast<const uint4*>(a.w2 + (static_cast<int64_t>(e) * a.inter + j0) * a.hidden);
    for (int hv = tid; hv < hvecs; hv += kThreads) {
      uint4 raw[kTileJ];
#pragma unroll
      for (int r = 0; r < kTileJ; ++r) raw[r] = __ldg(w2t + static_cast<int64_t>(r) * hvecs + hv);
#pragma unroll
      for (int r = 0; r < kTileJ; ++r) acc += raw[r].x ^ raw[r].y ^ raw[r].z ^ raw[r].w;
    }
    if constexpr (kBarriers) __syncthreads();
    if constexpr (kCounter) {
      __syncthreads();
      item = next;
    } else {
      item += static_cast<int>(gridDim.x);
    }
  }
  if (acc == 0x9e3779b9u) a.out[0] = 1.0f;  // never true; keeps the loads
  if constexpr (kCounter) {
    __shared__ int last;
    __syncthreads();
    if (tid == 0) last = atomicAdd(a.counters + 2, 1) == static_cast<int>(gridDim.x) - 1;
    __syncthreads();
    if (last && tid == 0) a.counters[0] = 0, a.counters[2] = 0;
  }
}

// Uniform bf16 in [-scale, scale) from a hash of the index: the same bits for every layout.
__device__ __host__ inline uint32_t mix(uint64_t i) {
  i ^= i >> 33;
  i *= 0xff51afd7ed558ccdull;
  i ^= i >> 33;
  i *= 0xc4ceb9fe1a85ec53ull;
  i ^= i >> 33;
  return static_cast<uint32_t>(i);
}
__global__ void fill(uint16_t* p, size_t n, uint64_t seed, float scale) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n; i += size_t{gridDim.x} * blockDim.x)
    p[i] = float_to_bf16_bits((mix(seed + i) * (1.0f / 4294967296.0f) * 2.0f - 1.0f) * scale);
}
// w2t[e, j, h] = w2[e, h, j]
__global__ void transpose_w2(const uint16_t* w2, uint16_t* w2t, int experts, int hidden, int inter) {
  const size_t n = size_t{static_cast<size_t>(experts)} * hidden * inter;
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n; i += size_t{gridDim.x} * blockDim.x) {
    const size_t e = i / (size_t{static_cast<size_t>(hidden)} * inter), r = i % (size_t{static_cast<size_t>(hidden)} * inter);
    const size_t h = r / inter, j = r % inter;
    w2t[(e * inter + j) * hidden + h] = w2[i];
  }
}

float bf(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
float round_bf(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Preset {
  const char* name;
  int experts, top_k, hidden, inter;
};

using Kernel = void (*)(Args);
struct Variant {
  const char* name;
  Kernel kernel;
  bool transposed;
  int tile_j;
  int blocks_per_sm;
  bool staged = false;  // takes tile_j · H bf16 of dynamic shared memory
  int cluster = 0;      // cluster_kernel<cluster>: launched with that cluster size, items dealt statically
};

// Median time of 200 replays (after 20) of graphs[r % size]; `after` runs after each replay r.
template <class After>
double time_replays(const std::vector<cudaGraphExec_t>& graphs, cudaStream_t stream, After after) {
  cudaEvent_t start, stop;
  CK(cudaEventCreate(&start));
  CK(cudaEventCreate(&stop));
  std::vector<float> times;
  for (int r = 0; r < 220; ++r) {
    CK(cudaEventRecord(start, stream));
    CK(cudaGraphLaunch(graphs[r % graphs.size()], stream));
    CK(cudaEventRecord(stop, stream));
    CK(cudaEventSynchronize(stop));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, start, stop));
    if (r >= 20) times.push_back(ms * 1000.0f);
    after(r);
  }
  CK(cudaGetLastError());
  CK(cudaEventDestroy(start));
  CK(cudaEventDestroy(stop));
  for (cudaGraphExec_t g : graphs) CK(cudaGraphExecDestroy(g));
  std::nth_element(times.begin(), times.begin() + times.size() / 2, times.end());
  return times[times.size() / 2];
}

// One graph per routing set s, each capturing launch(s) on `stream`.
template <class Launch>
std::vector<cudaGraphExec_t> capture_sets(int sets, cudaStream_t stream, Launch launch) {
  std::vector<cudaGraphExec_t> execs;
  for (int s = 0; s < sets; ++s) {
    cudaGraph_t graph;
    CK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    launch(s);
    CK(cudaStreamEndCapture(stream, &graph));
    cudaGraphExec_t exec;
    CK(cudaGraphInstantiate(&exec, graph, 0));
    CK(cudaGraphDestroy(graph));
    execs.push_back(exec);
  }
  return execs;
}

double rel_error(const std::vector<float>& got, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t h = 0; h < ref.size(); ++h) num += (got[h] - ref[h]) * (got[h] - ref[h]), den += ref[h] * ref[h];
  return std::sqrt(num / den);
}

}  // namespace

int main() {
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s, %d SMs: one-kernel CUDA graph replays at T=1 over 8 routing sets, median of 200\n", prop.name, sms);
  const Preset presets[] = {{"qwen1.5-moe-a2.7b", 60, 4, 2048, 1408}, {"qwen3-30b-a3b", 128, 8, 2048, 768}};
  const Variant variants[] = {
      {"transposed j16 s8", uniform_kernel<16, true, 0, 8>, true, 16, 3},
      {"transposed j16 NO REDUCTION", uniform_kernel<16, true, 0, 0>, true, 16, 3},
      {"static j16 (cluster 1)", cluster_kernel<1>, true, 16, 3, false, 1},
      {"in place, quads of 4 (static)", quad_kernel, false, 16, 3, false, 1},
      {"loads only, static", pattern_read<false, false>, true, 16, 3},
      {"loads only, static+bars", pattern_read<false, true>, true, 16, 3},
      {"loads only, counter+bars", pattern_read<true, true>, true, 16, 3},
  };
  for (const Variant& v : variants) {
    cudaFuncAttributes attr{};
    CK(cudaFuncGetAttributes(&attr, v.kernel));
    const int smem = v.staged ? v.tile_j * 2048 * 2 : 0;  // at H = 2048 (both presets)
    if (v.staged) CK(cudaFuncSetAttribute(v.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    int per_sm = 0;
    CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, v.kernel, kThreads, smem));
    std::printf("  %-36s %3d registers, %zu bytes local, %d blocks/SM resident\n", v.name, attr.numRegs, attr.localSizeBytes,
                per_sm);
  }
  cudaStream_t stream;
  CK(cudaStreamCreate(&stream));
  unsigned* sink = nullptr;
  CK(cudaMalloc(&sink, 4));
  constexpr int kSets = 8;
  for (const Preset& p : presets) {
    const size_t w13_n = size_t{static_cast<size_t>(p.experts)} * 2 * p.inter * p.hidden;
    const size_t w2_n = size_t{static_cast<size_t>(p.experts)} * p.hidden * p.inter;
    uint16_t *w13, *w2, *w2t, *x;
    CK(cudaMalloc(&w13, w13_n * 2));
    CK(cudaMalloc(&w2, w2_n * 2));
    CK(cudaMalloc(&w2t, w2_n * 2));
    CK(cudaMalloc(&x, size_t{static_cast<size_t>(p.hidden)} * 2 * kSets));
    const float scale = 1.0f / std::sqrt(static_cast<float>(p.hidden));
    fill<<<1024, 256>>>(w13, w13_n, 1000, scale);
    fill<<<1024, 256>>>(w2, w2_n, 2000000000000ull, 1.0f / std::sqrt(static_cast<float>(p.inter)));
    fill<<<64, 256>>>(x, size_t{static_cast<size_t>(p.hidden)} * kSets, 3000000000000ull, 1.0f);
    transpose_w2<<<2048, 256>>>(w2, w2t, p.experts, p.hidden, p.inter);
    CK(cudaDeviceSynchronize());
    // Routing sets: k distinct experts each, uniform without replacement; weights in (0, 1).
    std::mt19937 rng(42);
    std::vector<int> ids(kSets * p.top_k);
    std::vector<float> wts(kSets * p.top_k);
    for (int s = 0; s < kSets; ++s) {
      std::vector<int> all(p.experts);
      for (int e = 0; e < p.experts; ++e) all[e] = e;
      std::shuffle(all.begin(), all.end(), rng);
      for (int j = 0; j < p.top_k; ++j) {
        ids[s * p.top_k + j] = all[j];
        wts[s * p.top_k + j] = std::uniform_real_distribution<float>(0.05f, 1.0f)(rng);
      }
    }
    int* d_ids;
    float* d_wts;
    CK(cudaMalloc(&d_ids, ids.size() * 4));
    CK(cudaMalloc(&d_wts, wts.size() * 4));
    CK(cudaMemcpy(d_ids, ids.data(), ids.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_wts, wts.data(), wts.size() * 4, cudaMemcpyHostToDevice));
    // Host reference for routing set 0.
    std::vector<uint16_t> hx(p.hidden);
    CK(cudaMemcpy(hx.data(), x, hx.size() * 2, cudaMemcpyDeviceToHost));
    std::vector<double> ref(p.hidden, 0.0);
    {
      std::vector<uint16_t> e13(size_t{2} * p.inter * p.hidden), e2(size_t{static_cast<size_t>(p.hidden)} * p.inter);
      for (int j = 0; j < p.top_k; ++j) {
        const int e = ids[j];
        CK(cudaMemcpy(e13.data(), w13 + size_t{static_cast<size_t>(e)} * e13.size(), e13.size() * 2, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(e2.data(), w2 + size_t{static_cast<size_t>(e)} * e2.size(), e2.size() * 2, cudaMemcpyDeviceToHost));
        std::vector<float> actv(p.inter);
        for (int i = 0; i < p.inter; ++i) {
          double g = 0, u = 0;
          for (int h = 0; h < p.hidden; ++h) {
            g += double(bf(e13[size_t{static_cast<size_t>(i)} * p.hidden + h])) * bf(hx[h]);
            u += double(bf(e13[size_t{static_cast<size_t>(p.inter + i)} * p.hidden + h])) * bf(hx[h]);
          }
          const float gf = static_cast<float>(g), uf = static_cast<float>(u);
          actv[i] = round_bf(gf / (1.0f + std::exp(-gf)) * uf);
        }
        for (int h = 0; h < p.hidden; ++h) {
          double s = 0;
          for (int i = 0; i < p.inter; ++i) s += double(bf(e2[size_t{static_cast<size_t>(h)} * p.inter + i])) * actv[i];
          ref[h] += wts[j] * s;
        }
      }
    }
    const double bytes = double(p.top_k) * 3.0 * p.hidden * p.inter * 2.0;
    std::printf("%s: %.2f MB of weights per run, floor at 3.0 TB/s %.1f us\n", p.name, bytes / 1e6, bytes / 3.0e6);
    // Bare read of as many bytes, 8 slices of the w13 pool.
    {
      const size_t vecs = static_cast<size_t>(bytes) / 16;
      const double us = time_replays(capture_sets(kSets, stream, [&](int s) {
        read_all<4><<<sms * 2, 512, 0, stream>>>(reinterpret_cast<const uint4*>(w13) + s * vecs, vecs, sink);
      }), stream, [](int) {});
      std::printf("  %-36s %8.1f us  %5.2fx floor\n", "bare read", us, us / (bytes / 3.0e6));
    }
    // The kept kernel (two phases), lane counters as the executor gives them.
    {
      moeflow::cuda::FusedDecodeShape shape{p.experts, p.top_k, p.hidden, p.inter, 1};
      const size_t ws = static_cast<size_t>(moeflow::cuda::fused_decode_workspace_bytes(shape));
      char* workspace;
      int* lane_counters;
      uint16_t* out;
      CK(cudaMalloc(&workspace, ws * kSets));
      CK(cudaMalloc(&lane_counters, size_t{4} * moeflow::cuda::kLaneCounterWords * kSets));
      CK(cudaMemset(lane_counters, 0, size_t{4} * moeflow::cuda::kLaneCounterWords * kSets));
      CK(cudaMalloc(&out, size_t{static_cast<size_t>(p.hidden)} * 2));
      const double us = time_replays(capture_sets(kSets, stream, [&](int s) {
        moeflow::cuda::LaneContext ctx;
        ctx.stream = stream;
        ctx.counters = lane_counters + moeflow::cuda::kLaneCounterWords * s;
        ctx.counter_words = moeflow::cuda::kLaneCounterWords;
        moeflow::cuda::experts_fused_decode(ctx, shape, 1, nullptr, x + size_t{static_cast<size_t>(p.hidden)} * s,
                                            d_ids + s * p.top_k, d_wts + s * p.top_k, w13, w2, out, workspace + ws * s);
      }), stream, [](int) {});
      std::printf("  %-36s %8.1f us  %5.2fx floor\n", "kept kernel (two phases)", us, us / (bytes / 3.0e6));
      CK(cudaFree(workspace));
      CK(cudaFree(lane_counters));
      CK(cudaFree(out));
    }
    for (const Variant& v : variants) {
      const int tiles = p.inter / v.tile_j;
      const size_t partial_n = size_t{static_cast<size_t>(p.top_k)} * tiles * p.hidden;
      float *partial, *out;
      int* counters;
      CK(cudaMalloc(&partial, partial_n * 4 * kSets));
      CK(cudaMalloc(&out, size_t{static_cast<size_t>(p.hidden)} * 4 * kSets));
      CK(cudaMalloc(&counters, 3 * 4 * kSets));
      CK(cudaMemset(counters, 0, 3 * 4 * kSets));
      float* act_g;
      int* flags;
      const size_t act_n = size_t{static_cast<size_t>(p.top_k)} * p.inter;
      CK(cudaMalloc(&act_g, act_n * 4 * kSets));
      CK(cudaMalloc(&flags, act_n * 4 * kSets));  // ample: one int per feature
      CK(cudaMemset(flags, 0, act_n * 4 * kSets));
      const int smem = v.staged ? v.tile_j * p.hidden * 2 : 0;
      int per_sm = 0;
      CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, v.kernel, kThreads, smem));
      const int items = p.top_k * tiles + p.hidden / 8;  // (grid only: at most what is resident)
      int grid = std::min(items, sms * std::min(per_sm, v.blocks_per_sm));
      cudaLaunchConfig_t config{};
      cudaLaunchAttribute cluster_dims{};
      if (v.cluster > 0) {  // every block resident: at most the clusters that fit at once
        config.blockDim = dim3(kThreads);
        cluster_dims.id = cudaLaunchAttributeClusterDimension;
        cluster_dims.val.clusterDim.x = static_cast<unsigned>(v.cluster);
        cluster_dims.val.clusterDim.y = cluster_dims.val.clusterDim.z = 1;
        config.attrs = &cluster_dims;
        config.numAttrs = 1;
        config.gridDim = dim3(static_cast<unsigned>(v.cluster * 64));
        int fit = per_sm * sms / v.cluster;
        if (v.cluster > 1) CK(cudaOccupancyMaxActiveClusters(&fit, v.kernel, &config));
        grid = std::min(p.top_k * tiles, fit * v.cluster);
        config.gridDim = dim3(static_cast<unsigned>(grid));
        config.stream = stream;
      }
      auto graphs = capture_sets(kSets, stream, [&](int s) {
        Args a{};
        a.x = x + size_t{static_cast<size_t>(p.hidden)} * s;
        a.ids = d_ids + s * p.top_k;
        a.wts = d_wts + s * p.top_k;
        a.w13 = w13;
        a.w2 = v.transposed ? w2t : w2;
        a.partial = partial + partial_n * s;
        a.out = out + size_t{static_cast<size_t>(p.hidden)} * s;
        a.counters = counters + 3 * s;
        a.k = p.top_k;
        a.hidden = p.hidden;
        a.inter = p.inter;
        a.act = act_g + act_n * s;
        a.flags = flags + act_n * s;
        if (v.cluster > 0) CK(cudaLaunchKernelEx(&config, v.kernel, a));
        else v.kernel<<<grid, kThreads, smem, stream>>>(a);
      });
      std::vector<float> first(p.hidden), got(p.hidden);
      bool identical = true;
      const double us = time_replays(graphs, stream, [&](int r) {
        if (r % kSets != 0) return;  // routing set 0 (the reference's): every replay gives the same bytes
        CK(cudaMemcpy(r == 0 ? first.data() : got.data(), out, got.size() * 4, cudaMemcpyDeviceToHost));
        if (r != 0) identical = identical && std::memcmp(got.data(), first.data(), got.size() * 4) == 0;
      });
      if (std::strncmp(v.name, "loads only", 10) == 0 || std::strstr(v.name, "NO REDUCTION"))  // no output
        std::printf("  %-36s %8.1f us  %5.2fx floor  grid %4d\n", v.name, us, us / (bytes / 3.0e6), grid);
      else
        std::printf("  %-36s %8.1f us  %5.2fx floor  grid %4d  rel err %.2e  %s\n", v.name, us, us / (bytes / 3.0e6), grid,
                    rel_error(first, ref), identical ? "repeats identical" : "REPEATS DIFFER");
      CK(cudaFree(partial));
      CK(cudaFree(out));
      CK(cudaFree(counters));
      CK(cudaFree(act_g));
      CK(cudaFree(flags));
    }
    CK(cudaFree(w13));
    CK(cudaFree(w2));
    CK(cudaFree(w2t));
    CK(cudaFree(x));
    CK(cudaFree(d_ids));
    CK(cudaFree(d_wts));
  }
  return 0;
}
