// Can a CUTLASS Hopper grouped GEMM gather its A rows (the tokens routed to each expert) at the
// tensor cores' pace if several producer warps copy them? (issue 8's "gather token rows by the
// permutation in GEMM 1's loads"; bench/NOTES.md, "Gathering x in GEMM 1's loads".)
//
// Versions of GEMM 1 of the routed experts (D [rows, N] = A [rows, H] · w[e]ᵀ), on the same operands
// and tiles (128 × 256 × 64 cooperative, or 64 × 256 × 64 ping-pong), D written from the registers in
// bf16 pairs as the library's SwiGLU epilogue writes act (PairStoreEpilogueArray):
//   tma:      CUTLASS's own mainloop, A by TMA from the rows the chain's scatter wrote;
//   1 warp:   A gathered from x by the mainloop producer warp with 16-byte cp.async, B by TMA;
//   2 warps:  the rows split between the mainloop warp and the kernel's auxiliary producer warp
//             (CUTLASS's MainloopAux role, which its blockwise-scaling mainloops use for scales); the
//             library's version on the 64-row tiles (kernels/cuda/cutlass_gather_rows.cuh);
//   3 warps (cooperative tiles): the epilogue's producer warp copies too, in a kernel of its own
//             (kernels/cuda/cutlass_epilogue_warp_loads.hpp; rows 44 / 44 / 40). That warp is free only where the
//             epilogue loads nothing: CUTLASS's TMA-store epilogue counts as loading even without a
//             source (its consumers wait on the load pipeline), so the 3-warp kernel hung with it;
//   2 warps, offsets once (ping-pong tiles): each lane's copy offsets computed once per tile.
// Each copying lane arrives on the stage's full barrier when its copies land
// (cp.async.mbarrier.arrive.noinc), and the barrier expects those arrivals (the collective's
// NumProducerThreadEvents, 1 + 32 per copying warp), so no ordering between the warps is needed.
// The gathered versions' D must equal tma's bit for bit (same operands, same MMA order). Also timed:
// a scatter of x into the permuted rows (what the gather saves).
//
// Build and run on the GPU machine (from the repository root, the CUTLASS headers in cutlass/include):
//   nvcc -O3 -DNDEBUG -std=c++20 -arch=sm_90a --expt-relaxed-constexpr -I. -Icutlass/include -Ibench/probes \
//     bench/probes/gather_rows.cu -lcuda -o /tmp/gather_rows && /tmp/gather_rows
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "cute/tensor.hpp"
#include "cutlass/arch/barrier.h"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "probe_common.cuh"
#include "pair_store_epilogue.cuh"
#include "kernels/cuda/cutlass_epilogue_warp_loads.hpp"

namespace probe {

// The dispatch policy of a mainloop with an auxiliary producer warp: CUTLASS runs load_auxiliary on
// warp 1 of the producer warp group where HasAuxiliaryLoad says so (specialised below).
template <class Policy>
struct WithAuxiliaryLoad : Policy {};

}  // namespace probe

namespace cutlass::gemm::kernel::detail {
template <class Policy>
struct HasAuxiliaryLoad<probe::WithAuxiliaryLoad<Policy>> : cute::true_type {};
}  // namespace cutlass::gemm::kernel::detail

namespace probe {

using namespace cute;

struct RowGather {
  const uint16_t* x = nullptr;          // bf16 [tokens, hidden]
  int hidden = 0;
  const int32_t* row_source = nullptr;  // [rows]: t·k + j of each permuted row
  const int32_t* offsets = nullptr;     // [groups + 1]
  int top_k = 1;
};

// kWarps producer warps copy A's rows (kWarps = 2: the mainloop warp rows [0, M/2), the auxiliary warp
// the rest); the mainloop warp's elected lane also issues B's TMA.
// kPrecomputed: each lane computes its rows' offsets in x once per tile (no shuffle per copy).
template <class Base, int kWarps, bool kPrecomputed = false>
struct GatherRowsMainloop : Base {
  using typename Base::TileShape;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::TensorStorage;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using DispatchPolicy =
      std::conditional_t<kWarps >= 2, WithAuxiliaryLoad<typename Base::DispatchPolicy>, typename Base::DispatchPolicy>;
  // Arrivals per stage: the leader's (expecting B's bytes) and one per copying lane.
  static constexpr int NumProducerThreadEvents = 1 + 32 * kWarps;

