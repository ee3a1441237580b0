#include "graph/shape.hpp"

namespace moeflow {

bool Shape::symbolic() const {
  for (const Dim& d : dims_)
    if (d.symbolic()) return true;
  return false;
}

int64_t Shape::elements(int64_t tokens) const {
  int64_t n = 1;
  for (const Dim& d : dims_) n *= d.at(tokens);
  return n;
}

std::string Shape::str() const {
  std::string s = "[";
  for (std::size_t i = 0; i < dims_.size(); ++i) {
    if (i) s += ",";
    const Dim& d = dims_[i];
    if (!d.symbolic()) s += std::to_string(d.fixed);
    else if (d.token_factor == 1) s += "T";
    else s += std::to_string(d.token_factor) + "T";
  }
  return s + "]";
}

std::string Shape::str(int64_t tokens) const {
  std::string s = "[";
  for (std::size_t i = 0; i < dims_.size(); ++i) {
    if (i) s += ",";
    s += std::to_string(dims_[i].at(tokens));
  }
  return s + "]";
}

}  // namespace moeflow
