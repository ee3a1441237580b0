#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "graph/error.hpp"
#include "kernels/cuda/bf16_vec.cuh"
#include "kernels/cuda/check.cuh"
#include "kernels/cuda/elementwise.hpp"
#include "kernels/cuda/live_rows.cuh"

namespace moeflow::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kThreadsLog2 = 8;
static_assert(kThreads == 1 << kThreadsLog2);
constexpr int64_t kMaxFlatBlocks = 4096;  // grid-stride beyond: several waves of 132 SMs x 8 blocks

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

unsigned flat_blocks(int64_t work) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, kMaxFlatBlocks)));
}

// Threads per row (a power of two up to the block) and rows per block for `per_row` work items.
struct RowGrid {
  int shift;  // log2(threads per row)
  unsigned blocks;
};

RowGrid row_grid(int64_t rows, int64_t per_row, const char* what) {
  int shift = 0;
  while ((int64_t{1} << shift) < per_row && shift < kThreadsLog2) ++shift;
  const int64_t rpb = int64_t{1} << (kThreadsLog2 - shift);
  const int64_t blocks = (rows + rpb - 1) / rpb;
  if (blocks > 0x7fffffff) fail_input(std::string(what) + ": " + std::to_string(rows) + " rows exceed one grid");
  return {shift, static_cast<unsigned>(blocks)};
}





// ---- swiglu: one row per 2^shift threads ---------------------------------------------------------

template <bool kVec>
__global__ void __launch_bounds__(kThreads)
    swiglu_kernel(const uint16_t* __restrict__ h, int64_t rows, int inter, int shift, uint16_t* __restrict__ act,
                  LiveRows live) {
  const int64_t r = (static_cast<int64_t>(blockIdx.x) << (kThreadsLog2 - shift)) + (threadIdx.x >> shift);
  if (r >= live_bound(live, rows)) return;
  const int sub = static_cast<int>(threadIdx.x) & ((1 << shift) - 1);
  const uint16_t* gate = h + r * 2 * inter;
  const uint16_t* up = gate + inter;
  uint16_t* a = act + r * inter;
  if constexpr (kVec) {
    for (int v = sub; v < inter / 8; v += 1 << shift) {
      float g[8], u[8];
      unpack8(reinterpret_cast<const uint4*>(gate)[v], g);
      unpack8(reinterpret_cast<const uint4*>(up)[v], u);
#pragma unroll
      for (int i = 0; i < 8; ++i) g[i] = silu_mul(g[i], u[i]);
      reinterpret_cast<uint4*>(a)[v] = pack8(g);
    }
  } else {
    for (int i = sub; i < inter; i += 1 << shift)
      a[i] = float_to_bf16_bits(silu_mul(bf16_bits_to_float(gate[i]), bf16_bits_to_float(up[i])));
  }
}

// ---- sigmoid-gated row scale: one block per token ------------------------------------------------

// Each thread sums its own strided elements in a fixed order, then a fixed tree (warp butterfly,
// then warp 0 over the warp sums): the same bits on every run.
template <bool kVec>
__global__ void __launch_bounds__(kThreads)
    gated_scale_kernel(const uint16_t* x, const uint16_t* __restrict__ gate_w, int hidden,
                       uint16_t* y) {  // x may equal y: every read of x precedes the barrier
  __shared__ float warp_sums[kThreads / 32];
  __shared__ float gate;
  const int64_t t = blockIdx.x;
  const int tid = static_cast<int>(threadIdx.x);
  const uint16_t* xt = x + t * hidden;
  uint16_t* yt = y + t * hidden;
  float acc = 0.0f;
  if constexpr (kVec) {
    for (int v = tid; v < hidden / 8; v += kThreads) {
      float a[8], b[8];
      unpack8(reinterpret_cast<const uint4*>(xt)[v], a);
      unpack8(reinterpret_cast<const uint4*>(gate_w)[v], b);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc = fmaf(a[i], b[i], acc);
    }
  } else {
    for (int i = tid; i < hidden; i += kThreads) acc = fmaf(bf16_bits_to_float(xt[i]), bf16_bits_to_float(gate_w[i]), acc);
  }
#pragma unroll
  for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (tid % 32 == 0) warp_sums[tid / 32] = acc;
  __syncthreads();
  if (tid < 32) {
    float s = tid < kThreads / 32 ? warp_sums[tid] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (tid == 0) gate = 1.0f / (1.0f + expf(-s));
  }
  __syncthreads();
  const float g = gate;
  if constexpr (kVec) {
    for (int v = tid; v < hidden / 8; v += kThreads) {
      float a[8];
      unpack8(reinterpret_cast<const uint4*>(yt)[v], a);
#pragma unroll
      for (int i = 0; i < 8; ++i) a[i] *= g;
      reinterpret_cast<uint4*>(yt)[v] = pack8(a);
    }
  } else {
    for (int i = tid; i < hidden; i += kThreads) yt[i] = float_to_bf16_bits(bf16_bits_to_float(yt[i]) * g);
  }
}

