#include "kernels/cuda/cutlass_grouped.hpp"

#include <cuda_runtime.h>

#include <limits>
#include <string>
#include <type_traits>

#include "graph/error.hpp"
#include "kernels/cuda/bf16_vec.cuh"
#include "kernels/cuda/check.cuh"
#include "kernels/cuda/device.hpp"
#include "kernels/cuda/elementwise.hpp"

#if MOEFLOW_HAVE_CUTLASS
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/detail.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "kernels/cuda/cutlass_epilogue_warp_loads.hpp"
#include "kernels/cuda/cutlass_gather_rows.cuh"
#include "kernels/cuda/cutlass_stores_during_mainloop.cuh"
#include "kernels/cuda/cutlass_weight_tiles.cuh"
#endif

namespace moeflow::cuda {

namespace {

constexpr std::size_t kAlign = 256;
std::size_t aligned_up(std::size_t b) { return (b + kAlign - 1) / kAlign * kAlign; }
// CUTLASS's own workspace (one TMA descriptor set per SM) is well under this on any Hopper part;
// the run checks it against what CUTLASS asks for.
constexpr std::size_t kCutlassReserve = std::size_t{1} << 20;

std::string alignment_problem(int hidden, int intermediate) {
  if (hidden % 8 != 0 || intermediate % 8 != 0)
    return "H = " + std::to_string(hidden) + ", I = " + std::to_string(intermediate) +
           ": TMA needs rows of a multiple of 16 bytes (8 bf16)";
  return "";
}

}  // namespace

// The SwiGLU interleave: row r (< 2·kSwigluHalf) of block b of an expert's packed w13 copies w13 row
// 128·b + r (gate) for r < 128, I + 128·b + r - 128 (up) beyond; -1 past feature I (a zero row).
__device__ inline int64_t interleaved_w13_row(int64_t block, int64_t r, int64_t intermediate) {
  const int64_t feature = block * kSwigluHalf + r % kSwigluHalf;
  if (feature >= intermediate) return -1;
  return r < kSwigluHalf ? feature : intermediate + feature;
}

// packed[e, 256·b + r] = w13[e, interleaved_w13_row(b, r)]. One block per packed row, 16-byte copies
// (H is a multiple of 8: TMA's alignment, checked by the callers).
__global__ void pack_w13_rows(const uint4* __restrict__ w13, int64_t hidden_vectors, int intermediate,
                              int64_t features, uint4* __restrict__ packed) {
  const int64_t row = blockIdx.x;  // packed row: expert e, block b, r
  const int64_t per_expert = 2 * features;
  const int64_t e = row / per_expert, within = row % per_expert;
  const int64_t source_row = interleaved_w13_row(within / (2 * kSwigluHalf), within % (2 * kSwigluHalf), intermediate);
  uint4* dst = packed + row * hidden_vectors;
  if (source_row < 0) {
    for (int64_t i = threadIdx.x; i < hidden_vectors; i += blockDim.x) dst[i] = make_uint4(0, 0, 0, 0);
    return;
  }
  const int64_t source = e * 2 * intermediate + source_row;
  const uint4* src = w13 + source * hidden_vectors;
  for (int64_t i = threadIdx.x; i < hidden_vectors; i += blockDim.x) dst[i] = src[i];
}

int64_t packed_w13_features(int intermediate) {
  return (static_cast<int64_t>(intermediate) + kSwigluHalf - 1) / kSwigluHalf * kSwigluHalf;
}

int64_t packed_w13_bytes(int experts, int hidden, int intermediate) {
  return static_cast<int64_t>(experts) * 2 * packed_w13_features(intermediate) * hidden * 2;
}

void pack_w13_interleaved(const uint16_t* w13, int experts, int hidden, int intermediate, uint16_t* packed,
                          Stream stream) {
  if (experts <= 0 || hidden <= 0 || intermediate <= 0 || hidden % 8 != 0)
    fail_input("pack_w13_interleaved: E = " + std::to_string(experts) + ", H = " + std::to_string(hidden) +
               ", I = " + std::to_string(intermediate) + " (H must be a positive multiple of 8)");
  const int64_t rows = static_cast<int64_t>(experts) * 2 * packed_w13_features(intermediate);
  if (rows > std::numeric_limits<int32_t>::max())
    fail_input("pack_w13_interleaved: " + std::to_string(rows) + " packed rows, more than a grid's blocks");
  pack_w13_rows<<<static_cast<unsigned>(rows), 128, 0, stream>>>(reinterpret_cast<const uint4*>(w13), hidden / 8,
                                                                 intermediate, packed_w13_features(intermediate),
                                                                 reinterpret_cast<uint4*>(packed));
  MOEFLOW_CUDA_LAUNCH_CHECK();
}

namespace {

constexpr int kTileRows = kWeightTileRows, kTileCols = kWeightTileCols;
int64_t tiles_n(int64_t rows) { return (rows + kTileRows - 1) / kTileRows; }
int64_t blocks_k(int64_t k) { return (k + kTileCols - 1) / kTileCols; }
int64_t tiles_bytes(int64_t experts, int64_t rows, int64_t k) {
  return experts * tiles_n(rows) * blocks_k(k) * kTileRows * kTileCols * 2;
}

// One block per packed tile (expert e, weight tile n, k-block kb), thread r its row r: 64 columns of
// one source row of expert e (w [E, rows, k]), zeros past k or where there is no such row. Which row:
// with `interleaved`, w is w13 [E, 2I, k] and tile n is interleave block n of pack_w13_interleaved
// (a 256-row tile is one block of 2·kSwigluHalf rows); otherwise row n·256 + r of w.
__global__ void pack_weight_tile_rows(const uint16_t* __restrict__ w, int64_t rows, int64_t k, bool interleaved,
                                      int64_t n_tiles, int64_t k_blocks, uint4* __restrict__ packed) {
  static_assert(kTileRows == 2 * kSwigluHalf, "a weight tile is one interleave block of w13");
  const int64_t tile = blockIdx.x;  // (e · n_tiles + n) · k_blocks + kb
  const int64_t kb = tile % k_blocks, n = tile / k_blocks % n_tiles, e = tile / k_blocks / n_tiles;
  const int r = threadIdx.x;
  const int64_t row = interleaved ? interleaved_w13_row(n, r, rows / 2) : n * kTileRows + r;
  const bool valid = row >= 0 && row < rows;
  uint4* dst = packed + (tile * kTileRows + r) * (kTileCols / 8);
  const uint16_t* src = w + (e * rows + row) * k + kb * kTileCols;
  for (int v = 0; v < kTileCols / 8; ++v) {
    const int64_t column = kb * kTileCols + v * 8;
    // k is a multiple of 8 (TMA's alignment, checked by the callers): whole 16-byte groups.
    dst[v] = valid && column < k ? *reinterpret_cast<const uint4*>(src + v * 8) : make_uint4(0, 0, 0, 0);
  }
}

}  // namespace

int64_t weight_tiles_bytes(int experts, int hidden, int intermediate) {
  return tiles_bytes(experts, 2 * packed_w13_features(intermediate), hidden) + tiles_bytes(experts, hidden, intermediate);
}

void pack_weight_tiles(const uint16_t* w13, const uint16_t* w2, int experts, int hidden, int intermediate,
                       uint16_t* packed, Stream stream) {
  if (experts <= 0 || hidden <= 0 || intermediate <= 0 || hidden % 8 != 0 || intermediate % 8 != 0)
    fail_input("pack_weight_tiles: E = " + std::to_string(experts) + ", H = " + std::to_string(hidden) +
               ", I = " + std::to_string(intermediate) + " (H and I must be positive multiples of 8)");
  const int64_t H = hidden, I = intermediate, w13_rows = 2 * packed_w13_features(intermediate);
  const int64_t blocks1 = experts * tiles_n(w13_rows) * blocks_k(H), blocks2 = experts * tiles_n(H) * blocks_k(I);
  if (blocks1 > std::numeric_limits<int32_t>::max() || blocks2 > std::numeric_limits<int32_t>::max())
    fail_input("pack_weight_tiles: more tiles than a grid's blocks");
  pack_weight_tile_rows<<<static_cast<unsigned>(blocks1), kTileRows, 0, stream>>>(
      w13, 2 * I, H, true, tiles_n(w13_rows), blocks_k(H), reinterpret_cast<uint4*>(packed));
  MOEFLOW_CUDA_LAUNCH_CHECK();
  pack_weight_tile_rows<<<static_cast<unsigned>(blocks2), kTileRows, 0, stream>>>(
      w2, H, I, false, tiles_n(H), blocks_k(I),
      reinterpret_cast<uint4*>(packed + tiles_bytes(experts, w13_rows, H) / 2));
  MOEFLOW_CUDA_LAUNCH_CHECK();
}

#if MOEFLOW_HAVE_CUTLASS

namespace {

using namespace cute;

// One instantiation per tile configuration serves both GEMMs: D [m, n] = A [m, k] · B[n, k]ᵀ with A
// and D row-major and B stored [n, k] (K-major), which is w13 [2I, H] against rows for the first and
// w2 [H, I] against act for the second. The cooperative schedule's two consumer warp groups split a
// tile's 128 rows.
using Element = cutlass::bfloat16_t;
using LayoutA = cutlass::layout::RowMajor;
using LayoutB = cutlass::layout::ColumnMajor;
using LayoutD = cutlass::layout::RowMajor;
constexpr int kElementsPer16B = 8;
using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;
using Shape3 = typename ProblemShape::UnderlyingProblemShape;

struct Cooperative {
  using Mainloop = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using Epilogue = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
};
struct Pingpong {
  using Mainloop = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
  using Epilogue = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;
};

using StrideRowMajor = cutlass::detail::TagToStrideC_t<LayoutD*>;

// GEMM 1's SwiGLU in its epilogue, straight from the fp32 accumulators to act [m, I]: with w13 packed
// by pack_w13_interleaved (each 256 rows of B = 128 gate rows, then the same 128 features' up rows),
// a 256-column tile holds gate j in its first half and up j in its second, and Hopper's wgmma leaves
// both in the same thread: the value for column n sits in accumulator group n / 8, its partner for
// n + 128 in group n / 8 + 16. Each thread writes silu(gate)·up for its column pairs (4-byte stores),
// so h [m, 2I] is never written nor read back. Gate and up are rounded to bf16 first, as h would have
// been: the result is bit for bit the unfused path's (same mainloop, same accumulation order).
// The shape of CUTLASS's DefaultEpilogueArray (no shared memory, stores from the registers), run
// through its Sm90TmaWarpSpecializedAdapter like the ptr-array no-smem schedule. A kernel may instead
// call hold() and later write_slice() to issue the stores while its next tile's MMAs run.
class SwigluEpilogueArray {
 public:
  using EpilogueSchedule = cutlass::epilogue::PtrArrayNoSmemWarpSpecialized;
  using DispatchPolicy = EpilogueSchedule;
  using ElementOutput = Element;
  using ElementAccumulator = float;
  using ElementCompute = float;
  using ElementScalar = float;
  using ElementC = void;
  using StrideC = StrideRowMajor;
  using InternalStrideC = cute::remove_pointer_t<StrideC>;
  using ElementD = Element;
  using StrideD = StrideRowMajor;
  using InternalStrideD = cute::remove_pointer_t<StrideD>;
  using GmemTiledCopyC = void;
  using GmemTiledCopyD = void;
  // Named by CUTLASS's device adapter (its EpilogueOutputOp); the SwiGLU is applied in operator().
  using ThreadEpilogueOp = cutlass::epilogue::thread::LinearCombination<Element, 1, float, float>;
  struct SharedStorage {};
  using TensorMapStorage = SharedStorage;

