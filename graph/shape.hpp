#pragma once
// Shapes whose token dimension is symbolic: a Dim is either a fixed extent or `factor × T`, where T
// is the number of tokens of a run (≤ the graph's maximum). One graph and plan serve every T.
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

namespace moeflow {

struct Dim {
  int64_t fixed = 0;         // extent when factor == 0
  int64_t token_factor = 0;  // extent = token_factor × T when > 0

  static constexpr Dim of(int64_t n) { return Dim{n, 0}; }
  static constexpr Dim tokens(int64_t factor = 1) { return Dim{0, factor}; }
  constexpr bool symbolic() const { return token_factor > 0; }
  constexpr int64_t at(int64_t tokens) const { return symbolic() ? token_factor * tokens : fixed; }
  friend constexpr bool operator==(const Dim&, const Dim&) = default;
};

// Shorthand for the DESIGN.md sketch: `{tokens(), 7168}`.
constexpr Dim tokens(int64_t factor = 1) { return Dim::tokens(factor); }

class Shape {
 public:
  Shape() = default;
  Shape(std::initializer_list<Dim> dims) : dims_(dims) {}
  explicit Shape(std::vector<Dim> dims) : dims_(std::move(dims)) {}

  int rank() const { return static_cast<int>(dims_.size()); }
  const Dim& operator[](int i) const { return dims_.at(static_cast<std::size_t>(i)); }
  const std::vector<Dim>& dims() const { return dims_; }
  bool symbolic() const;
  int64_t elements(int64_t tokens) const;
  // "[T,2048]" symbolically, or "[64,2048]" for a given T.
  std::string str() const;
  std::string str(int64_t tokens) const;
  friend bool operator==(const Shape&, const Shape&) = default;

 private:
  std::vector<Dim> dims_;
};

}  // namespace moeflow