// ---- sum of up to 8 arrays ---------------------------------------------------------------------

// Passed by value: the kernel reads the pointers from its parameter space, no device copy needed.
struct Addends {
  const uint16_t* p[kSumRowsMaxAddends];
  int count;
};

// No __restrict__: out may alias p[0] (each element is read by the thread that then writes it).
template <bool kVec>
__global__ void __launch_bounds__(kThreads) sum_kernel(Addends in, int64_t n, uint16_t* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  int64_t scalar_from = 0;
  if constexpr (kVec) {
    const int64_t nv = n / 8;
    for (int64_t v = first; v < nv; v += stride) {
      float acc[8], f[8];
      unpack8(reinterpret_cast<const uint4*>(in.p[0])[v], acc);
#pragma unroll
      for (int a = 1; a < kSumRowsMaxAddends; ++a) {  // unrolled: a run-time index would copy p to the stack
        if (a < in.count) {
          unpack8(reinterpret_cast<const uint4*>(in.p[a])[v], f);
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[i] += f[i];
        }
      }
      reinterpret_cast<uint4*>(out)[v] = pack8(acc);
    }
    scalar_from = nv * 8;
  }
  for (int64_t i = scalar_from + first; i < n; i += stride) {
    float acc = bf16_bits_to_float(in.p[0][i]);
#pragma unroll
    for (int a = 1; a < kSumRowsMaxAddends; ++a)
      if (a < in.count) acc += bf16_bits_to_float(in.p[a][i]);
    out[i] = float_to_bf16_bits(acc);
  }
}

// ---- conversions: one kernel for both directions ------------------------------------------------

__device__ __forceinline__ float to_f32(float f) { return f; }
__device__ __forceinline__ float to_f32(uint16_t b) { return bf16_bits_to_float(b); }
__device__ __forceinline__ void store(float* out, int64_t i, float f) { out[i] = f; }
__device__ __forceinline__ void store(uint16_t* out, int64_t i, float f) { out[i] = float_to_bf16_bits(f); }

// Element group v (8 values) as fp32: 16-byte bf16 loads or two 16-byte fp32 loads, and back.
__device__ __forceinline__ void load8(const float* in, int64_t v, float f[8]) {
  const float4 a = reinterpret_cast<const float4*>(in)[2 * v];
  const float4 b = reinterpret_cast<const float4*>(in)[2 * v + 1];
  f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
}
__device__ __forceinline__ void load8(const uint16_t* in, int64_t v, float f[8]) {
  unpack8(reinterpret_cast<const uint4*>(in)[v], f);
}
__device__ __forceinline__ void store8(float* out, int64_t v, const float f[8]) {
  reinterpret_cast<float4*>(out)[2 * v] = make_float4(f[0], f[1], f[2], f[3]);
  reinterpret_cast<float4*>(out)[2 * v + 1] = make_float4(f[4], f[5], f[6], f[7]);
}
__device__ __forceinline__ void store8(uint16_t* out, int64_t v, const float f[8]) {
  reinterpret_cast<uint4*>(out)[v] = pack8(f);
}

template <bool kVec, class From, class To>
__global__ void __launch_bounds__(kThreads) convert_kernel(const From* __restrict__ in, int64_t n, To* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  int64_t scalar_from = 0;
  if constexpr (kVec) {
    const int64_t nv = n / 8;
    for (int64_t v = first; v < nv; v += stride) {
      float f[8];
      load8(in, v, f);
      store8(out, v, f);
    }
    scalar_from = nv * 8;
  }
  for (int64_t i = scalar_from + first; i < n; i += stride) store(out, i, to_f32(in[i]));
}

void check_nonnegative(const char* what, int64_t a, const char* a_name, int64_t b, const char* b_name) {
  if (a < 0 || b < 0)
    fail_input(std::string(what) + ": " + a_name + " = " + std::to_string(a) + ", " + b_name + " = " +
               std::to_string(b));
}

}  // namespace

