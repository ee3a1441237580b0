#pragma once
// Measured kernel choices (`moeflow tune`): for an op's signature (its kind and its inputs' types,
// the token dimension left symbolic), a device and a T, the kernel that ran fastest there. The
// planner prefers a cached choice over the registry's priority order (the built-in heuristic) when
// one was measured on the same device within a factor of two of the node's T; otherwise the
// heuristic decides, and the plan says which of the two chose.
#include <cstdint>
#include <string>
#include <vector>

#include "graph/graph.hpp"

namespace moeflow {

struct TunedKernel {
  std::string device;     // the GPU's name as the runtime reports it ("NVIDIA H100 80GB HBM3")
  std::string signature;  // tuning_signature() of the node
  int64_t tokens = 0;     // T it was measured at
  std::string kernel;     // the fastest kernel there
  double time_us = 0.0;   // its median time
};

class TuningCache {
 public:
  // A JSON file {"version": 1, "entries": [...]}; bad input (naming the file and the entry) if it is
  // not one. A missing file is an empty cache.
  static TuningCache load(const std::string& path);
  void save(const std::string& path) const;
  // Replaces the entry of the same device, signature and T.
  void record(TunedKernel k);
  // The entry of `signature` on `device` (any device when empty) whose T is nearest to `tokens` on
  // a log scale, if one lies within a factor of two; else null.
  const TunedKernel* find(const std::string& device, const std::string& signature, int64_t tokens) const;
  const std::vector<TunedKernel>& entries() const { return entries_; }
  const std::string& source() const { return source_; }

 private:
  std::vector<TunedKernel> entries_;
  std::string source_;
};

// "experts([T*8, 2048] bf16, [129] i32, ...)": what a kernel's speed depends on besides T.
std::string tuning_signature(const Graph& g, const Node& n);

}  // namespace moeflow
