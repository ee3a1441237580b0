#include "kernels/cuda/cutlass_grouped.hpp"

#include <cuda_runtime.h>

#include <string>
#include <type_traits>

#include "graph/error.hpp"
#include "kernels/cuda/check.cuh"
#include "kernels/cuda/device.hpp"
#include "kernels/cuda/elementwise.hpp"

#if MOEFLOW_HAVE_CUTLASS
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
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

template <class TileShape, class ClusterShape, class Schedule = Cooperative>
struct GroupedGemm {
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD*, kElementsPer16B, Element,
      LayoutD*, kElementsPer16B, typename Schedule::Epilogue,
      cutlass::epilogue::fusion::LinearCombination<Element, float, void, float>>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kElementsPer16B, Element, LayoutB*,
      kElementsPer16B, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      typename Schedule::Mainloop>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
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
// Both builders give the same operand strides (a row pitch and unit steps).
using StrideA = typename General::Kernel::InternalStrideA;
using StrideB = typename General::Kernel::InternalStrideB;
using StrideD = typename General::Kernel::InternalStrideD;
template <class Config>
constexpr bool kSameStrides = std::is_same_v<StrideA, typename Config::Kernel::InternalStrideA> &&
                              std::is_same_v<StrideB, typename Config::Kernel::InternalStrideB> &&
                              std::is_same_v<StrideD, typename Config::Kernel::InternalStrideD>;
static_assert(kSameStrides<Wide> && kSameStrides<Narrow> && kSameStrides<WideSingle>);

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

// Every group's problem (m_e, n, k) and pointers for both GEMMs, from the device offsets.
__global__ void fill_groups(const int32_t* __restrict__ offsets, int experts, int hidden, int intermediate,
                            const Element* rows, const Element* w13, const Element* w2, Element* h, Element* act,
                            Element* out, GroupArrays g1, GroupArrays g2, StrideA s1a, StrideB s1b, StrideD s1d,
                            StrideA s2a, StrideB s2b, StrideD s2d) {
  const int e = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (e >= experts) return;
  const int64_t first = offsets[e];
  const int m = offsets[e + 1] - offsets[e];
  const int64_t H = hidden, I = intermediate;
  g1.shapes[e] = Shape3{m, static_cast<int>(2 * I), hidden};
  g1.a[e] = rows + first * H;
  g1.b[e] = w13 + static_cast<int64_t>(e) * 2 * I * H;
  g1.d[e] = h + first * 2 * I;
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

template <class Config>
void run_group(const LaneContext& ctx, int experts, const GroupArrays& g, std::byte* cutlass_workspace) {
  using Gemm = typename Config::Gemm;
  typename Gemm::Arguments args;
  args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
  args.problem_shape = {experts, g.shapes, nullptr};  // sizes on the device only: a persistent grid
  args.mainloop = {g.a, g.sa, g.b, g.sb};
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = 0.0f;
  args.epilogue.ptr_C = nullptr;
  args.epilogue.ptr_D = g.d;
  args.epilogue.dD = g.sd;
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

void experts_cutlass_grouped(const LaneContext& ctx, const uint16_t* rows, const int32_t* offsets, int experts,
                             int64_t total_rows, int hidden, int intermediate, const uint16_t* w13, const uint16_t* w2, uint16_t* h,
                             uint16_t* act, uint16_t* out, void* workspace, CutlassTiles tiles) {
  if (experts <= 0 || hidden <= 0 || intermediate <= 0)
    fail_input("experts_cutlass_grouped: E = " + std::to_string(experts) + ", H = " + std::to_string(hidden) +
               ", I = " + std::to_string(intermediate));
  if (std::string why = alignment_problem(hidden, intermediate); !why.empty()) fail_input("experts_cutlass_grouped: " + why);
  if (workspace == nullptr || reinterpret_cast<uintptr_t>(workspace) % kAlign != 0)
    fail_input("experts_cutlass_grouped: the workspace must be non-null and 256-byte aligned");
  Carver c{static_cast<std::byte*>(workspace)};
  const GroupArrays g1 = c.group(experts), g2 = c.group(experts);
  std::byte* cutlass_workspace = static_cast<std::byte*>(workspace) + c.at;
  const int64_t H = hidden, I = intermediate;
  auto bf = [](const uint16_t* p) { return reinterpret_cast<const Element*>(p); };
  auto bf_out = [](uint16_t* p) { return reinterpret_cast<Element*>(p); };
  const int threads = 128;
  fill_groups<<<(experts + threads - 1) / threads, threads, 0, ctx.stream>>>(
      offsets, experts, hidden, intermediate, bf(rows), bf(w13), bf(w2), bf_out(h), bf_out(act), bf_out(out), g1, g2,
      pitch<StrideA>(H), pitch<StrideB>(H), pitch<StrideD>(2 * I), pitch<StrideA>(I), pitch<StrideB>(I),
      pitch<StrideD>(H));
  MOEFLOW_CUDA_LAUNCH_CHECK();
  auto gemm = tiles == CutlassTiles::wide          ? run_group<Wide>
              : tiles == CutlassTiles::narrow      ? run_group<Narrow>
              : tiles == CutlassTiles::wide_single ? run_group<WideSingle>
                                                   : run_group<General>;
  gemm(ctx, experts, g1, cutlass_workspace);
  // Only the routed rows (offsets[E], on the device): with a live T the launch bound is the maximum.
  swiglu(h, total_rows, intermediate, act, ctx.stream, LiveRows{offsets + experts, 1});
  gemm(ctx, experts, g2, cutlass_workspace);
}

#else  // built without CUTLASS's headers

std::string cutlass_grouped_unbuildable(int, int) {
  return "built without CUTLASS (its headers were not found: see CUTLASS_DIR in CMakeLists.txt)";
}
std::string cutlass_grouped_unsupported(int h, int i) { return cutlass_grouped_unbuildable(h, i); }
std::size_t cutlass_grouped_workspace_bytes(int) { return 0; }
void experts_cutlass_grouped(const LaneContext&, const uint16_t*, const int32_t*, int, int64_t, int, int, const uint16_t*,
                             const uint16_t*, uint16_t*, uint16_t*, uint16_t*, void*, CutlassTiles) {
  fail_input("experts_cutlass_grouped: " + cutlass_grouped_unbuildable(0, 0));
}

#endif

}  // namespace moeflow::cuda