  struct Arguments {
    Element** ptr_D = nullptr;  // act rows of each group
    int64_t pitch = 0;          // act's row pitch (I)
    int out_cols = 0;           // I: packed columns past it (padding to 128 features) are dropped
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) { return args; }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&, int) { return 0; }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& args) {
    return args.ptr_D != nullptr && args.out_cols % 2 == 0 && args.pitch % 2 == 0;
  }

  CUTLASS_HOST_DEVICE explicit SwigluEpilogueArray(Params const& p) : params(p) {}
  CUTLASS_DEVICE bool is_source_needed() { return false; }

  // Where a thread's pairs in one row of the tile go: a thread's pairs in a row lie 8 columns apart
  // (wgmma's accumulator groups), so one row pointer and one row check serve them all, and each store
  // is a predicated instruction on an immediate offset rather than 64-bit address arithmetic per pair.
  struct RowTarget {
    Element* row = nullptr;  // act at the row's first pair (a valid address even outside the group)
    int cols_left = 0;       // act columns inside I from there: the pair of group g is inside iff 8·g < cols_left
    bool inside = false;     // the row is one of the group's
    CUTLASS_DEVICE void store(int g, __nv_bfloat162 v) const {
      if (inside && 8 * g < cols_left) *reinterpret_cast<__nv_bfloat162*>(row + 8 * g) = v;  // 4-byte aligned
    }
  };

