#include "bench/cuda/cuda_session.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <chrono>
#include <map>
#include <mutex>
#include <sstream>
#include <thread>

#include "graph/error.hpp"
#include "kernels/common/random.hpp"
#include "kernels/cpu/random_fill.hpp"
#include "kernels/cuda/bf16.hpp"
#include "kernels/cuda/check.cuh"
#include "kernels/cuda/cublas_gemm.hpp"
#include "kernels/cuda/device.hpp"
#include "kernels/cuda/random_fill.hpp"
#include "kernels/cuda/stopwatch.hpp"
#include "scheduler/host_memory.hpp"

namespace moeflow {

namespace {

// Draws one input or weight on the device: uniform values by the device generator (f32 or bf16),
// ids and unit-interval weights on the host (small) and copied.
// A slice of a larger tensor whose elements are one run of its counters (rows of the full tensor,
// every other dimension whole): the index of its first element there; -1 otherwise.
int64_t contiguous_first(const Value& v) {
  if (!v.source) return 0;
  const SourceSlice& s = *v.source;
  for (std::size_t d = 1; d < s.dims.size(); ++d)
    if (s.dims[d].offset != 0 || s.dims[d].blocks != 1 ||
        (s.dims[d].full != 0 && s.dims[d].full != v.shape()[static_cast<int>(d)].at(1)))
      return -1;
  const int64_t row = v.shape().rank() > 1 ? v.shape().elements(1) / std::max<int64_t>(1, v.shape()[0].at(1)) : 1;
  return s.dims.empty() ? 0 : s.dims[0].offset * row;
}

void fill_device_value(const Value& v, void* dst, int64_t tokens, uint64_t seed) {
  const int64_t n = v.shape().elements(v.tokens_in(tokens));
  const uint64_t key = rng::name_key(v.source ? v.source->source : v.name);
  const int64_t first = contiguous_first(v);
  if (v.init == ValueInit::uniform && first >= 0) {
    if (v.dtype() == DType::bf16) cuda::fill_uniform_bf16(static_cast<uint16_t*>(dst), n, seed, key, v.init_scale, first, nullptr);
    else cuda::fill_uniform_f32(static_cast<float*>(dst), n, seed, key, v.init_scale, first, nullptr);
    return;
  }
  if (v.init == ValueInit::uniform && v.dtype() == DType::bf16) {
    // A slice across inner dimensions (I split over ranks): drawn on the host, rounded, uploaded.
    Value as_f32 = v;
    as_f32.type->dtype = DType::f32;
    std::vector<float> host(static_cast<std::size_t>(n));
    fill_random_value(as_f32, host.data(), tokens, seed);
    std::vector<uint16_t> bits(host.size());
    for (std::size_t i = 0; i < host.size(); ++i) bits[i] = float_to_bf16(host[i]);
    MOEFLOW_CUDA_CHECK(cudaMemcpy(dst, bits.data(), bits.size() * 2, cudaMemcpyHostToDevice));
    return;
  }
  std::vector<std::byte> host(static_cast<std::size_t>(v.bytes(v.tokens_in(tokens))));
  fill_random_value(v, host.data(), tokens, seed);
  MOEFLOW_CUDA_CHECK(cudaMemcpy(dst, host.data(), host.size(), cudaMemcpyHostToDevice));
}

// The host fp32 view of a value as the device holds it: the host generator's values, rounded
// through bf16 where the device stores bf16 (so the reference reads exactly the device's numbers).
std::vector<float> host_copy_of_input(const Value& v, int64_t tokens, uint64_t seed) {
  const int64_t n = v.shape().elements(tokens);
  std::vector<float> out(static_cast<std::size_t>(n));
  if (v.dtype() == DType::i32) {
    fill_random_value(v, out.data(), tokens, seed);  // int32 bits in a float-sized buffer
    return out;
  }
  Value as_f32 = v;
  as_f32.type->dtype = DType::f32;
  fill_random_value(as_f32, out.data(), tokens, seed);
  if (v.dtype() == DType::bf16)
    for (float& f : out) f = bf16_to_float(float_to_bf16(f));
  return out;
}

template <class T> std::vector<T> to_host(const void* device, int64_t count) {
  std::vector<T> h(static_cast<std::size_t>(count));
  MOEFLOW_CUDA_CHECK(cudaMemcpy(h.data(), device, h.size() * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

uint64_t set_seed(uint64_t seed, int set) { return seed + 0x9e3779b9ull * static_cast<uint64_t>(set); }

}  // namespace

namespace {

// Median milliseconds of `body` (work queued on `stream`) over `reps` runs after a warm-up.
template <class Body>
double median_ms(cudaStream_t stream, int reps, Body&& body) {
  cuda::Stopwatch watch;
  body();  // warm-up
  std::vector<float> t;
  for (int i = 0; i < reps; ++i) t.push_back(watch.milliseconds(stream, body));
  std::sort(t.begin(), t.end());
  return static_cast<double>(t[t.size() / 2]);
}

// Bytes read + written per second by a device-to-device copy of `bytes`, the median of `reps`.
double copy_rate(std::size_t bytes, int reps, cudaStream_t stream) {
  void *src = nullptr, *dst = nullptr;
  MOEFLOW_CUDA_CHECK(cudaMalloc(&src, bytes));
  if (const cudaError_t status = cudaMalloc(&dst, bytes); status != cudaSuccess) {
    cudaFree(src);
    MOEFLOW_CUDA_CHECK(status);
  }
  cuda::fill_uniform_f32(static_cast<float*>(src), static_cast<int64_t>(bytes / 4), 1, rng::name_key("calib.copy"), 1.0f, 0, stream);
  const double ms = median_ms(stream, reps, [&] { MOEFLOW_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream)); });
  cudaFree(src);
  cudaFree(dst);
  return 2.0 * static_cast<double>(bytes) / (ms * 1e-3);
}

MachineRates measure_cuda_rates_now(int device) {
  MOEFLOW_CUDA_CHECK(cudaSetDevice(device));
  MachineRates r;
  cudaStream_t stream = nullptr;
  MOEFLOW_CUDA_CHECK(cudaStreamCreate(&stream));
  r.bytes_per_s = copy_rate(std::size_t{2} << 30, 10, stream);
  {
    const int64_t n = 8192;
    uint16_t *x = nullptr, *w = nullptr, *c = nullptr;
    MOEFLOW_CUDA_CHECK(cudaMalloc(&x, n * n * 2));
    MOEFLOW_CUDA_CHECK(cudaMalloc(&w, n * n * 2));
    MOEFLOW_CUDA_CHECK(cudaMalloc(&c, n * n * 2));
    cuda::fill_uniform_bf16(x, n * n, 1, rng::name_key("calib.a"), 1.0f, 0, stream);
    cuda::fill_uniform_bf16(w, n * n, 1, rng::name_key("calib.b"), 1.0f, 0, stream);
    void* ws = nullptr;
    const std::size_t ws_bytes = cuda::recommended_blas_workspace_bytes();
    MOEFLOW_CUDA_CHECK(cudaMalloc(&ws, ws_bytes));
    cuda::LaneContext ctx;
    ctx.stream = stream;
    ctx.blas = cuda::create_blas_handle(stream, ws, ws_bytes);
    const double ms = median_ms(stream, 10, [&] { cuda::gemm_bf16_nt(ctx, n, n, n, x, w, c, false); });
    r.flops_per_s = 2.0 * static_cast<double>(n) * n * n / (ms * 1e-3);
    cuda::destroy_blas_handle(ctx.blas);
    cudaFree(ws);
    cudaFree(x);
    cudaFree(w);
    cudaFree(c);
  }
  cudaStreamDestroy(stream);
  // Per launch inside a layer, beyond its bytes: 50-78 us for 4-11 launches at T=1 on the H100
  // (bench/NOTES.md), about 5 us each.
  r.overhead_s = 5e-6;
  r.kernels_fill_machine = true;
  r.measured = true;
  return r;
}

}  // namespace

MachineRates measure_cuda_rates(int device) {
  // Once per device and process, before the sweeps' sessions allocate and free tens of GB: measured
  // again right after a pass that ended with deepseek-v3, the copy read 2.6 against 3.0 TB/s
  // (nvidia-h100-x1, `bench --passes 2` over the four presets), which raised that pass's floors by
  // 15% at the bandwidth-bound points. The ceilings are the machine's; what such a history does to
  // the points measured next (mixtral-8x7b T=1 in that pass, 290 against 247 µs) shows as their
  // spread over the passes (bench/NOTES.md, "the ordering effect").
  static std::mutex guard;
  static std::map<int, MachineRates> measured;
  const std::lock_guard<std::mutex> lock(guard);
  const auto it = measured.find(device);
  if (it != measured.end()) {
    MOEFLOW_CUDA_CHECK(cudaSetDevice(device));
    return it->second;
  }
  return measured[device] = measure_cuda_rates_now(device);
}

double settle_device_bandwidth(int device, double ceiling_bytes_per_s) {
  MOEFLOW_CUDA_CHECK(cudaSetDevice(device));
  // Its 1 GiB copy needs 2 GiB; where the sessions leave less than twice that free, no wait (the
  // check must not make a session that fits fail).
  const std::size_t bytes = std::size_t{1} << 30;
  int64_t free_bytes = 0, total = 0;
  cuda::device_memory(device, free_bytes, total);
  if (free_bytes < 4 * static_cast<int64_t>(bytes)) return 0.0;
  cudaStream_t stream = nullptr;
  MOEFLOW_CUDA_CHECK(cudaStreamCreate(&stream));
  const auto start = std::chrono::steady_clock::now();
  auto since_start_s = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); };
  double waited_s = 0.0;
  while (copy_rate(bytes, 5, stream) < kSettledShare * ceiling_bytes_per_s && since_start_s() < kMostSettle_s) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    waited_s = since_start_s();
  }
  cudaStreamDestroy(stream);
  return waited_s;
}

