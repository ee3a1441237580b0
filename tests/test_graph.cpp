// The IR: builder, validate (with the errors a user sees), topological ids, DOT.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "graph/dot.hpp"
#include "graph/error.hpp"
#include "ops/comm_ops.hpp"
#include "ops/dispatch_op.hpp"
#include "ops/experts_op.hpp"
#include "ops/layer_builder.hpp"
#include "ops/moe_layer.hpp"
#include "ops/reduce_op.hpp"
#include "ops/shared_expert_op.hpp"
#include "tests/expect_error.hpp"

using namespace moeflow;
using testing::HasSubstr;

namespace {

RoutingRule softmax_rule(int experts, int k) {
  RoutingRule r;
  r.experts = experts;
  r.top_k = k;
  r.renormalize = true;
  return r;
}

using testing_errors::bad_input_message;

}  // namespace

TEST(Graph, BuilderTypesEveryValueAndNumbersNodesTopologically) {
  LayerBuilder b("layer", 128);
  ValueId x = b.input("x", {tokens(), Dim::of(64)}, DType::f32);
  Route route = b.gate(x, softmax_rule(8, 2));
  ValueId shared = b.shared_expert(x, {.intermediate = 32, .gated = true});
  ExpertRows y = b.experts(b.dispatch(x, route), {.intermediate = 16});
  Graph g = std::move(b).finish({b.reduce(b.combine(y, route), {shared})});
  ASSERT_EQ(g.nodes().size(), 6u);
  for (const Node& n : g.nodes()) {
    EXPECT_EQ(g.node(n.id).name, n.name);
    for (NodeId p : g.predecessors(n.id)) EXPECT_LT(p, n.id) << n.name;
  }
  const Value& rows = g.value(*g.find_value("dispatch.rows"));
  EXPECT_EQ(rows.shape(), (Shape{tokens(2), Dim::of(64)}));
  EXPECT_EQ(rows.type_str(128), "[256,64] f32");
  EXPECT_EQ(g.value(*g.find_value("gate.ids")).dtype(), DType::i32);
  EXPECT_EQ(g.value(*g.find_value("experts.w13")).shape(), (Shape{Dim::of(8), Dim::of(32), Dim::of(64)}));
  EXPECT_EQ(g.value(*g.find_value("shared_expert.gate_w")).role, ValueRole::weight);
}

TEST(Graph, ValidateRenumbersNodesAddedOutOfOrder) {
  // Nodes added consumer-first through the low-level API: validate sorts them.
  Graph g("reversed", 16);
  ValueId x = g.add_input("x", {Shape{tokens(), Dim::of(8)}, DType::f32, {}}, ValueRole::input, 1.0f);
  ValueId mid = g.add_value("mid");
  ValueId out = g.add_value("out");
  g.add_node("second", std::make_shared<ReduceOp>(), {mid}, {out});
  g.add_node("first", std::make_shared<ReduceOp>(), {x}, {mid});
  g.mark_output(out);
  g.validate();
  EXPECT_EQ(g.node(0).name, "first");
  EXPECT_EQ(g.node(1).name, "second");
  EXPECT_EQ(g.value(mid).producer, 0);
  EXPECT_EQ(g.value(out).shape(), (Shape{tokens(), Dim::of(8)}));
}

TEST(Graph, RejectsCycleNamingItsNodes) {
  Graph g("cyclic", 16);
  ValueId a = g.add_value("a"), b = g.add_value("b");
  ValueId x = g.add_input("x", {Shape{tokens(), Dim::of(8)}, DType::f32, {}}, ValueRole::input, 1.0f);
  g.add_node("p", std::make_shared<ReduceOp>(), {x, b}, {a});
  g.add_node("q", std::make_shared<ReduceOp>(), {a}, {b});
  g.mark_output(b);
  const std::string msg = bad_input_message([&] { g.validate(); });
  EXPECT_THAT(msg, HasSubstr("cycle"));
  EXPECT_THAT(msg, HasSubstr("'p'"));
  EXPECT_THAT(msg, HasSubstr("'q'"));
}

TEST(Graph, RejectsDanglingInputNamingNodeAndValue) {
  Graph g("dangling", 16);
  ValueId ghost = g.add_value("ghost");
  ValueId out = g.add_value("out");
  g.add_node("sum", std::make_shared<ReduceOp>(), {ghost}, {out});
  g.mark_output(out);
  const std::string msg = bad_input_message([&] { g.validate(); });
  EXPECT_THAT(msg, HasSubstr("'sum'"));
  EXPECT_THAT(msg, HasSubstr("'ghost'"));
  EXPECT_THAT(msg, HasSubstr("dangling"));
}

