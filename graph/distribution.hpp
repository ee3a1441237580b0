#pragma once
// How a value is laid out over a parallel group. Replicated: every rank holds all of it.
// Split(dim): each rank holds a slice along dim. Partial: each rank holds a summand still owed,
// so it must be reduced exactly once before it is used as a whole (the bug of vLLM PR 30775).
#include <string>

namespace moeflow {

struct Distribution {
  enum class Kind { replicated, split, partial };
  Kind kind = Kind::replicated;
  int dim = -1;  // for split

  static Distribution replicated() { return {}; }
  static Distribution split(int d) { return {Kind::split, d}; }
  static Distribution partial() { return {Kind::partial, -1}; }
  std::string str() const {
    switch (kind) {
      case Kind::replicated: return "replicated";
      case Kind::split: return "split(" + std::to_string(dim) + ")";
      case Kind::partial: return "partial";
    }
    return "?";
  }
  friend bool operator==(const Distribution&, const Distribution&) = default;
};

}  // namespace moeflow
