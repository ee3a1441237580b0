// `moeflow bench --chunks`: the best chunked row over the best unchunked row per point and pass, the
// median over passes, the fewest rows a touched expert kept in one chunk and which row was best.
#include <gtest/gtest.h>

#include <sstream>

#include "bench/chunk_ratios.hpp"

using namespace moeflow;

namespace {

nlohmann::json row(int64_t T, int chunks, const std::string& plan, const std::string& kernel, double time_us,
                   int64_t fewest_rows = 100) {
  return {{"scope", "layer"}, {"preset", "m"}, {"T", T}, {"chunks", chunks}, {"plan", plan},
          {"experts_kernel", kernel}, {"time_us", time_us}, {"fewest_expert_rows", fewest_rows}};
}

}  // namespace

TEST(ChunkRatios, BestChunkedOverBestUnchunkedPerPass) {
  const std::vector<std::vector<nlohmann::json>> passes = {
      {row(8, 1, "serial", "k.loop", 100.0), row(8, 1, "graph", "k.grouped", 90.0),  // best unchunked: 90
       row(8, 2, "serial", "k.loop", 99.0, 40), row(8, 2, "graph", "k.grouped", 108.0, 40),
       row(8, 4, "serial", "k.loop", 120.0, 17), row(8, 4, "graph", "k.grouped", 117.0, 17),
       row(2, 1, "serial", "k.loop", 10.0)},  // a point measured unchunked only: no ratio
      {row(8, 1, "serial", "k.loop", 80.0), row(8, 1, "graph", "k.grouped", 95.0),  // best unchunked: 80
       row(8, 2, "serial", "k.loop", 92.0, 38), row(8, 2, "graph", "k.grouped", 84.0, 38),
       row(8, 4, "serial", "k.loop", 100.0, 16), row(8, 4, "graph", "k.grouped", 104.0, 16)},
      {row(8, 1, "serial", "k.loop", 85.0), row(8, 2, "serial", "k.loop", 93.5, 41),
       {{"note", "a row without a time counts for nothing"}, {"chunks", 2}}},
  };
  const std::vector<ChunkRatio> ratios = chunk_ratios(passes);
  ASSERT_EQ(ratios.size(), 2u);
  const ChunkRatio& two = ratios[0];
  EXPECT_EQ(two.point, (nlohmann::json{{"scope", "layer"}, {"preset", "m"}, {"T", 8}}));
  EXPECT_EQ(two.chunks, 2);
  ASSERT_EQ(two.per_pass.size(), 3u);
  EXPECT_DOUBLE_EQ(two.per_pass[0], 99.0 / 90.0);  // best against best, not a plan against its own unchunked row
  EXPECT_DOUBLE_EQ(two.per_pass[1], 84.0 / 80.0);
  EXPECT_DOUBLE_EQ(two.per_pass[2], 93.5 / 85.0);
  EXPECT_DOUBLE_EQ(two.median, 93.5 / 85.0);
  EXPECT_DOUBLE_EQ(two.low, 84.0 / 80.0);
  EXPECT_DOUBLE_EQ(two.high, 93.5 / 85.0);
  EXPECT_EQ(two.fewest_expert_rows, 38);
  EXPECT_EQ(two.best, "serial k.loop");  // best in two passes of three
  const ChunkRatio& four = ratios[1];
  EXPECT_EQ(four.chunks, 4);
  EXPECT_EQ(four.per_pass, (std::vector<double>{117.0 / 90.0, 100.0 / 80.0}));  // pass 3 measured no 4 chunks
  EXPECT_DOUBLE_EQ(four.median, (117.0 / 90.0 + 100.0 / 80.0) / 2);
  EXPECT_EQ(four.fewest_expert_rows, 16);

  std::ostringstream out;
  print_chunk_ratios(ratios, out);
  EXPECT_NE(out.str().find("T=8       2 chunks 1.100 (1.050-1.100 over 3 passes: 1.100 1.050 1.100)  fewest rows 38"
                           "  best: serial k.loop"),
            std::string::npos)
      << out.str();
  // A sweep measures every T at one chunk count before the next: the lines put a point's counts together.
  const std::vector<ChunkRatio> sorted = chunk_ratios({{row(8, 1, "serial", "k", 10.0), row(64, 1, "serial", "k", 20.0),
                                                        row(8, 2, "serial", "k", 11.0), row(64, 2, "serial", "k", 21.0),
                                                        row(8, 4, "serial", "k", 12.0), row(64, 4, "serial", "k", 22.0)}});
  ASSERT_EQ(sorted.size(), 4u);
  EXPECT_EQ(sorted[0].point["T"], 8);
  EXPECT_EQ(sorted[1].point["T"], 8);
  EXPECT_EQ(sorted[1].chunks, 4);
  EXPECT_EQ(sorted[2].point["T"], 64);
  EXPECT_EQ(sorted[2].chunks, 2);

  // Nothing routed (0 rows) is no count: the line leaves the rows out.
  const std::vector<ChunkRatio> unrouted =
      chunk_ratios({{row(8, 1, "serial", "k", 10.0, 0), row(8, 2, "serial", "k", 11.0, 0)}});
  ASSERT_EQ(unrouted.size(), 1u);
  EXPECT_EQ(unrouted[0].fewest_expert_rows, 0);
  std::ostringstream unrouted_out;
  print_chunk_ratios(unrouted, unrouted_out);
  EXPECT_EQ(unrouted_out.str().find("fewest rows"), std::string::npos) << unrouted_out.str();

  std::ostringstream none;
  print_chunk_ratios(chunk_ratios({{row(8, 1, "serial", "k", 1.0)}}), none);
  EXPECT_EQ(none.str(), "");  // nothing chunked, nothing printed
}