  static constexpr int kTileRows = size<0>(TileShape{});
  static constexpr int kTileK = size<2>(TileShape{});
  // Each warp a run of whole groups of four rows (the last warp's may be shorter: 44 / 44 / 40 with 3).
  static constexpr int kWarpRows = ((kTileRows + kWarps - 1) / kWarps + 3) / 4 * 4;
  static constexpr int kRowsPerLane = (kWarpRows + 31) / 32;
  static_assert(kTileK * 2 == 128, "a k-block row is 8 chunks of 16 bytes");
  static_assert(size(typename Base::DispatchPolicy::ClusterShape{}) == 1, "no clusters");

  struct Arguments : Base::Arguments {
    RowGather gather;
  };
  struct Params : Base::Params {
    RowGather gather;
  };
  static constexpr uint32_t kTmaBytesB = size<1>(TileShape{}) * kTileK * 2;

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
    return Base::can_implement(shapes, args) && args.gather.x != nullptr && args.gather.hidden % 8 == 0;
  }

  template <class ProblemShape_MNKL>
  CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& problem_shape_MNKL, Params const& params) const {
    auto base = Base::load_init(problem_shape_MNKL, params);
    return make_tuple(get<0>(base), get<1>(base), int32_t{0});
  }
  template <class InputTensors, class ProblemShape_MNKL>
  CUTLASS_DEVICE InputTensors tensors_perform_update(InputTensors const& inputs, Params const&, ProblemShape_MNKL,
                                                     int32_t next_group) {
    return make_tuple(get<0>(inputs), get<1>(inputs), next_group);
  }

  // One warp's rows [first_row, first_row + kWarpRows) of the tile, for every k-block: lane l resolves
  // rows l, l + 32, ... once; each copy instruction covers four whole rows (lane l: chunk l % 8 of row
  // l / 8 of the four), the row's token taken from its owner lane.
  template <int kWarp, class BlockCoord, class KTileIterator, class IssueB>
  CUTLASS_DEVICE void copy_rows(Params const& params, MainloopPipeline& pipeline, PipelineState smem_pipe_write,
                                int32_t group, BlockCoord const& blk_coord, KTileIterator k_tile_iter, int k_tile_count,
                                int lane, TensorStorage& shared_tensors, IssueB&& issue_b) {
    constexpr int first_row = kWarp * kWarpRows;
    constexpr int warp_rows = kTileRows - first_row < kWarpRows ? kTileRows - first_row : kWarpRows;
    const RowGather& g = params.gather;
    const int32_t start = g.offsets[group];
    const int32_t rows = g.offsets[group + 1] - start;
    const int32_t tile_first = static_cast<int32_t>(get<0>(blk_coord)) * kTileRows + first_row;
    const int chunk = lane % 8, row_in_four = lane / 8;
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});
    constexpr int kCopies = warp_rows / 4;
    // kPrecomputed: offset[i] = the x offset of the row copy i covers for this lane (-1: no row).
    // Otherwise token[j] = the token of row lane + 32 j, shuffled to the lanes that copy it.
    int32_t held[kPrecomputed ? kCopies : kRowsPerLane];
    if constexpr (kPrecomputed) {
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kCopies; ++i) {
        const int32_t r = tile_first + 4 * i + row_in_four;
        held[i] = r < rows ? g.row_source[start + r] / g.top_k * g.hidden : -1;
      }
    } else {
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < kRowsPerLane; ++j) {
        const int32_t r = tile_first + lane + 32 * j;
        held[j] = lane + 32 * j < warp_rows && r < rows ? g.row_source[start + r] / g.top_k : -1;
      }
    }
    CUTLASS_PRAGMA_NO_UNROLL
    for (; k_tile_count > 0; --k_tile_count) {
      pipeline.producer_acquire(smem_pipe_write);
      auto* barrier = pipeline.producer_get_barrier(smem_pipe_write);
      const int stage = smem_pipe_write.index();
      const int32_t column = static_cast<int32_t>(*k_tile_iter) * kTileK + chunk * 8;
      const uint32_t bytes = column < g.hidden ? 16u : 0u;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kCopies; ++i) {
        const int row = 4 * i + row_in_four;
        int64_t offset;
        if constexpr (kPrecomputed) {
          offset = held[i] < 0 ? -1 : held[i] + (bytes ? column : 0);
        } else {
          const int32_t t = __shfl_sync(0xffffffffu, held[i / 8], 4 * (i % 8) + row_in_four);
          offset = t < 0 ? -1 : static_cast<int64_t>(t) * g.hidden + (bytes ? column : 0);
        }
        {
          const uint16_t* src = g.x + (offset < 0 ? 0 : offset);
          const uint32_t dst = cast_smem_ptr_to_uint(&sA(first_row + row, chunk * 8, stage));
          asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                       "r"(offset < 0 ? 0u : bytes)
                       : "memory");
        }
      }
      cutlass::arch::cpasync_barrier_arrive_noinc(barrier);
      issue_b(*barrier, *k_tile_iter, stage);
      ++k_tile_iter;
      ++smem_pipe_write;
    }
  }

  template <class TensorA, class TensorB, class TensorMapA, class TensorMapB, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                           cute::tuple<TensorA, TensorB, int32_t> const& load_inputs,
                           cute::tuple<TensorMapA, TensorMapB> const& input_tensormaps, BlockCoord const& blk_coord,
                           KTileIterator k_tile_iter, int k_tile_count, int lane, uint32_t, TensorStorage& shared_tensors) {
    const bool leader = elect_one_sync();
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});
    Tensor gB = get<1>(load_inputs)(_, _, get<1>(blk_coord), _, get<3>(blk_coord));
    auto block_tma_b = params.tma_load_b.get_slice(0);
    Tensor tBgB = block_tma_b.partition_S(gB);
    Tensor tBsB = block_tma_b.partition_D(sB);
    auto issue_b = [&](auto& barrier, auto k_tile, int stage) {
      if (leader) copy(params.tma_load_b.with(get<1>(input_tensormaps), barrier, uint16_t{0}), tBgB(_, _, _, k_tile),
                       tBsB(_, _, _, stage));
    };
    copy_rows<0>(params, pipeline, smem_pipe_write, get<2>(load_inputs), blk_coord, k_tile_iter, k_tile_count, lane,
                 shared_tensors, issue_b);
  }

  template <class TensorA, class TensorB, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load_auxiliary(Params const& params, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                                     cute::tuple<TensorA, TensorB, int32_t> const& load_inputs,
                                     BlockCoord const& blk_coord, KTileIterator k_tile_iter, int k_tile_count, int lane,
                                     uint32_t, TensorStorage& shared_tensors) {
    // Warp w of the producer warp group copies rows [w · kWarpRows, (w + 1) · kWarpRows): CUTLASS's
    // kernels run this on warp 1 only, EpilogueWarpLoadsCooperative on warps 1 and 2.
    const int warp = cutlass::canonical_warp_idx_sync() % 4;
    auto none = [](auto&, auto, int) {};
    if constexpr (kWarps >= 2)
      if (warp == 1)
        copy_rows<1>(params, pipeline, smem_pipe_write, get<2>(load_inputs), blk_coord, k_tile_iter, k_tile_count, lane,
                     shared_tensors, none);
    if constexpr (kWarps >= 3)
      if (warp == 2)
        copy_rows<2>(params, pipeline, smem_pipe_write, get<2>(load_inputs), blk_coord, k_tile_iter, k_tile_count, lane,
                     shared_tensors, none);
  }
};

