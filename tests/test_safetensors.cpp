// The safetensors reader: round trips of F32, BF16 and F16 (exact, including fp16 subnormals,
// infinities and negative zero), sharded checkpoints, metadata, and every crafted bad file refused
// with one bad_input line naming the file and the tensor. Files are written by a tiny writer here.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "graph/error.hpp"
#include "ops/safetensors.hpp"
#include "tests/expect_error.hpp"
#include "tests/safetensors_writer.hpp"

namespace moeflow {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using testing::HasSubstr;

using testing_errors::bad_input_message;
using namespace testing_safetensors;

class Safetensors : public testing::Test {
 protected:
  void SetUp() override {
    const auto* info = testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() /
           ("moeflow_sft_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path file(const std::string& name) const { return dir_ / name; }

  // A file with the given header text and data, which open() must refuse naming the file and `tensor`.
  std::string refused(const std::string& header, const std::string& data, const std::string& tensor) {
    const fs::path p = file("bad.safetensors");
    write_raw(p, header, data);
    const std::string msg = bad_input_message([&] { SafetensorsCheckpoint::open(p.string()); });
    EXPECT_THAT(msg, HasSubstr(p.string()));
    if (!tensor.empty()) {
      EXPECT_THAT(msg, HasSubstr("'" + tensor + "'"));
    }
    return msg;
  }

  fs::path dir_;
};

uint32_t bits(float f) { return std::bit_cast<uint32_t>(f); }

// ---- round trips ----

TEST_F(Safetensors, F32RoundTripIsExact) {
  const std::vector<float> v = {1.5f, -0.0f, std::numeric_limits<float>::infinity(), 3.4e38f,
                                std::numeric_limits<float>::denorm_min(), -7.25f};
  write_st(file("a.safetensors"), {{"w", "F32", {2, 3}, raw(v)}});
  auto ck = SafetensorsCheckpoint::open(file("a.safetensors").string());
  const TensorInfo* t = ck.find("w");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->dtype, "F32");
  EXPECT_EQ(t->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(t->begin, 0u);
  EXPECT_EQ(t->end, 24u);
  EXPECT_EQ(t->file, file("a.safetensors").string());
  EXPECT_EQ(ck.find("nope"), nullptr);
  std::vector<float> out(6, 99.0f);
  ck.read_f32("w", {2, 3}, out.data());
  for (size_t i = 0; i < v.size(); ++i) EXPECT_EQ(bits(out[i]), bits(v[i])) << i;
}

TEST_F(Safetensors, Bf16RoundTripShifts) {
  const std::vector<uint16_t> v = {0x3f80, 0xc000, 0x8000, 0x7f80, 0xff80, 0x0001, 0x7fc0, 0x4049};
  write_st(file("a.safetensors"), {{"b", "BF16", {8}, raw(v)}});
  auto ck = SafetensorsCheckpoint::open(file("a.safetensors").string());
  std::vector<float> out(8);
  ck.read_f32("b", {8}, out.data());
  for (size_t i = 0; i < v.size(); ++i) EXPECT_EQ(bits(out[i]), static_cast<uint32_t>(v[i]) << 16) << i;
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], -2.0f);
  EXPECT_TRUE(std::signbit(out[2]) && out[2] == 0.0f);
  EXPECT_EQ(out[3], std::numeric_limits<float>::infinity());
}

TEST_F(Safetensors, F16RoundTripIsExact) {
  const std::vector<uint16_t> v = {0x3c00, 0x0001, 0x03ff, 0x8000, 0x7c00, 0xfc00, 0x7bff, 0x0400, 0x8001, 0xc000};
  write_st(file("a.safetensors"), {{"h", "F16", {2, 5}, raw(v)}});
  auto ck = SafetensorsCheckpoint::open(file("a.safetensors").string());
  std::vector<float> out(10);
  ck.read_f32("h", {2, 5}, out.data());
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(out[2], std::ldexp(1023.0f, -24));  // largest subnormal
  EXPECT_EQ(bits(out[3]), bits(-0.0f));  // negative zero
  EXPECT_EQ(out[4], std::numeric_limits<float>::infinity());
  EXPECT_EQ(out[5], -std::numeric_limits<float>::infinity());
  EXPECT_EQ(out[6], 65504.0f);
  EXPECT_EQ(out[7], std::ldexp(1.0f, -14));  // smallest normal
  EXPECT_EQ(out[8], -std::ldexp(1.0f, -24));
  EXPECT_EQ(out[9], -2.0f);
}

TEST(Fp16, EveryValueConvertsExactly) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float got = fp16_to_f32(static_cast<uint16_t>(h));
    const int exp = (h >> 10) & 0x1f;
    const int mant = h & 0x3ff;
    const float sign = (h & 0x8000) ? -1.0f : 1.0f;
    if (exp == 0x1f) {
      if (mant == 0) EXPECT_EQ(got, sign * std::numeric_limits<float>::infinity()) << h;
      else EXPECT_TRUE(std::isnan(got)) << h;
      continue;
    }
    const float want = exp == 0 ? sign * std::ldexp(static_cast<float>(mant), -24)
                                : sign * std::ldexp(static_cast<float>(1024 + mant), exp - 25);
    EXPECT_EQ(bits(got), bits(want)) << std::hex << h;
  }
}

