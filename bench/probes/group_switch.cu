// What does the grouping itself cost CUTLASS's Hopper pointer-array GEMM at large T? (issue 8's
// T=8192 points: the 128x256 cooperative GEMMs run at ~70% of cuBLAS's 8192³ rate on the rows that
// count; bench/NOTES.md "Where the time still goes".)
//
// One GEMM (D [rows, n] = A [rows, k] · Bᵀ, 128x256x64 cooperative tiles, no cluster) on the same
// rows, laid out and run six ways (each point twice, after a settle; bench/NOTES.md "What the
// grouping costs at T=8192" has the outcome):
//   grouped, routed:        the experts' row counts of uniform top-k routing, each its own weights;
//   grouped, equal:         every expert the same count (a multiple of 128: no padding rows);
//   grouped, equal, one B:  the same groups all pointing at one expert's weights (B stays in L2);
//   B per row tile, padded: a padded layout (each expert's rows from a multiple of 128) in CUTLASS's
//                           non-grouped kernel, B chosen per row tile from one tensor map over all
//                           experts (ExpertPerTile): no tensor map ever rewritten, no group walk;
//   plain, one B:           CUTLASS's non-grouped kernel on all rows;
//   cuBLAS, one B:          the same GEMM through cuBLAS;
// and the grouped kernel on the routed counts with D written three ways: CUTLASS's TMA store (a
// tensor map per group, rewritten by the consumer warp groups when their group changes), bf16 pairs
// from the registers (PairStoreEpilogueArray) and CUTLASS's no-shared-memory epilogue.
// routed → equal is the padding, equal → equal-one-B the weights' DRAM traffic, routed → padded
// what the pointer-array machinery costs, equal-one-B → plain and cuBLAS what is left.
//
// Build and run on the GPU machine (from the repository root, the CUTLASS headers in cutlass/include):
//   nvcc -O3 -DNDEBUG -std=c++20 -arch=sm_90a --expt-relaxed-constexpr -Icutlass/include -Ibench/probes \
//     bench/probes/group_switch.cu -lcuda -lcublas -o /tmp/group_switch && /tmp/group_switch
#include <cublas_v2.h>
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <random>
#include <thread>
#include <chrono>
#include <vector>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "probe_common.cuh"
#include "pair_store_epilogue.cuh"

namespace probe {

using namespace cute;
using Element = cutlass::bfloat16_t;
using LayoutA = cutlass::layout::RowMajor;
using LayoutB = cutlass::layout::ColumnMajor;
using LayoutD = cutlass::layout::RowMajor;
using TileShape = Shape<_128, _256, _64>;
using ClusterShape = Shape<_1, _1, _1>;
using GroupShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;
using Shape3 = typename GroupShape::UnderlyingProblemShape;


enum class Store { tma, no_smem, pairs };

// tma: CUTLASS's TMA-store epilogue (a tensor map per group, updated by the consumer warp groups
// whenever their group changes); no_smem: its no-shared-memory epilogue; pairs: PairStoreEpilogueArray.
template <Store kStore>
struct Grouped {
  using Built = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD*, 8, Element, LayoutD*, 8,
      std::conditional_t<kStore == Store::tma, cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
                         cutlass::epilogue::PtrArrayNoSmemWarpSpecialized>,
      cutlass::epilogue::fusion::LinearCombination<Element, float, void, float>>::CollectiveOp;
  using Epilogue = std::conditional_t<
      kStore == Store::pairs, cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<PairStoreEpilogueArray>,
      Built>;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, 8, Element, LayoutB*, 8, float, TileShape,
      ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<GroupShape, Mainloop, Epilogue>;
  using Adapter = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

struct Plain {
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD, 8, Element, LayoutD, 8,
      cutlass::epilogue::TmaWarpSpecializedCooperative,
      cutlass::epilogue::fusion::LinearCombination<Element, float, void, float>>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA, 8, Element, LayoutB, 8, float, TileShape,
      ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Adapter = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

// CUTLASS's non-grouped mainloop with B chosen per row tile: the rows of every expert start at a
// multiple of 128 (a padded layout), so each 128-row tile of A and D belongs to one expert, whose
// weights B [E, N, K] are addressed as the batch coordinate of one tensor map built over all of
// them. No tensor map ever changes; tile_expert[m] names the expert of row tile m.
template <class Base>
struct ExpertPerTile : Base {
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::TensorStorage;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::TileShape;

