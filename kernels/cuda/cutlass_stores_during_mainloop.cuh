#pragma once
// A CUTLASS Hopper pointer-array mainloop whose consumers, once a tile's first k-blocks are on the
// tensor cores, call back to the kernel: the kernel writes the previous tile's epilogue output then
// (EpilogueWarpLoadsCooperative with kStoresDuringMainloop, SwigluEpilogueArray's pending pairs).
//
// Why: in the cooperative schedule both consumer warp groups run a tile's epilogue between two
// mainloops, with the tensor cores idle. GEMM 1's SwiGLU epilogue writes act from the registers, and
// issuing those stores was most of its cost (bench/NOTES.md, "SwiGLU in GEMM 1's epilogue": with
// 4-byte stores, 71-84 µs over a TMA store of twice the bytes at qwen T=8192; write_slice now trades
// pairs within each quad so that each lane writes 16 bytes). An
// asynchronous wgmma batch leaves the warps free to issue other instructions, so stores issued right
// after a commit overlap the next tile's tensor work instead of delaying it.
//
// Everything but the callback is CUTLASS's collective (sm90_mma_array_tma_gmma_ss_warpspecialized):
// `mma` below is its mma with `after_commit(k_tile)` after the commits of k-tiles 0 .. callbacks - 1,
// so a kernel can spread the stores over the first k-tiles (each slice a fixed part of the registers:
// no dynamic indexing, so nothing goes to local memory). Keep the wgmma code free of branches: a
// condition around it, or a second path beside it that joins with a batch in flight, makes ptxas wait
// for every batch (C7515, C7519; bench/NOTES.md, twenty-third session).
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"

namespace moeflow::cuda::cutlass_detail {

template <class Base>
struct StoresDuringMainloop : Base {
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::TensorStorage;
  using typename Base::Params;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::TiledMma;
  using Base::Base;
  using Base::mma;

  template <class FrgTensorC, class AfterCommit>
  CUTLASS_DEVICE void mma(MainloopPipeline pipeline, PipelineState smem_pipe_read, FrgTensorC& accum, int k_tile_count,
                          int thread_idx, TensorStorage& shared_tensors, Params const&, int callbacks,
                          AfterCommit&& after_commit) {
    using namespace cute;
    static_assert(Base::K_PIPE_MMAS == 1, "written for CUTLASS's one k-tile of MMAs in flight");
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});  // (BLK_M,BLK_K,PIPE)
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});  // (BLK_N,BLK_K,PIPE)
    constexpr int kMmaWarpGroups = size(TiledMma{}) / cutlass::NumThreadsPerWarpGroup;
    Layout warp_group_thread_layout = make_layout(Int<kMmaWarpGroups>{}, Int<cutlass::NumThreadsPerWarpGroup>{});
    const int warp_group_idx = __shfl_sync(0xFFFFFFFF, thread_idx / cutlass::NumThreadsPerWarpGroup, 0);
    TiledMma tiled_mma;
    auto thread_mma = tiled_mma.get_slice(warp_group_thread_layout(warp_group_idx));
    Tensor tCrA = thread_mma.make_fragment_A(thread_mma.partition_A(sA));  // (MMA,MMA_M,MMA_K,PIPE)
    Tensor tCrB = thread_mma.make_fragment_B(thread_mma.partition_B(sB));  // (MMA,MMA_N,MMA_K,PIPE)

    PipelineState smem_pipe_release = smem_pipe_read;
    tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
    warpgroup_fence_operand(accum);
    if (k_tile_count > 0) {  // k-tile 0: scale D by 0 on its first k-block
      pipeline.consumer_wait(smem_pipe_read, pipeline.consumer_try_wait(smem_pipe_read));
      const int read_stage = smem_pipe_read.index();
      warpgroup_arrive();
      CUTLASS_PRAGMA_UNROLL
      for (int k_block = 0; k_block < size<2>(tCrA); ++k_block) {
        cute::gemm(tiled_mma, tCrA(_, _, k_block, read_stage), tCrB(_, _, k_block, read_stage), accum);
        tiled_mma.accumulate_ = GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();
      if (callbacks > 0) after_commit(0);
      ++smem_pipe_read;
    }
    warpgroup_fence_operand(accum);
    int k_tile = 1;
    CUTLASS_PRAGMA_NO_UNROLL
    for (; k_tile < k_tile_count; ++k_tile) {
      pipeline.consumer_wait(smem_pipe_read, pipeline.consumer_try_wait(smem_pipe_read));
      const int read_stage = smem_pipe_read.index();
      warpgroup_fence_operand(accum);
      warpgroup_arrive();
      cute::gemm(tiled_mma, tCrA(_, _, _, read_stage), tCrB(_, _, _, read_stage), accum);
      warpgroup_commit_batch();
      if (k_tile < callbacks) after_commit(k_tile);  // two k-tiles on the tensor cores now
      warpgroup_wait<Base::K_PIPE_MMAS>();
      warpgroup_fence_operand(accum);
      pipeline.consumer_release(smem_pipe_release);
      ++smem_pipe_read;
      ++smem_pipe_release;
    }
    warpgroup_fence_operand(accum);
  }
};

}  // namespace moeflow::cuda::cutlass_detail
