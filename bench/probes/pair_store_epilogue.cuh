#pragma once
// For the probes that run CUTLASS's Hopper pointer-array GEMMs (gather_rows.cu, group_switch.cu):
// PairStoreEpilogueArray, an epilogue that writes D from the registers in bf16 pairs, as the library's
// SwiGLU epilogue (kernels/cuda/cutlass_grouped.cu) writes act. Include after CUTLASS's headers.
#include <cuda_bf16.h>

#include <cstdint>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/detail.hpp"
#include "cutlass/epilogue/thread/linear_combination.h"

namespace probe {

using namespace cute;

using StrideRowMajor = cutlass::detail::TagToStrideC_t<cutlass::layout::RowMajor*>;

// D = the accumulators rounded to bf16, stored from the registers two columns at a time (4 bytes),
// rows past the group's count and columns past n dropped: no shared memory and no tensor map for D,
// so nothing to update when a consumer warp group's group changes. (The shape of the library's
// SwiGLU epilogue, kernels/cuda/cutlass_grouped.cu, without the SwiGLU.)
class PairStoreEpilogueArray {
 public:
  using EpilogueSchedule = cutlass::epilogue::PtrArrayNoSmemWarpSpecialized;
  using DispatchPolicy = EpilogueSchedule;
  using Element = cutlass::bfloat16_t;
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
  using ThreadEpilogueOp = cutlass::epilogue::thread::LinearCombination<Element, 1, float, float>;
  struct SharedStorage {};
  using TensorMapStorage = SharedStorage;
  struct Arguments {
    Element** ptr_D = nullptr;
    int64_t pitch = 0;
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
    return args.ptr_D != nullptr && args.pitch % 2 == 0;
  }
  CUTLASS_HOST_DEVICE explicit PairStoreEpilogueArray(Params const& p) : params(p) {}
  CUTLASS_DEVICE bool is_source_needed() { return false; }

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine, class FrgLayout,
            class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_MNK,
                                 BlockCoordMNKL blk_coord_mnkl, cute::Tensor<FrgEngine, FrgLayout> const& acc,
                                 TiledMma tiled_mma, ResidueMNK, int thread_idx, char*) {
    const int M = get<0>(problem_shape_mnkl), N = get<1>(problem_shape_mnkl);
    const auto [m_coord, n_coord, k_coord, l_coord] = blk_coord_mnkl;
    Tensor coords = local_tile(make_identity_tensor(make_shape(M, N)), take<0, 2>(blk_shape_MNK),
                               make_coord(m_coord, n_coord));
    Tensor tCcD = tiled_mma.get_thread_slice(thread_idx).partition_C(coords);
    Element* out = params.ptr_D[l_coord];
    constexpr int kGroups = size<0, 2>(FrgLayout{});
    CUTLASS_PRAGMA_UNROLL
    for (int mi = 0; mi < size<1>(acc); ++mi) {
      CUTLASS_PRAGMA_UNROLL
      for (int ni = 0; ni < size<2>(acc); ++ni) {
        CUTLASS_PRAGMA_UNROLL
        for (int g = 0; g < kGroups; ++g) {
          CUTLASS_PRAGMA_UNROLL
          for (int half = 0; half < 2; ++half) {
            const auto crd = tCcD(make_coord(0, half, g), mi, ni);
            const int m = get<0>(crd), n = get<1>(crd);
            if (m >= M || n >= N) continue;
            __nv_bfloat162 pair;
            pair.x = __float2bfloat16(acc(make_coord(0, half, g), mi, ni));
            pair.y = __float2bfloat16(acc(make_coord(1, half, g), mi, ni));
            *reinterpret_cast<__nv_bfloat162*>(out + static_cast<int64_t>(m) * params.pitch + n) = pair;
          }
        }
      }
    }
  }

 private:
  Params params;
};

}  // namespace probe
