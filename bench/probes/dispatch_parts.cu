// Probe, not part of the build: where the dispatch node's time goes at large T. The node
// (cuda.permute_rows) took 220 µs for qwen3-30b-a3b at T=8192 in a traced run, where writing its
// 268 MB of permuted rows alone should take ~95 µs (bench/NOTES.md, "Where the experts path's time
// goes"). Each part is timed alone (CUDA events, median of 50 after 5): the counting sort's three
// kernels at the tile length the library picks and at shorter ones, the row scatter (by token) and
// gather (by permuted row), the combine, and a device memset / copy of as many bytes for comparison;
// the sort by tiles against the sort by buckets (one block per expert, one launch), as CUDA graphs.
// It includes kernels/cuda/permute.cu to call its kernels with other tile lengths.
// Built and run on the GPU machine from the repository root:
//   nvcc -O3 -std=c++17 -arch=sm_90a -I. bench/probes/dispatch_parts.cu -o /tmp/dp && /tmp/dp
#include <algorithm>
#include <random>
#include <vector>

#include "bench/probes/probe_common.cuh"
#include "kernels/cuda/permute.cu"

namespace dispatch_probe {  // named: nvcc's stubs cannot tell two anonymous namespaces of one file apart

using namespace moeflow::cuda;

// The library's scan before the fifteenth session (kept here to compare): chunks of kScanThreads *
// kItems entries one after another, each thread's kItems entries contiguous and loaded one by one.
template <int kItems>
__global__ void __launch_bounds__(kScanThreads)
    scan_before(int32_t* __restrict__ data, int64_t m, int64_t num_tiles, int32_t* __restrict__ offsets) {
  __shared__ int32_t warp_sums[kScanThreads / 32];
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % 32;
  const int warp = tid / 32;
  int32_t carry = 0;
  for (int64_t base = 0; base < m; base += static_cast<int64_t>(kScanThreads) * kItems) {
    int32_t v[kItems];
    int32_t local = 0;
#pragma unroll
    for (int q = 0; q < kItems; ++q) {
      const int64_t idx = base + static_cast<int64_t>(tid) * kItems + q;
      v[q] = idx < m ? data[idx] : 0;
      local += v[q];
    }
    int32_t incl = local;
#pragma unroll
    for (int o = 1; o < 32; o *= 2) {
      const int32_t y = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += y;
    }
    if (lane == 31) warp_sums[warp] = incl;
    __syncthreads();
    if (warp == 0) {
      int32_t s = warp_sums[lane];
#pragma unroll
      for (int o = 1; o < 32; o *= 2) {
        const int32_t y = __shfl_up_sync(0xffffffffu, s, o);
        if (lane >= o) s += y;
      }
      warp_sums[lane] = s;
    }
    __syncthreads();
    int32_t prefix = carry + (warp > 0 ? warp_sums[warp - 1] : 0) + incl - local;
#pragma unroll
    for (int q = 0; q < kItems; ++q) {
      const int64_t idx = base + static_cast<int64_t>(tid) * kItems + q;
      if (idx < m) {
        data[idx] = prefix;
        if (idx % num_tiles == 0) offsets[idx / num_tiles] = prefix;
      }
      prefix += v[q];
    }
    carry += warp_sums[kScanThreads / 32 - 1];
    __syncthreads();
  }
}

// The library's scatter (one token per 256 threads at H = 2048) with each thread moving kPer words
// spaced a row's worth of threads apart (loads first, then stores; a warp's stores stay contiguous),
// and optionally streaming stores (evict-first: the rows are not read again soon from L2).
template <int kPer, bool kStream>
__global__ void __launch_bounds__(256) scatter_per_thread(const uint4* __restrict__ x, const int32_t* __restrict__ slot_of,
                                                          int64_t tokens, int top_k, int hvecs, int tpt,
                                                          uint4* __restrict__ out) {
  const int64_t t = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / tpt;
  if (t >= tokens) return;
  const int sub = static_cast<int>(threadIdx.x) % tpt;
  for (int v0 = sub; v0 < hvecs; v0 += tpt * kPer) {
    uint4 q[kPer];
#pragma unroll
    for (int u = 0; u < kPer; ++u)
      if (v0 + u * tpt < hvecs) q[u] = x[t * hvecs + v0 + u * tpt];
    for (int j = 0; j < top_k; ++j) {
      const int32_t slot = slot_of[t * top_k + j];
      if (slot < 0) continue;
#pragma unroll
      for (int u = 0; u < kPer; ++u)
        if (v0 + u * tpt < hvecs) {
          uint4* d = out + static_cast<int64_t>(slot) * hvecs + v0 + u * tpt;
          if constexpr (kStream) __stcs(d, q[u]);
          else *d = q[u];
        }
    }
  }
}

// The combine with every choice's 16-byte word loaded before any is added (up to 8 choices), the
// adds in the same order: the same bits. Until the seventeenth session the library's loaded choice
// by choice (129 against this 108 µs at qwen3 T=8192); it now batches its loads the same way.
__global__ void __launch_bounds__(256) combine_loads_first(const uint4* __restrict__ y, const int32_t* __restrict__ slot_of,
                                                           const float* __restrict__ weights, int64_t tokens, int top_k,
                                                           int hvecs, int tpt, uint4* __restrict__ out) {
  const int64_t t = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / tpt;
  if (t >= tokens) return;
  const int sub = static_cast<int>(threadIdx.x) % tpt;
  int32_t slots[8];
  float w[8];
  for (int j = 0; j < 8; ++j) {
    slots[j] = j < top_k ? slot_of[t * top_k + j] : -1;
    w[j] = j < top_k ? weights[t * top_k + j] : 0.0f;
  }
  for (int v = sub; v < hvecs; v += tpt) {
    uint4 q[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) q[j] = slots[j] >= 0 ? y[static_cast<int64_t>(slots[j]) * hvecs + v] : make_uint4(0, 0, 0, 0);
    float acc[8] = {};
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (slots[j] < 0) continue;
      float f[8];
      unpack8(q[j], f);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] = fmaf(w[j], f[i], acc[i]);
    }
    out[t * hvecs + v] = pack8(acc);
  }
}

