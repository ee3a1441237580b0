#pragma once
// A CUTLASS Hopper pointer-array mainloop whose A operand (GEMM 1's rows) is gathered from the tokens:
// row r of group g's tile is x[row_source[offsets[g] + r] / top_k], copied straight into the stage,
// so the dispatch writes no permuted copy of x and GEMM 1 reads none back (issue 8's "gather token
// rows by the permutation in GEMM 1's loads").
//
// How: two or three producer warps copy A with 16-byte cp.async into the stage's swizzled layout
// (CuTe's, the one wgmma reads), a warp instruction covering four whole 128-byte rows of a k-block
// (64 bf16): the mainloop warp the tile's first run of rows, the kernel's auxiliary producer warp
// (CUTLASS's MainloopAux role, which its blockwise-scaling mainloops use for their scales) the next,
// and with three, the epilogue's producer warp the last (EpilogueWarpLoadsCooperative,
// cutlass_epilogue_warp_loads.hpp: CUTLASS's own kernels leave that warp to the epilogue). Each
// warp's run of rows is fixed at compile time (a split computed at run time spilled under the
// producer warps' 40 registers and ran 1.5x slower). Each copying lane arrives on the stage's full
// barrier when its copies have landed (cp.async.mbarrier.arrive.noinc), and the barrier expects those
// arrivals besides the leader's (NumProducerThreadEvents = 1 + 32 per copying warp), so no warp waits
// for another. B comes by TMA as before: CUTLASS's (w13 as pack_w13_interleaved wrote it) or the
// packed weight tiles' (cutlass_weight_tiles.cuh), issued by the mainloop warp's elected lane. Rows
// past the group's count and columns past H are zero-filled. The result is bit for bit that of the
// same tiles on the dispatch's permuted rows: the same operands in the same stages, the same MMAs.
//
// Measured on the H100 (bench/probes/gather_rows.cu, GEMM 1 alone; bench/NOTES.md "Gathering x in
// GEMM 1's loads"): with one copying warp the gather lost to the dispatch's scatter + TMA everywhere
// but the weight-bound points; with two it is ahead on the 64x256 tiles up to ~128 rows per expert
// (qwen3-30b-a3b T = 512 / 1024 / 2048: 312 / 321 / 348-356 µs against 326 / 346 / 372-374 scatter +
// TMA) and behind where the tensor cores bound the GEMM (128x256 tiles at T=8192: qwen3 879-912
// against 785-805); with three on the 128x256 tiles ahead again where H = 2048 (qwen3 T = 8192 / 4096
// 816-851 / 535-536 against 880-891 / 610-621, qwen1.5-moe-a2.7b T=8192 755-771 against 811-846) and
// behind on deepseek-v3's H = 7168 and mixtral-8x7b's huge experts.
#include <cstdint>
#include <type_traits>

#include "cute/tensor.hpp"
#include "cutlass/arch/barrier.h"
#include "cutlass/cutlass.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "kernels/cuda/cutlass_group_index.cuh"

namespace moeflow::cuda::cutlass_detail {

// Where GEMM 1's rows come from (host arguments).
struct RowGather {
  const void* x = nullptr;              // bf16 [tokens, hidden], 16-byte aligned
  int hidden = 0;                       // a multiple of 8 (whole 16-byte chunks)
  const int32_t* row_source = nullptr;  // [rows]: the flat index t·k + j each permuted row holds
  const int32_t* offsets = nullptr;     // [groups + 1]: each group's first permuted row
  int top_k = 1;
};

// The dispatch policy of a mainloop with an auxiliary producer warp: CUTLASS's kernels run
// load_auxiliary on warp 1 of the producer warp group where HasAuxiliaryLoad says so (below).
template <class Policy>
struct WithAuxiliaryLoad : Policy {};

}  // namespace moeflow::cuda::cutlass_detail

namespace cutlass::gemm::kernel::detail {
template <class Policy>
struct HasAuxiliaryLoad<moeflow::cuda::cutlass_detail::WithAuxiliaryLoad<Policy>> : cute::true_type {};
}  // namespace cutlass::gemm::kernel::detail

namespace moeflow::cuda::cutlass_detail {

// `Base`: CUTLASS's pointer-array collective, or (kPackedB) WeightTilesMainloop over one, whose
// load_weight_tile then loads B and which carries the group index to load already.
template <class Base, bool kPackedB, int kCopyingWarps = 2>
struct GatherRowsMainloop : std::conditional_t<kPackedB, Base, WithGroupIndex<Base>> {
  using typename Base::TileShape;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::TensorStorage;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using DispatchPolicy = WithAuxiliaryLoad<typename Base::DispatchPolicy>;