using Element = cutlass::bfloat16_t;
using LayoutA = cutlass::layout::RowMajor;
using LayoutB = cutlass::layout::ColumnMajor;
using LayoutD = cutlass::layout::RowMajor;
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

template <class C>
using AsBuilt = C;
template <class C>
using Gather1 = GatherRowsMainloop<C, 1>;
template <class C>
using Gather2 = GatherRowsMainloop<C, 2>;
template <class C>
using Gather2Pre = GatherRowsMainloop<C, 2, true>;
template <class C>
using Gather3 = GatherRowsMainloop<C, 3>;

template <class TileShape, class Schedule, template <class> class Wrap, bool kEveryProducerWarp = false>
struct Gemm {
  using ClusterShape = Shape<_1, _1, _1>;
  using Epilogue = cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<PairStoreEpilogueArray>;
  using Mainloop = Wrap<typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, 8, Element, LayoutB*, 8, float, TileShape,
      ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      typename Schedule::Mainloop>::CollectiveOp>;
  using Kernel = std::conditional_t<kEveryProducerWarp,
                                    cutlass::gemm::kernel::EpilogueWarpLoadsCooperative<ProblemShape, Mainloop, Epilogue>,
                                    cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>>;
  using Adapter = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

using StrideA = cutlass::detail::TagToStrideA_t<LayoutA*>;
using StrideB = cutlass::detail::TagToStrideB_t<LayoutB*>;
using StrideD = cutlass::detail::TagToStrideC_t<LayoutD*>;
using IStrideA = cute::remove_pointer_t<StrideA>;
using IStrideB = cute::remove_pointer_t<StrideB>;
using IStrideD = cute::remove_pointer_t<StrideD>;

// Row-major operands (B stored [n, k]): the row pitch is all a stride holds.
template <class Stride>
Stride pitch(int64_t elements) {
  Stride s{};
  get<0>(s) = elements;
  return s;
}

struct Groups {  // device arrays
  Shape3* shapes;
  const Element** a;
  const Element** b;
  Element** d;
  IStrideA* sa;
  IStrideB* sb;
  IStrideD* sd;
  int count;
  int64_t pitch;  // D's row pitch (n)
};

template <class G>
void* prepare(G& gemm, typename G::Arguments& args, const Groups& g, const RowGather* gather) {
  args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
  args.problem_shape = {g.count, g.shapes, nullptr};
  args.mainloop.ptr_A = g.a;
  args.mainloop.dA = g.sa;
  args.mainloop.ptr_B = g.b;
  args.mainloop.dB = g.sb;
  if constexpr (requires { args.mainloop.gather; }) args.mainloop.gather = *gather;
  args.epilogue = {g.d, g.pitch};
  args.hw_info.device_id = 0;
  cudaDeviceGetAttribute(&args.hw_info.sm_count, cudaDevAttrMultiProcessorCount, 0);
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) {
    std::printf("can_implement failed\n");
    std::exit(1);
  }
  void* workspace = nullptr;
  CK(cudaMalloc(&workspace, std::max<size_t>(G::get_workspace_size(args), 256)));
  if (gemm.initialize(args, workspace) != cutlass::Status::kSuccess) {
    std::printf("initialize failed\n");
    std::exit(1);
  }
  return workspace;
}

