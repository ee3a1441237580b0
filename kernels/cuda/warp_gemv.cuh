#pragma once
// The inner loops of our matrix-vector kernels (decode_experts.cu, fused_decode.cu): a warp streams a
// few weight rows of one expert with 16-byte loads and multiplies them with up to kRows activation
// rows, fp32 accumulation, each lane holding partial sums that warp_sum finishes in a fixed order.
#include <cstdint>

#include "kernels/cuda/bf16_vec.cuh"

namespace moeflow::cuda {

// Butterfly sum over the warp: every lane ends with the total, in a fixed order.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float dot8(const float a[8], const float b[8], float acc) {
#pragma unroll
  for (int i = 0; i < 8; ++i) acc = fmaf(a[i], b[i], acc);
  return acc;
}

// σ(x · gate) of one token's row (Qwen2-MoE's shared-expert gate), `vecs` 16-byte vectors of bf16
// each, summed by one warp in a fixed order: every lane returns it.
__device__ __forceinline__ float warp_sigmoid_gate(const uint4* x, const uint4* gate, int vecs, int lane) {
  float acc = 0.0f;
  for (int i = lane; i < vecs; i += 32) {
    float xv[8], gv[8];
    unpack8(__ldg(x + i), xv);
    unpack8(__ldg(gate + i), gv);
    acc = dot8(xv, gv, acc);
  }
  return 1.0f / (1.0f + __expf(-warp_sum(acc)));
}

// Where the activation rows are: one after another (the permuted rows of the decode kernels), or
// anywhere (the fused kernel reads each choice's token row of x in place). Contiguous rows keep the
// address arithmetic the compiler strength-reduces (measured on the H100: a pointer per row in the
// decode kernels took 94 instead of 78 registers and 3-5% longer).
struct ContiguousRows {
  const uint4* base;
  int stride;  // in 16-byte vectors
  __device__ __forceinline__ const uint4* operator()(int q) const { return base + static_cast<int64_t>(q) * stride; }
};
template <int kRows>
struct GatheredRows {
  const uint4* row[kRows];
  __device__ __forceinline__ const uint4* operator()(int q) const { return row[q]; }
};

// How activation vectors are loaded: through the read-only path (inputs of the launch), plainly, or
// from L2 (written by other blocks of the same launch, which L1 would not see).
enum class ActLoad { read_only, plain, coherent };

template <ActLoad kLoad>
__device__ __forceinline__ uint4 load_act(const uint4* p) {
  if constexpr (kLoad == ActLoad::coherent) return __ldcg(p);
  else if constexpr (kLoad == ActLoad::plain) return *p;
  else return __ldg(p);
}

// gate[q][o] = w1_{j0+o} · x_q and up[q][o] = w3_{j0+o} · x_q (lane partial sums) for the first
// `count` of kRows rows; w13 is one expert's [2I, H] (gate rows, then up rows `inter` rows further:
// I, or S where w13 points into a wider shared expert's [2S, H]), vecs = H / 8.
template <int kRows, int kOutputs, ActLoad kLoad, class Rows>
__device__ __forceinline__ void gate_up_dot(const uint4* w13, int j0, int inter, int vecs, const Rows& x, int count, int lane,
                                            float (&gate)[kRows][kOutputs], float (&up)[kRows][kOutputs]) {
#pragma unroll 2
  for (int v = lane; v < vecs; v += 32) {
    float wg[kOutputs][8], wu[kOutputs][8];
#pragma unroll
    for (int o = 0; o < kOutputs; ++o) {
      unpack8(__ldg(w13 + static_cast<int64_t>(j0 + o) * vecs + v), wg[o]);
      unpack8(__ldg(w13 + static_cast<int64_t>(inter + j0 + o) * vecs + v), wu[o]);
    }
#pragma unroll
    for (int q = 0; q < kRows; ++q) {
      if (q >= count) break;
      float xv[8];
      unpack8(load_act<kLoad>(x(q) + v), xv);
#pragma unroll
      for (int o = 0; o < kOutputs; ++o) {
        gate[q][o] = dot8(wg[o], xv, gate[q][o]);
        up[q][o] = dot8(wu[o], xv, up[q][o]);
      }
    }
  }
}

// acc[q][o] = w_{h0+o} · act_q (lane partial sums) for the first `count` of kRows rows; w is one
// expert's [H, I], vecs = I / 8, its rows `stride` vectors apart (vecs, or more where w is a slice of
// the columns of a wider matrix: a shared expert folded in as several experts of I).
template <int kRows, int kOutputs, ActLoad kLoad, class Rows>
__device__ __forceinline__ void rows_dot(const uint4* w, int h0, int vecs, int stride, const Rows& act, int count, int lane,
                                         float (&acc)[kRows][kOutputs]) {
#pragma unroll 2
  for (int v = lane; v < vecs; v += 32) {
    float wv[kOutputs][8];
#pragma unroll
    for (int o = 0; o < kOutputs; ++o) unpack8(__ldg(w + static_cast<int64_t>(h0 + o) * stride + v), wv[o]);
#pragma unroll
    for (int q = 0; q < kRows; ++q) {
      if (q >= count) break;
      float av[8];
      unpack8(load_act<kLoad>(act(q) + v), av);
#pragma unroll
      for (int o = 0; o < kOutputs; ++o) acc[q][o] = dot8(wv[o], av, acc[q][o]);
    }
  }
}

}  // namespace moeflow::cuda