  static_assert(kCopyingWarps == 2 || kCopyingWarps == 3,
                "the mainloop warp, the auxiliary warp and (in EpilogueWarpLoadsCooperative) the epilogue's");
  // Arrivals a stage's full barrier waits for: the leader's (expecting B's bytes), one per copying lane.
  static constexpr int NumProducerThreadEvents = 1 + 32 * kCopyingWarps;
  static constexpr int kTileRows = cute::size<0>(TileShape{});
  static constexpr int kTileK = cute::size<2>(TileShape{});
  // Each warp a run of whole groups of four rows; the last warp's may be shorter (44 / 44 / 40).
  static constexpr int kWarpRows = ((kTileRows + kCopyingWarps - 1) / kCopyingWarps + 3) / 4 * 4;
  static constexpr int kRowsPerLane = (kWarpRows + 31) / 32;
  static_assert(kWarpRows <= 64, "a lane resolves at most two rows of its warp's run");
  static_assert(kTileK * 2 == 128, "a row of a k-block is 8 chunks of 16 bytes (64 bf16)");
  static_assert(cute::size(typename Base::DispatchPolicy::ClusterShape{}) == 1, "one CTA per cluster");
  // A arrives by cp.async, counted by arrivals: the stage's transaction bytes are B's alone.
  static constexpr uint32_t kTmaBytesB = cute::size<1>(TileShape{}) * kTileK * 2;

  struct Arguments : Base::Arguments {
    RowGather gather;
  };
  struct Params : Base::Params {
    RowGather gather;
  };

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape shapes, Arguments const& args, void* workspace) {
    Params p;
    static_cast<typename Base::Params&>(p) = Base::to_underlying_arguments(shapes, args, workspace);
    p.tma_transaction_bytes = kTmaBytesB;
    p.gather = args.gather;
    return p;
  }

  template <class ProblemShape>
  static bool can_implement(ProblemShape shapes, Arguments const& args) {
    const RowGather& g = args.gather;
    return Base::can_implement(shapes, args) && g.x != nullptr && reinterpret_cast<uintptr_t>(g.x) % 16 == 0 &&
           g.hidden > 0 && g.hidden % 8 == 0 && g.row_source != nullptr && g.offsets != nullptr && g.top_k > 0;
  }