int64_t session_device_bytes(const Plan& plan, bool weights_held) {
  return (weights_held ? 0 : plan.bytes(Arena::weights)) + plan.bytes(Arena::workspace) + plan.bytes(Arena::inputs) +
         plan.packed_bytes + CudaExecutor::own_device_bytes(plan);
}

Plan plan_within_device_memory(std::shared_ptr<const Graph> graph, PlanOptions options, int64_t free_bytes,
                               bool weights_held) {
  Plan plan = make_plan(graph, options);
  const int64_t needed = session_device_bytes(plan, weights_held);
  if (plan.packed_bytes == 0 || needed + kPackedWeightsHeadroom <= free_bytes) return plan;
  for (const PlanStep& s : plan.steps)
    if (s.packed >= 0 && options.forced_kernels.count(plan.graph->node(s.node).op->kind())) return plan;
  options.packed_weights = false;
  Plan without = make_plan(graph, options);
  without.notes.push_back("packed weights off: with them the plan needs " + format_gib(needed) + " of device memory (" +
                          format_gib(plan.packed_bytes) + " of packed copies) and " + format_gib(kPackedWeightsHeadroom) +
                          " left free, " + format_gib(free_bytes) + " are free; without them " +
                          format_gib(session_device_bytes(without, weights_held)));
  return without;
}