TEST_F(Safetensors, SliceReadsRowBlocks) {
  std::vector<float> v(12);
  for (int i = 0; i < 12; ++i) v[i] = static_cast<float>(i);
  std::vector<uint16_t> b(12);
  for (int i = 0; i < 12; ++i) b[i] = static_cast<uint16_t>(bits(static_cast<float>(i)) >> 16);
  write_st(file("a.safetensors"), {{"f", "F32", {4, 3}, raw(v)}, {"g", "BF16", {4, 3}, raw(b)}});
  auto ck = SafetensorsCheckpoint::open(file("a.safetensors").string());
  for (const char* name : {"f", "g"}) {
    std::vector<float> out(6);
    ck.read_f32_slice(name, 3, 6, out.data());  // rows 1..2
    for (int i = 0; i < 6; ++i) EXPECT_EQ(out[i], static_cast<float>(3 + i)) << name;
    const std::string msg = bad_input_message([&] { ck.read_f32_slice(name, 9, 6, out.data()); });
    EXPECT_THAT(msg, HasSubstr(std::string("'") + name + "'"));
    EXPECT_THAT(msg, HasSubstr("outside"));
  }
}

TEST_F(Safetensors, MetadataAndSortedNames) {
  write_st(file("a.safetensors"),
           {{"z", "F32", {1}, raw(std::vector<float>{1})}, {"a", "F32", {}, raw(std::vector<float>{2})},
            {"empty", "F16", {0, 4}, ""}},
           json{{"format", "pt"}});
  auto ck = SafetensorsCheckpoint::open(file("a.safetensors").string());
  EXPECT_EQ(ck.metadata("format"), "pt");
  EXPECT_EQ(ck.metadata("absent"), "");
  EXPECT_EQ(ck.names(), (std::vector<std::string>{"a", "empty", "z"}));
  float s = 0;
  ck.read_f32("a", {}, &s);  // a scalar
  EXPECT_EQ(s, 2.0f);
  ck.read_f32("empty", {0, 4}, nullptr);
}

TEST_F(Safetensors, FolderWithModelSafetensorsAndMove) {
  write_st(file("model.safetensors"), {{"w", "F32", {2}, raw(std::vector<float>{3, 4})}});
  auto ck = SafetensorsCheckpoint::open(dir_.string());
  SafetensorsCheckpoint moved = std::move(ck);
  std::vector<float> out(2);
  moved.read_f32("w", {2}, out.data());
  EXPECT_EQ(out, (std::vector<float>{3, 4}));
}

TEST_F(Safetensors, ShardedCheckpointWithIndex) {
  write_st(file("model-00001-of-00002.safetensors"),
           {{"layer.0.w", "F32", {2, 2}, raw(std::vector<float>{1, 2, 3, 4})},
            {"unlisted", "F32", {1}, raw(std::vector<float>{0})}},
           json{{"format", "pt"}});
  write_st(file("model-00002-of-00002.safetensors"),
           {{"layer.1.w", "BF16", {2}, raw(std::vector<uint16_t>{0x3f80, 0x4000})}}, json{{"format", "other"}});
  std::ofstream(file("model.safetensors.index.json"))
      << json{{"metadata", {{"total_size", 20}}},
              {"weight_map",
               {{"layer.1.w", "model-00002-of-00002.safetensors"}, {"layer.0.w", "model-00001-of-00002.safetensors"}}}}
             .dump();
  auto ck = SafetensorsCheckpoint::open(dir_.string());
  EXPECT_EQ(ck.names(), (std::vector<std::string>{"layer.0.w", "layer.1.w"}));
  EXPECT_EQ(ck.metadata("format"), "pt");
  std::vector<float> a(4), b(2);
  ck.read_f32("layer.0.w", {2, 2}, a.data());
  ck.read_f32("layer.1.w", {2}, b.data());
  EXPECT_EQ(a, (std::vector<float>{1, 2, 3, 4}));
  EXPECT_EQ(b, (std::vector<float>{1, 2}));
  EXPECT_EQ(ck.find("layer.1.w")->file, file("model-00002-of-00002.safetensors").string());

  const std::string msg = bad_input_message([&] { ck.read_f32("layer.2.w", {2}, b.data()); });
  EXPECT_THAT(msg, HasSubstr("'layer.2.w'"));
  EXPECT_THAT(msg, HasSubstr(dir_.string()));
}