  // A pair's gate and up, each two columns rounded to bf16 as h would hold them.
  struct Operands {
    __nv_bfloat162 gate, up;
  };
  // silu(gate)·up of both columns, packed.
  static CUTLASS_DEVICE __nv_bfloat162 swiglu(Operands o) {
    const float2 gate = bf16x2_bits_to_float2(bf16x2_bits(o.gate)), up = bf16x2_bits_to_float2(bf16x2_bits(o.up));
    return __floats2bfloat162_rn(silu_mul(gate.x, up.x), silu_mul(gate.y, up.y));
  }

  // A tile's act pairs as a thread holds them between hold() and write_slice():
  // EpilogueWarpLoadsCooperative with kStoresDuringMainloop writes them while the next tile's first
  // MMAs run, so the epilogue between two mainloops only computes. All of them fit: the consumers
  // have 232 registers (setmaxnreg), the accumulators take 128, and with one row pointer per row
  // (RowTarget) the highest register ptxas uses is R208, with no spills. Pair i of a thread is (gate
  // group g, rows r / r + 8 by `half`) with i = g · 2 + half, as walk_pairs visits them.
  template <class FrgLayout>
  struct Pending {
    static constexpr int kGroups = cute::size<0, 2>(FrgLayout{});  // 8-column groups a thread holds across the tile
    static_assert(cute::size<1>(FrgLayout{}) == 1, "one row block per thread (64 rows per warp group)");
    __nv_bfloat162 value[kGroups];  // kGroups / 2 act groups, two rows
    RowTarget row[2];               // rows r and r + 8
    bool live = false;
  };

  // operator() but for the held pairs, which go to p.
  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine, class FrgLayout,
            class TiledMma>
  CUTLASS_DEVICE void hold(Pending<FrgLayout>& p, ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_MNK,
                           BlockCoordMNKL blk_coord_mnkl, cute::Tensor<FrgEngine, FrgLayout> const& acc,
                           TiledMma tiled_mma, int thread_idx) const {
    p.live = true;
    walk_pairs(problem_shape_mnkl, blk_shape_MNK, blk_coord_mnkl, acc, tiled_mma, thread_idx,
               [&](int i, int, RowTarget const& target, auto operands) {
                 p.value[i] = swiglu(operands());
                 p.row[i % 2] = target;
               });
  }

