#pragma once
// A CUTLASS Hopper pointer-array mainloop that reads B (the experts' weights) from a copy packed once
// tile by tile: for group (expert) e, weight tile n and k-block k, the 256 rows × 64 columns the
// mainloop loads are one contiguous 32 KB at ((e · tiles_n + n) · blocks_k + k) · 256 rows of a
// [rows, 64] tensor. Stored [E, N, K], those 256 pieces of 128 bytes lie 2·K bytes apart. Plain loads
// in the GEMM's order read qwen3's w13 at 2.23 TB/s that way against 2.63 packed and 3.04 for a
// streaming read (bench/probes/tile_order_read.cu, H100); the TMA reads the stored layout better
// (80-90% of the DRAM's peak in Nsight Compute), and the experts path gains 2.5-4% below ~50 rows per
// expert (bench/NOTES.md, "Weights packed tile by tile", where it also loses at 128 rows on
// deepseek-v3's large K).
//
// The box is loaded by one 2-D TMA with the 128-byte swizzle of the stage's layout, on the stage's
// barrier, its bytes those CUTLASS expects for B (in a cluster along M each CTA loads its share of
// the rows and multicasts it, as CUTLASS does B); A is loaded exactly as CUTLASS does. Everything
// else is CUTLASS's: this class derives from the collective it replaces (with the group index carried
// to load, cutlass_group_index.cuh) and hides load and the arguments.
#include <cuda.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cute/arch/copy_sm90_tma.hpp"
#include "cute/tensor.hpp"
#include "cutlass/cuda_host_adapter.hpp"
#include "cutlass/cutlass.h"
#include "kernels/cuda/cutlass_group_index.cuh"
#include "kernels/cuda/cutlass_grouped.hpp"  // kWeightTileRows, kWeightTileCols

namespace moeflow::cuda::cutlass_detail {

// The packed weights of one GEMM (host arguments).
struct WeightTiles {
  const void* tiles = nullptr;  // bf16 [experts · tiles_n · blocks_k · 256, 64], 16-byte aligned
  int experts = 0, tiles_n = 0, blocks_k = 0;
};

template <class Base>
struct WeightTilesMainloop : WithGroupIndex<Base> {
  using typename Base::TileShape;
  using typename Base::DispatchPolicy;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::TensorStorage;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::GmemTiledCopyA;

  static_assert(cute::size<1>(TileShape{}) == kWeightTileRows && cute::size<2>(TileShape{}) == kWeightTileCols,
                "a packed weight tile is the mainloop's B box: 256 rows x 64 columns");
  // Clusters along M only: the CTAs of one share the weight tile, each loading 256 / cluster rows of
  // it and multicasting them to all (as CUTLASS multicasts B).
  static constexpr int kClusterM = cute::size<0>(typename DispatchPolicy::ClusterShape{});
  static constexpr int kBoxRows = kWeightTileRows / kClusterM;
  static_assert(cute::size<1>(typename DispatchPolicy::ClusterShape{}) == 1 &&
                    cute::size<2>(typename DispatchPolicy::ClusterShape{}) == 1 && kWeightTileRows % kClusterM == 0,
                "clusters along M only");
  static_assert(cute::cosize_v<SmemLayoutB> == kWeightTileRows * kWeightTileCols * DispatchPolicy::Stages,
                "B's stages one after another, row r of a stage at r * 64 elements (as the TMA box writes them)");

  struct Arguments : Base::Arguments {
    WeightTiles weights;
  };
  struct Params : Base::Params {
    cute::TmaDescriptor tiles_map;  // [rows, 64], box 64 x (256 / cluster), 128-byte swizzle
    int tiles_n = 0, blocks_k = 0;
  };

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape shapes, Arguments const& args, void* workspace) {
    Params p;
    static_cast<typename Base::Params&>(p) = Base::to_underlying_arguments(shapes, args, workspace);
    const WeightTiles& w = args.weights;
    const cuuint64_t rows = static_cast<cuuint64_t>(w.experts) * w.tiles_n * w.blocks_k * kWeightTileRows;
    const cuuint64_t dims[2] = {kWeightTileCols, rows};
    const cuuint64_t row_pitch[1] = {kWeightTileCols * 2};
    const cuuint32_t box[2] = {kWeightTileCols, kBoxRows};
    const cuuint32_t element_steps[2] = {1, 1};
    const CUresult r = CUTLASS_CUDA_DRIVER_WRAPPER_CALL(cuTensorMapEncodeTiled)(
        &p.tiles_map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, const_cast<void*>(w.tiles), dims, row_pitch, box,
        element_steps, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS)
      throw std::runtime_error("cuTensorMapEncodeTiled for the packed weight tiles (" + std::to_string(rows) +
                               " rows of 64) failed: CUresult " + std::to_string(static_cast<int>(r)));
    p.tiles_n = w.tiles_n;
    p.blocks_k = w.blocks_k;
    return p;
  }