void swiglu(const uint16_t* h, int64_t rows, int intermediate, uint16_t* act, Stream stream, LiveRows live) {
  check_nonnegative("cuda swiglu", rows, "rows", intermediate, "intermediate");
  if (rows == 0 || intermediate == 0) return;
  const bool vec = intermediate % 8 == 0 && aligned16(h) && aligned16(act);
  const RowGrid g = row_grid(rows, vec ? intermediate / 8 : intermediate, "cuda swiglu");
  if (vec) swiglu_kernel<true><<<g.blocks, kThreads, 0, stream>>>(h, rows, intermediate, g.shift, act, live);
  else swiglu_kernel<false><<<g.blocks, kThreads, 0, stream>>>(h, rows, intermediate, g.shift, act, live);
  MOEFLOW_CUDA_LAUNCH_CHECK();
}

void scale_rows_by_sigmoid_gate(const uint16_t* x, const uint16_t* gate_w, int64_t tokens, int hidden, uint16_t* y,
                                Stream stream) {
  check_nonnegative("cuda scale_rows_by_sigmoid_gate", tokens, "tokens", hidden, "hidden");
  if (tokens == 0 || hidden == 0) return;
  if (tokens > 0x7fffffff) fail_input("cuda scale_rows_by_sigmoid_gate: " + std::to_string(tokens) + " tokens exceed one grid");
  const bool vec = hidden % 8 == 0 && aligned16(x) && aligned16(gate_w) && aligned16(y);
  const unsigned blocks = static_cast<unsigned>(tokens);
  if (vec) gated_scale_kernel<true><<<blocks, kThreads, 0, stream>>>(x, gate_w, hidden, y);
  else gated_scale_kernel<false><<<blocks, kThreads, 0, stream>>>(x, gate_w, hidden, y);
  MOEFLOW_CUDA_LAUNCH_CHECK();
}

void sum_rows(const uint16_t* const* addends, int count, int64_t elements, uint16_t* out, Stream stream) {
  if (count < 0 || count > kSumRowsMaxAddends)
    fail_input("cuda sum_rows: " + std::to_string(count) + " addends, at most " + std::to_string(kSumRowsMaxAddends));
  check_nonnegative("cuda sum_rows", elements, "elements", count, "count");
  if (elements == 0) return;
  if (count == 0) {  // as cpu::sum_arrays: an empty sum is zero
    MOEFLOW_CUDA_CHECK(cudaMemsetAsync(out, 0, sizeof(uint16_t) * static_cast<size_t>(elements), stream));
    return;
  }
  // One addend whose bytes the output already is (the memory planner put a layer's reduce in place
  // over its routed output where no shared expert adds to it): the sum is there, so nothing is
  // launched (one launch less per layer; bf16 -> fp32 -> bf16 would have rewritten the same bits).
  if (count == 1 && addends[0] == out) return;
  Addends in{};
  bool vec = aligned16(out);
  for (int a = 0; a < count; ++a) {
    in.p[a] = addends[a];
    vec = vec && aligned16(addends[a]);
  }
  in.count = count;
  const unsigned blocks = flat_blocks(vec ? std::max<int64_t>(elements / 8, elements % 8) : elements);
  if (vec) sum_kernel<true><<<blocks, kThreads, 0, stream>>>(in, elements, out);
  else sum_kernel<false><<<blocks, kThreads, 0, stream>>>(in, elements, out);
  MOEFLOW_CUDA_LAUNCH_CHECK();
}

namespace {

template <class From, class To>
void convert(const char* what, const From* in, int64_t n, To* out, Stream stream) {
  check_nonnegative(what, n, "n", 0, "-");
  if (n == 0) return;
  const bool vec = aligned16(in) && aligned16(out);
  const unsigned blocks = flat_blocks(vec ? std::max<int64_t>(n / 8, n % 8) : n);
  if (vec) convert_kernel<true><<<blocks, kThreads, 0, stream>>>(in, n, out);
  else convert_kernel<false><<<blocks, kThreads, 0, stream>>>(in, n, out);
  MOEFLOW_CUDA_LAUNCH_CHECK();
}

}  // namespace

void convert_f32_to_bf16(const float* in, int64_t n, uint16_t* out, Stream stream) {
  convert("cuda convert_f32_to_bf16", in, n, out, stream);
}

void convert_bf16_to_f32(const uint16_t* in, int64_t n, float* out, Stream stream) {
  convert("cuda convert_bf16_to_f32", in, n, out, stream);
}

}  // namespace moeflow::cuda