  // Slice `slice` of kSlices equal parts of the held pairs (a run-time index into compile-time
  // ranges, so that the registers are never indexed dynamically): four act groups of one row each.
  //
  // One 16-byte store per lane: slice s is groups g0 .. g0 + 3 of row `half`, and the quad's four
  // lanes (one row; lane q holds columns 2q, 2q + 1 of every group) trade pairs so that lane q gets
  // all four of group g0 + q. A warp then writes 64 contiguous bytes per row where 4-byte stores wrote
  // 16 and half-filled 32-byte sectors: 0.2-0.8% faster at T = 4096 and 8192 (the exchange runs while
  // the MMAs do; bench/NOTES.md, "SwiGLU in GEMM 1's epilogue").
  template <int kSlices, int kSlice = 0, class FrgLayout>
  CUTLASS_DEVICE static void write_slice(Pending<FrgLayout> const& p, int slice) {
    static_assert(Pending<FrgLayout>::kGroups == 4 * kSlices, "a slice is four groups of one row");
    if constexpr (kSlice < kSlices) {
      if (slice != kSlice) {
        write_slice<kSlices, kSlice + 1>(p, slice);
        return;
      }
      constexpr int half = kSlice % 2, g0 = 4 * (kSlice / 2);
      const int q = static_cast<int>(threadIdx.x % 4);
      // Choices by bit masks, not by conditionals: the compiler turned `hi ? value[a] : value[b]` into
      // an indexed load and moved the held pairs to local memory.
      const uint32_t hi = 0u - static_cast<uint32_t>(q >> 1 & 1), lo = 0u - static_cast<uint32_t>(q & 1);
      auto choose = [](uint32_t if_clear, uint32_t if_set, uint32_t mask) { return if_clear ^ ((if_clear ^ if_set) & mask); };
      uint32_t a[4];  // this lane's pair of groups g0 .. g0 + 3
      CUTLASS_PRAGMA_UNROLL
      for (int t = 0; t < 4; ++t) a[t] = bf16x2_bits(p.value[2 * (g0 + t) + half]);
      // A 4x4 transpose in two butterfly steps (lane masks, not lane indices, so nothing is hoisted).
      // Step 1, lanes q and q ^ 2: each keeps the groups whose bit 1 is its own and gets its partner's.
      const uint32_t k0 = choose(a[0], a[2], hi), k1 = choose(a[1], a[3], hi);
      const uint32_t r0 = __shfl_xor_sync(0xffffffffu, choose(a[2], a[0], hi), 2);
      const uint32_t r1 = __shfl_xor_sync(0xffffffffu, choose(a[3], a[1], hi), 2);
      // Step 2, lanes q and q ^ 1: each keeps group g0 + q (from itself: w0, from lane q ^ 2: w1) and
      // gets it from lanes q ^ 1 (v0) and q ^ 3 (v1).
      const uint32_t w0 = choose(k0, k1, lo), w1 = choose(r0, r1, lo);
      const uint32_t v0 = __shfl_xor_sync(0xffffffffu, choose(k1, k0, lo), 1);
      const uint32_t v1 = __shfl_xor_sync(0xffffffffu, choose(r1, r0, lo), 1);
      // Column pair s of the group came from lane s, that is d = s ^ q: d = 0 w0, 1 v0, 2 w1, 3 v1.
      const uint32_t even = choose(w0, v0, lo), odd = choose(v0, w0, lo);   // d & 1 = 0 for s = 0 / 1
      const uint32_t even2 = choose(w1, v1, lo), odd2 = choose(v1, w1, lo);  // the same from d & 2 = 2
      const uint4 whole = make_uint4(choose(even, even2, hi), choose(odd, odd2, hi), choose(even2, even, hi),
                                     choose(odd2, odd, hi));
      RowTarget const& target = p.row[half];
      if (target.inside && 8 * (g0 + q) < target.cols_left + 2 * q)  // the group's first column inside I
        *reinterpret_cast<uint4*>(target.row - 2 * q + 8 * (g0 + q)) = whole;
    }
  }

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine, class FrgLayout,
            class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_MNK,
                                 BlockCoordMNKL blk_coord_mnkl, cute::Tensor<FrgEngine, FrgLayout> const& acc,
                                 TiledMma tiled_mma, ResidueMNK, int thread_idx, char*) {
    walk_pairs(problem_shape_mnkl, blk_shape_MNK, blk_coord_mnkl, acc, tiled_mma, thread_idx,
               [](int, int g, RowTarget const& target, auto operands) { target.store(g, swiglu(operands())); });
  }

 private:
  // Every pair of the thread's fragment in turn, handed to each(i, g, its row, operands), where
  // operands() rounds the pair's gate and up accumulators (computed when called).
  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine, class FrgLayout,
            class TiledMma, class Each>
  CUTLASS_DEVICE void walk_pairs(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_MNK,
                                 BlockCoordMNKL blk_coord_mnkl, cute::Tensor<FrgEngine, FrgLayout> const& acc,
                                 TiledMma tiled_mma, int thread_idx, Each&& each) const {
    constexpr int kTileN = size<1>(BlockShapeMNK{});
    constexpr int kGroups = size<0, 2>(FrgLayout{});  // 8-column groups a thread holds across the tile
    static_assert(kTileN == 256 && kGroups * 8 == kTileN && size<2>(FrgLayout{}) == 1,
                  "the SwiGLU epilogue needs one 256-column wgmma per row block: gate and up in one thread");
    const int M = get<0>(problem_shape_mnkl), N = get<1>(problem_shape_mnkl);
    const auto [m_coord, n_coord, k_coord, l_coord] = blk_coord_mnkl;
    Tensor coords = local_tile(make_identity_tensor(make_shape(M, N)), take<0, 2>(blk_shape_MNK),
                               make_coord(m_coord, n_coord));
    Tensor tCcD = tiled_mma.get_thread_slice(thread_idx).partition_C(coords);  // (VEC, MMA_M, MMA_N) -> (m, n)
    Element* const out = params.ptr_D[l_coord];
    CUTLASS_PRAGMA_UNROLL
    for (int mi = 0; mi < size<1>(acc); ++mi) {
      CUTLASS_PRAGMA_UNROLL
      for (int half = 0; half < 2; ++half) {  // rows r and r + 8
        const auto first = tCcD(make_coord(0, half, 0), mi, 0);
        const int m = get<0>(first), n = get<1>(first);
        const int col0 = n / kTileN * (kTileN / 2) + n % kTileN;
        RowTarget target;
        target.inside = m < M;
        target.cols_left = params.out_cols - col0;
        target.row = out + static_cast<int64_t>(target.inside ? m : 0) * params.pitch + col0;
        CUTLASS_PRAGMA_UNROLL
        for (int g = 0; g < kGroups / 2; ++g) {
          // Both columns' gate and up rounded to bf16 (as h holds them), then (swiglu) the result
          // packed, two values per conversion: in the cooperative tiles this epilogue runs between
          // mainloops with the tensor cores idle, so its instructions are the time (bf16_vec.cuh).
          auto operands = [&] {
            return Operands{__floats2bfloat162_rn(acc(make_coord(0, half, g), mi, 0), acc(make_coord(1, half, g), mi, 0)),
                            __floats2bfloat162_rn(acc(make_coord(0, half, g + kGroups / 2), mi, 0),
                                                  acc(make_coord(1, half, g + kGroups / 2), mi, 0))};
          };
          each((mi * (kGroups / 2) + g) * 2 + half, g, target, operands);
        }
      }
    }
  }

  Params params;
};

template <class Collective>
using AsBuilt = Collective;
using cutlass_detail::WeightTiles;
using cutlass_detail::WeightTilesMainloop;

// `Wrap` may replace parts of the mainloop CUTLASS's builder makes (WeightTilesMainloop,
// StoresDuringMainloop); kEpilogueWarpLoads runs it in EpilogueWarpLoadsCooperative (the epilogue's producer warp loading
// for the mainloop too: the three-warp gather) instead of CUTLASS's kernel.
// kStoresDuringMainloop (with kEpilogueWarpLoads and a StoresDuringMainloop mainloop) holds the SwiGLU
// epilogue's output in registers and writes it during the next tile's first MMAs.
template <class TileShape, class ClusterShape, class Schedule = Cooperative, bool kSwiglu = false,
          template <class> class Wrap = AsBuilt, bool kEpilogueWarpLoads = false, bool kStoresDuringMainloop = false>