  struct Arguments : Base::Arguments {
    int experts = 0;
    const int32_t* tile_expert = nullptr;
  };
  struct Params : Base::Params {
    typename Base::Params::TMA_B tma_load_b_experts;
    int experts = 0;
    const int32_t* tile_expert = nullptr;
  };

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape const& shape, Arguments const& args, void* workspace) {
    Params p;
    static_cast<typename Base::Params&>(p) = Base::to_underlying_arguments(shape, args, workspace);
    auto [M, N, K, L] = append<4>(shape, 1);
    p.tma_load_b_experts = Base::to_underlying_arguments(make_shape(M, N, K, args.experts), args, workspace).tma_load_b;
    p.experts = args.experts;
    p.tile_expert = args.tile_expert;
    return p;
  }

  CUTLASS_DEVICE static void prefetch_tma_descriptors(Params const& params) {
    Base::prefetch_tma_descriptors(params);
    cute::prefetch_tma_descriptor(params.tma_load_b_experts.get_tma_descriptor());
  }

  template <class ProblemShape_MNKL>
  CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& shape, Params const& params) const {
    auto [M, N, K, L] = shape;
    Tensor mA = params.tma_load_a.get_tma_tensor(make_shape(M, K, L));
    Tensor mB = params.tma_load_b_experts.get_tma_tensor(make_shape(N, K, params.experts));
    Tensor gA = local_tile(mA, TileShape{}, make_coord(_, _, _), Step<_1, Underscore, _1>{});
    Tensor gB = local_tile(mB, TileShape{}, make_coord(_, _, _), Step<Underscore, _1, _1>{});
    return make_tuple(gA, gB);
  }

  template <class TensorA, class TensorB, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                           cute::tuple<TensorA, TensorB> const& load_inputs, BlockCoord const& blk_coord,
                           KTileIterator k_tile_iter, int k_tile_count, int, uint32_t, TensorStorage& shared_tensors) {
    if (!cute::elect_one_sync()) return;
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});
    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord;
    const int expert = params.tile_expert[m_coord];
    Tensor gA = get<0>(load_inputs)(_, _, m_coord, _, l_coord);
    Tensor gB = get<1>(load_inputs)(_, _, n_coord, _, expert);
    auto block_tma_a = params.tma_load_a.get_slice(0);
    auto block_tma_b = params.tma_load_b_experts.get_slice(0);
    Tensor tAgA = block_tma_a.partition_S(gA);
    Tensor tAsA = block_tma_a.partition_D(sA);
    Tensor tBgB = block_tma_b.partition_S(gB);
    Tensor tBsB = block_tma_b.partition_D(sB);
    CUTLASS_PRAGMA_NO_UNROLL
    for (; k_tile_count > 0; --k_tile_count) {
      pipeline.producer_acquire(smem_pipe_write);
      auto* barrier = pipeline.producer_get_barrier(smem_pipe_write);
      const int stage = smem_pipe_write.index();
      copy(params.tma_load_a.with(*barrier, uint16_t{0}), tAgA(_, _, _, *k_tile_iter), tAsA(_, _, _, stage));
      copy(params.tma_load_b_experts.with(*barrier, uint16_t{0}), tBgB(_, _, _, *k_tile_iter), tBsB(_, _, _, stage));
      ++k_tile_iter;
      ++smem_pipe_write;
    }
  }
};