TEST(Graph, RejectsValueWrittenTwice) {
  Graph g("ssa", 16);
  ValueId x = g.add_input("x", {Shape{tokens(), Dim::of(8)}, DType::f32, {}}, ValueRole::input, 1.0f);
  ValueId out = g.add_value("out");
  g.add_node("one", std::make_shared<ReduceOp>(), {x}, {out});
  g.add_node("two", std::make_shared<ReduceOp>(), {x}, {out});
  g.mark_output(out);
  EXPECT_THAT(bad_input_message([&] { g.validate(); }), HasSubstr("written twice"));
}

TEST(Graph, RejectsGraphWithoutOutput) {
  Graph g("empty", 16);
  g.add_input("x", {Shape{tokens(), Dim::of(8)}, DType::f32, {}}, ValueRole::input, 1.0f);
  EXPECT_THAT(bad_input_message([&] { g.validate(); }), HasSubstr("no output"));
}

TEST(Graph, ShapeMismatchNamesNodeValueAndBothShapes) {
  LayerBuilder b("mismatch", 32);
  ValueId x = b.input("x", {tokens(), Dim::of(64)}, DType::f32);
  ValueId other = b.input("other", {tokens(), Dim::of(48)}, DType::f32);
  const std::string msg = bad_input_message([&] { b.reduce(x, {other}); });
  EXPECT_THAT(msg, HasSubstr("'reduce'"));
  EXPECT_THAT(msg, HasSubstr("'other'"));
  EXPECT_THAT(msg, HasSubstr("[T,48] f32"));
  EXPECT_THAT(msg, HasSubstr("[T,64] f32"));
}

TEST(Graph, DtypeMismatchIsRefused) {
  LayerBuilder b("dtypes", 32);
  ValueId x = b.input("x", {tokens(), Dim::of(64)}, DType::f32);
  ValueId ids = b.input("ids", {tokens(), Dim::of(2)}, DType::f32);  // ids must be i32
  Route route{ids, ids, 8, 2};
  const std::string msg = bad_input_message([&] { b.dispatch(x, route); });
  EXPECT_THAT(msg, HasSubstr("'ids'"));
  EXPECT_THAT(msg, HasSubstr("i32"));
}

// Stands for a rank-local computation whose result is a sum still owed across ranks.
class PartialSumOp final : public OpSchema {
 public:
  std::string kind() const override { return "partial_sum"; }
  std::string summary() const override { return "local part"; }
  std::vector<std::string> output_names() const override { return {"out"}; }
  std::vector<ValueType> infer(const Node&, std::span<const Value* const> in) const override {
    return {ValueType{in[0]->shape(), in[0]->dtype(), {}}};
  }
  std::vector<Distribution> distribute(const Node&, std::span<const Value* const>) const override {
    return {Distribution::partial()};
  }
  Cost cost(const OpOperands&, int64_t) const override { return {}; }
  bool token_parallel() const override { return true; }
  int min_inputs() const override { return 1; }
};

TEST(Graph, PartialValueMayNotReachTheOutput) {
  GraphBuilder b("partial_out", 32);
  ValueId x = b.input("x", {tokens(), Dim::of(16)}, DType::f32);
  ValueId part = b.add("local", std::make_shared<PartialSumOp>(), {x})[0];
  const std::string msg = bad_input_message([&] { std::move(b).finish({part}); });
  EXPECT_THAT(msg, HasSubstr("'local.out'"));
  EXPECT_THAT(msg, HasSubstr("Partial"));
}

TEST(Graph, PartialValueMustBeReducedBeforeUse) {
  GraphBuilder b("partial_use", 32);
  ValueId x = b.input("x", {tokens(), Dim::of(16)}, DType::f32);
  ValueId part = b.add("local", std::make_shared<PartialSumOp>(), {x})[0];
  // A non-reducing op may not read it ...
  EXPECT_THAT(bad_input_message([&] { b.add("misuse", std::make_shared<SharedExpertOp>(8, false), {part, x, x}); }),
              HasSubstr("Partial"));
  // ... a local add of two parts is still a part (one sum owed for both) ...
  ValueId both = b.add("add_parts", std::make_shared<ReduceOp>(), {part, part})[0];
  // ... adding a whole value to a part would count the whole value once per rank ...
  const std::string mixed = bad_input_message([&] { b.add("mixed", std::make_shared<ReduceOp>(), {both, x}); });
  EXPECT_THAT(mixed, HasSubstr("'x'"));
  EXPECT_THAT(mixed, HasSubstr("once per rank"));
  // ... and the sum over ranks makes it whole.
  ValueId whole = b.add("sum_over_ranks", std::make_shared<ReduceScatterRowsOp>(CommGroup::world, std::vector<int64_t>{4, 4}),
                        {both})[0];
  Graph g = std::move(b).finish({whole});
  EXPECT_EQ(g.value(both).type->dist, Distribution::partial());
  EXPECT_EQ(g.value(whole).type->dist, Distribution::replicated());
}

