#pragma once
// What the GPU tests ask of a CUDA session at a T: its output right against the reference (bf16
// relative norm error below 1e-2), and the same bytes again from a rerun and from a captured graph's
// replays (no floating-point atomics, nothing left over from the run before).
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "bench/cuda/cuda_session.hpp"

namespace moeflow::testing_gpu {

// Both outputs of the same size and bit for bit the same.
inline void expect_same_bytes(const std::vector<float>& expected, const std::vector<float>& actual, const std::string& what) {
  ASSERT_EQ(expected.size(), actual.size()) << what;
  EXPECT_EQ(0, std::memcmp(expected.data(), actual.data(), actual.size() * sizeof(float))) << what;
}

// The session's last output against the reference.
inline void expect_checked(CudaSession& s, const std::string& what) {
  const CheckReport r = s.check(1e-2);
  EXPECT_TRUE(r.pass) << what << " rel_norm " << r.comparison.rel_norm;
}

// Runs at T, checks the output against the reference and returns it.
inline std::vector<float> run_checked(CudaSession& s, int64_t tokens, const std::string& what) {
  s.set_tokens(tokens);
  s.run();
  expect_checked(s, what);
  return s.output();
}

// Runs again: the bytes of `eager`.
inline void expect_rerun_same(CudaSession& s, const std::vector<float>& eager, const std::string& what) {
  s.run();
  expect_same_bytes(eager, s.output(), what + ": rerun differs");
}

// Captures a graph at the session's T and replays it `replays` times: the bytes of `eager` each time.
inline void expect_replays_same(CudaSession& s, const std::vector<float>& eager, const std::string& what, int replays = 1) {
  s.capture();
  for (int replay = 0; replay < replays; ++replay) {
    s.replay();
    expect_same_bytes(eager, s.output(), what + ": replay differs");
  }
}

}  // namespace moeflow::testing_gpu