// The chain's dispatch: x row t copied to each of its k permuted rows (one block per token).
__global__ void scatter(const uint4* __restrict__ x, const int32_t* __restrict__ dest, int vecs, int k,
                        uint4* __restrict__ rows) {
  const int t = blockIdx.x;
  for (int v = threadIdx.x; v < vecs; v += blockDim.x) {
    const uint4 w = x[static_cast<int64_t>(t) * vecs + v];
    for (int j = 0; j < k; ++j) __stcs(&rows[static_cast<int64_t>(dest[t * k + j]) * vecs + v], w);
  }
}


template <class F>
float median_us(F&& f, int runs) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) f();
  std::vector<float> t;
  for (int i = 0; i < runs; ++i) {
    CK(cudaEventRecord(a));
    f();
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms * 1000.0f);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}


template <class TileShape, class Schedule>
void run_point(const char* name, int tokens, int experts, int top_k, int hidden, int n, const char* tiles) {
  // Routing: k distinct experts per token, uniform; permuted rows in expert order, then by t·k + j.
  std::mt19937 rng(1234);
  std::vector<int32_t> ids(static_cast<size_t>(tokens) * top_k);
  std::vector<int> pick(experts);
  std::iota(pick.begin(), pick.end(), 0);
  for (int t = 0; t < tokens; ++t) {
    for (int j = 0; j < top_k; ++j) std::swap(pick[j], pick[j + rng() % (experts - j)]);
    for (int j = 0; j < top_k; ++j) ids[static_cast<size_t>(t) * top_k + j] = pick[j];
  }
  const int rows = tokens * top_k;
  std::vector<int32_t> offsets(experts + 1, 0), row_source(rows), dest(rows);
  for (int32_t e : ids) ++offsets[e + 1];
  for (int e = 0; e < experts; ++e) offsets[e + 1] += offsets[e];
  std::vector<int32_t> fill(offsets.begin(), offsets.end() - 1);
  for (int p = 0; p < rows; ++p) {
    const int r = fill[ids[p]]++;
    row_source[r] = p;
    dest[p] = r;
  }

  uint16_t *x, *w, *rows_buf;
  Element *d_tma, *d_g1, *d_g2, *d_g3;
  const size_t x_elems = size_t(tokens) * hidden, w_elems = size_t(experts) * n * hidden;
  CK(cudaMalloc(&x, x_elems * 2));
  CK(cudaMalloc(&w, w_elems * 2));
  CK(cudaMalloc(&rows_buf, size_t(rows) * hidden * 2));
  CK(cudaMalloc(&d_tma, size_t(rows) * n * 2));
  CK(cudaMalloc(&d_g1, size_t(rows) * n * 2));
  CK(cudaMalloc(&d_g2, size_t(rows) * n * 2));
  CK(cudaMalloc(&d_g3, size_t(rows) * n * 2));
  fill_random<<<1024, 256>>>(x, x_elems, 17u);
  fill_random<<<1024, 256>>>(w, w_elems, 91u);
  int32_t* d_offsets = upload(offsets);
  int32_t* d_source = upload(row_source);
  int32_t* d_dest = upload(dest);
  const int vecs = hidden / 8;
  auto run_scatter = [&] {
    scatter<<<tokens, 256>>>(reinterpret_cast<const uint4*>(x), d_dest, vecs, top_k, reinterpret_cast<uint4*>(rows_buf));
  };
  run_scatter();
  CK(cudaDeviceSynchronize());

  // Group arrays, one set per output buffer.
  auto groups = [&](Element* d) {
    std::vector<Shape3> shapes(experts);
    std::vector<const Element*> a(experts), b(experts);
    std::vector<Element*> dd(experts);
    std::vector<IStrideA> sa(experts);
    std::vector<IStrideB> sb(experts);
    std::vector<IStrideD> sd(experts);
    for (int e = 0; e < experts; ++e) {
      const int m = offsets[e + 1] - offsets[e];
      shapes[e] = Shape3{m, n, hidden};
      a[e] = reinterpret_cast<const Element*>(rows_buf) + size_t(offsets[e]) * hidden;
      b[e] = reinterpret_cast<const Element*>(w) + size_t(e) * n * hidden;
      dd[e] = d + size_t(offsets[e]) * n;
      sa[e] = pitch<IStrideA>(hidden);
      sb[e] = pitch<IStrideB>(hidden);
      sd[e] = pitch<IStrideD>(n);
    }
    return Groups{upload(shapes), upload(a), upload(b), upload(dd), upload(sa), upload(sb), upload(sd), experts, n};
  };
  const RowGather gather{x, hidden, d_source, d_offsets, top_k};

  using Tma = typename Gemm<TileShape, Schedule, AsBuilt>::Adapter;
  using G1 = typename Gemm<TileShape, Schedule, Gather1>::Adapter;
  using G2 = typename Gemm<TileShape, Schedule, Gather2>::Adapter;
  // The third gather: 3 copying warps on the cooperative tiles (the epilogue's producer warp too, a
  // kernel of its own), 2 with each lane's offsets computed once per tile on the ping-pong ones.
  constexpr bool kCooperative = std::is_same_v<Schedule, Cooperative>;
  using G3 = std::conditional_t<kCooperative, typename Gemm<TileShape, Schedule, Gather3, true>::Adapter,
                                typename Gemm<TileShape, Schedule, Gather2Pre>::Adapter>;
  Tma tma;
  G1 g1;
  G2 g2;
  G3 g3;
  typename Tma::Arguments a_tma;
  typename G1::Arguments a_g1;
  typename G2::Arguments a_g2;
  typename G3::Arguments a_g3;
  prepare(tma, a_tma, groups(d_tma), nullptr);
  prepare(g1, a_g1, groups(d_g1), &gather);
  prepare(g2, a_g2, groups(d_g2), &gather);
  prepare(g3, a_g3, groups(d_g3), &gather);
  CK(cudaMemset(d_g1, 0xff, size_t(rows) * n * 2));
  CK(cudaMemset(d_g2, 0xff, size_t(rows) * n * 2));
  CK(cudaMemset(d_g3, 0xff, size_t(rows) * n * 2));
  auto step = [](const char* what) { std::fprintf(stderr, "  %s\n", what); std::fflush(stderr); };
  step("tma"); tma.run(); CK(cudaDeviceSynchronize());
  step("g1"); g1.run(); CK(cudaDeviceSynchronize());
  step("g2"); g2.run(); CK(cudaDeviceSynchronize());
  step("g3"); g3.run(); CK(cudaDeviceSynchronize());
  step("done");
  CK(cudaDeviceSynchronize());
  std::vector<uint16_t> h_tma(size_t(rows) * n), h_other(size_t(rows) * n);
  CK(cudaMemcpy(h_tma.data(), d_tma, h_tma.size() * 2, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(h_other.data(), d_g1, h_other.size() * 2, cudaMemcpyDeviceToHost));
  const bool same1 = h_tma == h_other;
  CK(cudaMemcpy(h_other.data(), d_g2, h_other.size() * 2, cudaMemcpyDeviceToHost));
  const bool same2 = h_tma == h_other;
  CK(cudaMemcpy(h_other.data(), d_g3, h_other.size() * 2, cudaMemcpyDeviceToHost));
  const bool same3 = h_tma == h_other;
  size_t nonzero = 0;
  for (uint16_t v : h_tma) nonzero += (v & 0x7fff) != 0;

  const int runs = 20;
  const float t_scatter = median_us(run_scatter, runs);
  const float t_tma = median_us([&] { tma.run(); }, runs);
  const float t_g1 = median_us([&] { g1.run(); }, runs);
  const float t_g2 = median_us([&] { g2.run(); }, runs);
  const float t_g3 = median_us([&] { g3.run(); }, runs);
  const float t_tma2 = median_us([&] { tma.run(); }, runs);
  const double flops = 2.0 * rows * double(n) * hidden;
  std::printf("%-18s T=%-5d %s: scatter %7.1f us | tma %7.1f / %7.1f us (%.0f TFLOP/s), scatter + tma %7.1f | "
              "gather 1 warp %7.1f (%s) | 2 warps %7.1f (%s) | %s %7.1f (%s) | nonzero %.3f\n",
              name, tokens, tiles, t_scatter, t_tma, t_tma2, flops / (std::min(t_tma, t_tma2) * 1e6), t_scatter + t_tma,
              t_g1, same1 ? "bits equal" : "DIFFERENT", t_g2, same2 ? "bits equal" : "DIFFERENT",
              kCooperative ? "3 warps" : "2 warps, offsets once", t_g3,
              same3 ? "bits equal" : "DIFFERENT",
              double(nonzero) / h_tma.size());
  std::fflush(stdout);
  cudaFree(x);
  cudaFree(w);
  cudaFree(rows_buf);
  cudaFree(d_tma);
  cudaFree(d_g1);
  cudaFree(d_g2);
  cudaFree(d_g3);
}

}  // namespace probe