TEST(Graph, ValueReducedTwiceIsRefused) {
  for (bool alltoall : {false, true}) {
    GraphBuilder b("reduced_twice", 32);
    ValueId x = b.input("x", {tokens(), Dim::of(16)}, DType::f32);
    ValueId part = b.add("local", std::make_shared<PartialSumOp>(), {x})[0];
    ValueId once = b.add("sum_once", std::make_shared<ReduceScatterRowsOp>(CommGroup::world, std::vector<int64_t>{4, 4}),
                         {part})[0];
    const std::string msg = bad_input_message([&] {
      if (alltoall) {
        ValueId layout = b.input("layout", {Dim::of(8)}, DType::i32);
        ValueId counts = b.input("counts", {Dim::of(4)}, DType::i32);
        b.add("sum_twice", std::make_shared<AlltoallCombineOp>(std::vector<int64_t>{4, 4}, 2), {once, layout, counts});
      } else {
        b.add("sum_twice", std::make_shared<ReduceScatterRowsOp>(CommGroup::world, std::vector<int64_t>{4, 4}), {once});
      }
    });
    EXPECT_THAT(msg, HasSubstr("'sum_twice'"));
    EXPECT_THAT(msg, HasSubstr("'sum_once.rows'"));
    EXPECT_THAT(msg, HasSubstr("not Partial"));
  }
}

TEST(Graph, LoweredExpertsWithoutTheirSumCannotReachTheOutput) {
  // A rank's share of the experts combined but never summed over the ranks.
  MoEConfig c = load_config("mixtral-8x7b", {"hidden_size=32", "intermediate_size=16"});
  LayerBuilder b("unsummed", 16);
  const ValueId x = b.input("x", {tokens(), Dim::of(32)}, DType::f32);
  const Route r = b.gate(x, c.routing());
  const auto d = b.add("dispatch", std::make_shared<DispatchOp>(4, 2, DispatchOp::Share{4, 8}), {x, r.ids});
  const ValueId w13 = b.weight("experts.w13", {Dim::of(4), Dim::of(32), Dim::of(32)}, DType::f32, 0.1f);
  const ValueId w2 = b.weight("experts.w2", {Dim::of(4), Dim::of(32), Dim::of(16)}, DType::f32, 0.1f);
  const ValueId y = b.add("experts", std::make_shared<ExpertsOp>(4, 2, 16, true), {d[0], d[1], w13, w2})[0];
  const ValueId out = b.combine({y, d[2], 2}, r);
  const std::string msg = bad_input_message([&] { std::move(b).finish({out}); });
  EXPECT_THAT(msg, HasSubstr("'combine.out'"));
  EXPECT_THAT(msg, HasSubstr("Partial"));
}

TEST(Graph, DotIsDeterministicAndShowsEveryOp) {
  MoEConfig c = load_config("qwen1.5-moe-a2.7b", {"hidden_size=256", "moe_intermediate_size=64",
                                                  "shared_expert_intermediate_size=128"});
  const std::string a = graph_dot(build_moe_layer(c, {.max_tokens = 64}));
  const std::string b = graph_dot(build_moe_layer(c, {.max_tokens = 64}));
  EXPECT_EQ(a, b);
  for (const char* op : {"gate", "shared_expert", "dispatch", "experts", "combine", "reduce"})
    EXPECT_THAT(a, HasSubstr(std::string("{") + op + "|")) << op;
  EXPECT_THAT(a, HasSubstr("fillcolor=lightblue"));
  EXPECT_THAT(a, HasSubstr("[256,256] f32"));  // dispatch rows at T=64, k=4
}

TEST(Graph, ExpertsOnlyGraphTakesRouteAsInputs) {
  MoEConfig c = load_config("mixtral-8x7b", {"hidden_size=128", "intermediate_size=64"});
  Graph g = build_experts_graph(c, {.max_tokens = 32});
  std::vector<std::string> inputs;
  for (ValueId v : g.graph_inputs())
    if (g.value(v).role == ValueRole::input) inputs.push_back(g.value(v).name);
  EXPECT_THAT(inputs, testing::ElementsAre("x", "route.ids", "route.weights"));
  EXPECT_EQ(g.value(*g.find_value("route.ids")).init, ValueInit::expert_ids);
  EXPECT_EQ(g.nodes().size(), 3u);
}
