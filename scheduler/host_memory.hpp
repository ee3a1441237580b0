#pragma once
// Host memory: what the machine can give (MemAvailable, or the cgroup's limit when lower), and
// arenas laid out by a Plan's buffer table, allocated once.
#include <cstdint>
#include <memory>
#include <string>

#include "scheduler/plan.hpp"

namespace moeflow {

// "1.25 GiB": how every memory message states a size.
std::string format_gib(int64_t bytes);

// Bytes this process may still allocate: min(MemAvailable, cgroup limit - cgroup usage).
int64_t available_host_bytes();
// Throws Error(resource) saying what needs how much and what is available, when bytes exceed it.
void require_host_bytes(int64_t bytes, const std::string& what);

// One allocation holding one arena of a plan; values sit at their planned offsets.
class HostArena {
 public:
  HostArena(const Plan& plan, Arena arena);
  void* data(ValueId v) const;
  template <class T> T* as(ValueId v) const { return static_cast<T*>(data(v)); }
  int64_t bytes() const { return bytes_; }
  std::byte* base() const { return memory_.get(); }
  Arena arena() const { return arena_; }

 private:
  struct Free { void operator()(std::byte* p) const; };
  const Plan* plan_;
  Arena arena_;
  int64_t bytes_;
  std::unique_ptr<std::byte[], Free> memory_;
};

// Fills every value of `arena` with its random data (ValueInit, keyed by name and seed) for T tokens.
void fill_random(const Plan& plan, HostArena& arena, int64_t tokens, uint64_t seed);
// Fills one value.
void fill_random_value(const Value& v, void* data, int64_t tokens, uint64_t seed);

}  // namespace moeflow
