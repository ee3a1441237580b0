// `moeflow bench --passes`: rows of the same point from several passes become one point with the
// median of the passes' times and their spread; points keep the order they were first measured in.
#include <gtest/gtest.h>

#include <sstream>

#include "bench/pass_summary.hpp"

using namespace moeflow;

namespace {

nlohmann::json row(int64_t T, const std::string& plan, double time_us, double floor_us = 50.0) {
  return {{"scope", "layer"}, {"preset", "m"}, {"T", T}, {"chunks", 1}, {"plan", plan},
          {"time_us", time_us}, {"floor_us", floor_us}, {"runs", 10}};
}

}  // namespace

TEST(PassSummary, GroupsRowsByPointWithMedianAndSpread) {
  const std::vector<nlohmann::json> rows = {
      row(8, "serial", 100.0), row(8, "concurrent", 80.0), row(1, "serial", 20.0),  // pass 1
      row(8, "serial", 110.0), row(8, "concurrent", 84.0), row(1, "serial", 21.0),  // pass 2
      row(8, "serial", 104.0), row(8, "concurrent", 82.0), row(1, "serial", 30.0),  // pass 3
      {{"note", "a row without a time is not a point"}},
  };
  const std::vector<PassPoint> points = summarize_passes(rows);
  ASSERT_EQ(points.size(), 3u);
  EXPECT_EQ(points[0].key["T"], 8);
  EXPECT_EQ(points[0].key["plan"], "serial");
  EXPECT_FALSE(points[0].key.contains("time_us"));
  EXPECT_FALSE(points[0].key.contains("runs"));
  EXPECT_EQ(points[0].time_us, (std::vector<double>{100.0, 110.0, 104.0}));
  EXPECT_DOUBLE_EQ(points[0].median_us, 104.0);
  EXPECT_DOUBLE_EQ(points[0].spread, 10.0 / 104.0);
  EXPECT_DOUBLE_EQ(points[0].ratio_floor, 104.0 / 50.0);
  EXPECT_DOUBLE_EQ(points[1].median_us, 82.0);
  EXPECT_EQ(points[2].key["T"], 1);
  EXPECT_DOUBLE_EQ(points[2].median_us, 21.0);  // one slow pass moves the spread, not the median
  EXPECT_DOUBLE_EQ(points[2].spread, 10.0 / 21.0);

  // Each pass measures the rates again: the ratio is to the smallest floor any pass measured (a
  // pass whose rates came out low does not flatter the point), whichever pass it was.
  const std::vector<PassPoint> moved =
      summarize_passes({row(1, "serial", 33.6, 22.9), row(1, "serial", 36.9, 26.9), row(1, "serial", 36.9, 26.7)});
  ASSERT_EQ(moved.size(), 1u);
  EXPECT_DOUBLE_EQ(moved[0].ratio_floor, 36.9 / 22.9);
  const std::vector<PassPoint> later =
      summarize_passes({row(1, "serial", 36.9, 26.9), row(1, "serial", 33.6, 22.9), row(1, "serial", 36.9, 0.0)});
  EXPECT_DOUBLE_EQ(later[0].ratio_floor, 36.9 / 22.9);

  // Rows that asked for different kernels stay apart, though the planner chose the same one.
  nlohmann::json asked_auto = row(2, "serial", 5.0), asked_x = row(2, "serial", 9.0);
  asked_auto["experts_kernel_asked"] = "auto";
  asked_x["experts_kernel_asked"] = "cuda.x";
  asked_auto["experts_kernel"] = asked_x["experts_kernel"] = "cuda.x";
  EXPECT_EQ(summarize_passes({asked_auto, asked_x, asked_auto, asked_x}).size(), 2u);

  // An even number of passes: the mean of the middle two.
  const std::vector<PassPoint> two = summarize_passes({row(4, "serial", 10.0), row(4, "serial", 14.0)});
  ASSERT_EQ(two.size(), 1u);
  EXPECT_DOUBLE_EQ(two[0].median_us, 12.0);

  std::ostringstream out;
  print_pass_summary(points, out);
  EXPECT_NE(out.str().find("scope=layer preset=m T=8 chunks=1 plan=serial"), std::string::npos) << out.str();
  EXPECT_NE(out.str().find("spread 9.6%"), std::string::npos) << out.str();
  EXPECT_NE(out.str().find("passes 100.0 110.0 104.0"), std::string::npos) << out.str();
}