CudaSession::CudaSession(std::shared_ptr<const Graph> graph, CudaSessionOptions options, CudaSession* share_weights)
    : plan_([&] {
        options.plan.backend = Backend::cuda;
        const PlanOptions po = observing(*graph, options.plan);
        if (cuda::device_count() <= po.device) return make_plan(graph, po);  // the memory check below says why
        int64_t free_bytes = 0, total = 0;
        cuda::device_memory(po.device, free_bytes, total);
        return plan_within_device_memory(graph, po, free_bytes, share_weights != nullptr);
      }()),
      options_(options) {
  const int device = options_.plan.device;
  std::ostringstream what;
  what.setf(std::ios::fixed);
  what.precision(2);
  what << "'" << plan_.graph->name() << "' (weights " << static_cast<double>(plan_.bytes(Arena::weights)) / (1 << 30)
       << " GiB in bf16 + workspace at T=" << plan_.graph->max_tokens() << ")";
  if (share_weights) {
    if (!plan_.weights_laid_out_as(share_weights->plan_) || share_weights->options_.seed != options_.seed)
      fail_input("CudaSession: weights can only be shared between plans of one layer and seed");
    weights_ = share_weights->weights_;
    loaded_ = share_weights->loaded_;
  }
  require_device_bytes(device, session_device_bytes(plan_, weights_ != nullptr), what.str());
  if (!weights_) {
    weights_ = std::make_shared<DeviceArena>(plan_, Arena::weights, device);
    if (options_.load_weights) {
      upload_loaded_weights();
    } else {
      for (const Buffer& b : plan_.buffers)
        if (b.arena == Arena::weights)
          fill_device_value(plan_.graph->value(b.value), weights_->data(b.value), plan_.graph->max_tokens(), options_.seed);
    }
  }
  executor_ = std::make_unique<CudaExecutor>(plan_, options_.comm);
  MOEFLOW_CUDA_CHECK(cudaDeviceSynchronize());
}

CudaSession::~CudaSession() = default;

