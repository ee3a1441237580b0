// small_rows_gemm against a double-precision loop on generated data: every remainder of n, k and
// cols, padded strides (padding of y must stay untouched), and bit-identical repeats.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/common/random.hpp"
#include "kernels/cpu/small_rows_gemm.hpp"

namespace moeflow {
namespace {

constexpr uint64_t kSeed = 20240611;
constexpr float kPad = -12345.0f;  // sentinel in y's padding

std::vector<float> random_values(size_t n, const std::string& name) {
  const uint64_t key = rng::stream_key(kSeed, rng::name_key(name));
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = rng::uniform_pm1(key, i);
  return v;
}

struct Case {
  int n, k, cols, ldw, ldy;
};

// Runs one case: x and w exactly sized (so ASan sees any read past their ends), y padded.
void check_case(const Case& c) {
  SCOPED_TRACE("n=" + std::to_string(c.n) + " k=" + std::to_string(c.k) + " cols=" + std::to_string(c.cols) +
               " ldw=" + std::to_string(c.ldw) + " ldy=" + std::to_string(c.ldy));
  const std::string tag = std::to_string(c.n) + "/" + std::to_string(c.k) + "/" + std::to_string(c.cols);
  const std::vector<float> x = random_values(static_cast<size_t>(c.n) * c.k, "x" + tag);
  // w has (cols - 1) full strides plus one k-long last row: nothing after the last element.
  const size_t w_size = static_cast<size_t>(c.cols - 1) * c.ldw + c.k;
  std::vector<float> w = random_values(w_size, "w" + tag);
  const size_t y_size = static_cast<size_t>(c.n - 1) * c.ldy + c.cols;
  std::vector<float> y(y_size, kPad);

  cpu::small_rows_gemm(x.data(), c.n, c.k, w.data(), c.cols, c.ldw, y.data(), c.ldy);

  for (int r = 0; r < c.n; ++r) {
    for (int col = 0; col < c.cols; ++col) {
      double want = 0.0, magnitude = 0.0;
      for (int i = 0; i < c.k; ++i) {
        const double p = static_cast<double>(x[static_cast<size_t>(r) * c.k + i]) *
                         static_cast<double>(w[static_cast<size_t>(col) * c.ldw + i]);
        want += p;
        magnitude += std::fabs(p);
      }
      const double got = y[static_cast<size_t>(r) * c.ldy + col];
      // Relative to Σ|x·w| (the scale of fp32 rounding error in a dot product), 1e-5.
      ASSERT_LE(std::fabs(got - want), 1e-5 * magnitude + 1e-30) << "r=" << r << " c=" << col;
    }
    for (int col = c.cols; col < c.ldy && r + 1 < c.n; ++col)
      ASSERT_EQ(y[static_cast<size_t>(r) * c.ldy + col], kPad) << "padding written at r=" << r << " c=" << col;
  }

  // Same inputs, same bits.
  std::vector<float> again(y_size, kPad);
  cpu::small_rows_gemm(x.data(), c.n, c.k, w.data(), c.cols, c.ldw, again.data(), c.ldy);
  ASSERT_EQ(std::memcmp(y.data(), again.data(), y_size * sizeof(float)), 0);
}

TEST(SmallRowsGemm, MatchesDoubleLoopOverRemainders) {
  for (int n = 1; n <= 17; ++n)
    for (int k : {1, 7, 8, 13, 100, 257})
      for (int cols : {1, 3, 4, 5, 33}) {
        check_case({n, k, cols, k, cols});            // dense
        check_case({n, k, cols, k + 3, cols + 2});    // padded strides
      }
}

TEST(SmallRowsGemm, LongRowsCrossChunksAndGroups) {
  // k beyond one L1 chunk (256) with every remainder mod 8 and mod 32; n past a row group (16).
  for (int n : {1, 2, 3, 16, 17, 33})
    for (int k : {256, 263, 520, 777, 2048}) check_case({n, k, 13, k + 5, 17});
}

TEST(SmallRowsGemm, ExactOnSmallIntegers) {
  // Integer-valued inputs: every partial sum is exact in fp32, so the result must be exact.
  const int n = 5, k = 301, cols = 7;
  std::vector<float> x(static_cast<size_t>(n) * k), w(static_cast<size_t>(cols) * k), y(static_cast<size_t>(n) * cols);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(static_cast<int>(i % 7) - 3);
  for (size_t i = 0; i < w.size(); ++i) w[i] = static_cast<float>(static_cast<int>(i % 5) - 2);
  cpu::small_rows_gemm(x.data(), n, k, w.data(), cols, k, y.data(), cols);
  for (int r = 0; r < n; ++r)
    for (int c = 0; c < cols; ++c) {
      double want = 0;
      for (int i = 0; i < k; ++i) want += double(x[size_t(r) * k + i]) * double(w[size_t(c) * k + i]);
      EXPECT_EQ(y[size_t(r) * cols + c], static_cast<float>(want)) << r << "," << c;
    }
}

TEST(SmallRowsGemm, RowsIndependentOfBatch) {
  // A row alone and the same row inside a 16-row call agree to fp32 rounding (their summation
  // splits may differ: a lone row uses the 1-row tile).
  const int k = 2051, cols = 9;
  const std::vector<float> x = random_values(static_cast<size_t>(16) * k, "x_batch");
  const std::vector<float> w = random_values(static_cast<size_t>(cols) * k, "w_batch");
  std::vector<float> y16(static_cast<size_t>(16) * cols), y1(cols);
  cpu::small_rows_gemm(x.data(), 16, k, w.data(), cols, k, y16.data(), cols);
  for (int r = 0; r < 16; ++r) {
    cpu::small_rows_gemm(x.data() + static_cast<size_t>(r) * k, 1, k, w.data(), cols, k, y1.data(), cols);
    for (int c = 0; c < cols; ++c) EXPECT_NEAR(y1[c], y16[static_cast<size_t>(r) * cols + c], 1e-4f) << r << "," << c;
  }
}

static_assert(cpu::kSmallRowsMax >= 1);

}  // namespace
}  // namespace moeflow