template <template <class> class Wrap>
struct PlainWrapped {
  using Epilogue = typename Plain::Epilogue;
  using Mainloop = Wrap<typename Plain::Mainloop>;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Adapter = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

using StrideA = cute::remove_pointer_t<cutlass::detail::TagToStrideA_t<LayoutA*>>;
using StrideB = cute::remove_pointer_t<cutlass::detail::TagToStrideB_t<LayoutB*>>;
using StrideD = cute::remove_pointer_t<cutlass::detail::TagToStrideC_t<LayoutD*>>;

// Row-major operands (B stored [n, k]) and one batch: the row pitch is all a stride holds.
template <class Stride>
Stride pitch(int64_t elements) {
  Stride s{};
  get<0>(s) = elements;
  return s;
}



// CUTLASS's can_implement -> workspace -> initialize for `gemm`, stopping the probe on a refusal; the
// workspace (at least 256 bytes) is the caller's to free.
template <class Adapter>
void* initialized(Adapter& gemm, typename Adapter::Arguments& args, const char* what) {
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) {
    std::printf("%s: can_implement failed\n", what);
    std::exit(1);
  }
  void* workspace = nullptr;
  CK(cudaMalloc(&workspace, std::max<size_t>(Adapter::get_workspace_size(args), 256)));
  if (gemm.initialize(args, workspace) != cutlass::Status::kSuccess) {
    std::printf("%s: initialize failed\n", what);
    std::exit(1);
  }
  return workspace;
}

// One grouped GEMM over `counts` (rows per group, laid out one after another in a and d); group e
// multiplies by w + b_of(e) · n · k.
template <Store kStore = Store::tma>
float time_grouped(const std::vector<int>& counts, int n, int k, const uint16_t* a, const uint16_t* w, uint16_t* d,
                   bool one_b) {
  using Adapter = typename Grouped<kStore>::Adapter;
  const int groups = static_cast<int>(counts.size());
  std::vector<Shape3> shapes(groups);
  std::vector<const Element*> pa(groups), pb(groups);
  std::vector<Element*> pd(groups);
  std::vector<StrideA> sa(groups, pitch<StrideA>(k));
  std::vector<StrideB> sb(groups, pitch<StrideB>(k));
  std::vector<StrideD> sd(groups, pitch<StrideD>(n));
  int64_t first = 0;
  for (int e = 0; e < groups; ++e) {
    shapes[e] = Shape3{counts[e], n, k};
    pa[e] = reinterpret_cast<const Element*>(a) + first * k;
    pb[e] = reinterpret_cast<const Element*>(w) + (one_b ? 0 : int64_t(e) * n * k);
    pd[e] = reinterpret_cast<Element*>(d) + first * n;
    first += counts[e];
  }
  Adapter gemm;
  typename Adapter::Arguments args;
  args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
  args.problem_shape = {groups, upload(shapes), nullptr};
  args.mainloop.ptr_A = upload(pa);
  args.mainloop.dA = upload(sa);
  args.mainloop.ptr_B = upload(pb);
  args.mainloop.dB = upload(sb);
  if constexpr (kStore == Store::pairs) {
    args.epilogue = {upload(pd), n};
  } else {
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 0.0f;
    args.epilogue.ptr_C = nullptr;
    args.epilogue.ptr_D = upload(pd);
    args.epilogue.dD = upload(sd);
  }
  args.hw_info.device_id = 0;
  CK(cudaDeviceGetAttribute(&args.hw_info.sm_count, cudaDevAttrMultiProcessorCount, 0));
  void* workspace = initialized(gemm, args, "grouped");
  const float us = median_us([&] { gemm.run(); }, 30, 5);
  CK(cudaFree(workspace));
  return us;
}

