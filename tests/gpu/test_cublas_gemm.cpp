// cuBLAS GEMMs and the three routed-experts strategies against a plain fp64 loop over the same
// bf16-rounded inputs (gpu label: each test skips cleanly on a machine without a GPU).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <random>
#include <string>
#include <vector>

#include "graph/error.hpp"
#include "kernels/common/random.hpp"
#include "kernels/cuda/bf16.hpp"
#include "kernels/cuda/cublas_gemm.hpp"
#include "kernels/cuda/cutlass_grouped.hpp"
#include "kernels/cuda/decode_experts.hpp"
#include "kernels/cuda/device.hpp"
#include "kernels/cuda/lane_context.hpp"
#include "kernels/cuda/measured_gemm.hpp"

using namespace moeflow;

namespace {

void ok(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

class DeviceBuffer {
 public:
  explicit DeviceBuffer(std::size_t bytes) {
    if (bytes > 0) ok(cudaMalloc(&ptr_, bytes), "cudaMalloc");
  }
  ~DeviceBuffer() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <class T> T* as() const { return static_cast<T*>(ptr_); }
  void* get() const { return ptr_; }

 private:
  void* ptr_ = nullptr;
};

class PinnedBuffer {
 public:
  explicit PinnedBuffer(std::size_t bytes) {
    if (bytes > 0) ok(cudaMallocHost(&ptr_, bytes), "cudaMallocHost");
  }
  ~PinnedBuffer() {
    if (ptr_ != nullptr) cudaFreeHost(ptr_);
  }
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  void* get() const { return ptr_; }

 private:
  void* ptr_ = nullptr;
};

template <class T> std::unique_ptr<DeviceBuffer> upload(const std::vector<T>& host) {
  auto buffer = std::make_unique<DeviceBuffer>(host.size() * sizeof(T));
  if (!host.empty()) ok(cudaMemcpy(buffer->get(), host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), "upload");
  return buffer;
}

template <class T> std::vector<T> download(const DeviceBuffer& buffer, std::size_t n) {
  std::vector<T> host(n);
  if (n > 0) ok(cudaMemcpy(host.data(), buffer.get(), n * sizeof(T), cudaMemcpyDeviceToHost), "download");
  return host;
}

// One lane as the executor builds it: a stream, its own cuBLAS handle and workspace, an error flag.
class Lane {
 public:
  Lane() : workspace_(cuda::recommended_blas_workspace_bytes()), flag_(sizeof(int)) {
    ok(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    ctx.stream = stream_;
    ctx.blas = cuda::create_blas_handle(stream_, workspace_.get(), cuda::recommended_blas_workspace_bytes());
    ctx.blas_workspace = workspace_.get();
    ctx.blas_workspace_bytes = cuda::recommended_blas_workspace_bytes();
    ctx.error_flag = flag_.as<int>();
    ok(cudaMemset(ctx.error_flag, 0, sizeof(int)), "cudaMemset flag");
  }
  ~Lane() {
    cuda::destroy_blas_handle(ctx.blas);
    cudaStreamDestroy(stream_);
  }
  Lane(const Lane&) = delete;
  Lane& operator=(const Lane&) = delete;

  void sync() const { ok(cudaStreamSynchronize(stream_), "cudaStreamSynchronize"); }
  int flag() const {
    sync();
    int value = 0;
    ok(cudaMemcpy(&value, ctx.error_flag, sizeof(int), cudaMemcpyDeviceToHost), "read flag");
    return value;
  }
  void clear_flag() const { ok(cudaMemset(ctx.error_flag, 0, sizeof(int)), "clear flag"); }

  cuda::LaneContext ctx;

 private:
  cudaStream_t stream_ = nullptr;
  DeviceBuffer workspace_;
  DeviceBuffer flag_;
};

// U(-1, 1)·scale from the counter-based generator, rounded to bf16: never zero.
std::vector<uint16_t> random_bf16(std::size_t n, const char* name, float scale, uint64_t seed) {
  const uint64_t key = rng::stream_key(seed, rng::name_key(name));
  std::vector<uint16_t> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = float_to_bf16(rng::uniform_pm1(key, i) * scale);
  return v;
}

struct Problem {
  int experts = 0, hidden = 0, inter = 0;
  std::vector<int32_t> offsets;  // [E+1]
  std::vector<uint16_t> rows, w13, w2;
  int64_t total() const { return offsets.back(); }
  int max_count() const {
    int m = 0;
    for (int e = 0; e < experts; ++e) m = std::max(m, offsets[e + 1] - offsets[e]);
    return m;
  }
};

Problem make_problem(const std::vector<int>& counts, int hidden, int inter, uint64_t seed = 7) {
  Problem p;
  p.experts = static_cast<int>(counts.size());
  p.hidden = hidden;
  p.inter = inter;
  p.offsets.assign(1, 0);
  for (int c : counts) p.offsets.push_back(p.offsets.back() + c);
  const std::size_t E = counts.size(), H = hidden, I = inter, R = static_cast<std::size_t>(p.total());
  p.rows = random_bf16(R * H, "x", 1.0f, seed);
  p.w13 = random_bf16(E * 2 * I * H, "experts.w13", 1.0f / std::sqrt(static_cast<float>(H)), seed);
  p.w2 = random_bf16(E * H * I, "experts.w2", 1.0f / std::sqrt(static_cast<float>(I)), seed);
  return p;
}

// fp64 accumulation over the bf16 values; h and act are not rounded (the tolerance covers that).
std::vector<double> reference(const Problem& p) {
  const std::size_t H = p.hidden, I = p.inter;
  std::vector<double> out(static_cast<std::size_t>(p.total()) * H, 0.0), act(I);
  for (int e = 0; e < p.experts; ++e) {
    const uint16_t* w13 = p.w13.data() + static_cast<std::size_t>(e) * 2 * I * H;
    const uint16_t* w2 = p.w2.data() + static_cast<std::size_t>(e) * H * I;
    for (int32_t r = p.offsets[e]; r < p.offsets[e + 1]; ++r) {
      const uint16_t* x = p.rows.data() + static_cast<std::size_t>(r) * H;
      for (std::size_t j = 0; j < I; ++j) {
        double g = 0, u = 0;
        for (std::size_t k = 0; k < H; ++k) {
          g += static_cast<double>(bf16_to_float(x[k])) * bf16_to_float(w13[j * H + k]);
          u += static_cast<double>(bf16_to_float(x[k])) * bf16_to_float(w13[(I + j) * H + k]);
        }
        act[j] = g / (1.0 + std::exp(-g)) * u;
      }
      for (std::size_t o = 0; o < H; ++o) {
        double s = 0;
        for (std::size_t j = 0; j < I; ++j) s += act[j] * bf16_to_float(w2[o * I + j]);
        out[static_cast<std::size_t>(r) * H + o] = s;
      }
    }
  }
  return out;
}

// ‖y − r‖₂ / ‖r‖₂ over [first, last) (whole vectors by default); NaN anywhere gives NaN, which fails.
double rel_error(const std::vector<double>& y, const std::vector<double>& r, std::size_t first = 0,
                 std::size_t last = SIZE_MAX) {
  last = std::min(last, r.size());
  double num = 0, den = 0, max_diff = 0, max_ref = 0;
  for (std::size_t i = first; i < last; ++i) {
    num += (y[i] - r[i]) * (y[i] - r[i]);
    den += r[i] * r[i];
    max_diff = std::max(max_diff, std::abs(y[i] - r[i]));
    max_ref = std::max(max_ref, std::abs(r[i]));
  }
  std::printf("    rel norm error %.3e, max|y-r|/max|r| %.3e\n", std::sqrt(num / den), max_diff / max_ref);
  return std::sqrt(num / den);
}

std::vector<double> widen(const std::vector<uint16_t>& bits) {
  std::vector<double> v(bits.size());
  for (std::size_t i = 0; i < bits.size(); ++i) v[i] = bf16_to_float(bits[i]);
  return v;
}

// Device copies of a problem's operands and an output pre-filled with bf16 NaNs (0xFFFF), so a row
// that a strategy leaves unwritten fails the comparison.
struct DeviceProblem {
  explicit DeviceProblem(const Problem& p)
      : rows(upload(p.rows)), w13(upload(p.w13)), w2(upload(p.w2)), offsets(upload(p.offsets)),
        out(static_cast<std::size_t>(p.total()) * p.hidden * 2), out_count(static_cast<std::size_t>(p.total()) * p.hidden) {
    if (out_count > 0) ok(cudaMemset(out.get(), 0xff, out_count * 2), "poison out");
  }
  std::unique_ptr<DeviceBuffer> rows, w13, w2, offsets;
  DeviceBuffer out;
  std::size_t out_count;
};

std::vector<uint16_t> run_loop(const Lane& lane, const Problem& p) {
  DeviceProblem d(p);
  const std::size_t R = static_cast<std::size_t>(p.total());
  DeviceBuffer h(R * 2 * p.inter * 2), act(R * p.inter * 2);
  cuda::experts_per_expert_loop(lane.ctx, d.rows->as<uint16_t>(), p.offsets.data(), p.experts, p.hidden, p.inter,
                                d.w13->as<uint16_t>(), d.w2->as<uint16_t>(), h.as<uint16_t>(), act.as<uint16_t>(),
                                d.out.as<uint16_t>());
  lane.sync();
  return download<uint16_t>(d.out, d.out_count);
}

std::vector<uint16_t> run_grouped(const Lane& lane, const Problem& p, const DeviceBuffer& dev_ptrs,
                                  const PinnedBuffer& host_ptrs) {
  DeviceProblem d(p);
  const std::size_t R = static_cast<std::size_t>(p.total());
  DeviceBuffer h(R * 2 * p.inter * 2), act(R * p.inter * 2);
  cuda::experts_grouped_batched(lane.ctx, d.rows->as<uint16_t>(), p.offsets.data(), p.experts, p.hidden, p.inter,
                                d.w13->as<uint16_t>(), d.w2->as<uint16_t>(), h.as<uint16_t>(), act.as<uint16_t>(),
                                d.out.as<uint16_t>(), dev_ptrs.get(), host_ptrs.get());
  lane.sync();
  return download<uint16_t>(d.out, d.out_count);
}

std::vector<uint16_t> run_grouped(const Lane& lane, const Problem& p) {
  DeviceBuffer dev_ptrs(cuda::grouped_pointer_bytes(p.experts));
  PinnedBuffer host_ptrs(cuda::grouped_pointer_bytes(p.experts));
  return run_grouped(lane, p, dev_ptrs, host_ptrs);
}

std::vector<uint16_t> run_padded(const Lane& lane, const Problem& p, int64_t capacity) {
  DeviceProblem d(p);
  DeviceBuffer scratch(cuda::padded_scratch_bytes(p.experts, capacity, p.hidden, p.inter));
  cuda::experts_padded_strided_batched(lane.ctx, d.rows->as<uint16_t>(), d.offsets->as<int32_t>(), p.experts, capacity,
                                       p.hidden, p.inter, d.w13->as<uint16_t>(), d.w2->as<uint16_t>(), scratch.get(),
                                       d.out.as<uint16_t>());
  lane.sync();
  return download<uint16_t>(d.out, d.out_count);
}

// Our decode kernel (not cuBLAS, held to the same reference): `extra_rows` unrouted rows past
// offsets[E] must come back as zeros.
std::vector<uint16_t> run_decode(const Lane& lane, const Problem& p, int64_t extra_rows = 0) {
  DeviceProblem d(p);
  const int64_t R = p.total() + extra_rows;
  DeviceBuffer act(static_cast<std::size_t>(std::max<int64_t>(R, 1)) * p.inter * 2),
      out(static_cast<std::size_t>(std::max<int64_t>(R, 1)) * p.hidden * 2);
  ok(cudaMemset(out.get(), 0xff, static_cast<std::size_t>(R) * p.hidden * 2), "poison out");
  DeviceBuffer rows(static_cast<std::size_t>(std::max<int64_t>(R, 1)) * p.hidden * 2);
  ok(cudaMemset(rows.get(), 0, static_cast<std::size_t>(R) * p.hidden * 2), "rows");
  if (p.total() > 0)
    ok(cudaMemcpy(rows.get(), d.rows->get(), static_cast<std::size_t>(p.total()) * p.hidden * 2, cudaMemcpyDeviceToDevice), "rows");
  cuda::experts_decode(lane.ctx, rows.as<uint16_t>(), d.offsets->as<int32_t>(), p.experts, R, p.hidden, p.inter,
                       d.w13->as<uint16_t>(), d.w2->as<uint16_t>(), act.as<uint16_t>(), out.as<uint16_t>());
  lane.sync();
  return download<uint16_t>(out, static_cast<std::size_t>(R) * p.hidden);
}

// CUTLASS's grouped GEMM (sizes from the device offsets), in a workspace poisoned first so that an
// array it failed to fill shows.
// With `swiglu_epilogue`, w13 is packed first (poisoned before, so a row it failed to write shows)
// and GEMM 1 applies SwiGLU in its epilogue; h is then null, so a kernel touching it faults.
std::vector<uint16_t> run_cutlass(const Lane& lane, const Problem& p,
                                  cuda::CutlassTiles tiles = cuda::CutlassTiles::general, bool swiglu_epilogue = false) {
  DeviceProblem d(p);
  const std::size_t R = static_cast<std::size_t>(std::max<int64_t>(p.total(), 1));
  DeviceBuffer h(R * 2 * p.inter * 2), act(R * p.inter * 2), ws(cuda::cutlass_grouped_workspace_bytes(p.experts));
  ok(cudaMemset(ws.get(), 0xff, cuda::cutlass_grouped_workspace_bytes(p.experts)), "poison workspace");
  ok(cudaMemset(act.get(), 0xff, R * p.inter * 2), "poison act");  // an act element nobody wrote shows
  const auto packed_bytes = static_cast<std::size_t>(cuda::packed_w13_bytes(p.experts, p.hidden, p.inter));
  DeviceBuffer packed(swiglu_epilogue ? packed_bytes : 1);
  if (swiglu_epilogue) {
    ok(cudaMemset(packed.get(), 0xff, packed_bytes), "poison packed w13");
    cuda::pack_w13_interleaved(d.w13->as<uint16_t>(), p.experts, p.hidden, p.inter, packed.as<uint16_t>(), lane.ctx.stream);
  }
  cuda::experts_cutlass_grouped(lane.ctx, d.rows->as<uint16_t>(), d.offsets->as<int32_t>(), p.experts, p.total(),
                                p.hidden, p.inter, d.w13->as<uint16_t>(), d.w2->as<uint16_t>(),
                                swiglu_epilogue ? nullptr : h.as<uint16_t>(), act.as<uint16_t>(), d.out.as<uint16_t>(),
                                ws.get(), tiles, swiglu_epilogue ? packed.as<uint16_t>() : nullptr);
  lane.sync();
  return download<uint16_t>(d.out, d.out_count);
}

// The weights packed tile by tile (cuda::pack_weight_tiles, poisoned first so that a tile it failed
// to write shows), both GEMMs reading them; the workspace poisoned as above.
std::vector<uint16_t> run_cutlass_weight_tiles(const Lane& lane, const Problem& p, cuda::CutlassTiles tiles) {
  DeviceProblem d(p);
  const std::size_t R = static_cast<std::size_t>(std::max<int64_t>(p.total(), 1));
  DeviceBuffer act(R * p.inter * 2), ws(cuda::cutlass_grouped_workspace_bytes(p.experts));
  ok(cudaMemset(ws.get(), 0xff, cuda::cutlass_grouped_workspace_bytes(p.experts)), "poison workspace");
  ok(cudaMemset(act.get(), 0xff, R * p.inter * 2), "poison act");
  const auto packed_bytes = static_cast<std::size_t>(cuda::weight_tiles_bytes(p.experts, p.hidden, p.inter));
  DeviceBuffer packed(packed_bytes);
  ok(cudaMemset(packed.get(), 0xff, packed_bytes), "poison packed tiles");
  cuda::pack_weight_tiles(d.w13->as<uint16_t>(), d.w2->as<uint16_t>(), p.experts, p.hidden, p.inter,
                          packed.as<uint16_t>(), lane.ctx.stream);
  cuda::experts_cutlass_weight_tiles(lane.ctx, d.rows->as<uint16_t>(), d.offsets->as<int32_t>(), p.experts, p.hidden,
                                     p.inter, packed.as<uint16_t>(), d.w2->as<uint16_t>(), act.as<uint16_t>(),
                                     d.out.as<uint16_t>(), ws.get(), tiles);
  lane.sync();
  return download<uint16_t>(d.out, d.out_count);
}

// The SwiGLU epilogue against the same tiles' unfused GEMM, SwiGLU kernel, GEMM: the same mainloop and
// accumulation order, gate and up rounded to bf16 as h holds them, so the bits must agree.
void check_swiglu_epilogue(const Lane& lane, const Problem& p) {
  for (const auto tiles : {cuda::CutlassTiles::narrow, cuda::CutlassTiles::wide_single, cuda::CutlassTiles::narrow_pair}) {
    const char* which = tiles == cuda::CutlassTiles::narrow        ? "narrow"
                        : tiles == cuda::CutlassTiles::wide_single ? "wide, no cluster"
                                                                   : "narrow, 2x1 clusters";
    const std::vector<uint16_t> fused = run_cutlass(lane, p, tiles, true);
    EXPECT_EQ(fused, run_cutlass(lane, p, tiles)) << "SwiGLU epilogue, " << which << ", against the unfused GEMMs";
    EXPECT_EQ(fused, run_cutlass(lane, p, tiles, true)) << "SwiGLU epilogue, " << which << ": rerun differs";
    // Only where B comes from differs (the same tiles, the same accumulation order): the same bits.
    EXPECT_EQ(fused, run_cutlass_weight_tiles(lane, p, tiles)) << "weights packed tile by tile, " << which;
  }
}

constexpr double kBf16Tolerance = 1e-2;

// Each strategy against the reference, and the strategies against each other.
void check_all_strategies(const std::vector<int>& counts, int hidden, int inter) {
  const Problem p = make_problem(counts, hidden, inter);
  ASSERT_GT(p.total(), 0);
  const std::vector<double> ref = reference(p);
  Lane lane;
  const std::vector<double> loop = widen(run_loop(lane, p));
  const std::vector<double> grouped = widen(run_grouped(lane, p));
  const std::vector<double> padded_max = widen(run_padded(lane, p, p.total()));  // capacity = max tokens
  const std::vector<double> padded_tight = widen(run_padded(lane, p, p.max_count()));
  EXPECT_EQ(lane.flag(), 0);
  EXPECT_LT(rel_error(loop, ref), kBf16Tolerance) << "per-expert loop";
  EXPECT_LT(rel_error(grouped, ref), kBf16Tolerance) << "grouped batched";
  EXPECT_LT(rel_error(padded_max, ref), kBf16Tolerance) << "padded, capacity = total rows";
  EXPECT_LT(rel_error(padded_tight, ref), kBf16Tolerance) << "padded, capacity = largest expert";
  EXPECT_LT(rel_error(grouped, loop), kBf16Tolerance) << "grouped vs loop";
  EXPECT_LT(rel_error(padded_max, loop), kBf16Tolerance) << "padded vs loop";
  EXPECT_LT(rel_error(padded_tight, grouped), kBf16Tolerance) << "padded vs grouped";
  if (const std::string why = cuda::cutlass_grouped_unsupported(hidden, inter); why.empty()) {
    for (const auto tiles : {cuda::CutlassTiles::general, cuda::CutlassTiles::wide, cuda::CutlassTiles::narrow,
                             cuda::CutlassTiles::wide_single, cuda::CutlassTiles::narrow_pair}) {
      const char* which = tiles == cuda::CutlassTiles::wide          ? "cutlass wide"
                          : tiles == cuda::CutlassTiles::narrow      ? "cutlass narrow"
                          : tiles == cuda::CutlassTiles::wide_single ? "cutlass wide, no cluster"
                          : tiles == cuda::CutlassTiles::narrow_pair ? "cutlass narrow, 2x1 clusters"
                                                                     : "cutlass general";
      const std::vector<uint16_t> cutlass_bits = run_cutlass(lane, p, tiles);
      EXPECT_LT(rel_error(widen(cutlass_bits), ref), kBf16Tolerance) << which;
      EXPECT_LT(rel_error(widen(cutlass_bits), loop), kBf16Tolerance) << which << " vs loop";
      EXPECT_EQ(cutlass_bits, run_cutlass(lane, p, tiles)) << which << " rerun differs";
    }
    if (hidden % 8 == 0 && inter % 8 == 0) check_swiglu_epilogue(lane, p);
  } else {
    std::printf("    cutlass grouped not run: %s\n", why.c_str());
  }
  if (cuda::decode_experts_supported(hidden, inter)) {
    const std::vector<uint16_t> decode_bits = run_decode(lane, p, /*extra_rows=*/3);
    const std::vector<uint16_t> routed(decode_bits.begin(), decode_bits.begin() + static_cast<std::ptrdiff_t>(ref.size()));
    EXPECT_LT(rel_error(widen(routed), ref), kBf16Tolerance) << "decode kernel";
    EXPECT_LT(rel_error(widen(routed), grouped), kBf16Tolerance) << "decode vs grouped";
    for (std::size_t i = ref.size(); i < decode_bits.size(); ++i) ASSERT_EQ(decode_bits[i], 0) << "unrouted row element " << i;
    EXPECT_EQ(decode_bits, run_decode(lane, p, 3)) << "decode rerun differs";
  }
}

}  // namespace

TEST(CublasExperts, ZeroTokenExperts) {
  if (moeflow::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  check_all_strategies({5, 0, 17, 0, 3, 9}, 72, 40);
}

TEST(CublasExperts, AllRowsOnOneExpert) {
  if (moeflow::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  check_all_strategies({0, 0, 23, 0}, 72, 40);
}

TEST(CublasExperts, SingleToken) {
  if (moeflow::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  check_all_strategies({0, 1, 0}, 72, 40);
}

TEST(CublasExperts, HiddenNotAMultipleOfEight) {
  if (moeflow::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  check_all_strategies({4, 0, 7, 1}, 36, 20);  // padded strategy takes its scalar (2-byte) copy path
}

TEST(CublasExperts, CiSizedRandomCounts) {
  if (moeflow::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  check_all_strategies({7, 0, 31, 2, 0, 12, 1, 19}, 256, 128);
}

TEST(CublasExperts, MoreRowsThanATileAndSizesThatAreNoTileMultiple) {
  if (moeflow::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  // 128x128x64 tiles: experts of 1, 129 and 300 rows, N = 2I = 272 and H = 200, K not a multiple of 64.
  check_all_strategies({300, 0, 129, 1, 0, 77}, 200, 136);
}

// Random counts over many experts, a few hundred rows each (several row tiles, ragged), I neither a
// multiple of the packing's 128 features nor of a tile: the fused GEMM 1 against the unfused one.
// H = 136 is three k-tiles, fewer than the 128x256 tiles' held stores have slices (the rest follow
// the mainloop), with more tiles than SMs so that blocks take several.
TEST(CublasExperts, SwigluEpilogueMatchesTheUnfusedGemmsOnLargeRandomShapes) {
  if (moeflow::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  if (const std::string why = cuda::cutlass_grouped_unsupported(520, 200); !why.empty()) GTEST_SKIP() << why;
  std::mt19937 rng(20261123);
  Lane lane;
  for (const auto& [hidden, inter] :
       {std::pair{520, 200}, std::pair{1024, 384}, std::pair{264, 520}, std::pair{136, 520}}) {
    std::vector<int> counts(12);
    for (int& c : counts) c = std::uniform_int_distribution<int>(0, 5)(rng) == 0 ? 0 : std::uniform_int_distribution<int>(1, 700)(rng);
    SCOPED_TRACE("H = " + std::to_string(hidden) + ", I = " + std::to_string(inter));
    check_swiglu_epilogue(lane, make_problem(counts, hidden, inter));
  }
}

TEST(CublasExperts, PackedW13InterleavesGateAndUpBy128Rows) {
  if (moeflow::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const int experts = 2, hidden = 16, inter = 136;  // two blocks of 128 features, the second mostly padding
  const Problem p = make_problem({1, 1}, hidden, inter);
  DeviceProblem d(p);
  const auto bytes = static_cast<std::size_t>(cuda::packed_w13_bytes(experts, hidden, inter));
  ASSERT_EQ(bytes, std::size_t{2} * 2 * 256 * hidden * 2);
  DeviceBuffer packed(bytes);
  ok(cudaMemset(packed.get(), 0xff, bytes), "poison");
  Lane lane;
  cuda::pack_w13_interleaved(d.w13->as<uint16_t>(), experts, hidden, inter, packed.as<uint16_t>(), lane.ctx.stream);
  lane.sync();
  const std::vector<uint16_t> w13 = download<uint16_t>(*d.w13, static_cast<std::size_t>(experts) * 2 * inter * hidden);
  const std::vector<uint16_t> got = download<uint16_t>(packed, bytes / 2);
  for (int e = 0; e < experts; ++e)
    for (int row = 0; row < 512; ++row) {
      const int block = row / 256, r = row % 256, feature = block * 128 + r % 128;
      for (int k = 0; k < hidden; ++k) {
        const uint16_t want = feature >= inter ? 0
                              : w13[(static_cast<std::size_t>(e) * 2 * inter + (r < 128 ? feature : inter + feature)) * hidden + k];
        ASSERT_EQ(got[(static_cast<std::size_t>(e) * 512 + row) * hidden + k], want) << "expert " << e << " row " << row << " k " << k;
      }
    }
}

TEST(CublasExperts, CutlassGroupedWithNoRowsWritesNothing) {
  if (moeflow::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  if (const std::string why = cuda::cutlass_grouped_unsupported(72, 40); !why.empty()) GTEST_SKIP() << why;
  const Problem p = make_problem({0, 0, 0}, 72, 40);
  Lane lane;
  EXPECT_TRUE(run_cutlass(lane, p).empty());
}

TEST(CublasExperts, NoRowsAtAllIsANoOp) {
  if (moeflow::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const Problem p = make_problem({0, 0, 0}, 72, 40);
  Lane lane;
  EXPECT_TRUE(run_loop(lane, p).empty());
  EXPECT_TRUE(run_grouped(lane, p).empty());
  EXPECT_TRUE(run_padded(lane, p, 4).empty());
  EXPECT_EQ(lane.flag(), 0);
}

TEST(CublasExperts, GroupedReusesItsPointerScratchAcrossCalls) {
  if (moeflow::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  // Two calls back to back through the same host and device scratch: the second rewrites the host
  // scratch as soon as the first returns, which the function's own fence makes safe.
  const Problem a = make_problem({3, 0, 8, 5}, 72, 40, 11);
  const Problem b = make_problem({0, 9, 1, 0}, 72, 40, 12);
  Lane lane;
  DeviceBuffer dev_ptrs(cuda::grouped_pointer_bytes(4));
  PinnedBuffer host_ptrs(cuda::grouped_pointer_bytes(4));
  DeviceProblem da(a), db(b);
  DeviceBuffer ha(static_cast<std::size_t>(a.total()) * 2 * 40 * 2), acta(static_cast<std::size_t>(a.total()) * 40 * 2);
  DeviceBuffer hb(static_cast<std::size_t>(b.total()) * 2 * 40 * 2), actb(static_cast<std::size_t>(b.total()) * 40 * 2);
  cuda::experts_grouped_batched(lane.ctx, da.rows->as<uint16_t>(), a.offsets.data(), 4, 72, 40, da.w13->as<uint16_t>(),
                                da.w2->as<uint16_t>(), ha.as<uint16_t>(), acta.as<uint16_t>(), da.out.as<uint16_t>(),
                                dev_ptrs.get(), host_ptrs.get());
  cuda::experts_grouped_batched(lane.ctx, db.rows->as<uint16_t>(), b.offsets.data(), 4, 72, 40, db.w13->as<uint16_t>(),
                                db.w2->as<uint16_t>(), hb.as<uint16_t>(), actb.as<uint16_t>(), db.out.as<uint16_t>(),
                                dev_ptrs.get(), host_ptrs.get());
  lane.sync();
  EXPECT_LT(rel_error(widen(download<uint16_t>(da.out, da.out_count)), reference(a)), kBf16Tolerance);
  EXPECT_LT(rel_error(widen(download<uint16_t>(db.out, db.out_count)), reference(b)), kBf16Tolerance);
}

TEST(CublasExperts, PaddedOverflowRaisesTheFlag) {
  if (moeflow::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const Problem p = make_problem({5, 2, 9}, 72, 40);
  const std::vector<double> ref = reference(p);
  Lane lane;
  const std::vector<double> y = widen(run_padded(lane, p, 6));  // expert 2 has 9 > 6 rows
  EXPECT_EQ(lane.flag() & cuda::kErrorCapacityOverflow, cuda::kErrorCapacityOverflow);
  // The experts within capacity, and expert 2's first 6 rows, are still computed.
  const std::size_t H = 72;
  EXPECT_LT(rel_error(y, ref, 0, static_cast<std::size_t>(p.offsets[2] + 6) * H), kBf16Tolerance);

  lane.clear_flag();
  (void)run_padded(lane, p, 0);  // no capacity at all: still flagged, nothing computed
  EXPECT_EQ(lane.flag() & cuda::kErrorCapacityOverflow, cuda::kErrorCapacityOverflow);

  lane.clear_flag();
  (void)run_padded(lane, p, 9);  // exactly enough
  EXPECT_EQ(lane.flag(), 0);
}

TEST(CublasExperts, PaddedReplaysFromOneCapturedGraphForAnyRouting) {
  if (moeflow::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  // The padded strategy reads its offsets on the device: one graph, captured once, serves a new
  // routing written into the same buffers. The grouped strategy, captured too, replays as recorded.
  const Problem a = make_problem({6, 0, 11, 3}, 72, 40, 5);
  const Problem b = make_problem({1, 9, 0, 12}, 72, 40, 5);  // same weights (same seed and shapes)
  ASSERT_EQ(a.w13, b.w13);
  const int64_t capacity = 12, max_rows = 22;
  const std::size_t H = 72, I = 40;
  Lane lane;
  DeviceProblem d(a);
  DeviceBuffer rows(max_rows * H * 2), out(max_rows * H * 2), grouped_out(max_rows * H * 2);
  DeviceBuffer scratch(cuda::padded_scratch_bytes(4, capacity, 72, 40));
  DeviceBuffer h(max_rows * 2 * I * 2), act(max_rows * I * 2);
  DeviceBuffer dev_ptrs(cuda::grouped_pointer_bytes(4));
  PinnedBuffer host_ptrs(cuda::grouped_pointer_bytes(4));
  ok(cudaMemcpy(rows.get(), a.rows.data(), a.rows.size() * 2, cudaMemcpyHostToDevice), "rows");
  auto issue = [&] {
    cuda::experts_padded_strided_batched(lane.ctx, rows.as<uint16_t>(), d.offsets->as<int32_t>(), 4, capacity, 72, 40,
                                         d.w13->as<uint16_t>(), d.w2->as<uint16_t>(), scratch.get(), out.as<uint16_t>());
    cuda::experts_grouped_batched(lane.ctx, rows.as<uint16_t>(), a.offsets.data(), 4, 72, 40, d.w13->as<uint16_t>(),
                                  d.w2->as<uint16_t>(), h.as<uint16_t>(), act.as<uint16_t>(),
                                  grouped_out.as<uint16_t>(), dev_ptrs.get(), host_ptrs.get());
  };
  issue();  // eager first: loads cuBLAS's kernels outside the capture
  lane.sync();
  ok(cudaMemset(out.get(), 0xff, max_rows * H * 2), "poison");
  ok(cudaMemset(grouped_out.get(), 0xff, max_rows * H * 2), "poison");
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  ok(cudaStreamBeginCapture(lane.ctx.stream, cudaStreamCaptureModeThreadLocal), "begin capture");
  issue();
  ok(cudaStreamEndCapture(lane.ctx.stream, &graph), "end capture");
  ok(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
  ok(cudaGraphLaunch(exec, lane.ctx.stream), "launch");
  lane.sync();
  const std::size_t na = static_cast<std::size_t>(a.total()) * H;
  EXPECT_LT(rel_error(widen(download<uint16_t>(out, na)), reference(a)), kBf16Tolerance) << "padded, routing a";
  EXPECT_LT(rel_error(widen(download<uint16_t>(grouped_out, na)), reference(a)), kBf16Tolerance) << "grouped replay";

  // A new routing in the same buffers, the same graph.
  ok(cudaMemcpy(rows.get(), b.rows.data(), b.rows.size() * 2, cudaMemcpyHostToDevice), "rows b");
  ok(cudaMemcpy(d.offsets->get(), b.offsets.data(), b.offsets.size() * 4, cudaMemcpyHostToDevice), "offsets b");
  ok(cudaMemset(out.get(), 0xff, max_rows * H * 2), "poison");
  ok(cudaGraphLaunch(exec, lane.ctx.stream), "relaunch");
  lane.sync();
  const std::size_t nb = static_cast<std::size_t>(b.total()) * H;
  EXPECT_LT(rel_error(widen(download<uint16_t>(out, nb)), reference(b)), kBf16Tolerance) << "padded, routing b";
  EXPECT_EQ(lane.flag(), 0);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
}

namespace {

struct DenseCase {
  int m, n, k;
  std::vector<uint16_t> a, b;
  std::vector<double> ref;
};

// A[m, k] and B[n, k] from the counter-based generator (B scaled by 1/sqrt(k)) and their fp64 product.
DenseCase dense_case(int m, int n, int k, uint64_t seed, const char* b_name = "w") {
  DenseCase d{m, n, k, random_bf16(static_cast<std::size_t>(m) * k, "x", 1.0f, seed),
              random_bf16(static_cast<std::size_t>(n) * k, b_name, 1.0f / std::sqrt(static_cast<float>(k)), seed), {}};
  d.ref.assign(static_cast<std::size_t>(m) * n, 0.0);
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      double s = 0;
      for (int l = 0; l < k; ++l)
        s += static_cast<double>(bf16_to_float(d.a[static_cast<std::size_t>(i) * k + l])) *
             bf16_to_float(d.b[static_cast<std::size_t>(j) * k + l]);
      d.ref[static_cast<std::size_t>(i) * n + j] = s;
    }
  return d;
}

void check_dense(int64_t m, int64_t n, int64_t k, bool f32, double tolerance) {
  const DenseCase d = dense_case(static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), 3, "gate.weight");
  const std::vector<double>& ref = d.ref;
  Lane lane;
  auto da = upload(d.a), db = upload(d.b);
  DeviceBuffer c(static_cast<std::size_t>(m * n) * (f32 ? 4 : 2));
  cuda::gemm_bf16_nt(lane.ctx, m, n, k, da->as<uint16_t>(), db->as<uint16_t>(), c.get(), f32);
  lane.sync();
  std::vector<double> y;
  if (f32) {
    const std::vector<float> host = download<float>(c, ref.size());
    y.assign(host.begin(), host.end());
  } else {
    y = widen(download<uint16_t>(c, ref.size()));
  }
  EXPECT_LT(rel_error(y, ref), tolerance) << "m=" << m << " n=" << n << " k=" << k << (f32 ? " fp32" : " bf16");
}

}  // namespace

TEST(CublasGemm, RouterLogitsInFp32) {
  if (moeflow::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  check_dense(33, 8, 72, true, 1e-5);
  check_dense(1, 60, 256, true, 1e-5);
}

TEST(CublasGemm, SharedExpertShapesInBf16) {
  if (moeflow::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  check_dense(5, 200, 256, false, kBf16Tolerance);
  check_dense(37, 80, 72, false, kBf16Tolerance);
}

TEST(CublasGemm, NoRowsIsANoOp) {
  if (moeflow::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  Lane lane;
  DeviceBuffer b(8 * 72 * 2);
  EXPECT_NO_THROW(cuda::gemm_bf16_nt(lane.ctx, 0, 8, 72, nullptr, b.as<uint16_t>(), nullptr, true));
  lane.sync();
}

// gemm_nt_measured (kernels/cuda/measured_gemm.hpp): the algorithm cuBLASLt's candidates are timed
// for, per bucket of row counts, against the fp64 reference; a second row count of a measured
// bucket runs the kept choice without timing again; repeated calls give the same bytes; under stream
// capture nothing is timed and the replay is still right.
namespace {

// The product through gemm_nt_measured on the lane, waited for and read back as bytes.
std::vector<uint8_t> measured_bytes(const Lane& lane, const DenseCase& d, bool f32, const DeviceBuffer& da,
                                    const DeviceBuffer& db, const DeviceBuffer& c) {
  cuda::gemm_nt_measured(lane.ctx, d.m, d.n, d.k, da.get(), d.k, db.get(), d.k, c.get(), f32, d.n);
  lane.sync();
  return download<uint8_t>(c, static_cast<std::size_t>(d.m) * d.n * (f32 ? 4 : 2));
}

std::vector<double> as_values(const std::vector<uint8_t>& bytes, bool f32) {
  std::vector<double> v(bytes.size() / (f32 ? 4 : 2));
  for (std::size_t i = 0; i < v.size(); ++i) {
    if (f32) {
      float f;
      std::memcpy(&f, bytes.data() + 4 * i, 4);
      v[i] = f;
    } else {
      uint16_t h;
      std::memcpy(&h, bytes.data() + 2 * i, 2);
      v[i] = bf16_to_float(h);
    }
  }
  return v;
}

}  // namespace

TEST(MeasuredGemm, MatchesTheReferenceAcrossABucketAndRepeatsBitForBit) {
  if (moeflow::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  Lane lane;
  for (const bool f32 : {false, true}) {
    // 40 and 64 rows share a bucket (33..64); 65 starts the next one. n = 392 + f32 keeps the shapes
    // of the two output types apart.
    const int n = f32 ? 393 : 392, k = 264;
    const int before = cuda::measured_gemm_stats().buckets_measured;
    for (const int m : {40, 64, 65, 33}) {
      const DenseCase d = dense_case(m, n, k, 11 + m);
      auto da = upload(d.a), db = upload(d.b);
      DeviceBuffer c(static_cast<std::size_t>(m) * n * 4);
      const std::vector<uint8_t> first = measured_bytes(lane, d, f32, *da, *db, c);
      EXPECT_LT(rel_error(as_values(first, f32), d.ref), f32 ? 1e-5 : kBf16Tolerance) << "m=" << m << " f32=" << f32;
      EXPECT_EQ(first, measured_bytes(lane, d, f32, *da, *db, c)) << "m=" << m << ": a repeated call differs";
    }
    // Two buckets measured: 40 measured the first, 64 and 33 ran its choice, 65 measured the second.
    EXPECT_EQ(cuda::measured_gemm_stats().buckets_measured, before + 2) << "f32=" << f32;
  }
  // From kMeasuredBelowRows rows cuBLAS's own choice runs, untimed.
  const int before_large = cuda::measured_gemm_stats().buckets_measured;
  const DenseCase large = dense_case(cuda::kMeasuredBelowRows, 40, 24, 3);
  auto la = upload(large.a), lb = upload(large.b);
  DeviceBuffer lc(large.ref.size() * 4);
  EXPECT_LT(rel_error(as_values(measured_bytes(lane, large, true, *la, *lb, lc), true), large.ref), 1e-5);
  EXPECT_EQ(cuda::measured_gemm_stats().buckets_measured, before_large);
  EXPECT_FALSE(cuda::measured_gemm_stats().last_call_switched);
  EXPECT_NO_THROW(cuda::gemm_nt_measured(lane.ctx, 0, 8, 72, nullptr, 72, nullptr, 72, nullptr, false, 8));
  EXPECT_THROW(cuda::gemm_nt_measured(lane.ctx, 4, 8, 0, nullptr, 72, nullptr, 72, nullptr, false, 8), Error);
}

TEST(MeasuredGemm, UnderCaptureTimesNothingAndTheReplayIsRight) {
  if (moeflow::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  Lane lane;
  const DenseCase d = dense_case(21, 136, 200, 5);  // a shape no other test measures
  auto da = upload(d.a), db = upload(d.b);
  DeviceBuffer c(static_cast<std::size_t>(d.m) * d.n * 2);
  const int before = cuda::measured_gemm_stats().buckets_measured;
  cudaGraph_t graph = nullptr;
  ok(cudaStreamBeginCapture(lane.ctx.stream, cudaStreamCaptureModeThreadLocal), "begin capture");
  cuda::gemm_nt_measured(lane.ctx, d.m, d.n, d.k, da->get(), d.k, db->get(), d.k, c.get(), false, d.n);
  ok(cudaStreamEndCapture(lane.ctx.stream, &graph), "end capture");
  EXPECT_EQ(cuda::measured_gemm_stats().buckets_measured, before);
  cudaGraphExec_t exec = nullptr;
  ok(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
  ok(cudaMemset(c.get(), 0, static_cast<std::size_t>(d.m) * d.n * 2), "clear");
  ok(cudaGraphLaunch(exec, lane.ctx.stream), "launch");
  lane.sync();
  EXPECT_LT(rel_error(widen(download<uint16_t>(c, d.ref.size())), d.ref), kBf16Tolerance);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
}