void CudaSession::upload_loaded_weights() {
  const Graph& g = *plan_.graph;
  auto host = std::make_shared<std::map<ValueId, std::vector<float>>>();
  int64_t bytes = 0;
  for (const Buffer& b : plan_.buffers)
    if (b.arena == Arena::weights) bytes += g.value(b.value).shape().elements(g.max_tokens()) * 4;
  require_host_bytes(bytes, "the fp32 host copy of the loaded weights of '" + g.name() + "'");
  for (const Buffer& b : plan_.buffers)
    if (b.arena == Arena::weights)
      (*host)[b.value].assign(static_cast<std::size_t>(g.value(b.value).shape().elements(g.max_tokens())), 0.0f);
  options_.load_weights(g, [&](ValueId v) {
    auto it = host->find(v);
    if (it == host->end()) fail_input("load_weights: '" + g.value(v).name + "' is not a weight of '" + g.name() + "'");
    return it->second.data();
  });
  for (auto& [v, data] : *host) {
    const Value& val = g.value(v);
    if (val.dtype() == DType::bf16) {
      std::vector<uint16_t> bits(data.size());
      for (std::size_t i = 0; i < data.size(); ++i) {
        bits[i] = float_to_bf16(data[i]);
        data[i] = bf16_to_float(bits[i]);  // what the device holds, for the check
      }
      MOEFLOW_CUDA_CHECK(cudaMemcpy(weights_->data(v), bits.data(), bits.size() * 2, cudaMemcpyHostToDevice));
    } else if (val.dtype() == DType::f32) {
      MOEFLOW_CUDA_CHECK(cudaMemcpy(weights_->data(v), data.data(), data.size() * 4, cudaMemcpyHostToDevice));
    } else {
      fail_input("load_weights: weight '" + val.name + "' is " + val.type_str() + "; only f32 and bf16 load");
    }
  }
  loaded_ = std::move(host);
}

void CudaSession::set_tokens(int64_t tokens, int input_sets) {
  if (tokens <= 0 || tokens > plan_.graph->max_tokens())
    fail_input("tokens = " + std::to_string(tokens) + " must be in [1, " + std::to_string(plan_.graph->max_tokens()) + "]");
  if (input_sets < 1) fail_input("CudaSession: input_sets must be >= 1");
  tokens_ = tokens;
  inputs_.resize(static_cast<std::size_t>(input_sets));
  for (int s = 0; s < input_sets; ++s) {
    auto& arena = inputs_[static_cast<std::size_t>(s)];
    if (!arena) arena = std::make_unique<DeviceArena>(plan_, Arena::inputs, options_.plan.device);
    for (const Buffer& b : plan_.buffers)
      if (b.arena == Arena::inputs && !b.is_view()) fill_device_value(plan_.graph->value(b.value), arena->data(b.value), tokens, set_seed(options_.seed, s));
  }
  MOEFLOW_CUDA_CHECK(cudaDeviceSynchronize());
  overwritten_.clear();
  set_ = 0;
}

void CudaSession::use_input_set(int set) {
  if (set < 0 || set >= input_sets()) fail_input("CudaSession: no input set " + std::to_string(set));
  set_ = set;
}

double CudaSession::run(Trace* trace) {
  if (tokens_ == 0) fail_input("CudaSession::run: call set_tokens first");
  return executor_->run(*inputs_[static_cast<std::size_t>(set_)], *weights_, tokens_, trace);
}

void CudaSession::write_input(ValueId v, const void* host, std::size_t bytes) {
  if (!plan_.graph->value(v).is_graph_input() || plan_.buffer(v).arena != Arena::inputs ||
      static_cast<int64_t>(bytes) > plan_.buffer(v).bytes)
    fail_input("write_input: '" + plan_.graph->value(v).name + "' is not an input of that size");
  MOEFLOW_CUDA_CHECK(cudaMemcpy(inputs_[static_cast<std::size_t>(set_)]->data(v), host, bytes, cudaMemcpyHostToDevice));
  overwritten_[{set_, v}] = std::vector<std::byte>(static_cast<const std::byte*>(host), static_cast<const std::byte*>(host) + bytes);
}

void CudaSession::capture(bool stamped) {
  if (tokens_ == 0) fail_input("CudaSession::capture: call set_tokens first");
  executor_->capture(*inputs_[static_cast<std::size_t>(set_)], *weights_, tokens_, stamped);
}

void CudaSession::capture_any_tokens(bool stamped) {
  if (tokens_ == 0) fail_input("CudaSession::capture_any_tokens: call set_tokens first (it fills the inputs)");
  executor_->capture_any_tokens(*inputs_[static_cast<std::size_t>(set_)], *weights_, stamped);
}

double CudaSession::replay(Trace* trace) { return executor_->replay(trace, tokens_); }

