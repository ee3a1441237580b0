// The CUDA routing, permutation and element-wise kernels against the CPU kernels (or plain loops
// written here) on generated, never-zero data. gpu label: every test skips cleanly without a GPU.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include "graph/error.hpp"
#include "kernels/common/random.hpp"
#include "kernels/common/routing_rule.hpp"
#include "kernels/cpu/permute.hpp"
#include "kernels/cpu/routing.hpp"
#include "kernels/cuda/bf16.hpp"
#include "kernels/cuda/device.hpp"
#include "kernels/cuda/elementwise.hpp"
#include "kernels/cuda/permute.hpp"
#include "kernels/cuda/routing.hpp"

namespace moeflow {
namespace {

constexpr uint64_t kSeed = 20250214;

void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

// Waits for the default stream and surfaces any asynchronous kernel error.
void sync() { cuda_ok(cudaDeviceSynchronize(), "cudaDeviceSynchronize"); }

// Owns n elements of device memory; uploads from and downloads to std::vector.
template <class T> class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t n) : n_(n) {
    if (n_ > 0) cuda_ok(cudaMalloc(reinterpret_cast<void**>(&p_), n_ * sizeof(T)), "cudaMalloc");
  }
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) { upload(host); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (p_ != nullptr) cudaFree(p_);
  }
  T* get() const { return p_; }
  size_t size() const { return n_; }
  void upload(const std::vector<T>& host) {
    if (host.size() != n_) throw std::runtime_error("DeviceBuffer::upload: size mismatch");
    if (n_ > 0) cuda_ok(cudaMemcpy(p_, host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy H2D");
  }
  std::vector<T> download() const {
    sync();
    std::vector<T> host(n_);
    if (n_ > 0) cuda_ok(cudaMemcpy(host.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
    return host;
  }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

std::vector<float> random_values(size_t n, const std::string& name, float scale) {
  const uint64_t key = rng::stream_key(kSeed, rng::name_key(name));
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = rng::uniform_pm1(key, i) * scale;
  return v;
}

// Values on a grid of `step` within ±scale: distinct values are far apart (so expf's last bits on
// either backend cannot reorder them) and equal values are exactly equal (real ties).
std::vector<float> grid_values(size_t n, const std::string& name, float scale, float step) {
  std::vector<float> v = random_values(n, name, scale);
  for (float& x : v) x = std::round(x / step) * step;
  return v;
}

std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<uint16_t> b(v.size());
  for (size_t i = 0; i < v.size(); ++i) b[i] = float_to_bf16(v[i]);
  return b;
}

std::vector<float> to_f32(const std::vector<uint16_t>& b) {
  std::vector<float> v(b.size());
  for (size_t i = 0; i < b.size(); ++i) v[i] = bf16_to_float(b[i]);
  return v;
}

std::vector<uint16_t> random_bf16(size_t n, const std::string& name, float scale) {
  return to_bf16(random_values(n, name, scale));
}

// ‖y − r‖₂ / ‖r‖₂ with y from the device (bf16) and r the fp32 reference.
double rel_norm_error(const std::vector<uint16_t>& y, const std::vector<float>& r) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < r.size(); ++i) {
    const double d = static_cast<double>(bf16_to_float(y[i])) - r[i];
    num += d * d;
    den += static_cast<double>(r[i]) * r[i];
  }
  return std::sqrt(num / den);
}

// Every element within one bf16 rounding (2^-8 relative) of the fp32 reference, plus `slack`
// (relative) for fp32 differences of summation order or of expf's last bits.
void expect_bf16_close(const std::vector<uint16_t>& y, const std::vector<float>& r, double slack,
                       const std::string& what) {
  ASSERT_EQ(y.size(), r.size()) << what;
  EXPECT_LT(rel_norm_error(y, r), 1e-2) << what;
  int bad = 0;
  for (size_t i = 0; i < r.size() && bad < 5; ++i) {
    const double g = bf16_to_float(y[i]);
    const double tol = (std::ldexp(1.0, -8) + slack) * std::fabs(r[i]) + 1e-30;
    if (std::fabs(g - r[i]) > tol) {
      ADD_FAILURE() << what << ": element " << i << " is " << g << ", reference " << r[i];
      ++bad;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Routing

RoutingRule make_rule(int experts, int k, Scoring scoring, TopKMethod method, int n_group = 1, int topk_group = 1) {
  RoutingRule r;
  r.experts = experts;
  r.top_k = k;
  r.scoring = scoring;
  r.method = method;
  r.n_group = n_group;
  r.topk_group = topk_group;
  return r;
}

bool better(float va, int ia, float vb, int ib) { return va > vb || (va == vb && ia < ib); }

bool near_but_not_equal(float a, float b) {
  return a != b && std::fabs(static_cast<double>(a) - b) <= 1e-6 * std::max(std::fabs(a), std::fabs(b));
}

// True when this token's selection hinges on two different values within 1e-6 of each other (at a
// group boundary or among the k + 1 best experts): there the device's expf, which may differ from
// the host's in the last bit, can legitimately flip the choice. Exact ties never count.
bool has_near_tie(const RoutingRule& rule, const float* logits, const float* bias) {
  const int n = rule.experts;
  std::vector<float> scratch(3 * static_cast<size_t>(n));
  std::vector<float> scores(n), choice(n);
  if (rule.scoring == Scoring::sigmoid) {
    for (int e = 0; e < n; ++e) scores[e] = 1.0f / (1.0f + std::exp(-logits[e]));
  } else {
    float m = logits[0];
    for (int e = 1; e < n; ++e) m = std::max(m, logits[e]);
    float sum = 0.0f;
    for (int e = 0; e < n; ++e) sum += scores[e] = std::exp(logits[e] - m);
    for (int e = 0; e < n; ++e) scores[e] *= 1.0f / sum;
  }
  for (int e = 0; e < n; ++e) choice[e] = rule.use_bias ? scores[e] + bias[e] : scores[e];
  std::vector<int> eligible(n);
  std::iota(eligible.begin(), eligible.end(), 0);
  const bool grouped = rule.method != TopKMethod::greedy && rule.topk_group < rule.n_group;
  if (grouped) {
    const int gs = n / rule.n_group;
    std::vector<float> gscore(rule.n_group);
    for (int g = 0; g < rule.n_group; ++g) {
      std::vector<float> c(choice.begin() + g * gs, choice.begin() + (g + 1) * gs);
      std::sort(c.begin(), c.end(), std::greater<float>());
      gscore[g] = rule.method == TopKMethod::group_limited_greedy || gs == 1 ? c[0] : c[0] + c[1];
    }
    std::vector<int> order(rule.n_group);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int a, int b) { return better(gscore[a], a, gscore[b], b); });
    for (int r = 0; r + 1 < rule.n_group && r <= rule.topk_group; ++r)
      if (near_but_not_equal(gscore[order[r]], gscore[order[r + 1]])) return true;
    eligible.clear();
    for (int r = 0; r < rule.topk_group; ++r)
      for (int e = order[r] * gs; e < (order[r] + 1) * gs; ++e) eligible.push_back(e);
  }
  std::sort(eligible.begin(), eligible.end(), [&](int a, int b) { return better(choice[a], a, choice[b], b); });
  for (size_t r = 0; r + 1 < eligible.size() && r <= static_cast<size_t>(rule.top_k); ++r)
    if (near_but_not_equal(choice[eligible[r]], choice[eligible[r + 1]])) return true;
  return false;
}

struct Routed {
  std::vector<int32_t> ids;
  std::vector<float> weights;
};

Routed route_on_device(const RoutingRule& rule, const std::vector<float>& logits, const std::vector<float>& bias,
                       int64_t tokens) {
  DeviceBuffer<float> d_logits(logits), d_bias(bias);
  DeviceBuffer<int32_t> d_ids(static_cast<size_t>(tokens * rule.top_k));
  DeviceBuffer<float> d_weights(static_cast<size_t>(tokens * rule.top_k));
  cuda::route_tokens(rule, d_logits.get(), rule.use_bias ? d_bias.get() : nullptr, tokens, d_ids.get(),
                     d_weights.get(), nullptr);
  return {d_ids.download(), d_weights.download()};
}

// Device against cpu::route_tokens: ids identical, weights within 1e-6 relative. With
// `allow_near_ties`, a token whose ids differ passes only if has_near_tie says the host's own
// values are within 1e-6 at the decisive place (continuous random data can produce those).
void check_routing(const RoutingRule& rule, int64_t tokens, const std::vector<float>& logits,
                   const std::vector<float>& bias, bool allow_near_ties, const std::string& what) {
  const int k = rule.top_k;
  std::vector<int32_t> ids(static_cast<size_t>(tokens * k));
  std::vector<float> weights(ids.size());
  cpu::route_tokens(rule, logits.data(), rule.use_bias ? bias.data() : nullptr, tokens, ids.data(), weights.data());
  const Routed dev = route_on_device(rule, logits, bias, tokens);
  int flips = 0, failures = 0;
  for (int64_t t = 0; t < tokens && failures < 5; ++t) {
    const auto b = ids.begin() + t * k;
    if (!std::equal(b, b + k, dev.ids.begin() + t * k)) {
      if (allow_near_ties && has_near_tie(rule, logits.data() + t * rule.experts, bias.data())) {
        ++flips;
        continue;
      }
      std::string got, want;
      for (int j = 0; j < k; ++j) {
        got += " " + std::to_string(dev.ids[t * k + j]);
        want += " " + std::to_string(ids[t * k + j]);
      }
      ADD_FAILURE() << what << ": token " << t << " ids" << got << ", cpu" << want;
      ++failures;
      continue;
    }
    for (int j = 0; j < k; ++j) {
      const float c = weights[t * k + j], g = dev.weights[t * k + j];
      if (std::fabs(g - c) > 1e-6f * std::fabs(c)) {
        ADD_FAILURE() << what << ": token " << t << " slot " << j << " weight " << g << ", cpu " << c;
        ++failures;
        break;
      }
    }
  }
  EXPECT_LE(flips, std::max<int64_t>(1, tokens / 100)) << what << ": near-tie flips";
  const Routed again = route_on_device(rule, logits, bias, tokens);
  EXPECT_EQ(again.ids, dev.ids) << what << ": rerun";
  EXPECT_EQ(0, std::memcmp(again.weights.data(), dev.weights.data(), again.weights.size() * sizeof(float)))
      << what << ": rerun bits";
}

void check_routing_random(const RoutingRule& rule, int64_t tokens, bool allow_near_ties, const std::string& what) {
  // Logits on a 1/1024 grid within ±2: well separated unless equal.
  const auto logits = grid_values(static_cast<size_t>(tokens * rule.experts), what + ".logits", 2.0f, 1.0f / 1024);
  const auto bias = random_values(static_cast<size_t>(rule.experts), what + ".bias", 0.05f);
  check_routing(rule, tokens, logits, bias, allow_near_ties, what);
}

TEST(CudaRouting, GreedySoftmaxMatchesCpu) {
  if (moeflow::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  RoutingRule mixtral = make_rule(8, 2, Scoring::softmax, TopKMethod::greedy);
  mixtral.renormalize = true;
  RoutingRule qwen3 = make_rule(128, 8, Scoring::softmax, TopKMethod::greedy);
  qwen3.renormalize = true;
  const RoutingRule qwen15 = make_rule(60, 4, Scoring::softmax, TopKMethod::greedy);
  const RoutingRule widest = make_rule(512, 32, Scoring::softmax, TopKMethod::greedy);
  for (int64_t tokens : {1, 37, 1000}) {
    check_routing_random(mixtral, tokens, false, "mixtral.T" + std::to_string(tokens));
    check_routing_random(qwen3, tokens, false, "qwen3.T" + std::to_string(tokens));
    check_routing_random(qwen15, tokens, false, "qwen15.T" + std::to_string(tokens));
  }
  check_routing_random(widest, 300, false, "e512k32");
  check_routing_random(make_rule(1, 1, Scoring::softmax, TopKMethod::greedy), 37, false, "e1k1");
}

TEST(CudaRouting, GreedySigmoidScaledAndBiasedMatchesCpu) {
  if (moeflow::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  RoutingRule r = make_rule(64, 6, Scoring::sigmoid, TopKMethod::greedy);
  r.scale = 2.5f;
  check_routing_random(r, 1000, false, "sigmoid.scaled");
  r.use_bias = true;
  r.renormalize = true;
  r.renorm_epsilon = 1e-20f;
  check_routing_random(r, 1000, true, "sigmoid.biased");
}

TEST(CudaRouting, GroupLimitedGreedyMatchesCpu) {
  if (moeflow::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  RoutingRule v2 = make_rule(160, 6, Scoring::softmax, TopKMethod::group_limited_greedy, 8, 3);
  v2.scale = 16.0f;  // DeepSeek-V2 scales when it does not renormalise
  for (int64_t tokens : {1, 37, 1000}) check_routing_random(v2, tokens, false, "v2.T" + std::to_string(tokens));
  // 40 groups of 8: more groups than lanes.
  check_routing_random(make_rule(320, 8, Scoring::sigmoid, TopKMethod::group_limited_greedy, 40, 5), 500, false,
                       "groups40");
}

TEST(CudaRouting, NoauxTcWithBiasMatchesCpu) {
  if (moeflow::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  RoutingRule v3 = make_rule(256, 8, Scoring::sigmoid, TopKMethod::noaux_tc, 8, 4);
  v3.use_bias = true;
  v3.renormalize = true;
  v3.renorm_epsilon = 1e-20f;
  v3.scale = 2.5f;
  for (int64_t tokens : {1, 37, 1000}) check_routing_random(v3, tokens, true, "v3.T" + std::to_string(tokens));
  // Groups of one expert: the group score is the expert's own choice score.
  RoutingRule singles = make_rule(16, 4, Scoring::sigmoid, TopKMethod::noaux_tc, 16, 4);
  singles.use_bias = true;
  check_routing_random(singles, 1000, true, "groups_of_one");
  // Without bias, and with every group kept (then it is greedy).
  check_routing_random(make_rule(64, 5, Scoring::sigmoid, TopKMethod::noaux_tc, 8, 3), 1000, true, "no_bias");
  RoutingRule all_kept = make_rule(64, 5, Scoring::sigmoid, TopKMethod::noaux_tc, 8, 8);
  all_kept.use_bias = true;
  check_routing_random(all_kept, 1000, true, "all_groups_kept");
}

// The one-launch router for a few tokens: its logits against an fp64 sum of the same bf16 values
// (to fp32 accumulation), its ids and weights exactly what the host's routing makes of those logits,
// reruns bit-identical, the counter left zero (lane counters) or in scratch (no lane counters).
TEST(CudaRouting, SmallBatchRouterComputesLogitsAndRoutesThemInOneLaunch) {
  if (moeflow::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  RoutingRule mixtral = make_rule(8, 2, Scoring::softmax, TopKMethod::greedy);
  mixtral.renormalize = true;
  RoutingRule v2 = make_rule(160, 6, Scoring::softmax, TopKMethod::group_limited_greedy, 8, 3);
  v2.scale = 16.0f;
  RoutingRule v3 = make_rule(256, 8, Scoring::sigmoid, TopKMethod::noaux_tc, 8, 4);
  v3.use_bias = true;
  v3.renormalize = true;
  v3.renorm_epsilon = 1e-20f;
  v3.scale = 2.5f;
  // The widest scratch a routing warp takes: 512 biased experts in 256 groups (2048 words per warp).
  RoutingRule widest = make_rule(512, 8, Scoring::sigmoid, TopKMethod::noaux_tc, 256, 128);
  widest.use_bias = true;
  widest.renormalize = true;
  const std::pair<std::string, RoutingRule> rules[] = {{"mixtral", mixtral},
                                                       {"qwen15", make_rule(60, 4, Scoring::softmax, TopKMethod::greedy)},
                                                       {"v2", v2},
                                                       {"v3", v3},
                                                       {"e512k32", make_rule(512, 32, Scoring::softmax, TopKMethod::greedy)},
                                                       {"e512g256", widest}};
  DeviceBuffer<int> lane_counters(std::vector<int>(4, 0));
  for (const auto& [name, rule] : rules)
    for (int hidden : {264, 2048, 7168})  // 1, 4 and 8 warps per expert
      for (int64_t tokens : {1, 3, cuda::kRouteSmallMaxTokens}) {
        const std::string what = name + ".H" + std::to_string(hidden) + ".T" + std::to_string(tokens);
        const int E = rule.experts, k = rule.top_k;
        const auto x = random_bf16(static_cast<size_t>(tokens * hidden), what + ".x", 1.0f);
        const auto w = random_bf16(static_cast<size_t>(E) * hidden, what + ".w", 0.05f);
        const auto bias = random_values(static_cast<size_t>(E), what + ".bias", 0.05f);
        DeviceBuffer<uint16_t> d_x(x), d_w(w);
        DeviceBuffer<float> d_bias(bias), d_logits(static_cast<size_t>(tokens * E)), d_weights(static_cast<size_t>(tokens * k));
        DeviceBuffer<int32_t> d_ids(static_cast<size_t>(tokens * k));
        DeviceBuffer<int> scratch(std::vector<int>(64, 0));
        const bool use_lane_counters = tokens != 1;
        cuda::LaneContext ctx;
        if (use_lane_counters) {
          ctx.counters = lane_counters.get();
          ctx.counter_words = 4;
        }
        auto run = [&] {
          cuda::route_tokens_small(ctx, rule, d_x.get(), d_w.get(), hidden, tokens, rule.use_bias ? d_bias.get() : nullptr,
                                   d_logits.get(), d_ids.get(), d_weights.get(), scratch.get());
          sync();
        };
        run();
        const std::vector<float> logits = d_logits.download();
        const std::vector<float> xf = to_f32(x), wf = to_f32(w);
        for (int64_t t = 0; t < tokens; ++t)
          for (int e = 0; e < E; ++e) {
            double sum = 0, magnitude = 0;
            for (int h = 0; h < hidden; ++h) {
              const double term = static_cast<double>(xf[t * hidden + h]) * wf[static_cast<size_t>(e) * hidden + h];
              sum += term;
              magnitude += std::fabs(term);
            }
            ASSERT_NEAR(logits[t * E + e], sum, 1e-5 * magnitude + 1e-30) << what << " t " << t << " e " << e;
          }
        std::vector<int32_t> ids(static_cast<size_t>(tokens * k));
        std::vector<float> weights(ids.size());
        cpu::route_tokens(rule, logits.data(), rule.use_bias ? bias.data() : nullptr, tokens, ids.data(), weights.data());
        const std::vector<int32_t> got_ids = d_ids.download();
        const std::vector<float> got_weights = d_weights.download();
        // As route_tokens: the same ids as the host's, except where the host's own values tie within
        // 1e-6 at the decisive place (the device's expf may differ by 2 ulp).
        for (int64_t t = 0; t < tokens; ++t) {
          const auto want = ids.begin() + t * k;
          if (!std::equal(want, want + k, got_ids.begin() + t * k)) {
            EXPECT_TRUE(has_near_tie(rule, logits.data() + t * E, bias.data())) << what << ": token " << t << " ids differ";
            continue;
          }
          for (int j = 0; j < k; ++j)
            ASSERT_NEAR(got_weights[t * k + j], weights[t * k + j], 1e-6 * std::fabs(weights[t * k + j])) << what;
        }
        run();
        EXPECT_EQ(d_ids.download(), got_ids) << what << ": rerun";
        EXPECT_EQ(0, std::memcmp(d_logits.download().data(), logits.data(), logits.size() * 4)) << what << ": rerun bits";
        EXPECT_EQ(0, std::memcmp(d_weights.download().data(), got_weights.data(), got_weights.size() * 4)) << what;
        EXPECT_EQ((use_lane_counters ? lane_counters : scratch).download()[0], 0) << what << ": counter left zero";
      }
  std::string why;
  EXPECT_FALSE(cuda::route_small_supported(mixtral, 2048, cuda::kRouteSmallMaxTokens + 1, &why));
  EXPECT_NE(why.find("tokens"), std::string::npos) << why;
  EXPECT_FALSE(cuda::route_small_supported(mixtral, 2044, 1, &why));
  EXPECT_NE(why.find("multiple of 8"), std::string::npos) << why;
}

TEST(CudaRouting, ExactTiesGoToLowerIndexAsOnCpu) {
  if (moeflow::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const int64_t tokens = 500;
  // Logits on a 1/8 grid: 17 values for up to 256 experts, so ties everywhere (experts and groups).
  auto coarse = [&](const RoutingRule& r, const std::string& name) {
    return grid_values(static_cast<size_t>(tokens * r.experts), name, 1.0f, 0.125f);
  };
  const RoutingRule greedy = make_rule(128, 8, Scoring::softmax, TopKMethod::greedy);
  check_routing(greedy, tokens, coarse(greedy, "ties.greedy"), {}, false, "ties.greedy");
  const RoutingRule glg = make_rule(64, 6, Scoring::sigmoid, TopKMethod::group_limited_greedy, 8, 3);
  check_routing(glg, tokens, coarse(glg, "ties.glg"), {}, false, "ties.glg");
  RoutingRule v3 = make_rule(256, 8, Scoring::sigmoid, TopKMethod::noaux_tc, 8, 4);
  v3.use_bias = true;
  v3.renormalize = true;
  v3.renorm_epsilon = 1e-20f;
  v3.scale = 2.5f;
  const auto bias = grid_values(256, "ties.bias", 0.05f, 1.0f / 64);
  check_routing(v3, tokens, coarse(v3, "ties.v3"), bias, true, "ties.v3");

  // All logits equal: the lowest indices, in order (and for groups, the lowest groups).
  const std::vector<float> flat(32 * 3, 0.7f);
  const Routed g = route_on_device(make_rule(32, 4, Scoring::softmax, TopKMethod::greedy), flat, {}, 3);
  for (int t = 0; t < 3; ++t)
    EXPECT_EQ(std::vector<int32_t>(g.ids.begin() + 4 * t, g.ids.begin() + 4 * t + 4),
              (std::vector<int32_t>{0, 1, 2, 3}));
  RoutingRule grouped = make_rule(32, 4, Scoring::sigmoid, TopKMethod::noaux_tc, 8, 2);
  grouped.use_bias = true;
  check_routing(grouped, 3, flat, std::vector<float>(32, 0.01f), false, "ties.flat_groups");
}

TEST(CudaRouting, ZeroTokensLaunchNothingAndBadRulesAreRefused) {
  if (moeflow::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const RoutingRule r = make_rule(8, 2, Scoring::softmax, TopKMethod::greedy);
  EXPECT_NO_THROW(cuda::route_tokens(r, nullptr, nullptr, 0, nullptr, nullptr, nullptr));
  sync();
  EXPECT_THROW(cuda::route_tokens(make_rule(1024, 8, Scoring::softmax, TopKMethod::greedy), nullptr, nullptr, 1,
                                  nullptr, nullptr, nullptr),
               Error);
  EXPECT_THROW(cuda::route_tokens(make_rule(64, 33, Scoring::softmax, TopKMethod::greedy), nullptr, nullptr, 1,
                                  nullptr, nullptr, nullptr),
               Error);
  EXPECT_THROW(cuda::route_tokens(make_rule(64, 8, Scoring::softmax, TopKMethod::noaux_tc, 6, 2), nullptr, nullptr,
                                  1, nullptr, nullptr, nullptr),
               Error);
  RoutingRule biased = r;
  biased.use_bias = true;
  EXPECT_THROW(cuda::route_tokens(biased, nullptr, nullptr, 1, nullptr, nullptr, nullptr), Error);
}

// ---------------------------------------------------------------------------------------------
// Permutation

struct DevicePermutation {
  std::vector<int32_t> offsets, slot_of, row_source;
};

// `ws_offset` (a multiple of 4): the workspace and the ids that many bytes past an aligned
// allocation (the kernels then load them one by one instead of 16 bytes at a time).
// `live_tokens` ≥ 0: a live count of that many tokens (the launch sized for `tokens`); the entries
// past the live ones are returned as the marker -7 they were filled with.
DevicePermutation permute_on_device(const std::vector<int32_t>& ids, int64_t tokens, int k, int experts,
                                    int64_t max_tokens, size_t ws_offset = 0,
                                    cuda::SortMethod method = cuda::SortMethod::automatic, int32_t live_tokens = -1) {
  std::vector<int32_t> shifted(ws_offset / sizeof(int32_t), 0);
  shifted.insert(shifted.end(), ids.begin(), ids.end());
  DeviceBuffer<int32_t> d_ids(shifted);
  DeviceBuffer<int32_t> offsets(static_cast<size_t>(experts) + 1);
  DeviceBuffer<int32_t> slot_of(std::vector<int32_t>(ids.size(), -7)), row_source(std::vector<int32_t>(ids.size(), -7));
  const size_t ws_bytes = cuda::permutation_workspace_bytes(max_tokens, k, experts);
  DeviceBuffer<unsigned char> ws(std::max<size_t>(ws_bytes, 1) + ws_offset);
  DeviceBuffer<int32_t> live(std::vector<int32_t>{live_tokens});
  cuda::build_permutation(d_ids.get() + ws_offset / sizeof(int32_t), tokens, k, experts, offsets.get(), slot_of.get(), row_source.get(),
                          ws.get() + ws_offset, ws_bytes, nullptr,
                          live_tokens >= 0 ? cuda::LiveRows{live.get(), k} : cuda::LiveRows{}, method);
  return {offsets.download(), slot_of.download(), row_source.download()};
}

// Every sort method that takes these ids (and the engine's automatic choice) against the CPU's
// counting sort: with the workspace sized for exactly T and for more, rerun, the workspace off
// 16-byte alignment, and (where T > 1) with a live count of half the tokens.
void check_permutation(const std::vector<int32_t>& ids, int64_t tokens, int k, int experts, const std::string& what) {
  std::vector<int32_t> offsets(static_cast<size_t>(experts) + 1), slot_of(ids.size());
  cpu::build_permutation(ids.data(), tokens, k, experts, offsets.data(), slot_of.data());
  const int64_t live_tokens = tokens / 2;
  std::vector<int32_t> live_offsets(static_cast<size_t>(experts) + 1), live_slot_of(ids.size(), -7);
  cpu::build_permutation(ids.data(), live_tokens, k, experts, live_offsets.data(), live_slot_of.data());
  const int64_t n = tokens * k;
  for (const cuda::SortMethod method : {cuda::SortMethod::automatic, cuda::SortMethod::small,
                                        cuda::SortMethod::buckets, cuda::SortMethod::tiles}) {
    if (!cuda::sort_method_takes(method, n, experts)) continue;
    const std::string how = what + " (" + cuda::sort_method_name(method) + ")";
    for (int64_t max_tokens : {tokens, tokens * 3 + 5}) {  // the workspace sized for exactly T, and for more
      const DevicePermutation d = permute_on_device(ids, tokens, k, experts, max_tokens, 0, method);
      EXPECT_EQ(d.offsets, offsets) << how;
      EXPECT_EQ(d.slot_of, slot_of) << how;
      for (size_t i = 0; i < ids.size(); ++i) {
        ASSERT_EQ(d.row_source[static_cast<size_t>(slot_of[i])], static_cast<int32_t>(i)) << how << ": row of " << i;
      }
      const DevicePermutation again = permute_on_device(ids, tokens, k, experts, max_tokens, 0, method);
      EXPECT_EQ(again.slot_of, d.slot_of) << how << ": rerun";
      EXPECT_EQ(again.row_source, d.row_source) << how << ": rerun";
    }
    const DevicePermutation off16 = permute_on_device(ids, tokens, k, experts, tokens, 4, method);
    EXPECT_EQ(off16.offsets, offsets) << how << ": ids and workspace off 16-byte alignment";
    EXPECT_EQ(off16.slot_of, slot_of) << how << ": ids and workspace off 16-byte alignment";
    if (live_tokens == 0) continue;
    const DevicePermutation live =
        permute_on_device(ids, tokens, k, experts, tokens, 0, method, static_cast<int32_t>(live_tokens));
    EXPECT_EQ(live.offsets, live_offsets) << how << ": live count of " << live_tokens << " tokens";
    EXPECT_EQ(live.slot_of, live_slot_of) << how << ": live count of " << live_tokens << " tokens";
    for (int64_t i = 0; i < live_tokens * k; ++i)
      ASSERT_EQ(live.row_source[static_cast<size_t>(live_slot_of[static_cast<size_t>(i)])], static_cast<int32_t>(i))
          << how << ": live row of " << i;
    for (size_t r = static_cast<size_t>(live_tokens * k); r < ids.size(); ++r)
      ASSERT_EQ(live.row_source[r], -7) << how << ": row " << r << " past the live ones written";
  }
}

// k distinct experts per token, uniformly (a partial Fisher-Yates per token).
std::vector<int32_t> distinct_ids(int64_t tokens, int k, int experts, const std::string& name) {
  const auto u = random_values(static_cast<size_t>(tokens * k), name, 1.0f);
  std::vector<int32_t> ids(static_cast<size_t>(tokens * k)), pool(experts);
  for (int64_t t = 0; t < tokens; ++t) {
    std::iota(pool.begin(), pool.end(), 0);
    for (int j = 0; j < k; ++j) {
      const int span = experts - j;
      const int pick = j + std::min(span - 1, static_cast<int>((u[t * k + j] * 0.5f + 0.5f) * span));
      std::swap(pool[j], pool[pick]);
      ids[t * k + j] = pool[j];
    }
  }
  return ids;
}

TEST(CudaPermute, MatchesCpuOnSmallAndOddShapes) {
  if (moeflow::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  check_permutation({3, 0, 6}, 1, 3, 7, "T1");
  check_permutation(distinct_ids(37, 4, 16, "p37"), 37, 4, 16, "T37");
  check_permutation({0}, 1, 1, 1, "E1");
  // Zero-token experts: only even experts are used.
  std::vector<int32_t> even = distinct_ids(61, 4, 16, "even");
  for (int32_t& e : even) e = (e / 2) * 2;
  check_permutation(even, 61, 4, 16, "zero_token_experts");
}

TEST(CudaPermute, AllTokensOnOneExpert) {
  if (moeflow::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  check_permutation(std::vector<int32_t>(40 * 2, 5), 40, 2, 8, "one_expert.T40");
  check_permutation(std::vector<int32_t>(3000, 0), 3000, 1, 8, "one_expert.T3000");  // several tiles
  check_permutation(std::vector<int32_t>(5000, 255), 5000, 1, 256, "last_expert");
}

TEST(CudaPermute, LargeShapesMatchCpu) {
  if (moeflow::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  // Around the tile lengths' bounds: past the small kernel's 256 ids, 65536 ids, 350 experts.
  check_permutation(distinct_ids(257, 1, 16, "block_first"), 257, 1, 16, "E16k1T257");
  check_permutation(distinct_ids(8192, 8, 128, "block_last"), 8192, 8, 128, "E128k8T8192");
  check_permutation(distinct_ids(65537, 1, 300, "tiled_first"), 65537, 1, 300, "E300k1T65537");
  check_permutation(distinct_ids(500, 8, 350, "block_widest"), 500, 8, 350, "E350k8T500");
  check_permutation(distinct_ids(500, 8, 351, "tiled_widest"), 500, 8, 351, "E351k8T500");
  check_permutation(distinct_ids(1000, 8, 256, "deepseek"), 1000, 8, 256, "E256k8T1000");
  check_permutation(distinct_ids(20000, 2, 8, "mixtral"), 20000, 2, 8, "E8k2T20000");
  check_permutation(distinct_ids(20000, 8, 512, "wide"), 20000, 8, 512, "E512k8T20000");  // tiles past 1024 ids
}

TEST(CudaPermute, ZeroTokensWriteZeroOffsets) {
  if (moeflow::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  DeviceBuffer<int32_t> offsets(std::vector<int32_t>(5, 77));
  cuda::build_permutation(nullptr, 0, 2, 4, offsets.get(), nullptr, nullptr, nullptr, 0, nullptr);
  EXPECT_EQ(offsets.download(), std::vector<int32_t>(5, 0));
}

TEST(CudaPermute, InvalidIdsStayInBoundsAfterTheValidRows) {
  if (moeflow::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (const int64_t tokens : {37, 301}) {  // 148 ids in the small kernel, 1204 in tiles
    SCOPED_TRACE("T = " + std::to_string(tokens));
    const int k = 4, experts = 16;
    std::vector<int32_t> ids = distinct_ids(tokens, k, experts, "invalid");
    ids[5] = -1;
    ids[17] = experts;
    ids[100] = 1 << 30;
    const DevicePermutation d = permute_on_device(ids, tokens, k, experts, tokens);
    // The valid entries alone, by the CPU's counting sort; the invalid ones' rows after them in flat
    // order, with no slot (the combine skips them).
    std::vector<int32_t> valid_counts(experts + 1, 0);
    for (int32_t e : ids)
      if (e >= 0 && e < experts) ++valid_counts[e + 1];
    for (int e = 0; e < experts; ++e) valid_counts[e + 1] += valid_counts[e];
    EXPECT_EQ(d.offsets, valid_counts);
    std::vector<int32_t> cursor(valid_counts.begin(), valid_counts.end() - 1);
    int32_t next_invalid = valid_counts[experts];
    for (size_t i = 0; i < ids.size(); ++i) {
      const bool valid = ids[i] >= 0 && ids[i] < experts;
      const int32_t row = valid ? cursor[ids[i]]++ : next_invalid++;
      EXPECT_EQ(d.slot_of[i], valid ? row : -1) << i;
      EXPECT_EQ(d.row_source[static_cast<size_t>(row)], static_cast<int32_t>(i)) << i;
    }
    // The dispatch's row scatter writes every valid choice's row from its token and leaves the rows
    // after the valid ones (ids outside [0, E): no expert reads them) as they were.
    const int hidden = 24;
    const auto x = random_bf16(static_cast<size_t>(tokens * hidden), "invalid.x", 1.0f);
    const std::vector<uint16_t> marker(static_cast<size_t>(ids.size() * hidden), 0x7fc1);  // a NaN no row holds
    DeviceBuffer<uint16_t> d_x(x), d_rows(marker);
    DeviceBuffer<int32_t> d_slot(d.slot_of);
    cuda::scatter_rows(d_x.get(), d_slot.get(), tokens, k, hidden, d_rows.get(), nullptr);
    const std::vector<uint16_t> rows = d_rows.download();
    for (size_t i = 0; i < ids.size(); ++i) {
      if (d.slot_of[i] < 0) continue;
      for (int h = 0; h < hidden; ++h)
        ASSERT_EQ(rows[static_cast<size_t>(d.slot_of[i]) * hidden + h], x[i / k * hidden + h]) << "choice " << i;
    }
    for (size_t r = static_cast<size_t>(valid_counts[experts]); r < ids.size(); ++r)
      for (int h = 0; h < hidden; ++h) ASSERT_EQ(rows[r * hidden + h], 0x7fc1) << "row " << r << " of an invalid id written";
  }
}

TEST(CudaPermute, TooSmallWorkspaceIsRefused) {
  if (moeflow::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const auto ids = distinct_ids(5000, 2, 8, "ws");
  DeviceBuffer<int32_t> d_ids(ids), offsets(9), slot_of(ids.size()), row_source(ids.size());
  const size_t small = cuda::permutation_workspace_bytes(100, 2, 8);
  DeviceBuffer<unsigned char> ws(small);
  EXPECT_THROW(cuda::build_permutation(d_ids.get(), 5000, 2, 8, offsets.get(), slot_of.get(), row_source.get(),
                                       ws.get(), small, nullptr),
               Error);
}

// ---------------------------------------------------------------------------------------------
// Gather and combine

void check_gather_combine(int64_t tokens, int k, int experts, int hidden) {
  const std::string what = "T" + std::to_string(tokens) + ".k" + std::to_string(k) + ".H" + std::to_string(hidden);
  const auto ids = distinct_ids(tokens, k, experts, what + ".ids");
  const int64_t rows = tokens * k;
  DeviceBuffer<int32_t> d_ids(ids), offsets(static_cast<size_t>(experts) + 1);
  DeviceBuffer<int32_t> slot_of(ids.size()), row_source(ids.size());
  const size_t ws_bytes = cuda::permutation_workspace_bytes(tokens, k, experts);
  DeviceBuffer<unsigned char> ws(std::max<size_t>(ws_bytes, 1));
  cuda::build_permutation(d_ids.get(), tokens, k, experts, offsets.get(), slot_of.get(), row_source.get(), ws.get(),
                          ws_bytes, nullptr);
  const std::vector<int32_t> h_slot = slot_of.download();

  // Gather: a copy, so bit-exact against cpu::gather_rows on the widened values.
  const auto x = random_bf16(static_cast<size_t>(tokens * hidden), what + ".x", 1.0f);
  DeviceBuffer<uint16_t> d_x(x), d_rows(static_cast<size_t>(rows * hidden));
  cuda::gather_rows(d_x.get(), row_source.get(), rows, k, hidden, d_rows.get(), nullptr);
  std::vector<float> ref_rows(static_cast<size_t>(rows * hidden));
  const std::vector<float> xf = to_f32(x);
  cpu::gather_rows(xf.data(), h_slot.data(), tokens, k, hidden, ref_rows.data());
  EXPECT_EQ(d_rows.download(), to_bf16(ref_rows)) << what << ": gather";
  // Scatter by token (each row of x read once): the same rows; with a live count of fewer tokens,
  // only their k slots each are written.
  {
    const std::vector<uint16_t> marker(static_cast<size_t>(rows * hidden), 0x7fc1);  // a NaN no row holds
    DeviceBuffer<uint16_t> d_scattered(marker);
    cuda::scatter_rows(d_x.get(), slot_of.get(), tokens, k, hidden, d_scattered.get(), nullptr);
    EXPECT_EQ(d_scattered.download(), to_bf16(ref_rows)) << what << ": scatter";
    const int32_t live_tokens = static_cast<int32_t>(tokens / 2);
    DeviceBuffer<int32_t> d_live(std::vector<int32_t>{live_tokens});
    DeviceBuffer<uint16_t> d_live_rows(marker);
    cuda::scatter_rows(d_x.get(), slot_of.get(), tokens, k, hidden, d_live_rows.get(), nullptr, {d_live.get(), 1});
    const std::vector<uint16_t> live_rows = d_live_rows.download(), all = to_bf16(ref_rows);
    for (int64_t i = 0; i < rows; ++i)
      for (int h = 0; h < hidden; ++h) {
        const size_t at = static_cast<size_t>(h_slot[static_cast<size_t>(i)]) * hidden + h;
        ASSERT_EQ(live_rows[at], i / k < live_tokens ? all[at] : uint16_t{0x7fc1}) << what << ": live scatter, choice " << i;
      }
  }

  // Combine: fp32 in j order, one rounding.
  const auto y = random_bf16(static_cast<size_t>(rows * hidden), what + ".y", 1.0f);
  const auto w = random_values(static_cast<size_t>(rows), what + ".w", 1.0f);
  DeviceBuffer<uint16_t> d_y(y), d_out(static_cast<size_t>(tokens * hidden));
  DeviceBuffer<float> d_w(w);
  cuda::combine_rows(d_y.get(), slot_of.get(), d_w.get(), tokens, k, hidden, d_out.get(), nullptr);
  std::vector<float> ref(static_cast<size_t>(tokens * hidden));
  const std::vector<float> yf = to_f32(y);
  cpu::combine_rows(yf.data(), h_slot.data(), w.data(), tokens, k, hidden, ref.data());
  const std::vector<uint16_t> out = d_out.download();
  // fp32 differences (fused multiply-adds) are tiny next to the terms, but may matter where the
  // terms cancel: measure the slack against Σ|w·y| rather than |r|.
  EXPECT_LT(rel_norm_error(out, ref), 1e-2) << what;
  for (int64_t t = 0; t < tokens; ++t)
    for (int h = 0; h < hidden; ++h) {
      double mag = 0.0;
      for (int j = 0; j < k; ++j)
        mag += std::fabs(static_cast<double>(w[t * k + j]) * yf[static_cast<size_t>(h_slot[t * k + j]) * hidden + h]);
      const double r = ref[t * hidden + h], g = bf16_to_float(out[t * hidden + h]);
      ASSERT_LE(std::fabs(g - r), std::ldexp(1.0, -8) * std::fabs(r) + 1e-6 * mag) << what << " t " << t << " h " << h;
    }
  cuda::combine_rows(d_y.get(), slot_of.get(), d_w.get(), tokens, k, hidden, d_out.get(), nullptr);
  EXPECT_EQ(d_out.download(), out) << what << ": rerun";
  // With two addends (the shared experts' outputs): added in fp32 after the choices, in order, before
  // the one rounding; against the CPU's fp32 sums of the same bf16 values.
  {
    const auto s0 = random_bf16(static_cast<size_t>(tokens * hidden), what + ".s0", 1.0f);
    const auto s1 = random_bf16(static_cast<size_t>(tokens * hidden), what + ".s1", 1.0f);
    DeviceBuffer<uint16_t> d_s0(s0), d_s1(s1), d_sum(static_cast<size_t>(tokens * hidden));
    cuda::RowAddends addends;
    addends.rows[0] = d_s0.get();
    addends.rows[1] = d_s1.get();
    addends.count = 2;
    cuda::combine_rows(d_y.get(), slot_of.get(), d_w.get(), tokens, k, hidden, d_sum.get(), nullptr, {}, {}, addends);
    const std::vector<float> s0f = to_f32(s0), s1f = to_f32(s1);
    const float* const cpu_addends[] = {s0f.data(), s1f.data()};
    std::vector<float> ref_sum(static_cast<size_t>(tokens * hidden));
    cpu::combine_rows(yf.data(), h_slot.data(), w.data(), tokens, k, hidden, ref_sum.data(), cpu_addends);
    const std::vector<uint16_t> sum = d_sum.download();
    for (int64_t t = 0; t < tokens; ++t)
      for (int h = 0; h < hidden; ++h) {
        double mag = std::fabs(s0f[t * hidden + h]) + std::fabs(s1f[t * hidden + h]);
        for (int j = 0; j < k; ++j)
          mag += std::fabs(static_cast<double>(w[t * k + j]) * yf[static_cast<size_t>(h_slot[t * k + j]) * hidden + h]);
        const double r = ref_sum[t * hidden + h], g = bf16_to_float(sum[t * hidden + h]);
        ASSERT_LE(std::fabs(g - r), std::ldexp(1.0, -8) * std::fabs(r) + 1e-6 * mag) << what << " addends, t " << t << " h " << h;
      }
    EXPECT_THROW(cuda::combine_rows(d_y.get(), slot_of.get(), d_w.get(), tokens, k, hidden, d_sum.get(), nullptr, {}, {},
                                    cuda::RowAddends{{}, cuda::RowAddends::kMax + 1}),
                 Error);
  }

  // A window of rows kept in another buffer (the alltoall's rows for its own rank): the gather
  // writes them there and nowhere else, the combine reads them there; results are the same bits.
  const int64_t lo = rows / 3, hi = std::max(lo, rows - rows / 4);
  const std::vector<uint16_t> all_rows = d_rows.download();
  const std::vector<uint16_t> marker(static_cast<size_t>(rows * hidden), 0x7fc1);  // a NaN no row holds
  DeviceBuffer<uint16_t> d_split(marker), d_window(static_cast<size_t>(std::max<int64_t>(hi - lo, 1) * hidden));
  cuda::gather_rows(d_x.get(), row_source.get(), rows, k, hidden, d_split.get(), nullptr,
                    cuda::RowWindow{lo, hi, d_window.get()});
  const std::vector<uint16_t> split = d_split.download(), window = d_window.download();
  for (int64_t r = 0; r < rows; ++r)
    for (int h = 0; h < hidden; ++h) {
      const uint16_t want = all_rows[static_cast<size_t>(r * hidden + h)];
      if (r >= lo && r < hi) {
        ASSERT_EQ(window[static_cast<size_t>((r - lo) * hidden + h)], want) << what << " window row " << r;
        ASSERT_EQ(split[static_cast<size_t>(r * hidden + h)], 0x7fc1) << what << " row " << r << " written twice";
      } else {
        ASSERT_EQ(split[static_cast<size_t>(r * hidden + h)], want) << what << " row " << r;
      }
    }
  std::vector<uint16_t> y_outside = y, y_window;
  for (int64_t r = lo; r < hi; ++r)
    for (int h = 0; h < hidden; ++h) {
      y_window.push_back(y[static_cast<size_t>(r * hidden + h)]);
      y_outside[static_cast<size_t>(r * hidden + h)] = 0x7fc1;
    }
  if (y_window.empty()) y_window.assign(static_cast<size_t>(hidden), 0);
  DeviceBuffer<uint16_t> d_y_outside(y_outside), d_y_window(y_window);
  cuda::combine_rows(d_y_outside.get(), slot_of.get(), d_w.get(), tokens, k, hidden, d_out.get(), nullptr,
                     cuda::RowWindow{lo, hi, d_y_window.get()});
  EXPECT_EQ(d_out.download(), out) << what << ": combine through a window";
}

TEST(CudaPermute, GatherAndCombineMatchCpu) {
  if (moeflow::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  check_gather_combine(37, 4, 16, 512);  // 16-byte vectors
  check_gather_combine(37, 4, 16, 36);   // 72-byte rows: scalar path
  check_gather_combine(1, 8, 64, 8);
  check_gather_combine(300, 8, 256, 2056);  // more vectors than threads per row
  check_gather_combine(5, 2, 8, 7);
  check_gather_combine(40, 10, 32, 64);  // top-k past the combine's batch of 8 loads: two batches
}

// ---------------------------------------------------------------------------------------------
// Element-wise

TEST(CudaElementwise, SwigluMatchesLoop) {
  if (moeflow::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (int inter : {256, 100, 37, 1408}) {
    const int64_t rows = 37;
    const std::string what = "swiglu.I" + std::to_string(inter);
    const auto h = random_bf16(static_cast<size_t>(rows * 2 * inter), what, 4.0f);
    DeviceBuffer<uint16_t> d_h(h), d_act(static_cast<size_t>(rows * inter));
    cuda::swiglu(d_h.get(), rows, inter, d_act.get(), nullptr);
    std::vector<float> ref(static_cast<size_t>(rows * inter));
    for (int64_t r = 0; r < rows; ++r)
      for (int i = 0; i < inter; ++i) {
        const float g = bf16_to_float(h[r * 2 * inter + i]), u = bf16_to_float(h[r * 2 * inter + inter + i]);
        ref[r * inter + i] = g / (1.0f + std::exp(-g)) * u;
      }
    const std::vector<uint16_t> act = d_act.download();
    expect_bf16_close(act, ref, 1e-6, what);
    cuda::swiglu(d_h.get(), rows, inter, d_act.get(), nullptr);
    EXPECT_EQ(d_act.download(), act) << what << ": rerun";
  }
}

TEST(CudaElementwise, SigmoidGateScalesRows) {
  if (moeflow::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (int hidden : {512, 100, 2048, 7}) {
    const int64_t tokens = 37;
    const std::string what = "gate.H" + std::to_string(hidden);
    const auto x = random_bf16(static_cast<size_t>(tokens * hidden), what + ".x", 1.0f);
    const auto gw = random_bf16(static_cast<size_t>(hidden), what + ".w", 4.0f / std::sqrt(static_cast<float>(hidden)));
    const auto y = random_bf16(static_cast<size_t>(tokens * hidden), what + ".y", 1.0f);
    DeviceBuffer<uint16_t> d_x(x), d_w(gw), d_y(y);
    cuda::scale_rows_by_sigmoid_gate(d_x.get(), d_w.get(), tokens, hidden, d_y.get(), nullptr);
    std::vector<float> ref(y.size());
    for (int64_t t = 0; t < tokens; ++t) {
      double dot = 0.0;
      for (int i = 0; i < hidden; ++i)
        dot += static_cast<double>(bf16_to_float(x[t * hidden + i])) * bf16_to_float(gw[i]);
      const double g = 1.0 / (1.0 + std::exp(-dot));
      for (int i = 0; i < hidden; ++i) ref[t * hidden + i] = static_cast<float>(bf16_to_float(y[t * hidden + i]) * g);
    }
    const std::vector<uint16_t> out = d_y.download();
    expect_bf16_close(out, ref, 1e-5, what);
    d_y.upload(y);
    cuda::scale_rows_by_sigmoid_gate(d_x.get(), d_w.get(), tokens, hidden, d_y.get(), nullptr);
    EXPECT_EQ(d_y.download(), out) << what << ": rerun";
  }
}

TEST(CudaElementwise, SumRowsAddsInOrderWithOneRounding) {
  if (moeflow::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (int64_t n : {4096, 1003}) {
    for (int count : {1, 2, 3, 8}) {
      const std::string what = "sum.n" + std::to_string(n) + ".c" + std::to_string(count);
      std::vector<std::vector<uint16_t>> h;
      std::vector<std::unique_ptr<DeviceBuffer<uint16_t>>> d;
      std::vector<const uint16_t*> ptrs;
      for (int a = 0; a < count; ++a) {
        h.push_back(random_bf16(static_cast<size_t>(n), what + "." + std::to_string(a), 1.0f));
        d.push_back(std::make_unique<DeviceBuffer<uint16_t>>(h.back()));
        ptrs.push_back(d.back()->get());
      }
      std::vector<uint16_t> want(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) {
        float acc = bf16_to_float(h[0][i]);
        for (int a = 1; a < count; ++a) acc += bf16_to_float(h[a][i]);
        want[i] = float_to_bf16(acc);
      }
      DeviceBuffer<uint16_t> out(static_cast<size_t>(n));
      cuda::sum_rows(ptrs.data(), count, n, out.get(), nullptr);
      EXPECT_EQ(out.download(), want) << what;
      // In place into the first addend.
      cuda::sum_rows(ptrs.data(), count, n, d[0]->get(), nullptr);
      EXPECT_EQ(d[0]->download(), want) << what << ": aliased";
      // Misaligned addends (one element in): the scalar path.
      if (count >= 2) {
        d[0]->upload(h[0]);
        std::vector<const uint16_t*> shifted;
        for (const uint16_t* p : ptrs) shifted.push_back(p + 1);
        cuda::sum_rows(shifted.data(), count, n - 1, out.get(), nullptr);
        const std::vector<uint16_t> got = out.download();
        for (int64_t i = 0; i + 1 < n; ++i) ASSERT_EQ(got[i], want[i + 1]) << what << ": misaligned " << i;
      }
    }
  }
  EXPECT_THROW(cuda::sum_rows(nullptr, 9, 10, nullptr, nullptr), Error);
  {
    // One addend that already is the output (a layer's reduce with no shared expert, planned in
    // place): nothing to add, so nothing is launched; two addends in place are still summed.
    const std::vector<uint16_t> h = random_bf16(64, "sum.single", 1.0f), h2 = random_bf16(64, "sum.second", 1.0f);
    DeviceBuffer<uint16_t> a(h), b(h2);
    cudaStream_t s = nullptr;
    ASSERT_EQ(cudaStreamCreate(&s), cudaSuccess);
    auto nodes_captured = [&](int count) {
      const uint16_t* ptrs[2] = {a.get(), b.get()};
      cudaGraph_t graph = nullptr;
      EXPECT_EQ(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), cudaSuccess);
      cuda::sum_rows(ptrs, count, 64, a.get(), s);
      EXPECT_EQ(cudaStreamEndCapture(s, &graph), cudaSuccess);
      size_t nodes = 0;
      EXPECT_EQ(cudaGraphGetNodes(graph, nullptr, &nodes), cudaSuccess);
      cudaGraphDestroy(graph);
      return nodes;
    };
    EXPECT_EQ(nodes_captured(1), 0u);
    EXPECT_EQ(nodes_captured(2), 1u);
    EXPECT_EQ(a.download(), h);  // captured, never run
    cudaStreamDestroy(s);
  }
  DeviceBuffer<uint16_t> zeros(std::vector<uint16_t>(100, 0x3f80));
  cuda::sum_rows(nullptr, 0, 100, zeros.get(), nullptr);
  EXPECT_EQ(zeros.download(), std::vector<uint16_t>(100, 0));
}

TEST(CudaElementwise, ConversionsRoundToNearestEven) {
  if (moeflow::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (int64_t n : {4096, 1003, 5}) {
    const std::string what = "convert.n" + std::to_string(n);
    std::vector<float> f = random_values(static_cast<size_t>(n), what, 100.0f);
    if (n > 3) {
      f[0] = 1.0f + std::ldexp(1.0f, -8);                            // a tie: rounds to even (1.0)
      f[1] = 1.0f + 3 * std::ldexp(1.0f, -8);                        // a tie: rounds to even, upwards
      f[2] = std::ldexp(1.0f, -130);                                 // subnormal
    }
    DeviceBuffer<float> d_f(f), back(static_cast<size_t>(n));
    DeviceBuffer<uint16_t> d_b(static_cast<size_t>(n));
    cuda::convert_f32_to_bf16(d_f.get(), n, d_b.get(), nullptr);
    const std::vector<uint16_t> b = d_b.download();
    EXPECT_EQ(b, to_bf16(f)) << what;
    cuda::convert_bf16_to_f32(d_b.get(), n, back.get(), nullptr);
    EXPECT_EQ(back.download(), to_f32(b)) << what;
  }
}

}  // namespace
}  // namespace moeflow