  template <class ProblemShape>
  static bool can_implement(ProblemShape shapes, Arguments const& args) {
    const WeightTiles& w = args.weights;
    return Base::can_implement(shapes, args) && w.tiles != nullptr && reinterpret_cast<uintptr_t>(w.tiles) % 16 == 0 &&
           w.experts > 0 && w.tiles_n > 0 && w.blocks_k > 0 &&
           static_cast<int64_t>(w.experts) * w.tiles_n * w.blocks_k * kWeightTileRows <= INT32_MAX;
  }

  template <class TensorA, class TensorB, class TensorMapA, class TensorMapB, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                           cute::tuple<TensorA, TensorB, int32_t> const& load_inputs,
                           cute::tuple<TensorMapA, TensorMapB> const& input_tensormaps, BlockCoord const& blk_coord,
                           KTileIterator k_tile_iter, int k_tile_count, int, uint32_t block_rank_in_cluster,
                           TensorStorage& shared_tensors) {
    using namespace cute;
    if (!cute::elect_one_sync()) return;
    // A as CUTLASS's mainloop loads it (one CTA per cluster: no multicast).
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});
    Tensor gA = get<0>(load_inputs)(_, _, get<0>(blk_coord), _, get<3>(blk_coord));
    auto block_tma_a = params.tma_load_a.get_slice(0);
    Tensor tAgA = block_tma_a.partition_S(gA);
    Tensor tAsA = block_tma_a.partition_D(sA);
    const int32_t group = get<2>(load_inputs);
    const auto n_tile = static_cast<int32_t>(get<1>(blk_coord));
    CUTLASS_PRAGMA_NO_UNROLL
    for (; k_tile_count > 0; --k_tile_count) {
      pipeline.producer_acquire(smem_pipe_write);
      auto* barrier = pipeline.producer_get_barrier(smem_pipe_write);
      const int stage = smem_pipe_write.index();
      copy(params.tma_load_a.with(get<0>(input_tensormaps), *barrier, uint16_t{0}), tAgA(_, _, _, *k_tile_iter),
           tAsA(_, _, _, stage));
      load_weight_tile(params, barrier, group, n_tile, static_cast<int32_t>(*k_tile_iter), stage, block_rank_in_cluster,
                       shared_tensors);
      ++k_tile_iter;
      ++smem_pipe_write;
    }
  }

  // B's k-block k_tile of weight tile n_tile of `group` into `stage`, completing on `barrier` (one
  // lane issues it). The tile's packed rows follow one another k-block by k-block.
  CUTLASS_DEVICE void load_weight_tile(Params const& params, uint64_t* barrier, int32_t group, int32_t n_tile,
                                       int32_t k_tile, int stage, uint32_t block_rank_in_cluster,
                                       TensorStorage& shared_tensors) const {
    using namespace cute;
    const int32_t tile_first_row = (group * params.tiles_n + n_tile) * params.blocks_k * kWeightTileRows;
    const int box = static_cast<int>(block_rank_in_cluster % kClusterM);  // this CTA's share of the tile's rows
    const int32_t row = tile_first_row + k_tile * kWeightTileRows + box * kBoxRows;
    auto* destination =
        shared_tensors.smem_B.data() + box * (kBoxRows * kWeightTileCols) + stage * (kWeightTileRows * kWeightTileCols);
    constexpr auto hint = static_cast<uint64_t>(TMA::CacheHintSm90::EVICT_NORMAL);
    if constexpr (kClusterM == 1)
      SM90_TMA_LOAD_2D::copy(&params.tiles_map, barrier, hint, destination, 0, row);
    else  // to the same offset of every CTA of the cluster, completing on each one's barrier
      SM90_TMA_LOAD_MULTICAST_2D::copy(&params.tiles_map, barrier, uint16_t((1u << kClusterM) - 1), hint, destination,
                                       0, row);
  }
};

}  // namespace moeflow::cuda::cutlass_detail
