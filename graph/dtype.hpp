#pragma once
// Element types of values. The CPU backend computes in f32; the CUDA backend stores bf16.
#include <cstddef>
#include <string>

namespace moeflow {

enum class DType { f32, bf16, i32 };

constexpr std::size_t dtype_size(DType t) { return t == DType::bf16 ? 2 : 4; }
inline const char* to_string(DType t) {
  switch (t) {
    case DType::f32: return "f32";
    case DType::bf16: return "bf16";
    case DType::i32: return "i32";
  }
  return "?";
}

}  // namespace moeflow