struct GroupedGemm {
  using PlainEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD*, kElementsPer16B, Element,
      LayoutD*, kElementsPer16B, typename Schedule::Epilogue,
      cutlass::epilogue::fusion::LinearCombination<Element, float, void, float>>::CollectiveOp;
  using Epilogue = std::conditional_t<
      kSwiglu, cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<SwigluEpilogueArray>, PlainEpilogue>;
  using Mainloop = Wrap<typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kElementsPer16B, Element, LayoutB*,
      kElementsPer16B, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      typename Schedule::Mainloop>::CollectiveOp>;
  using Kernel =
      std::conditional_t<kEpilogueWarpLoads,
                         cutlass::gemm::kernel::EpilogueWarpLoadsCooperative<ProblemShape, Mainloop, Epilogue, void,
                                                                             kStoresDuringMainloop>,
                         cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

// 128x128x64, no cluster: any expert size. 128x256x64 in 2x1 clusters: experts of hundreds of rows,
// where a weight tile multicast to the two CTAs of a cluster (same n, next m) halves its loads.
// 64x256x64, no cluster, ping-pong (each consumer warp group its own tile): an expert's rows rounded
// up to 64, not 128 or 256, where a few rows past a multiple of 128 would cost a whole row tile.
using General = GroupedGemm<Shape<_128, _128, _64>, Shape<_1, _1, _1>>;
using Wide = GroupedGemm<Shape<_128, _256, _64>, Shape<_2, _1, _1>>;
using Narrow = GroupedGemm<Shape<_64, _256, _64>, Shape<_1, _1, _1>, Pingpong>;
// 128x256x64 with no cluster: the wide tile's work per weight tile, rows rounded up to 128 and not to
// a cluster's 256 (without the multicast).
using WideSingle = GroupedGemm<Shape<_128, _256, _64>, Shape<_1, _1, _1>>;
// GEMM 1 of the two 256-column configurations with SwiGLU in its epilogue (SwigluEpilogueArray).
using NarrowSwiglu = GroupedGemm<Shape<_64, _256, _64>, Shape<_1, _1, _1>, Pingpong, true>;
// Its cooperative warp groups run the epilogue between mainloops, so each thread's act pairs wait in
// registers and go out during the next tile's first MMAs (EpilogueWarpLoadsCooperative with
// kStoresDuringMainloop): 3-6% faster on qwen at T=8192 than the epilogue's own stores (bench/NOTES.md).
template <class Collective>
using StoresDuringMainloop = cutlass_detail::StoresDuringMainloop<Collective>;
using WideSingleSwiglu =
    GroupedGemm<Shape<_128, _256, _64>, Shape<_1, _1, _1>, Cooperative, true, StoresDuringMainloop, true, true>;
// 64x256x64 ping-pong tiles in 2x1 clusters: the narrow tiles with each weight tile multicast to the
// cluster's two row tiles (an expert's rows padded to 128). Ahead of the narrow tiles alone below
// ~100 rows per expert, behind from 128 (measurements where they are registered).
using NarrowPair = GroupedGemm<Shape<_64, _256, _64>, Shape<_2, _1, _1>, Pingpong>;
using NarrowPairSwiglu = GroupedGemm<Shape<_64, _256, _64>, Shape<_2, _1, _1>, Pingpong, true>;
// The 256-column tiles reading the weights packed tile by tile (cutlass_weight_tiles.cuh): GEMM 1
// with the SwiGLU epilogue, GEMM 2 plain.
using NarrowSwigluTiles = GroupedGemm<Shape<_64, _256, _64>, Shape<_1, _1, _1>, Pingpong, true, WeightTilesMainloop>;
using NarrowTiles = GroupedGemm<Shape<_64, _256, _64>, Shape<_1, _1, _1>, Pingpong, false, WeightTilesMainloop>;
using WideSingleSwigluTiles =
    GroupedGemm<Shape<_128, _256, _64>, Shape<_1, _1, _1>, Cooperative, true, WeightTilesMainloop>;
using WideSingleTiles = GroupedGemm<Shape<_128, _256, _64>, Shape<_1, _1, _1>, Cooperative, false, WeightTilesMainloop>;
using NarrowPairSwigluTiles = GroupedGemm<Shape<_64, _256, _64>, Shape<_2, _1, _1>, Pingpong, true, WeightTilesMainloop>;
using NarrowPairTiles = GroupedGemm<Shape<_64, _256, _64>, Shape<_2, _1, _1>, Pingpong, false, WeightTilesMainloop>;
// GEMM 1 of the 64x256 tiles with SwiGLU in its epilogue, its rows gathered from x
// (cutlass_gather_rows.cuh): B as CUTLASS loads it, or from the packed weight tiles.
template <class Collective>
using GatherRows = cutlass_detail::GatherRowsMainloop<Collective, false>;
template <class Collective>
using GatherRowsTiles = cutlass_detail::GatherRowsMainloop<WeightTilesMainloop<Collective>, true>;
using NarrowSwigluGather = GroupedGemm<Shape<_64, _256, _64>, Shape<_1, _1, _1>, Pingpong, true, GatherRows>;
// GEMM 1 of the 128x256 tiles with SwiGLU in its epilogue, its rows gathered from x by three warps
// (the epilogue's producer warp too, EpilogueWarpLoadsCooperative), B as CUTLASS loads it.
template <class Collective>
using GatherRowsThreeWarps = cutlass_detail::GatherRowsMainloop<Collective, false, 3>;
using WideSingleSwigluGather =
    GroupedGemm<Shape<_128, _256, _64>, Shape<_1, _1, _1>, Cooperative, true, GatherRowsThreeWarps, true>;
using NarrowSwigluTilesGather = GroupedGemm<Shape<_64, _256, _64>, Shape<_1, _1, _1>, Pingpong, true, GatherRowsTiles>;
// Both builders give the same operand strides (a row pitch and unit steps).
using StrideA = typename General::Kernel::InternalStrideA;
using StrideB = typename General::Kernel::InternalStrideB;
using StrideD = typename General::Kernel::InternalStrideD;
template <class Config>
constexpr bool kSameStrides = std::is_same_v<StrideA, typename Config::Kernel::InternalStrideA> &&
                              std::is_same_v<StrideB, typename Config::Kernel::InternalStrideB> &&
                              std::is_same_v<StrideD, typename Config::Kernel::InternalStrideD>;
static_assert(kSameStrides<Wide> && kSameStrides<Narrow> && kSameStrides<WideSingle> && kSameStrides<NarrowSwiglu> &&
              kSameStrides<WideSingleSwiglu> && kSameStrides<NarrowPair> && kSameStrides<NarrowPairSwiglu> &&
              kSameStrides<NarrowSwigluTiles> && kSameStrides<NarrowTiles> && kSameStrides<WideSingleSwigluTiles> &&
              kSameStrides<WideSingleTiles> && kSameStrides<NarrowPairSwigluTiles> && kSameStrides<NarrowPairTiles> &&
              kSameStrides<NarrowSwigluGather> && kSameStrides<NarrowSwigluTilesGather> &&
              kSameStrides<WideSingleSwigluGather>);

// One GEMM's per-group arrays, each E long, carved from the workspace.
struct GroupArrays {
  Shape3* shapes;
  const Element** a;
  const Element** b;
  Element** d;
  StrideA* sa;
  StrideB* sb;
  StrideD* sd;
};

struct Carver {
  std::byte* base;
  std::size_t at = 0;
  template <class T>
  T* take(std::size_t count) {
    T* p = base ? reinterpret_cast<T*>(base + at) : nullptr;
    at += aligned_up(sizeof(T) * count);
    return p;
  }
  GroupArrays group(int experts) {
    const auto e = static_cast<std::size_t>(experts);
    GroupArrays g;
    g.shapes = take<Shape3>(e);
    g.a = take<const Element*>(e);
    g.b = take<const Element*>(e);
    g.d = take<Element*>(e);
    g.sa = take<StrideA>(e);
    g.sb = take<StrideB>(e);
    g.sd = take<StrideD>(e);
    return g;
  }
};

// Row-major [m, k] operands and outputs: the row pitch is all a stride holds.
template <class Stride>
Stride pitch(int64_t elements) {
  Stride s{};
  cute::get<0>(s) = elements;
  return s;
}

// Every group's problem (m_e, n, k) and pointers for both GEMMs, from the device offsets. GEMM 1
// multiplies by w13 as stored ([2I, H] per expert, into h [m, 2I]) or packed ([2·I128, H], into act
// [m, I] through the SwiGLU epilogue): `w13_rows` and `d1`, `d1_pitch` say which.
__global__ void fill_groups(const int32_t* __restrict__ offsets, int experts, int hidden, int intermediate,
                            const Element* rows, const Element* w13, int64_t w13_rows, const Element* w2, Element* d1,
                            int64_t d1_pitch, const Element* act, Element* out, GroupArrays g1, GroupArrays g2,
                            StrideA s1a, StrideB s1b, StrideD s1d, StrideA s2a, StrideB s2b, StrideD s2d) {
  const int e = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (e >= experts) return;
  const int64_t first = offsets[e];
  const int m = offsets[e + 1] - offsets[e];
  const int64_t H = hidden, I = intermediate;
  g1.shapes[e] = Shape3{m, static_cast<int>(w13_rows), hidden};
  g1.a[e] = rows + first * H;
  g1.b[e] = w13 + static_cast<int64_t>(e) * w13_rows * H;
  g1.d[e] = d1 + first * d1_pitch;
  g1.sa[e] = s1a;
  g1.sb[e] = s1b;
  g1.sd[e] = s1d;
  g2.shapes[e] = Shape3{m, hidden, intermediate};
  g2.a[e] = act + first * I;
  g2.b[e] = w2 + static_cast<int64_t>(e) * H * I;
  g2.d[e] = out + first * H;
  g2.sa[e] = s2a;
  g2.sb[e] = s2b;
  g2.sd[e] = s2d;
}

void check(cutlass::Status s, const char* what) {
  if (s != cutlass::Status::kSuccess)
    throw Error(ErrorKind::resource, std::string("cutlass grouped GEMM: ") + what + ": " + cutlassGetStatusString(s));
}

// One grouped launch: can_implement -> workspace -> initialize -> run. `extra` may add to the
// mainloop's arguments (a packed weights' tiles) before CUTLASS checks them.
template <class Config, class ExtraMainloopArguments = void (*)(typename Config::Gemm::Arguments&)>
void run_group(const LaneContext& ctx, int experts, const GroupArrays& g, std::byte* cutlass_workspace,
               const typename Config::Kernel::EpilogueArguments& epilogue,
               ExtraMainloopArguments extra = [](typename Config::Gemm::Arguments&) {}) {
  using Gemm = typename Config::Gemm;
  typename Gemm::Arguments args;
  args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
  args.problem_shape = {experts, g.shapes, nullptr};  // sizes on the device only: a persistent grid
  args.mainloop.ptr_A = g.a;
  args.mainloop.dA = g.sa;
  args.mainloop.ptr_B = g.b;
  args.mainloop.dB = g.sb;
  extra(args);
  args.epilogue = epilogue;
  args.hw_info.device_id = ctx.device;
  args.hw_info.sm_count = ctx.sm_count > 0 ? ctx.sm_count : multiprocessor_count(ctx.device);  // its persistent grid
  Gemm gemm;
  check(gemm.can_implement(args), "can_implement");
  if (Gemm::get_workspace_size(args) > kCutlassReserve)
    fail_resource("cutlass grouped GEMM: workspace of " + std::to_string(Gemm::get_workspace_size(args)) +
                  " bytes, above the " + std::to_string(kCutlassReserve) + " reserved");
  check(gemm.initialize(args, cutlass_workspace, ctx.stream), "initialize");
  check(gemm.run(ctx.stream), "run");
}

// D = A·Bᵀ into each group's d (the plain epilogue: alpha 1, no source).
template <class Config>
typename Config::Kernel::EpilogueArguments plain_epilogue(const GroupArrays& g) {
  typename Config::Kernel::EpilogueArguments epilogue{};
  epilogue.thread.alpha = 1.0f;
  epilogue.thread.beta = 0.0f;
  epilogue.ptr_C = nullptr;
  epilogue.ptr_D = g.d;
  epilogue.dD = g.sd;
  return epilogue;
}
template <class Config>
void run_plain(const LaneContext& ctx, int experts, const GroupArrays& g, std::byte* cutlass_workspace) {
  run_group<Config>(ctx, experts, g, cutlass_workspace, plain_epilogue<Config>(g));
}

// The same with B read from packed tiles.
template <class Config>
void run_tiles(const LaneContext& ctx, int experts, const GroupArrays& g, std::byte* cutlass_workspace,
               const typename Config::Kernel::EpilogueArguments& epilogue, const WeightTiles& weights) {
  run_group<Config>(ctx, experts, g, cutlass_workspace, epilogue,
                    [&weights](typename Config::Gemm::Arguments& args) { args.mainloop.weights = weights; });
}

// act = SwiGLU(rows · packed w13ᵀ) into each group's d (SwigluEpilogueArray).
template <class Config>
void run_swiglu(const LaneContext& ctx, int experts, const GroupArrays& g, std::byte* cutlass_workspace,
                int intermediate) {
  run_group<Config>(ctx, experts, g, cutlass_workspace, {g.d, intermediate, intermediate});
}

}  // namespace