struct Shape {
  const char* name;
  int64_t tokens;
  int k, experts, hidden;
};

void probe(const Shape& s) {
  const int64_t n = s.tokens * s.k;
  std::mt19937 rng(7);
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (int64_t t = 0; t < s.tokens; ++t) {  // k distinct experts per token, uniform
    std::vector<int32_t> pool(static_cast<size_t>(s.experts));
    for (int e = 0; e < s.experts; ++e) pool[static_cast<size_t>(e)] = e;
    for (int j = 0; j < s.k; ++j) {
      std::uniform_int_distribution<int> d(j, s.experts - 1);
      std::swap(pool[static_cast<size_t>(j)], pool[static_cast<size_t>(d(rng))]);
      ids[static_cast<size_t>(t * s.k + j)] = pool[static_cast<size_t>(j)];
    }
  }
  int32_t *d_ids, *offsets, *slot_of, *row_source, *hist;
  uint16_t *x, *rows, *out;
  float* weights;
  const size_t row_bytes = static_cast<size_t>(n) * s.hidden * 2;
  CK(cudaMalloc(&d_ids, n * 4));
  CK(cudaMalloc(&offsets, (s.experts + 1) * 4));
  CK(cudaMalloc(&slot_of, n * 4));
  CK(cudaMalloc(&row_source, n * 4));
  CK(cudaMalloc(&hist, 64 << 20));
  CK(cudaMalloc(&x, s.tokens * s.hidden * 2));
  CK(cudaMalloc(&rows, row_bytes));
  CK(cudaMalloc(&out, s.tokens * s.hidden * 2));
  CK(cudaMalloc(&weights, n * 4));
  CK(cudaMemcpy(d_ids, ids.data(), n * 4, cudaMemcpyHostToDevice));
  CK(cudaMemset(x, 0x3c, s.tokens * s.hidden * 2));
  CK(cudaMemset(weights, 0, n * 4));
  std::printf("== %s: T=%lld k=%d E=%d H=%d, %lld rows, %.1f MB of rows\n", s.name, static_cast<long long>(s.tokens), s.k,
              s.experts, s.hidden, static_cast<long long>(n), row_bytes / 1e6);
  const size_t ws = permutation_workspace_bytes(s.tokens, s.k, s.experts);
  std::printf("  build_permutation (library)       %8.1f us\n", median_us([&] {
    build_permutation(d_ids, s.tokens, s.k, s.experts, offsets, slot_of, row_source, hist, ws, nullptr);
  }));
  {
    // The sort by tiles and by buckets, each as a CUDA graph (as the engine replays them), the buckets'
    // result checked equal to the tiles'. graph_us: issue(stream) captured once and replayed; the
    // outputs (slot_of, row_source, offsets) into *result.
    auto graph_us = [&](auto issue, std::vector<int32_t>* result) {
      cudaStream_t st;
      CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
      cudaGraph_t g;
      cudaGraphExec_t exec;
      CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
      issue(st);
      CK(cudaStreamEndCapture(st, &g));
      CK(cudaGraphInstantiate(&exec, g, 0));
      CK(cudaMemset(slot_of, 0xff, n * 4));
      CK(cudaMemset(row_source, 0xff, n * 4));
      const float us = median_us([&] { CK(cudaGraphLaunch(exec, 0)); });
      CK(cudaDeviceSynchronize());
      result->assign(static_cast<size_t>(n * 2 + s.experts + 1), 0);
      CK(cudaMemcpy(result->data(), slot_of, n * 4, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(result->data() + n, row_source, n * 4, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(result->data() + 2 * n, offsets, (s.experts + 1) * 4, cudaMemcpyDeviceToHost));
      cudaGraphExecDestroy(exec);
      cudaGraphDestroy(g);
      cudaStreamDestroy(st);
      return us;
    };
    std::vector<int32_t> tiled, buckets;
    const float t_tiles = graph_us([&](cudaStream_t st) {
      build_permutation(d_ids, s.tokens, s.k, s.experts, offsets, slot_of, row_source, hist, ws, st, {}, SortMethod::tiles);
    }, &tiled);
    if (n <= kBucketMaxIds) {
      // The kernel itself, so that shapes past kBucketMaxReads are measured too (where the bound lies).
      const float t_buckets = graph_us([&](cudaStream_t st) {
        perm_bucket_kernel<<<s.experts + 1, kBucketThreads, bucket_masks_bytes(n), st>>>(
            d_ids, n, s.experts, offsets, slot_of, row_source, {});
      }, &buckets);
      std::printf("  sort as a CUDA graph: tiles %6.1f us, buckets %6.1f us (%s the tiles' result; the library: %s)\n",
                  t_tiles, t_buckets, buckets == tiled ? "same as" : "DIFFERENT from",
                  sort_method_name(sort_method_for(n, s.experts)));
    } else {
      std::printf("  sort as a CUDA graph: tiles %6.1f us (buckets do not take %lld ids)\n", t_tiles,
                  static_cast<long long>(n));
    }
  }
  const int wpb = warps_per_block(s.experts);
  const size_t smem = sizeof(int32_t) * (static_cast<size_t>(s.experts) + 1) * wpb;
  {
    // The library's three kernels as one CUDA graph (as the engine replays them), against the same
    // with the scan before (4 contiguous entries per thread, loaded one by one, chunk after chunk), and
    // with 16 contiguous entries per thread (one chunk up to kScanEntries; measured slower).
    const int64_t tile = tile_length(n, s.experts), num_tiles = (n + tile - 1) / tile;
    const int64_t entries = (static_cast<int64_t>(s.experts) + 1) * num_tiles;
    const unsigned blocks = static_cast<unsigned>((num_tiles + wpb - 1) / wpb);
    auto graph_us = [&](auto scan) {
      cudaStream_t st;
      CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
      cudaGraph_t g;
      cudaGraphExec_t exec;
      CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
      perm_count_kernel<<<blocks, wpb * 32, smem, st>>>(d_ids, n, s.experts, tile, num_tiles, hist, {});
      scan(st, entries, num_tiles);
      perm_rank_kernel<<<blocks, wpb * 32, smem, st>>>(d_ids, n, s.experts, tile, num_tiles, hist, slot_of, row_source, {});
      CK(cudaStreamEndCapture(st, &g));
      CK(cudaGraphInstantiate(&exec, g, 0));
      const float us = median_us([&] { CK(cudaGraphLaunch(exec, 0)); });
      cudaGraphExecDestroy(exec);
      cudaGraphDestroy(g);
      cudaStreamDestroy(st);
      return us;
    };
    const float library = graph_us([&](cudaStream_t st, int64_t m, int64_t tiles) {
      launch_scan(hist, m, tiles, offsets, st);
    });
    const float before = graph_us([&](cudaStream_t st, int64_t m, int64_t tiles) {
      scan_before<4><<<1, kScanThreads, 0, st>>>(hist, m, tiles, offsets);
    });
    const float items16 = graph_us([&](cudaStream_t st, int64_t m, int64_t tiles) {
      scan_before<16><<<1, kScanThreads, 0, st>>>(hist, m, tiles, offsets);
    });
    std::printf("  count + scan + rank as a CUDA graph: library %6.1f us, scan before %6.1f, 16 per thread %6.1f (%lld entries)\n",
                library, before, items16, static_cast<long long>(entries));
  }
  for (int64_t tile : {tile_length(n, s.experts), int64_t{512}, int64_t{256}, int64_t{128}}) {
    const int64_t num_tiles = (n + tile - 1) / tile, entries = (static_cast<int64_t>(s.experts) + 1) * num_tiles;
    if (entries * 4 > (64 << 20)) continue;
    const unsigned blocks = static_cast<unsigned>((num_tiles + wpb - 1) / wpb);
    const float count = median_us([&] {
      perm_count_kernel<<<blocks, wpb * 32, smem>>>(d_ids, n, s.experts, tile, num_tiles, hist, {});
    });
    const float scan = median_us([&] { launch_scan(hist, entries, num_tiles, offsets, 0); });
    const float scan4 = median_us([&] { scan_before<4><<<1, kScanThreads>>>(hist, entries, num_tiles, offsets); });
    perm_count_kernel<<<blocks, wpb * 32, smem>>>(d_ids, n, s.experts, tile, num_tiles, hist, {});
    launch_scan(hist, entries, num_tiles, offsets, 0);
    const float rank = median_us([&] {
      perm_rank_kernel<<<blocks, wpb * 32, smem>>>(d_ids, n, s.experts, tile, num_tiles, hist, slot_of, row_source, {});
    });
    std::printf("  tile %5lld (%4lld warps, %6lld scan entries): count %6.1f  scan %6.1f (before: %6.1f)  rank %6.1f us\n",
                static_cast<long long>(tile), static_cast<long long>(num_tiles), static_cast<long long>(entries), count,
                scan, scan4, rank);
  }
  build_permutation(d_ids, s.tokens, s.k, s.experts, offsets, slot_of, row_source, hist, ws, nullptr);
  CK(cudaDeviceSynchronize());
  const double mb = row_bytes / 1e6;
  auto rate = [&](float us) { return mb / us; };  // MB/us = TB/s
  float t;
  t = median_us([&] { scatter_rows(x, slot_of, s.tokens, s.k, s.hidden, rows, nullptr); });
  std::printf("  scatter_rows (library)            %8.1f us  %.2f TB/s written\n", t, rate(t));
  t = median_us([&] { gather_rows(x, row_source, n, s.k, s.hidden, rows, nullptr); });
  std::printf("  gather_rows (library)             %8.1f us  %.2f TB/s written\n", t, rate(t));
  auto download = [](const void* p, size_t bytes) {
    std::vector<uint16_t> h(bytes / 2);
    CK(cudaMemcpy(h.data(), p, bytes, cudaMemcpyDeviceToHost));
    return h;
  };
  const int hvecs = s.hidden / 8;
  const auto* xv = reinterpret_cast<const uint4*>(x);
  auto* rv = reinterpret_cast<uint4*>(rows);
  auto blocks_for = [&](int tpt) { return static_cast<unsigned>((s.tokens * tpt + 255) / 256); };
  t = median_us([&] { scatter_per_thread<1, true><<<blocks_for(256), 256>>>(xv, slot_of, s.tokens, s.k, hvecs, 256, rv); });
  std::printf("  scatter, 256 thr/token, streaming %8.1f us  %.2f TB/s written\n", t, rate(t));
  t = median_us([&] { scatter_per_thread<2, false><<<blocks_for(128), 256>>>(xv, slot_of, s.tokens, s.k, hvecs, 128, rv); });
  std::printf("  scatter, 128 thr/token, 2 words   %8.1f us  %.2f TB/s written\n", t, rate(t));
  t = median_us([&] { scatter_per_thread<2, true><<<blocks_for(128), 256>>>(xv, slot_of, s.tokens, s.k, hvecs, 128, rv); });
  std::printf("  scatter, 128 thr/token, 2, stream %8.1f us  %.2f TB/s written\n", t, rate(t));
  t = median_us([&] { scatter_per_thread<4, false><<<blocks_for(64), 256>>>(xv, slot_of, s.tokens, s.k, hvecs, 64, rv); });
  std::printf("  scatter,  64 thr/token, 4 words   %8.1f us  %.2f TB/s written\n", t, rate(t));
  {
    std::vector<uint16_t> xs(static_cast<size_t>(s.tokens) * s.hidden);
    for (size_t i = 0; i < xs.size(); ++i) xs[i] = static_cast<uint16_t>(i * 40503u);
    CK(cudaMemcpy(x, xs.data(), xs.size() * 2, cudaMemcpyHostToDevice));
    scatter_rows(x, slot_of, s.tokens, s.k, s.hidden, rows, nullptr);
    const std::vector<uint16_t> lib = download(rows, row_bytes);
    CK(cudaMemset(rows, 0, row_bytes));
    scatter_per_thread<2, true><<<blocks_for(128), 256>>>(xv, slot_of, s.tokens, s.k, hvecs, 128, rv);
    const bool two = download(rows, row_bytes) == lib;
    CK(cudaMemset(rows, 0, row_bytes));
    scatter_per_thread<4, false><<<blocks_for(64), 256>>>(xv, slot_of, s.tokens, s.k, hvecs, 64, rv);
    std::printf("  scatter variants (2 words streaming, 4 words): %s, %s the library's rows\n", two ? "same" : "DIFFERENT",
                download(rows, row_bytes) == lib ? "same as" : "DIFFERENT FROM");
  }
  // The variants' bytes against the library's (rows from the last scatter; random weights).
  {
    std::vector<float> w(static_cast<size_t>(n));
    std::uniform_real_distribution<float> d(0.0f, 1.0f);
    for (float& v : w) v = d(rng);
    CK(cudaMemcpy(weights, w.data(), n * 4, cudaMemcpyHostToDevice));
    std::vector<uint16_t> y(static_cast<size_t>(n) * s.hidden);
    for (size_t i = 0; i < y.size(); ++i) y[i] = static_cast<uint16_t>(0x3c00 + (i * 2654435761u >> 20) % 0x300);
    CK(cudaMemcpy(rows, y.data(), row_bytes, cudaMemcpyHostToDevice));
  }
  combine_rows(rows, slot_of, weights, s.tokens, s.k, s.hidden, out, nullptr);
  const std::vector<uint16_t> want = download(out, s.tokens * s.hidden * 2);
  if (s.k <= 8) {
    combine_loads_first<<<blocks_for(128), 256>>>(reinterpret_cast<const uint4*>(rows), slot_of, weights, s.tokens, s.k,
                                                  hvecs, 128, reinterpret_cast<uint4*>(out));
    std::printf("  combine, loads first: %s the library's bytes\n",
                download(out, s.tokens * s.hidden * 2) == want ? "the same as" : "DIFFERENT FROM");
  }
  t = median_us([&] { combine_rows(rows, slot_of, weights, s.tokens, s.k, s.hidden, out, nullptr); });
  std::printf("  combine_rows (library)            %8.1f us  %.2f TB/s read\n", t, rate(t));
  if (s.k <= 8)
    for (int tpt : {256, 128}) {
      t = median_us([&] {
        combine_loads_first<<<blocks_for(tpt), 256>>>(reinterpret_cast<const uint4*>(rows), slot_of, weights, s.tokens, s.k,
                                                      hvecs, tpt, reinterpret_cast<uint4*>(out));
      });
      std::printf("  combine, loads first, %3d thr/tok %8.1f us  %.2f TB/s read\n", tpt, t, rate(t));
    }
  t = median_us([&] { CK(cudaMemsetAsync(rows, 0, row_bytes)); });
  std::printf("  memset of the rows                %8.1f us  %.2f TB/s written\n", t, rate(t));
  uint16_t* copy;
  CK(cudaMalloc(&copy, row_bytes));
  t = median_us([&] { CK(cudaMemcpyAsync(copy, rows, row_bytes, cudaMemcpyDeviceToDevice)); });
  std::printf("  device copy of the rows           %8.1f us  %.2f TB/s written\n", t, rate(t));
  for (void* p : std::initializer_list<void*>{d_ids, offsets, slot_of, row_source, hist, x, rows, out, weights, copy})
    cudaFree(p);
}

}  // namespace dispatch_probe

int main() {
  using dispatch_probe::Shape;
  for (const Shape& s : {Shape{"qwen3-30b-a3b", 8192, 8, 128, 2048}, Shape{"qwen3-30b-a3b", 2048, 8, 128, 2048},
                         Shape{"qwen3-30b-a3b", 512, 8, 128, 2048}, Shape{"qwen3-30b-a3b", 128, 8, 128, 2048},
                         Shape{"qwen1.5-moe-a2.7b", 8192, 4, 60, 2048}, Shape{"qwen1.5-moe-a2.7b", 512, 4, 60, 2048},
                         Shape{"deepseek-v3", 8192, 8, 256, 7168}, Shape{"deepseek-v3", 2048, 8, 256, 7168},
                         Shape{"deepseek-v3", 128, 8, 256, 7168}, Shape{"mixtral-8x7b", 8192, 2, 8, 4096},
                         Shape{"mixtral-8x7b", 512, 2, 8, 4096}})
    dispatch_probe::probe(s);
  return 0;
}
