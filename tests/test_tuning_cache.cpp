// The tuning cache (`moeflow tune` writes it, plans read it): round trip, matching by device,
// signature and T within a factor of two, malformed files refused by name, and the planner
// preferring a cached kernel over the registry's order, but never over --kernel.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

#include "ops/moe_layer.hpp"
#include "scheduler/plan.hpp"
#include "scheduler/tuning_cache.hpp"
#include "tests/expect_error.hpp"

using namespace moeflow;
using testing::HasSubstr;
using moeflow::testing_errors::bad_input_message;

namespace {

std::string temp_file(const std::string& name) { return (std::filesystem::path(testing::TempDir()) / name).string(); }

std::shared_ptr<const Graph> small_layer(int64_t max_tokens) {
  const MoEConfig c = load_config("qwen1.5-moe-a2.7b", {"hidden_size=16", "moe_intermediate_size=8", "num_experts=8",
                                                        "num_experts_per_tok=2", "shared_expert_intermediate_size=12"});
  return std::make_shared<const Graph>(build_moe_layer(c, {.max_tokens = max_tokens}));
}

const Node& experts_node(const Graph& g) {
  for (const Node& n : g.nodes())
    if (n.op->kind() == "experts") return n;
  throw std::logic_error("no experts node");
}

// The built-in CPU kernels and one more experts kernel, last in priority: only a cache picks it.
KernelRegistry registry_with_alternative() {
  KernelRegistry r = KernelRegistry::builtin();
  r.add({"experts", Backend::cpu, "test.experts_alternative", -100,
         [](const Graph&, const Node&) { return Support::yes("an alternative"); }, [](const KernelCall&) {}, {}});
  return r;
}

std::string experts_kernel(const Plan& p) {
  for (const PlanStep& s : p.steps)
    if (p.graph->node(s.node).op->kind() == "experts") return s.kernel->name + " | " + s.reason;
  return "";
}

}  // namespace

TEST(TuningCache, RoundTripsAndReplacesAnEntryOfTheSameKey) {
  TuningCache c;
  c.record({"GPU A", "experts(x)", 128, "k1", 10.0});
  c.record({"GPU A", "experts(x)", 2048, "k2", 90.0});
  c.record({"GPU A", "experts(x)", 128, "k3", 8.0});  // replaces the first
  const std::string path = temp_file("tuning_roundtrip.json");
  c.save(path);
  const TuningCache back = TuningCache::load(path);
  ASSERT_EQ(back.entries().size(), 2u);
  EXPECT_EQ(back.entries()[0].kernel, "k3");
  EXPECT_EQ(back.entries()[0].time_us, 8.0);
  EXPECT_EQ(back.entries()[1].tokens, 2048);
  EXPECT_EQ(back.source(), path);
  EXPECT_TRUE(TuningCache::load(temp_file("no_such_cache.json")).entries().empty());
}

TEST(TuningCache, FindsTheNearestTWithinAFactorOfTwoOnTheSameDevice) {
  TuningCache c;
  c.record({"GPU A", "experts(x)", 128, "small", 1.0});
  c.record({"GPU A", "experts(x)", 2048, "large", 1.0});
  c.record({"GPU B", "experts(x)", 600, "other gpu", 1.0});
  ASSERT_NE(c.find("GPU A", "experts(x)", 200), nullptr);
  EXPECT_EQ(c.find("GPU A", "experts(x)", 200)->kernel, "small");
  EXPECT_EQ(c.find("GPU A", "experts(x)", 1100)->kernel, "large");
  EXPECT_EQ(c.find("GPU A", "experts(x)", 600), nullptr);  // 4.7x and 3.4x away
  EXPECT_EQ(c.find("GPU A", "experts(y)", 128), nullptr);
  EXPECT_EQ(c.find("GPU C", "experts(x)", 128), nullptr);
  EXPECT_EQ(c.find("", "experts(x)", 600)->kernel, "other gpu");  // any device
}

TEST(TuningCache, MalformedFilesAreRefusedByName) {
  auto write = [](const std::string& name, const std::string& text) {
    const std::string p = temp_file(name);
    std::ofstream(p) << text;
    return p;
  };
  EXPECT_THAT(bad_input_message([&] { TuningCache::load(write("t1.json", "{not json")); }), HasSubstr("t1.json"));
  EXPECT_THAT(bad_input_message([&] { TuningCache::load(write("t2.json", R"({"version": 2, "entries": []})")); }),
              HasSubstr("expected"));
  EXPECT_THAT(bad_input_message([&] {
                TuningCache::load(write("t3.json", R"({"version": 1, "entries": [{"device": "A", "tokens": 4}]})"));
              }),
              HasSubstr("entry 0"));
}

TEST(TuningCache, ThePlannerPrefersACachedKernelButNeverOverKernelFlags) {
  const auto g = small_layer(64);
  const KernelRegistry registry = registry_with_alternative();
  PlanOptions o;
  o.registry = &registry;
  EXPECT_THAT(experts_kernel(make_plan(g, o)), HasSubstr("cpu.grouped_swiglu"));

  auto cache = std::make_shared<TuningCache>();
  cache->record({"GPU A", tuning_signature(*g, experts_node(*g)), 48, "test.experts_alternative", 12.5});
  o.tuning = cache;
  o.tuning_device = "GPU A";
  const std::string tuned = experts_kernel(make_plan(g, o));
  EXPECT_THAT(tuned, HasSubstr("test.experts_alternative"));
  EXPECT_THAT(tuned, HasSubstr("tuned: fastest measured at T=48 on GPU A"));

  o.tuning_device = "GPU B";  // measured elsewhere
  EXPECT_THAT(experts_kernel(make_plan(g, o)), HasSubstr("cpu.grouped_swiglu"));
  o.tuning_device = "GPU A";
  o.forced_kernels["experts"] = "cpu.grouped_swiglu";
  EXPECT_THAT(experts_kernel(make_plan(g, o)), HasSubstr("forced by --kernel"));
  o.forced_kernels.clear();
  // A T more than twice away from every measured one: the registry's order decides.
  EXPECT_THAT(experts_kernel(make_plan(small_layer(256), o)), HasSubstr("cpu.grouped_swiglu"));
}