std::string cutlass_grouped_unbuildable(int hidden, int intermediate) { return alignment_problem(hidden, intermediate); }

std::string cutlass_grouped_unsupported(int hidden, int intermediate) {
  if (std::string why = alignment_problem(hidden, intermediate); !why.empty()) return why;
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    cudaGetLastError();
    return "no CUDA device";
  }
  if (major != 9 || minor != 0)
    return "built for sm_90a (Hopper); this device is sm_" + std::to_string(major) + std::to_string(minor);
  return "";
}

std::size_t cutlass_grouped_workspace_bytes(int experts) {
  Carver c{nullptr};
  c.group(experts);
  c.group(experts);
  return c.at + kCutlassReserve;
}

namespace {

// The configurations whose 256 columns hold the SwiGLU epilogue's gate and up halves in one thread.
bool has_256_columns(CutlassTiles t) {
  return t == CutlassTiles::narrow || t == CutlassTiles::wide_single || t == CutlassTiles::narrow_pair;
}

// Both GEMMs' group arrays and CUTLASS's own workspace, carved from the caller's.
struct Groups {
  GroupArrays g1, g2;
  std::byte* cutlass_workspace;
};

// What every entry point does first: check the sizes and the workspace (errors name `who`), carve the
// groups' arrays and fill them from the device offsets. GEMM 1 reads w13 as `w13_rows` rows per
// expert and writes d1 with row pitch `d1_pitch`; GEMM 2 reads act and w2 into out.
Groups prepare_groups(const char* who, const LaneContext& ctx, const uint16_t* rows, const int32_t* offsets,
                      int experts, int hidden, int intermediate, const uint16_t* w13, int64_t w13_rows,
                      const uint16_t* w2, uint16_t* d1, int64_t d1_pitch, const uint16_t* act, uint16_t* out,
                      void* workspace) {
  if (experts <= 0 || hidden <= 0 || intermediate <= 0)
    fail_input(std::string(who) + ": E = " + std::to_string(experts) + ", H = " + std::to_string(hidden) +
               ", I = " + std::to_string(intermediate));
  if (std::string why = alignment_problem(hidden, intermediate); !why.empty()) fail_input(std::string(who) + ": " + why);
  if (workspace == nullptr || reinterpret_cast<uintptr_t>(workspace) % kAlign != 0)
    fail_input(std::string(who) + ": the workspace must be non-null and 256-byte aligned");
  Carver c{static_cast<std::byte*>(workspace)};
  Groups g{c.group(experts), c.group(experts), nullptr};
  g.cutlass_workspace = static_cast<std::byte*>(workspace) + c.at;
  const int64_t H = hidden, I = intermediate;
  auto bf = [](const uint16_t* p) { return reinterpret_cast<const Element*>(p); };
  auto bf_out = [](uint16_t* p) { return reinterpret_cast<Element*>(p); };
  const int threads = 128;
  fill_groups<<<(experts + threads - 1) / threads, threads, 0, ctx.stream>>>(
      offsets, experts, hidden, intermediate, bf(rows), bf(w13), w13_rows, bf(w2), bf_out(d1), d1_pitch, bf(act),
      bf_out(out), g.g1, g.g2, pitch<StrideA>(H), pitch<StrideB>(H), pitch<StrideD>(d1_pitch), pitch<StrideA>(I),
      pitch<StrideB>(I), pitch<StrideD>(H));
  MOEFLOW_CUDA_LAUNCH_CHECK();
  return g;
}

}  // namespace