  // The mainloop warp: the tile's first run of rows, and B.
  template <class TensorA, class TensorB, class TensorMapA, class TensorMapB, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                           cute::tuple<TensorA, TensorB, int32_t> const& load_inputs,
                           cute::tuple<TensorMapA, TensorMapB> const& input_tensormaps, BlockCoord const& blk_coord,
                           KTileIterator k_tile_iter, int k_tile_count, int lane, uint32_t block_rank_in_cluster,
                           TensorStorage& shared_tensors) {
    using namespace cute;
    const bool leader = elect_one_sync();
    const int32_t group = get<2>(load_inputs);
    if constexpr (kPackedB) {
      const auto n_tile = static_cast<int32_t>(get<1>(blk_coord));
      copy_rows<0>(params, pipeline, smem_pipe_write, group, blk_coord, k_tile_iter, k_tile_count, lane, shared_tensors,
                   [&](uint64_t* barrier, int32_t k_tile, int stage) {
                     if (leader)
                       this->load_weight_tile(params, barrier, group, n_tile, k_tile, stage, block_rank_in_cluster,
                                              shared_tensors);
                   });
    } else {
      Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});
      Tensor gB = get<1>(load_inputs)(_, _, get<1>(blk_coord), _, get<3>(blk_coord));
      auto block_tma_b = params.tma_load_b.get_slice(0);
      Tensor tBgB = block_tma_b.partition_S(gB);
      Tensor tBsB = block_tma_b.partition_D(sB);
      copy_rows<0>(params, pipeline, smem_pipe_write, group, blk_coord, k_tile_iter, k_tile_count, lane, shared_tensors,
                   [&](uint64_t* barrier, int32_t k_tile, int stage) {
                     if (leader)
                       copy(params.tma_load_b.with(get<1>(input_tensormaps), *barrier, uint16_t{0}),
                            tBgB(_, _, _, k_tile), tBsB(_, _, _, stage));
                   });
    }
    // Every lane read the group's tensor maps in shared memory (CUTLASS's copy of them to the
    // workspace); lane 0 rewrites them for the next group once this returns: order those reads first.
    __syncwarp();
  }

  // The other copying warps (warp 1 of the producer warp group, and warp 2 with three): the
  // following runs of rows.
  template <class TensorA, class TensorB, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load_auxiliary(Params const& params, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                                     cute::tuple<TensorA, TensorB, int32_t> const& load_inputs,
                                     BlockCoord const& blk_coord, KTileIterator k_tile_iter, int k_tile_count, int lane,
                                     uint32_t, TensorStorage& shared_tensors) {
    auto no_b = [](uint64_t*, int32_t, int) {};
    const int warp = cutlass::canonical_warp_idx_sync() % 4;
    if (warp == 1)
      copy_rows<1>(params, pipeline, smem_pipe_write, cute::get<2>(load_inputs), blk_coord, k_tile_iter, k_tile_count,
                   lane, shared_tensors, no_b);
    if constexpr (kCopyingWarps == 3)
      if (warp == 2)
        copy_rows<2>(params, pipeline, smem_pipe_write, cute::get<2>(load_inputs), blk_coord, k_tile_iter,
                     k_tile_count, lane, shared_tensors, no_b);
  }

 private:
  // Copying warp kWarp's run of rows of the tile, every k-block: lane l resolves the tokens of rows
  // l, l + 32 of the run once; each copy instruction then covers four whole rows (lane l chunk l % 8
  // of the four's row l / 8), each row's token shuffled from its owner lane. (Each lane computing its
  // copies' offsets once per tile instead was no faster: the probe above.)
  template <int kWarp, class BlockCoord, class KTileIterator, class IssueB>
  CUTLASS_DEVICE void copy_rows(Params const& params, MainloopPipeline& pipeline, PipelineState smem_pipe_write,
                                int32_t group, BlockCoord const& blk_coord, KTileIterator k_tile_iter, int k_tile_count,
                                int lane, TensorStorage& shared_tensors, IssueB&& issue_b) {
    using namespace cute;
    constexpr int first_row = kWarp * kWarpRows;
    constexpr int run_rows = kTileRows - first_row < kWarpRows ? kTileRows - first_row : kWarpRows;
    constexpr int kCopies = run_rows / 4;
    const RowGather& g = params.gather;
    const auto* x = static_cast<const uint16_t*>(g.x);
    const int32_t start = g.offsets[group];
    const int32_t rows = g.offsets[group + 1] - start;
    const int32_t tile_first = static_cast<int32_t>(get<0>(blk_coord)) * kTileRows + first_row;
    int32_t token[kRowsPerLane];
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < kRowsPerLane; ++j) {
      const int32_t r = tile_first + lane + 32 * j;
      token[j] = lane + 32 * j < run_rows && r < rows ? g.row_source[start + r] / g.top_k : -1;
    }
    const int chunk = lane % 8, row_in_four = lane / 8;
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});  // (BLK_M, BLK_K, PIPE)
    CUTLASS_PRAGMA_NO_UNROLL
    for (; k_tile_count > 0; --k_tile_count) {
      pipeline.producer_acquire(smem_pipe_write);
      uint64_t* barrier = pipeline.producer_get_barrier(smem_pipe_write);
      const int stage = smem_pipe_write.index();
      const auto k_tile = static_cast<int32_t>(*k_tile_iter);
      const int32_t column = k_tile * kTileK + chunk * 8;
      const uint32_t bytes = column < g.hidden ? 16u : 0u;  // H is a multiple of 8: whole chunks
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kCopies; ++i) {
        const int row = 4 * i + row_in_four;
        const int32_t t = __shfl_sync(0xffffffffu, token[i / 8], 4 * (i % 8) + row_in_four);
        const uint16_t* src = x + (t < 0 ? 0 : static_cast<int64_t>(t) * g.hidden + (bytes ? column : 0));
        const uint32_t dst = cast_smem_ptr_to_uint(&sA(first_row + row, chunk * 8, stage));
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(t < 0 ? 0u : bytes)
                     : "memory");
      }
      cutlass::arch::cpasync_barrier_arrive_noinc(barrier);  // the phase now also waits for these copies
      issue_b(barrier, k_tile, stage);
      ++k_tile_iter;
      ++smem_pipe_write;
    }
  }
};

}  // namespace moeflow::cuda::cutlass_detail
