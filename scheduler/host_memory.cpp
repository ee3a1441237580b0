#include "scheduler/host_memory.hpp"

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

void fill_random_value(const Value& v, void* data, int64_t tokens, uint64_t seed) {
  const uint64_t key = rng::name_key(v.name);
  const int64_t n = v.shape().elements(tokens);
  if (v.dtype() != DType::f32 && v.init != ValueInit::expert_ids)
    fail_input("value '" + v.name + "' is " + v.type_str() + ": host random data is generated in f32 only");
  switch (v.init) {
    case ValueInit::uniform: cpu::fill_uniform(static_cast<float*>(data), n, seed, key, v.init_scale); break;
    case ValueInit::unit_interval: cpu::fill_unit_interval(static_cast<float*>(data), n, seed, key); break;
    case ValueInit::expert_ids:
      cpu::fill_distinct_ids(static_cast<int32_t*>(data), tokens, static_cast<int>(v.shape()[1].fixed), v.init_choices,
                             seed, key);
      break;
  }
}

void fill_random(const Plan& plan, HostArena& arena, int64_t tokens, uint64_t seed) {
  for (const Buffer& b : plan.buffers)
    if (b.arena == arena.arena()) fill_random_value(plan.graph->value(b.value), arena.data(b.value), tokens, seed);
}

}  // namespace moeflow