int main(int argc, char** argv) {
  using namespace probe;
  using Wide = Shape<_128, _256, _64>;
  using Narrow = Shape<_64, _256, _64>;
  const bool quick = argc > 1 && std::strcmp(argv[1], "quick") == 0;
  // GEMM 1 of each preset: N = 2I (gate and up rows of w13), K = H.
  run_point<Wide, Cooperative>("qwen3-30b-a3b", 8192, 128, 8, 2048, 1536, "128x256 coop");
  if (quick) return 0;
  run_point<Wide, Cooperative>("qwen1.5-moe-a2.7b", 8192, 60, 4, 2048, 2816, "128x256 coop");
  run_point<Wide, Cooperative>("deepseek-v3", 8192, 256, 8, 7168, 4096, "128x256 coop");
  run_point<Wide, Cooperative>("mixtral-8x7b", 8192, 8, 2, 4096, 28672, "128x256 coop");
  run_point<Narrow, Pingpong>("qwen3-30b-a3b", 2048, 128, 8, 2048, 1536, "64x256 pingpong");
  run_point<Narrow, Pingpong>("qwen1.5-moe-a2.7b", 2048, 60, 4, 2048, 2816, "64x256 pingpong");
  run_point<Narrow, Pingpong>("deepseek-v3", 2048, 256, 8, 7168, 4096, "64x256 pingpong");
  run_point<Wide, Cooperative>("qwen3-30b-a3b", 4096, 128, 8, 2048, 1536, "128x256 coop");
  run_point<Narrow, Pingpong>("qwen3-30b-a3b", 4096, 128, 8, 2048, 1536, "64x256 pingpong");
  run_point<Narrow, Pingpong>("qwen3-30b-a3b", 1024, 128, 8, 2048, 1536, "64x256 pingpong");
  run_point<Narrow, Pingpong>("qwen3-30b-a3b", 512, 128, 8, 2048, 1536, "64x256 pingpong");
  run_point<Narrow, Pingpong>("qwen1.5-moe-a2.7b", 512, 60, 4, 2048, 2816, "64x256 pingpong");
  run_point<Narrow, Pingpong>("deepseek-v3", 512, 256, 8, 7168, 4096, "64x256 pingpong");
  run_point<Narrow, Pingpong>("mixtral-8x7b", 2048, 8, 2, 4096, 28672, "64x256 pingpong");
  return 0;
}
