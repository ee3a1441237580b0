#include "scheduler/host_memory.hpp"

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "graph/error.hpp"
#include "kernels/common/random.hpp"
#include "kernels/cpu/elementwise.hpp"
#include "kernels/cpu/random_fill.hpp"

namespace moeflow {

namespace {

int64_t read_number(const std::string& path) {
  std::ifstream f(path);
  std::string text;
  if (!(f >> text) || text == "max") return -1;
  try {
    return std::stoll(text);
  } catch (...) {
    return -1;
  }
}

}  // namespace

std::string format_gib(int64_t b) {
  std::ostringstream o;
  o.setf(std::ios::fixed);
  o.precision(2);
  o << static_cast<double>(b) / (1024.0 * 1024.0 * 1024.0) << " GiB";
  return o.str();
}

int64_t available_host_bytes() {
  int64_t available = -1;
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  int64_t kib = 0;
  std::string unit;
  while (meminfo >> key >> kib >> unit)
    if (key == "MemAvailable:") available = kib * 1024;
  // cgroup v2, then v1: a container's limit may be far below what the host has.
  for (auto [limit_path, usage_path] : {std::pair{"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"},
                                        std::pair{"/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                                  "/sys/fs/cgroup/memory/memory.usage_in_bytes"}}) {
    const int64_t limit = read_number(limit_path), usage = read_number(usage_path);
    if (limit > 0 && limit < (int64_t{1} << 60) && usage >= 0) {
      const int64_t room = limit - usage;
      if (available < 0 || room < available) available = room;
      break;
    }
  }
  return available;
}

void require_host_bytes(int64_t bytes, const std::string& what) {
  const int64_t available = available_host_bytes();
  if (available >= 0 && bytes > available)
    fail_resource(what + " needs " + format_gib(bytes) + " of host memory but only " + format_gib(available) +
                  " is available (MemAvailable / cgroup limit)");
}

void HostArena::Free::operator()(std::byte* p) const { std::free(p); }

HostArena::HostArena(const Plan& plan, Arena arena) : plan_(&plan), arena_(arena), bytes_(plan.bytes(arena)) {
  const std::size_t size = static_cast<std::size_t>(std::max<int64_t>(bytes_, 256));
  memory_.reset(static_cast<std::byte*>(std::aligned_alloc(256, (size + 255) / 256 * 256)));
  if (!memory_) fail_resource("cannot allocate " + format_gib(bytes_) + " for the " + to_string(arena) + " arena");
}

void* HostArena::data(ValueId v) const {
  const Buffer& b = plan_->buffer(v);
  if (b.arena != arena_)
    fail_input("value '" + plan_->graph->value(v).name + "' lives in the " + to_string(b.arena) + " arena, not " +
               to_string(arena_));
  return memory_.get() + b.offset;
}

namespace {

// A sliced value's uniform data: each element drawn at its index in the source tensor.
void fill_uniform_slice(const Value& v, float* dst, int64_t tokens, uint64_t seed) {
  const SourceSlice& src = *v.source;
  const int rank = v.shape().rank();
  if (static_cast<int>(src.dims.size()) != rank)
    fail_input("value '" + v.name + "': its source slice of '" + src.source + "' gives " + std::to_string(src.dims.size()) +
               " dimensions for a rank-" + std::to_string(rank) + " value");
  std::vector<int64_t> local(rank), full(rank), block_local(rank), block_full(rank), stride(rank);
  for (int d = 0; d < rank; ++d) {
    const SliceDim& sd = src.dims[static_cast<std::size_t>(d)];
    local[d] = v.shape()[d].symbolic() ? v.tokens_in(tokens) * v.shape()[d].token_factor : v.shape()[d].fixed;
    full[d] = sd.full > 0 ? sd.full : local[d];
    if (sd.blocks < 1 || local[d] % sd.blocks != 0 || full[d] % sd.blocks != 0)
      fail_input("value '" + v.name + "': dimension " + std::to_string(d) + " (" + std::to_string(local[d]) + " of " +
                 std::to_string(full[d]) + ") does not split into " + std::to_string(sd.blocks) + " equal blocks");
    block_local[d] = local[d] / sd.blocks;
    block_full[d] = full[d] / sd.blocks;
  }
  int64_t s = 1;
  for (int d = rank - 1; d >= 0; --d) {
    stride[d] = s;
    s *= full[d];
  }
  auto coord = [&](int d, int64_t i) {
    return (i / block_local[d]) * block_full[d] + src.dims[static_cast<std::size_t>(d)].offset + i % block_local[d];
  };
  const int64_t inner = local[rank - 1];
  const int64_t runs = inner == 0 ? 0 : v.shape().elements(v.tokens_in(tokens)) / inner;
  const uint64_t key = rng::stream_key(seed, rng::name_key(src.source));
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, runs, 16), [&](const tbb::blocked_range<int64_t>& r) {
    for (int64_t run = r.begin(); run < r.end(); ++run) {
      int64_t base = 0, rest = run;
      for (int d = rank - 2; d >= 0; --d) {
        base += coord(d, rest % local[d]) * stride[d];
        rest /= local[d];
      }
      float* out = dst + run * inner;
      for (int64_t i = 0; i < inner; ++i)
        out[i] = rng::uniform_pm1(key, static_cast<uint64_t>(base + coord(rank - 1, i))) * v.init_scale;
    }
  });
}

}  // namespace

void fill_random_value(const Value& v, void* data, int64_t tokens, uint64_t seed) {
  const uint64_t key = rng::name_key(v.source ? v.source->source : v.name);
  const int64_t n = v.shape().elements(v.tokens_in(tokens));
  if (v.dtype() != DType::f32 && v.init != ValueInit::expert_ids)
    fail_input("value '" + v.name + "' is " + v.type_str() + ": host random data is generated in f32 only");
  // Token-indexed inits take a slice of whole rows only (a data-parallel rank's tokens).
  int64_t first_row = 0;
  if (v.source && v.init != ValueInit::uniform) {
    for (std::size_t d = 1; d < v.source->dims.size(); ++d)
      if (v.source->dims[d].offset != 0 || v.source->dims[d].blocks != 1 ||
          (v.source->dims[d].full != 0 && v.source->dims[d].full != v.shape()[static_cast<int>(d)].fixed))
        fail_input("value '" + v.name + "': routing inputs can be sliced by token rows only");
    first_row = v.source->dims.empty() ? 0 : v.source->dims[0].offset;
  }
  const int64_t row_elements = v.shape().rank() > 1 ? v.shape().elements(1) / std::max<int64_t>(1, v.shape()[0].at(1)) : 1;
  switch (v.init) {
    case ValueInit::uniform:
      if (v.source) fill_uniform_slice(v, static_cast<float*>(data), tokens, seed);
      else cpu::fill_uniform(static_cast<float*>(data), n, seed, key, v.init_scale);
      break;
    case ValueInit::unit_interval:
      cpu::fill_unit_interval(static_cast<float*>(data), n, seed, key, first_row * row_elements);
      break;
    case ValueInit::expert_ids:
      cpu::fill_distinct_ids(static_cast<int32_t*>(data), v.tokens_in(tokens), static_cast<int>(v.shape()[1].fixed),
                             v.init_choices, seed, key, first_row);
      break;
  }
}

void fill_random(const Plan& plan, HostArena& arena, int64_t tokens, uint64_t seed) {
  for (const Buffer& b : plan.buffers)
    if (b.arena == arena.arena() && !b.is_view()) fill_random_value(plan.graph->value(b.value), arena.data(b.value), tokens, seed);
}

}  // namespace moeflow