void experts_cutlass_grouped(const LaneContext& ctx, const uint16_t* rows, const int32_t* offsets, int experts,
                             int64_t total_rows, int hidden, int intermediate, const uint16_t* w13, const uint16_t* w2, uint16_t* h,
                             uint16_t* act, uint16_t* out, void* workspace, CutlassTiles tiles,
                             const uint16_t* w13_packed) {
  const bool fused = w13_packed != nullptr;
  if (fused && !has_256_columns(tiles))
    fail_input("experts_cutlass_grouped: the SwiGLU epilogue runs on the 256-column tiles (narrow, wide_single, "
               "narrow_pair) only");
  const int64_t I = intermediate;
  const Groups g = prepare_groups("experts_cutlass_grouped", ctx, rows, offsets, experts, hidden, intermediate,
                                  fused ? w13_packed : w13, fused ? 2 * packed_w13_features(intermediate) : 2 * I, w2,
                                  fused ? act : h, fused ? I : 2 * I, act, out, workspace);
  auto plain = [](CutlassTiles t) {
    return t == CutlassTiles::wide          ? run_plain<Wide>
           : t == CutlassTiles::narrow      ? run_plain<Narrow>
           : t == CutlassTiles::wide_single ? run_plain<WideSingle>
           : t == CutlassTiles::narrow_pair ? run_plain<NarrowPair>
                                            : run_plain<General>;
  };
  if (fused) {
    if (tiles == CutlassTiles::narrow) run_swiglu<NarrowSwiglu>(ctx, experts, g.g1, g.cutlass_workspace, intermediate);
    else if (tiles == CutlassTiles::narrow_pair)
      run_swiglu<NarrowPairSwiglu>(ctx, experts, g.g1, g.cutlass_workspace, intermediate);
    else run_swiglu<WideSingleSwiglu>(ctx, experts, g.g1, g.cutlass_workspace, intermediate);
  } else {
    plain(tiles)(ctx, experts, g.g1, g.cutlass_workspace);
    // Only the routed rows (offsets[E], on the device): with a live T the launch bound is the maximum.
    swiglu(h, total_rows, intermediate, act, ctx.stream, LiveRows{offsets + experts, 1});
  }
  plain(tiles)(ctx, experts, g.g2, g.cutlass_workspace);
}