TEST_F(Safetensors, ShapeMismatchNamesTensorAndBothShapes) {
  write_st(file("a.safetensors"), {{"w", "F32", {2, 3}, raw(std::vector<float>(6))}});
  auto ck = SafetensorsCheckpoint::open(file("a.safetensors").string());
  std::vector<float> out(6);
  const std::string msg = bad_input_message([&] { ck.read_f32("w", {3, 2}, out.data()); });
  EXPECT_THAT(msg, HasSubstr("'w'"));
  EXPECT_THAT(msg, HasSubstr(file("a.safetensors").string()));
  EXPECT_THAT(msg, HasSubstr("[2, 3]"));
  EXPECT_THAT(msg, HasSubstr("[3, 2]"));
}

TEST_F(Safetensors, MissingTensorNamesItAndThePath) {
  write_st(file("a.safetensors"), {{"w", "F32", {1}, raw(std::vector<float>(1))}});
  auto ck = SafetensorsCheckpoint::open(file("a.safetensors").string());
  float x;
  const std::string msg = bad_input_message([&] { ck.read_f32("missing.weight", {1}, &x); });
  EXPECT_THAT(msg, HasSubstr("'missing.weight'"));
  EXPECT_THAT(msg, HasSubstr(file("a.safetensors").string()));
}

// ---- bad files ----

TEST_F(Safetensors, MissingFile) {
  const std::string p = file("nope.safetensors").string();
  EXPECT_THAT(bad_input_message([&] { SafetensorsCheckpoint::open(p); }), HasSubstr(p));
  // A folder with neither model.safetensors nor an index.
  EXPECT_THAT(bad_input_message([&] { SafetensorsCheckpoint::open(dir_.string()); }), HasSubstr(dir_.string()));
}

TEST_F(Safetensors, FourByteFile) {
  const fs::path p = file("short.safetensors");
  std::ofstream(p, std::ios::binary) << "abcd";
  const std::string msg = bad_input_message([&] { SafetensorsCheckpoint::open(p.string()); });
  EXPECT_THAT(msg, HasSubstr(p.string()));
  EXPECT_THAT(msg, HasSubstr("shorter than"));
}

TEST_F(Safetensors, HeaderLengthBeyondFile) {
  const fs::path p = file("bad.safetensors");
  write_raw(p, "{}", "", 1000);
  EXPECT_THAT(bad_input_message([&] { SafetensorsCheckpoint::open(p.string()); }),
              testing::AllOf(HasSubstr(p.string()), HasSubstr("beyond the end")));
  write_raw(p, "{}", "", 1ull << 40);
  EXPECT_THAT(bad_input_message([&] { SafetensorsCheckpoint::open(p.string()); }),
              testing::AllOf(HasSubstr(p.string()), HasSubstr("100 MB")));
}

TEST_F(Safetensors, MalformedJsonHeader) {
  EXPECT_THAT(refused(R"({"w": {"dtype": "F32",)", "", ""), HasSubstr("not valid JSON"));
  EXPECT_THAT(refused(R"([1, 2])", "", ""), HasSubstr("not a JSON object"));
  EXPECT_THAT(refused(R"({"w": 5})", "", "w"), HasSubstr("not an object"));
}

TEST_F(Safetensors, MissingDataOffsets) {
  EXPECT_THAT(refused(R"({"w": {"dtype": "F32", "shape": [1]}})", "abcd", "w"), HasSubstr("data_offsets"));
  EXPECT_THAT(refused(R"({"w": {"shape": [1], "data_offsets": [0, 4]}})", "abcd", "w"), HasSubstr("dtype"));
  EXPECT_THAT(refused(R"({"w": {"dtype": "F32", "shape": 1, "data_offsets": [0, 4]}})", "abcd", "w"),
              HasSubstr("shape"));
  EXPECT_THAT(refused(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": ["0", 4]}})", "abcd", "w"),
              HasSubstr("data_offsets"));
  EXPECT_THAT(refused(R"({"w": {"dtype": 7, "shape": [1], "data_offsets": [0, 4]}})", "abcd", "w"),
              HasSubstr("dtype"));
  EXPECT_THAT(refused(R"({"w": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}})", "abcd", "w"),
              HasSubstr("shape"));
}