float time_plain(int rows, int n, int k, const uint16_t* a, const uint16_t* w, uint16_t* d) {
  typename Plain::Adapter gemm;
  typename Plain::Adapter::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {rows, n, k, 1},
      {reinterpret_cast<const Element*>(a), pitch<typename Plain::Kernel::StrideA>(k),
       reinterpret_cast<const Element*>(w), pitch<typename Plain::Kernel::StrideB>(k)},
      {{1.0f, 0.0f},
       nullptr,
       pitch<typename Plain::Kernel::StrideC>(n),
       reinterpret_cast<Element*>(d),
       pitch<typename Plain::Kernel::StrideD>(n)}};
  void* workspace = initialized(gemm, args, "plain");
  const float us = median_us([&] { gemm.run(); }, 30, 5);
  CK(cudaFree(workspace));
  return us;
}

// The padded layout: expert e's rows start at a multiple of 128; one plain GEMM over them all, B
// chosen per row tile.
using RasterOrderOptions = cutlass::gemm::kernel::detail::PersistentTileSchedulerSm90::RasterOrderOptions;
float time_padded(const std::vector<int>& counts, int n, int k, const uint16_t* a, const uint16_t* w, uint16_t* d,
                  bool one_b, cublasHandle_t check = nullptr) {
  std::vector<int32_t> tile_expert;
  for (int e = 0; e < static_cast<int>(counts.size()); ++e)
    for (int t = 0; t < (counts[e] + 127) / 128; ++t) tile_expert.push_back(one_b ? 0 : e);
  const int rows = static_cast<int>(tile_expert.size()) * 128;  // a and d hold at least as many
  using Adapter = typename PlainWrapped<ExpertPerTile>::Adapter;
  using Kernel = typename PlainWrapped<ExpertPerTile>::Kernel;
  Adapter gemm;
  typename Adapter::Arguments args;
  args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
  args.problem_shape = {rows, n, k, 1};
  args.mainloop.ptr_A = reinterpret_cast<const Element*>(a);
  args.mainloop.dA = pitch<typename Kernel::StrideA>(k);
  args.mainloop.ptr_B = reinterpret_cast<const Element*>(w);
  args.mainloop.dB = pitch<typename Kernel::StrideB>(k);
  get<2>(args.mainloop.dB) = int64_t(n) * k;
  args.mainloop.experts = static_cast<int>(counts.size());
  args.mainloop.tile_expert = upload(tile_expert);
  args.epilogue.thread = {1.0f, 0.0f};
  args.epilogue.ptr_C = nullptr;
  args.epilogue.dC = pitch<typename Kernel::StrideC>(n);
  args.epilogue.ptr_D = reinterpret_cast<Element*>(d);
  args.epilogue.dD = pitch<typename Kernel::StrideD>(n);
  // Row tiles in order (expert-major), each swept across n: measured the best of both orders and
  // swizzles 1-8 on the qwen shapes (and no order makes deepseek-v3's or mixtral-8x7b's fast).
  args.scheduler.raster_order = RasterOrderOptions::AlongN;
  args.hw_info.device_id = 0;
  CK(cudaDeviceGetAttribute(&args.hw_info.sm_count, cudaDevAttrMultiProcessorCount, 0));
  void* workspace = initialized(gemm, args, "padded");
  const float us = median_us([&] { gemm.run(); }, 30, 5);
  if (check != nullptr) {  // three experts' rows against cuBLAS on the same operands
    uint16_t* ref;
    CK(cudaMalloc(&ref, size_t(rows) * n * 2));
    double worst = 0;
    int64_t first = 0;
    for (int e = 0; e < static_cast<int>(counts.size()); ++e) {
      const int m = counts[e];
      if (e == 0 || e == static_cast<int>(counts.size()) / 2 || e + 1 == static_cast<int>(counts.size())) {
        const float one = 1.0f, zero = 0.0f;
        CB(cublasGemmEx(check, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &one, w + (one_b ? 0 : int64_t(e) * n * k), CUDA_R_16BF, k,
                        a + first * k, CUDA_R_16BF, k, &zero, ref, CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        std::vector<uint16_t> got(size_t(m) * n), want(size_t(m) * n);
        CK(cudaMemcpy(got.data(), d + first * n, got.size() * 2, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(want.data(), ref, want.size() * 2, cudaMemcpyDeviceToHost));
        double num = 0, den = 0;
        auto f = [](uint16_t v) { return __bfloat162float(__ushort_as_bfloat16(v)); };
        for (size_t i = 0; i < got.size(); ++i) {
          const double g = f(got[i]), r = f(want[i]);
          num += (g - r) * (g - r);
          den += r * r;
        }
        worst = std::max(worst, std::sqrt(num / std::max(den, 1e-30)));
      }
      first += (m + 127) / 128 * 128;
    }
    std::printf("  padded layout against cuBLAS per expert (3 experts): relative norm error %.2e\n", worst);
    cudaFree(ref);
  }
  cudaFree(workspace);
  return us;
}

float time_cublas(cublasHandle_t handle, int rows, int n, int k, const uint16_t* a, const uint16_t* w, uint16_t* d) {
  const float one = 1.0f, zero = 0.0f;
  // Column-major view: Dᵀ [n, rows] = W [n, k] (stored [n, k] row-major = [k, n] column-major, so
  // transposed) · Aᵀ [k, rows].
  return median_us(
      [&] {
        CB(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, n, rows, k, &one, w, CUDA_R_16BF, k, a, CUDA_R_16BF, k, &zero,
                        d, CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      },
      30, 5);
}

void run_point(cublasHandle_t handle, const char* name, int tokens, int experts, int top_k, int n, int k) {
  std::mt19937 rng(1234);
  std::vector<int> routed(experts, 0);
  std::vector<int> pick(experts);
  std::iota(pick.begin(), pick.end(), 0);
  for (int t = 0; t < tokens; ++t)
    for (int j = 0; j < top_k; ++j) {
      std::swap(pick[j], pick[j + rng() % (experts - j)]);
      ++routed[pick[j]];
    }
  const int rows = tokens * top_k;
  const int per = rows / experts / 128 * 128;  // equal counts: a multiple of 128 ...
  const int equal_rows = per * experts;        // ... at most the routed rows
  const int padded_rows = rows + experts * 127;
  std::vector<int> equal(experts, per);
  uint16_t *a, *w, *d;
  const size_t a_elems = size_t(padded_rows) * k, w_elems = size_t(experts) * n * k;
  CK(cudaMalloc(&a, a_elems * 2));
  CK(cudaMalloc(&w, w_elems * 2));
  CK(cudaMalloc(&d, size_t(padded_rows) * n * 2));
  fill_random<<<1024, 256>>>(a, a_elems, 17u);
  fill_random<<<1024, 256>>>(w, w_elems, 91u);
  CK(cudaDeviceSynchronize());
  // After large allocations the device reads slower for a few seconds (bench/probes/alloc_history.cu):
  // let it settle before the first timing.
  std::this_thread::sleep_for(std::chrono::seconds(4));
  auto tflops = [&](int r, float us) { return 2.0 * r * double(n) * k / (us * 1e6); };
  for (int round = 0; round < 2; ++round) {
    const float t_routed = time_grouped(routed, n, k, a, w, d, false);
    const float t_equal = time_grouped(equal, n, k, a, w, d, false);
    const float t_one_b = time_grouped(equal, n, k, a, w, d, true);
    const float t_padded = time_padded(routed, n, k, a, w, d, false, round == 0 ? handle : nullptr);
    const float t_padded_equal = time_padded(equal, n, k, a, w, d, false);
    const float t_plain = time_plain(equal_rows, n, k, a, w, d);
    const float t_cublas = time_cublas(handle, equal_rows, n, k, a, w, d);
    std::printf("%-18s T=%-5d n=%-5d k=%-5d round %d | grouped: routed (%d rows) %7.1f us %4.0f TFLOP/s, equal (%d x %d) "
                "%7.1f us %4.0f, equal one B %7.1f us %4.0f | B per row tile, padded layout: routed %7.1f us %4.0f, equal "
                "%7.1f us %4.0f | plain one B %7.1f us %4.0f | cuBLAS one B %7.1f us %4.0f\n",
                name, tokens, n, k, round, rows, t_routed, tflops(rows, t_routed), experts, per, t_equal,
                tflops(equal_rows, t_equal), t_one_b, tflops(equal_rows, t_one_b), t_padded, tflops(rows, t_padded),
                t_padded_equal, tflops(equal_rows, t_padded_equal), t_plain, tflops(equal_rows, t_plain), t_cublas,
                tflops(equal_rows, t_cublas));
    std::fflush(stdout);
  }
  // The grouped kernel's D from the registers instead of by TMA (no tensor map to update per group).
  const float t_tma = time_grouped(routed, n, k, a, w, d, false);
  std::vector<uint16_t> d_tma(size_t(rows) * n), d_pairs(size_t(rows) * n);
  CK(cudaMemcpy(d_tma.data(), d, d_tma.size() * 2, cudaMemcpyDeviceToHost));
  const float t_pairs = time_grouped<Store::pairs>(routed, n, k, a, w, d, false);
  CK(cudaMemcpy(d_pairs.data(), d, d_pairs.size() * 2, cudaMemcpyDeviceToHost));
  const float t_no_smem = time_grouped<Store::no_smem>(routed, n, k, a, w, d, false);
  std::printf("%-18s T=%-5d grouped, routed, D by: TMA store %7.1f us | pair stores %7.1f us (%s) | CUTLASS's no-smem "
              "epilogue %7.1f us\n",
              name, tokens, t_tma, t_pairs, d_pairs == d_tma ? "bits equal" : "DIFFERENT", t_no_smem);
  std::fflush(stdout);
  cudaFree(a);
  cudaFree(w);
  cudaFree(d);
}

}  // namespace probe

int main() {
  using namespace probe;
  cublasHandle_t handle;
  CB(cublasCreate(&handle));
  {  // the 8192³ reference rate
    uint16_t *a, *w, *d;
    const size_t s = size_t(8192) * 8192;
    CK(cudaMalloc(&a, s * 2));
    CK(cudaMalloc(&w, s * 2));
    CK(cudaMalloc(&d, s * 2));
    fill_random<<<1024, 256>>>(a, s, 3u);
    fill_random<<<1024, 256>>>(w, s, 5u);
    const float us = time_cublas(handle, 8192, 8192, 8192, a, w, d);
    const float us_plain = time_plain(8192, 8192, 8192, a, w, d);
    std::printf("8192^3: cuBLAS %.1f us %.0f TFLOP/s | CUTLASS 128x256 coop %.1f us %.0f TFLOP/s\n", us,
                2.0 * 8192.0 * 8192.0 * 8192.0 / (us * 1e6), us_plain, 2.0 * 8192.0 * 8192.0 * 8192.0 / (us_plain * 1e6));
    cudaFree(a);
    cudaFree(w);
    cudaFree(d);
  }
  // GEMM 1 (n = 2I, k = H) and GEMM 2 (n = H, k = I) of each preset at T = 8192.
  run_point(handle, "qwen3-30b-a3b g1", 8192, 128, 8, 1536, 2048);
  run_point(handle, "qwen3-30b-a3b g2", 8192, 128, 8, 2048, 768);
  run_point(handle, "qwen1.5 g1", 8192, 60, 4, 2816, 2048);
  run_point(handle, "qwen1.5 g2", 8192, 60, 4, 2048, 1408);
  run_point(handle, "deepseek-v3 g1", 8192, 256, 8, 4096, 7168);
  run_point(handle, "deepseek-v3 g2", 8192, 256, 8, 7168, 2048);
  run_point(handle, "mixtral-8x7b g1", 8192, 8, 2, 28672, 4096);
  run_point(handle, "qwen3-30b-a3b g1", 2048, 128, 8, 1536, 2048);
  return 0;
}