std::vector<int32_t> CudaSession::read_i32(ValueId v, int64_t count) {
  if (plan_.graph->value(v).dtype() != DType::i32)
    fail_input("read_i32: value '" + plan_.graph->value(v).name + "' is " + plan_.graph->value(v).type_str());
  std::vector<int32_t> h(static_cast<std::size_t>(count));
  // An input is the current input set's; any other value may live in pinned host memory (the plan's
  // host arena): cudaMemcpyDefault reads either.
  const void* src = plan_.buffer(v).arena == Arena::inputs ? inputs_[static_cast<std::size_t>(set_)]->data(v)
                                                           : executor_->data(v);
  MOEFLOW_CUDA_CHECK(cudaMemcpy(h.data(), src, h.size() * 4, cudaMemcpyDefault));
  return h;
}

std::vector<float> CudaSession::output() {
  const Value& out = plan_.graph->value(plan_.graph->outputs().at(0));
  const int64_t n = out.shape().elements(tokens_);
  std::vector<float> y(static_cast<std::size_t>(n));
  if (out.dtype() == DType::bf16) {
    const std::vector<uint16_t> bits = to_host<uint16_t>(executor_->data(out.id), n);
    for (int64_t i = 0; i < n; ++i) y[static_cast<std::size_t>(i)] = bf16_to_float(bits[static_cast<std::size_t>(i)]);
  } else {
    y = to_host<float>(executor_->data(out.id), n);
  }
  return y;
}

CheckReport CudaSession::check(double tolerance) {
  const std::vector<float> y = output();
  return check_against(y.data(), tolerance);
}

CheckReport CudaSession::check_against(const float* y, double tolerance) {
  const Graph& g = *plan_.graph;
  // Host fp32 copies of exactly what the device read, and the engine's ids for the near-tie rule.
  std::map<ValueId, std::vector<float>> host;
  for (ValueId v : g.graph_inputs()) {
    const Value& val = g.value(v);
    if (loaded_ && loaded_->count(v)) continue;  // a checkpoint's weights: their host copy, as uploaded
    auto written = overwritten_.find({set_, v});
    if (written != overwritten_.end()) {  // written as the device holds it (ids, fp32 or bf16 bits)
      std::vector<float> f(written->second.size() / dtype_size(val.dtype()));
      if (val.dtype() == DType::bf16) {
        const auto* bits = reinterpret_cast<const uint16_t*>(written->second.data());
        for (std::size_t i = 0; i < f.size(); ++i) f[i] = bf16_to_float(bits[i]);
      } else {
        std::memcpy(f.data(), written->second.data(), written->second.size());
      }
      host[v] = std::move(f);
      continue;
    }
    host[v] = host_copy_of_input(val, val.role == ValueRole::weight ? g.max_tokens() : tokens_,
                                 val.role == ValueRole::weight ? options_.seed : set_seed(options_.seed, set_));
  }
  std::map<ValueId, std::vector<int32_t>> engine;
  for (const Node& n : g.nodes())
    if (n.op->kind() == "gate") {
      const Value& ids = g.value(n.outputs[0]);  // a chunk's gate holds only its rows
      engine[ids.id] = to_host<int32_t>(executor_->data(ids.id), ids.shape().elements(ids.tokens_in(tokens_)));
    }
  const int64_t host_bytes = [&] {
    int64_t b = 0;
    for (auto& [v, data] : host) b += static_cast<int64_t>(data.size() * 4);
    return b;
  }();
  require_host_bytes(host_bytes, "the reference check of '" + g.name() + "'");
  auto graph_data = [&](ValueId v) -> const void* {
    if (loaded_ && loaded_->count(v)) return loaded_->at(v).data();
    return host.at(v).data();
  };
  auto engine_data = [&](ValueId v) -> const void* { return engine.at(v).data(); };
  const ReferenceResult ref = reference_run(g, tokens_, graph_data, engine_data);
  return check_output(y, ref, tolerance);
}

Floor CudaSession::floor(const MachineRates& rates) {
  const Graph& g = *plan_.graph;
  if (routing_ids(g).empty()) return roofline_floor(g, tokens_, nullptr, rates);  // nothing routed (shared experts alone)
  const int current = set_;
  const Floor f = mean_floor(g, tokens_, input_sets(), [&](int set) {
    use_input_set(set);
    if (!routing_is_input(g)) run();
    return gather_routing(g, tokens_, [&](ValueId v, int64_t count) {
      const void* device_ids = plan_.buffer(v).arena == Arena::inputs ? inputs_[static_cast<std::size_t>(set)]->data(v)
                                                                      : executor_->data(v);
      return to_host<int32_t>(device_ids, count);
    });
  }, rates);
  use_input_set(current);
  return f;
}

}  // namespace moeflow