TEST_F(Safetensors, UnsupportedDtype) {
  for (const char* d : {"I8", "F64"}) {
    const std::string msg =
        refused(std::string(R"({"w": {"dtype": ")") + d + R"(", "shape": [1], "data_offsets": [0, 8]}})",
                std::string(8, '\0'), "w");
    EXPECT_THAT(msg, HasSubstr(d));
    EXPECT_THAT(msg, HasSubstr("BF16, F16, F32"));
  }
}

TEST_F(Safetensors, EndBeyondFileIsTruncated) {
  EXPECT_THAT(refused(R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", std::string(12, '\0'),
                      "w"),
              HasSubstr("truncated"));
  EXPECT_THAT(refused(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}})", std::string(12, '\0'),
                      "w"),
              HasSubstr("begin > end"));
  EXPECT_THAT(refused(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}})", std::string(12, '\0'),
                      "w"),
              HasSubstr("negative"));
}

TEST_F(Safetensors, SizeDisagreesWithShape) {
  const std::string msg =
      refused(R"({"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 8]}})", std::string(8, '\0'), "w");
  EXPECT_THAT(msg, HasSubstr("needs 12"));
  // A shape whose byte size overflows 64 bits.
  EXPECT_THAT(refused(R"({"w": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 0]}})", "", "w"),
              HasSubstr("too large"));
  // A zero dimension after an overflowing product: 0 elements, 0 bytes, accepted.
  write_raw(file("zero.safetensors"),
            R"({"w": {"dtype": "F32", "shape": [4294967296, 4294967296, 0], "data_offsets": [0, 0]}})", "");
  EXPECT_EQ(SafetensorsCheckpoint::open(file("zero.safetensors").string()).find("w")->numel(), 0u);
}

TEST_F(Safetensors, OverlappingRanges) {
  const std::string msg = refused(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                     "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
                                  std::string(12, '\0'), "b");
  EXPECT_THAT(msg, HasSubstr("overlap"));
  EXPECT_THAT(msg, HasSubstr("'a'"));
}

TEST_F(Safetensors, NegativeDim) {
  EXPECT_THAT(refused(R"({"w": {"dtype": "F32", "shape": [-1, 2], "data_offsets": [0, 8]}})", std::string(8, '\0'),
                      "w"),
              HasSubstr("negative dimension"));
}

TEST_F(Safetensors, IndexNamingMissingShard) {
  std::ofstream(file("model.safetensors.index.json"))
      << R"({"weight_map": {"w": "model-00001-of-00001.safetensors"}})";
  const std::string msg = bad_input_message([&] { SafetensorsCheckpoint::open(dir_.string()); });
  EXPECT_THAT(msg, HasSubstr(file("model-00001-of-00001.safetensors").string()));
}

TEST_F(Safetensors, IndexNamingTensorAbsentFromShard) {
  write_st(file("shard.safetensors"), {{"w", "F32", {1}, raw(std::vector<float>{1})}});
  std::ofstream(file("model.safetensors.index.json"))
      << R"({"weight_map": {"w": "shard.safetensors", "ghost": "shard.safetensors"}})";
  const std::string msg = bad_input_message([&] { SafetensorsCheckpoint::open(dir_.string()); });
  EXPECT_THAT(msg, HasSubstr("'ghost'"));
  EXPECT_THAT(msg, HasSubstr(file("shard.safetensors").string()));
}

TEST_F(Safetensors, BadIndex) {
  std::ofstream(file("model.safetensors.index.json")) << R"({"weight_map": )";
  EXPECT_THAT(bad_input_message([&] { SafetensorsCheckpoint::open(dir_.string()); }),
              testing::AllOf(HasSubstr("model.safetensors.index.json"), HasSubstr("not valid JSON")));
  std::ofstream(file("model.safetensors.index.json")) << R"({"metadata": {}})";
  EXPECT_THAT(bad_input_message([&] { SafetensorsCheckpoint::open(dir_.string()); }), HasSubstr("weight_map"));
  std::ofstream(file("model.safetensors.index.json")) << R"({"weight_map": {"w": 3}})";
  EXPECT_THAT(bad_input_message([&] { SafetensorsCheckpoint::open(dir_.string()); }), HasSubstr("'w'"));
}

TEST_F(Safetensors, BadShardIsValidatedAndNamed) {
  write_raw(file("shard.safetensors"), R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})",
            std::string(4, '\0'));
  std::ofstream(file("model.safetensors.index.json")) << R"({"weight_map": {"w": "shard.safetensors"}})";
  const std::string msg = bad_input_message([&] { SafetensorsCheckpoint::open(dir_.string()); });
  EXPECT_THAT(msg, HasSubstr(file("shard.safetensors").string()));
  EXPECT_THAT(msg, HasSubstr("'w'"));
  EXPECT_THAT(msg, HasSubstr("truncated"));
}

}  // namespace
}  // namespace moeflow
