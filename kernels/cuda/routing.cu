#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "graph/error.hpp"
#include "kernels/cuda/bf16_vec.cuh"
#include "kernels/cuda/check.cuh"
#include "kernels/cuda/dependent_launch.cuh"
#include "kernels/cuda/grid_sync.cuh"
#include "kernels/cuda/routing.hpp"

namespace moeflow::cuda {

namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kExpertsPerLane = kRouteMaxExperts / 32;  // 16: a lane's eligibility mask fits 32 bits
constexpr uint32_t kNone = 0xffffffffu;

struct RouteParams {
  int experts;
  int top_k;
  int n_group;
  int topk_group;
  int group_size;
  bool sigmoid;
  bool grouped;    // groups are scored and some dropped
  bool group_max;  // group score = max (group_limited_greedy); else sum of the top two (noaux_tc)
  bool use_bias;
  bool renormalize;
  float renorm_epsilon;
  float scale;
  int warp_words;  // shared-memory words per warp
};

// The host's ordering (routing.cpp `better`): higher value first, then the lower index.
__device__ __forceinline__ bool better(float va, int ia, float vb, int ib) {
  return va > vb || (va == vb && ia < ib);
}

// Monotone map of a float onto uint32 (a > b as floats iff key(a) > key(b), NaNs aside), so the warp
// can pick a maximum with one __reduce_max_sync. -0 is folded onto +0: they compare equal as floats
// and must tie here too.
__device__ __forceinline__ uint32_t order_key(float v) {
  if (v == 0.0f) v = 0.0f;
  const uint32_t u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Best remaining candidate of this lane (experts lane, lane + 32, ...; `avail` bit j = expert
// lane + 32 j). The first maximum in j order wins: the lowest index among equals.
__device__ __forceinline__ void lane_best(const float* choice, int lane, uint32_t avail, uint32_t& best_key,
                                          uint32_t& best_expert) {
  best_key = 0;
  best_expert = kNone;
#pragma unroll
  for (int j = 0; j < kExpertsPerLane; ++j) {
    if (avail & (1u << j)) {
      const int e = lane + 32 * j;
      const uint32_t key = order_key(choice[e]);
      if (best_expert == kNone || key > best_key) {
        best_key = key;
        best_expert = static_cast<uint32_t>(e);
      }
    }
  }
}

// Token t's routing by one warp. Its shared memory (p.warp_words words): scores[E], choice[E]
// (biased rules only; otherwise choice aliases scores), then for grouped rules gscore[n_group] and
// kept[n_group]. kFromL2: the logits were written by other blocks of this launch (L1 would not see
// them), so they are read from L2.
template <bool kFromL2>
__device__ void route_token(const RouteParams& p, const float* __restrict__ logits, const float* __restrict__ bias,
                            int64_t t, int32_t* __restrict__ ids, float* __restrict__ weights, float* scores, int lane) {
  const int n = p.experts;
  float* choice = p.use_bias ? scores + n : scores;
  float* gscore = scores + (p.use_bias ? 2 * n : n);
  int* kept = reinterpret_cast<int*>(gscore + p.n_group);
  const float* row = logits + t * n;
  auto logit = [&](int e) { return kFromL2 ? __ldcg(row + e) : row[e]; };

  // Scores, exactly as routing.cpp computes them (the same operations in the same order).
  if (p.sigmoid) {
    for (int e = lane; e < n; e += 32) scores[e] = 1.0f / (1.0f + expf(-logit(e)));
  } else {
    float m = -__int_as_float(0x7f800000);
    for (int e = lane; e < n; e += 32) m = fmaxf(m, logit(e));
#pragma unroll
    for (int o = 16; o > 0; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    for (int e = lane; e < n; e += 32) scores[e] = expf(logit(e) - m);
    __syncwarp();
    // The host sums in expert order; a tree sum would differ in the last bits, so one lane adds
    // serially (at most 512 dependent adds, small next to the gate's GEMM).
    float sum = 0.0f;
    if (lane == 0) {
#pragma unroll 8
      for (int e = 0; e < n; ++e) sum += scores[e];
    }
    sum = __shfl_sync(0xffffffffu, sum, 0);
    const float inv = 1.0f / sum;
    for (int e = lane; e < n; e += 32) scores[e] *= inv;
  }
  if (p.use_bias) {
    for (int e = lane; e < n; e += 32) choice[e] = scores[e] + bias[e];
  }
  __syncwarp();

  // Groups: each lane scores whole groups (max, or sum of the top two as the host tracks them; both
  // independent of the visiting order, which is rotated per group to spread shared-memory banks).
  // A group is kept iff fewer than topk_group groups are better than it.
  if (p.grouped) {
    const int gs = p.group_size;
    for (int g = lane; g < p.n_group; g += 32) {
      const float* c = choice + static_cast<size_t>(g) * gs;
      float s;
      if (p.group_max) {
        s = c[0];
        for (int i = 1; i < gs; ++i) s = fmaxf(s, c[i]);
      } else if (gs == 1) {
        s = c[0];
      } else {
        float a = -__int_as_float(0x7f800000);
        float b = a;
        int i = g % gs;
        for (int step = 0; step < gs; ++step) {
          const float v = c[i];
          if (v > a) {
            b = a;
            a = v;
          } else if (v > b) {
            b = v;
          }
          if (++i == gs) i = 0;
        }
        s = a + b;
      }
      gscore[g] = s;
    }
    __syncwarp();
    for (int g = lane; g < p.n_group; g += 32) {
      const float s = gscore[g];
      int rank = 0;
      for (int h = 0; h < p.n_group; ++h) rank += better(gscore[h], h, s, g) ? 1 : 0;
      kept[g] = rank < p.topk_group ? 1 : 0;
    }
    __syncwarp();
  }

  uint32_t avail = 0;
#pragma unroll
  for (int j = 0; j < kExpertsPerLane; ++j) {
    const int e = lane + 32 * j;
    if (e < n && (!p.grouped || kept[e / p.group_size] != 0)) avail |= 1u << j;
  }

  // k rounds of a warp arg-max: the best key, then the lowest expert holding it. Only the lane that
  // owned the winner rescans its (at most 16) candidates.
  uint32_t best_key, best_expert;
  lane_best(choice, lane, avail, best_key, best_expert);
  int my_id = 0;
  for (int it = 0; it < p.top_k; ++it) {
    const uint32_t top = __reduce_max_sync(0xffffffffu, best_expert == kNone ? 0u : best_key);
    const uint32_t win =
        __reduce_min_sync(0xffffffffu, (best_expert != kNone && best_key == top) ? best_expert : kNone);
    if (lane == it) my_id = static_cast<int>(win);
    if (lane == static_cast<int>(win % 32)) {
      avail &= ~(1u << (win / 32));
      lane_best(choice, lane, avail, best_key, best_expert);
    }
  }

  // Weights: the unbiased scores of the chosen ids, summed in j order as the host does.
  const float w = lane < p.top_k ? scores[my_id] : 0.0f;
  float sum = 0.0f;
  for (int j = 0; j < p.top_k; ++j) sum += __shfl_sync(0xffffffffu, w, j);
  if (lane < p.top_k) {
    float out = w;
    if (p.renormalize) out = out / (sum + p.renorm_epsilon);
    out = out * p.scale;
    ids[t * p.top_k + lane] = my_id;
    weights[t * p.top_k + lane] = out;
  }
}

// One warp per token.
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    route_kernel(RouteParams p, const float* __restrict__ logits, const float* __restrict__ bias, int64_t tokens,
                 int32_t* __restrict__ ids, float* __restrict__ weights) {
  extern __shared__ float smem[];
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (t >= tokens) return;  // whole warps leave; nothing below synchronises beyond the warp
  route_token<false>(p, logits, bias, t, ids, weights, smem + static_cast<size_t>(warp) * p.warp_words, lane);
}

// A few tokens in one launch: logits[t, e] = x_t · w_e (fp32 from bf16), `per_expert` warps per
// expert each over a slice of H, summed in a fixed order; the block that finishes last (an integer
// counter it leaves zero again) then routes every token, one warp each, from the logits the others
// wrote. Why: at T = 1 cuBLAS's GEMV and the routing kernel are two launches around a few hundred KB
// of gate weights, and the layer waits for both. The slices are short (small_warps_per_expert): a
// warp's loads are L2 round trips in a row (at T = 8 on H = 7168, four warps per expert took 34 µs
// against cuBLAS's 18, eight 26; H100, CUDA graph).
constexpr int kSmallThreads = 256;
constexpr int kSmallWarps = kSmallThreads / 32;
static_assert(kSmallWarps >= kRouteSmallMaxTokens, "the last block routes each token with one warp");

// Warps per expert (1, 2, 4 or 8, dividing kSmallWarps): enough that each walks H in at most two
// 32-lane steps of 16 bytes where 8 can.
int small_warps_per_expert(int hidden) {
  const int vecs = hidden / 8;
  int per_expert = 1;
  while (per_expert < kSmallWarps && vecs > 2 * 32 * per_expert) per_expert *= 2;
  return per_expert;
}

__global__ void __launch_bounds__(kSmallThreads)
    logits_and_route_kernel(RouteParams p, const uint16_t* __restrict__ x, const uint16_t* __restrict__ w, int hidden,
                            int tokens, int per_expert, const float* __restrict__ bias, float* __restrict__ logits,
                            int32_t* __restrict__ ids, float* __restrict__ weights, int* __restrict__ counter) {
  extern __shared__ float smem[];  // the routing scratch of the routing warps (one per token)
  __shared__ float partial[kSmallWarps][kRouteSmallMaxTokens];
  __shared__ bool last;
  // The next kernel of the lane may start now where it was launched to (the fused decode kernel
  // streams the shared expert's weights meanwhile); it waits for this grid before reading the routing.
  release_dependent_launch();
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int experts_per_block = kSmallWarps / per_expert;
  const int e = static_cast<int>(blockIdx.x) * experts_per_block + warp / per_expert;
  const int slice = warp % per_expert;
  const int vecs = hidden / 8;
  float acc[kRouteSmallMaxTokens] = {};
  if (e < p.experts) {
    const uint4* wr = reinterpret_cast<const uint4*>(w + static_cast<int64_t>(e) * hidden);
    const uint4* xr = reinterpret_cast<const uint4*>(x);
#pragma unroll 4
    for (int v = slice * 32 + lane; v < vecs; v += per_expert * 32) {
      float wv[8];
      unpack8(__ldg(wr + v), wv);
#pragma unroll
      for (int t = 0; t < kRouteSmallMaxTokens; ++t) {
        if (t >= tokens) break;
        float xv[8];
        unpack8(__ldg(xr + static_cast<int64_t>(t) * vecs + v), xv);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[t] = fmaf(wv[i], xv[i], acc[t]);
      }
    }
  }
#pragma unroll
  for (int t = 0; t < kRouteSmallMaxTokens; ++t) {
    if (t >= tokens) break;
    float v = acc[t];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) partial[warp][t] = v;
  }
  __syncthreads();
  const int tid = static_cast<int>(threadIdx.x);
  if (tid < experts_per_block * tokens) {
    const int local = tid / tokens, t = tid % tokens;
    const int expert = static_cast<int>(blockIdx.x) * experts_per_block + local;
    if (expert < p.experts) {
      float sum = 0.0f;
      for (int q = 0; q < per_expert; ++q) sum += partial[local * per_expert + q][t];
      logits[static_cast<int64_t>(t) * p.experts + expert] = sum;
    }
  }
  // Publish this block's logits, then count it; the last block sees every other block's writes.
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    last = atomicAdd(counter, 1) == static_cast<int>(gridDim.x) - 1;
    if (last) *counter = 0;  // for the lane's next kernel
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  if (warp < tokens)
    route_token<true>(p, logits, bias, warp, ids, weights, smem + static_cast<size_t>(warp) * p.warp_words, lane);
}

// The host's check_rule (routing.cpp), plus this kernel's own limits.
void check_rule(const RoutingRule& rule, const float* bias) {
  const int e = rule.experts;
  if (e <= 0 || e > kRouteMaxExperts)
    fail_input("cuda routing: experts = " + std::to_string(e) + " must lie in [1, " +
               std::to_string(kRouteMaxExperts) + "]");
  if (rule.top_k <= 0 || rule.top_k > e || rule.top_k > kRouteMaxTopK)
    fail_input("cuda routing: top_k = " + std::to_string(rule.top_k) + " must lie in [1, " +
               std::to_string(e < kRouteMaxTopK ? e : kRouteMaxTopK) + "]");
  if (rule.use_bias && bias == nullptr) fail_input("cuda routing: the rule uses a bias but none was given");
  if (rule.method == TopKMethod::greedy) return;
  if (rule.n_group <= 0 || e % rule.n_group != 0)
    fail_input("cuda routing: n_group = " + std::to_string(rule.n_group) + " must divide experts = " +
               std::to_string(e));
  if (rule.topk_group <= 0 || rule.topk_group > rule.n_group)
    fail_input("cuda routing: topk_group = " + std::to_string(rule.topk_group) + " must lie in [1, n_group = " +
               std::to_string(rule.n_group) + "]");
  if (static_cast<int64_t>(rule.topk_group) * (e / rule.n_group) < rule.top_k)
    fail_input("cuda routing: topk_group = " + std::to_string(rule.topk_group) + " groups of " +
               std::to_string(e / rule.n_group) + " experts cannot supply top_k = " + std::to_string(rule.top_k));
}

RouteParams route_params(const RoutingRule& rule) {
  RouteParams p{};
  p.experts = rule.experts;
  p.top_k = rule.top_k;
  p.grouped = rule.method != TopKMethod::greedy && rule.topk_group < rule.n_group;
  p.n_group = p.grouped ? rule.n_group : 0;
  p.topk_group = rule.topk_group;
  p.group_size = p.grouped ? rule.experts / rule.n_group : rule.experts;
  p.sigmoid = rule.scoring == Scoring::sigmoid;
  p.group_max = rule.method == TopKMethod::group_limited_greedy;
  p.use_bias = rule.use_bias;
  p.renormalize = rule.renormalize;
  p.renorm_epsilon = rule.renorm_epsilon;
  p.scale = rule.scale;
  p.warp_words = rule.experts * (p.use_bias ? 2 : 1) + 2 * p.n_group;  // at most 4 * 512 words
  return p;
}

// Shared memory of logits_and_route_kernel: its dynamic routing scratch (one per routing warp: the
// last block routes each of its at most kRouteSmallMaxTokens tokens with one warp) and its static
// partial sums and flag. At most 4 warps' 2048 words and 128 bytes: every rule the routing warp
// takes fits the 48 KiB (it reserved all 8 warps' scratch before, refusing the widest rules).
constexpr std::size_t kSmallSharedBytes = 48 * 1024;
std::size_t small_router_dynamic_bytes(const RouteParams& p) {
  return sizeof(float) * static_cast<std::size_t>(p.warp_words) * kRouteSmallMaxTokens;
}
std::size_t small_router_shared_bytes(const RouteParams& p) {
  return small_router_dynamic_bytes(p) + sizeof(float) * kSmallWarps * kRouteSmallMaxTokens + 16;
}

}  // namespace

void route_tokens(const RoutingRule& rule, const float* logits, const float* bias, int64_t tokens, int32_t* ids,
                  float* weights, Stream stream) {
  check_rule(rule, bias);
  if (tokens <= 0) return;
  const RouteParams p = route_params(rule);
  const int64_t blocks = (tokens + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks > 0x7fffffff) fail_input("cuda routing: " + std::to_string(tokens) + " tokens exceed one grid");
  const size_t smem = sizeof(float) * static_cast<size_t>(p.warp_words) * kWarpsPerBlock;  // <= 32 KiB
  route_kernel<<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, smem, stream>>>(p, logits, bias, tokens, ids,
                                                                                     weights);
  MOEFLOW_CUDA_LAUNCH_CHECK();
}

bool route_small_supported(const RoutingRule& rule, int hidden, int64_t max_tokens, std::string* why) {
  auto no = [&](std::string reason) {
    if (why) *why = std::move(reason);
    return false;
  };
  if (max_tokens > kRouteSmallMaxTokens)
    return no("up to " + std::to_string(max_tokens) + " tokens; one launch routes at most " +
              std::to_string(kRouteSmallMaxTokens));
  if (hidden <= 0 || hidden % 8 != 0) return no("H = " + std::to_string(hidden) + " is not a multiple of 8 (16-byte loads)");
  if (rule.experts <= 0 || rule.experts > kRouteMaxExperts)
    return no(std::to_string(rule.experts) + " experts; the routing warp takes at most " + std::to_string(kRouteMaxExperts));
  // The routing scratch of every warp and the kernel's own partial sums must fit the 48 KiB a block
  // gets without opting in (the two-launch router takes larger rules).
  const std::size_t scratch = small_router_shared_bytes(route_params(rule));
  if (scratch > kSmallSharedBytes)
    return no(std::to_string(scratch) + " bytes of shared memory for " + std::to_string(rule.experts) + " experts in " +
              std::to_string(rule.n_group) + " groups; one block has " + std::to_string(kSmallSharedBytes));
  return true;
}

int64_t route_small_workspace_bytes() { return 256; }

void route_tokens_small(const LaneContext& ctx, const RoutingRule& rule, const uint16_t* x, const uint16_t* gate_w,
                        int hidden, int64_t tokens, const float* bias, float* logits, int32_t* ids, float* weights,
                        void* workspace) {
  check_rule(rule, bias);
  if (std::string why; !route_small_supported(rule, hidden, tokens, &why)) fail_input("route_tokens_small: " + why);
  if (tokens <= 0) return;
  const RouteParams p = route_params(rule);
  int* counter = launch_counters(ctx, 1, static_cast<int*>(workspace));
  const int per_expert = small_warps_per_expert(hidden), experts_per_block = kSmallWarps / per_expert;
  const unsigned blocks = static_cast<unsigned>((rule.experts + experts_per_block - 1) / experts_per_block);
  const size_t smem = small_router_dynamic_bytes(p);  // fits: route_small_supported
  logits_and_route_kernel<<<blocks, kSmallThreads, smem, ctx.stream>>>(p, x, gate_w, hidden, static_cast<int>(tokens),
                                                                        per_expert, bias, logits, ids, weights, counter);
  MOEFLOW_CUDA_LAUNCH_CHECK();
}

}  // namespace moeflow::cuda