void experts_cutlass_weight_tiles(const LaneContext& ctx, const uint16_t* rows, const int32_t* offsets, int experts,
                                  int hidden, int intermediate, const uint16_t* weight_tiles, const uint16_t* w2,
                                  uint16_t* act, uint16_t* out, void* workspace, CutlassTiles tiles) {
  if (!has_256_columns(tiles))
    fail_input("experts_cutlass_weight_tiles: packed weight tiles run on the 256-column tiles (narrow, narrow_pair, "
               "wide_single) only");
  if (weight_tiles == nullptr) fail_input("experts_cutlass_weight_tiles: the packed tiles must be given");
  const int64_t H = hidden, I = intermediate, w13_rows = 2 * packed_w13_features(intermediate);
  // The groups' B pointers point into the copy and at w2 as stored: CUTLASS keeps a tensor map per
  // group, which then loads nothing (B comes from the packed tiles).
  const Groups g = prepare_groups("experts_cutlass_weight_tiles", ctx, rows, offsets, experts, hidden, intermediate,
                                  weight_tiles, w13_rows, w2, act, I, act, out, workspace);
  const WeightTiles w13_tiles{weight_tiles, experts, static_cast<int>(tiles_n(w13_rows)), static_cast<int>(blocks_k(H))};
  const WeightTiles w2_tiles{weight_tiles + tiles_bytes(experts, w13_rows, H) / 2, experts, static_cast<int>(tiles_n(H)),
                             static_cast<int>(blocks_k(I))};
  const SwigluEpilogueArray::Arguments swiglu{g.g1.d, intermediate, intermediate};
  std::byte* ws = g.cutlass_workspace;
  if (tiles == CutlassTiles::narrow) {
    run_tiles<NarrowSwigluTiles>(ctx, experts, g.g1, ws, swiglu, w13_tiles);
    run_tiles<NarrowTiles>(ctx, experts, g.g2, ws, plain_epilogue<NarrowTiles>(g.g2), w2_tiles);
  } else if (tiles == CutlassTiles::narrow_pair) {
    run_tiles<NarrowPairSwigluTiles>(ctx, experts, g.g1, ws, swiglu, w13_tiles);
    run_tiles<NarrowPairTiles>(ctx, experts, g.g2, ws, plain_epilogue<NarrowPairTiles>(g.g2), w2_tiles);
  } else {
    run_tiles<WideSingleSwigluTiles>(ctx, experts, g.g1, ws, swiglu, w13_tiles);
    run_tiles<WideSingleTiles>(ctx, experts, g.g2, ws, plain_epilogue<WideSingleTiles>(g.g2), w2_tiles);
  }
}

void experts_cutlass_gathered(const LaneContext& ctx, const GatheredRows& rows, const int32_t* offsets, int experts,
                              int hidden, int intermediate, const uint16_t* w13_packed, bool weight_tiles,
                              const uint16_t* w2, uint16_t* act, uint16_t* out, void* workspace, CutlassTiles tiles) {
  if (rows.x == nullptr || rows.row_source == nullptr || rows.top_k <= 0 || w13_packed == nullptr)
    fail_input("experts_cutlass_gathered: x, row_source, top_k > 0 (got " + std::to_string(rows.top_k) +
               ") and the packed w13 must be given");
  if (tiles != CutlassTiles::narrow && (tiles != CutlassTiles::wide_single || weight_tiles))
    fail_input("experts_cutlass_gathered: the gather runs on the 64x256 tiles (w13 packed once or both weights packed "
               "tile by tile) and on the 128x256 tiles with w13 packed once");
  const int64_t H = hidden, I = intermediate, w13_rows = 2 * packed_w13_features(intermediate);
  // GEMM 1's A pointers (x + each group's first row · H) only feed CUTLASS's per-group tensor maps,
  // which then load nothing: A is gathered.
  const Groups g = prepare_groups("experts_cutlass_gathered", ctx, rows.x, offsets, experts, hidden, intermediate,
                                  w13_packed, w13_rows, w2, act, I, act, out, workspace);
  const cutlass_detail::RowGather gather{rows.x, hidden, rows.row_source, offsets, rows.top_k};
  const SwigluEpilogueArray::Arguments swiglu{g.g1.d, intermediate, intermediate};
  std::byte* ws = g.cutlass_workspace;
  if (tiles == CutlassTiles::wide_single) {
    run_group<WideSingleSwigluGather>(ctx, experts, g.g1, ws, swiglu,
                                      [&](typename WideSingleSwigluGather::Gemm::Arguments& args) {
                                        args.mainloop.gather = gather;
                                      });
    run_plain<WideSingle>(ctx, experts, g.g2, ws);
  } else if (weight_tiles) {
    const WeightTiles w13_tiles{w13_packed, experts, static_cast<int>(tiles_n(w13_rows)), static_cast<int>(blocks_k(H))};
    const WeightTiles w2_tiles{w13_packed + tiles_bytes(experts, w13_rows, H) / 2, experts,
                               static_cast<int>(tiles_n(H)), static_cast<int>(blocks_k(I))};
    run_group<NarrowSwigluTilesGather>(ctx, experts, g.g1, ws, swiglu,
                                       [&](typename NarrowSwigluTilesGather::Gemm::Arguments& args) {
                                         args.mainloop.weights = w13_tiles;
                                         args.mainloop.gather = gather;
                                       });
    run_tiles<NarrowTiles>(ctx, experts, g.g2, ws, plain_epilogue<NarrowTiles>(g.g2), w2_tiles);
  } else {
    run_group<NarrowSwigluGather>(ctx, experts, g.g1, ws, swiglu,
                                  [&](typename NarrowSwigluGather::Gemm::Arguments& args) { args.mainloop.gather = gather; });
    run_plain<Narrow>(ctx, experts, g.g2, ws);
  }
}

#else  // built without CUTLASS's headers

void experts_cutlass_gathered(const LaneContext&, const GatheredRows&, const int32_t*, int, int, int, const uint16_t*,
                              bool, const uint16_t*, uint16_t*, uint16_t*, void*, CutlassTiles) {
  fail_input("experts_cutlass_gathered: built without CUTLASS");
}
void experts_cutlass_weight_tiles(const LaneContext&, const uint16_t*, const int32_t*, int, int, int, const uint16_t*,
                                  const uint16_t*, uint16_t*, uint16_t*, void*, CutlassTiles) {
  fail_input("experts_cutlass_weight_tiles: built without CUTLASS");
}
std::string cutlass_grouped_unbuildable(int, int) {
  return "built without CUTLASS (its headers were not found: see CUTLASS_DIR in CMakeLists.txt)";
}
std::string cutlass_grouped_unsupported(int h, int i) { return cutlass_grouped_unbuildable(h, i); }
std::size_t cutlass_grouped_workspace_bytes(int) { return 0; }
void experts_cutlass_grouped(const LaneContext&, const uint16_t*, const int32_t*, int, int64_t, int, int, const uint16_t*,
                             const uint16_t*, uint16_t*, uint16_t*, uint16_t*, void*, CutlassTiles, const uint16_t*) {
  fail_input("experts_cutlass_grouped: " + cutlass_grouped_unbuildable(0, 0));
}

#endif

}  // namespace moeflow::cuda
