#include "bench/reference_run.hpp"

#include <map>

#include "graph/error.hpp"
#include "graph/row_ops.hpp"
#include "ops/combine_op.hpp"
#include "ops/dispatch_op.hpp"
#include "ops/experts_op.hpp"
#include "ops/fused_experts_op.hpp"
#include "ops/gate_op.hpp"
#include "ops/shared_expert_op.hpp"

namespace moeflow {

namespace {

// What the reference knows of each value: dense fp64 data, or ids, or how routed rows were made.
struct RefValue {
  std::vector<double> data;
  std::vector<int32_t> ids;
  std::vector<float> as_float;  // fp32 view of data, made when a kernel-style input needs it
  ValueId dispatched_x = -1, dispatched_ids = -1;   // dispatch.rows
  NodeId experts_node = kNoNode;                     // experts.y
};

}  // namespace

ReferenceResult reference_run(const Graph& g, int64_t run_tokens, const std::function<const void*(ValueId)>& graph_data,
                              const std::function<const void*(ValueId)>& engine_data) {
  std::map<ValueId, RefValue> vals;
  ReferenceResult result;
  auto floats = [&](ValueId v) -> const float* {
    const Value& val = g.value(v);
    if (val.is_graph_input()) return static_cast<const float*>(graph_data(v));
    RefValue& r = vals.at(v);
    if (r.as_float.empty()) r.as_float.assign(r.data.begin(), r.data.end());
    return r.as_float.data();
  };
  auto ids_of = [&](ValueId v) -> const int32_t* {
    if (g.value(v).is_graph_input()) return static_cast<const int32_t*>(graph_data(v));
    return vals.at(v).ids.data();
  };
  auto weights_of = [&](ValueId v) -> std::vector<double> {
    if (g.value(v).is_graph_input()) {
      const float* w = static_cast<const float*>(graph_data(v));
      return std::vector<double>(w, w + g.value(v).shape().elements(run_tokens));
    }
    return vals.at(v).data;
  };

  for (const Node& n : g.nodes()) {
    const std::string kind = n.op->kind();
    if (kind == "to_host") continue;  // a copy: the reference's values live on the host already
    const int64_t T = g.tokens_of(n, run_tokens);  // a chunk's rows in a chunked graph
    if (kind == "slice_rows") {
      const auto& op = static_cast<const SliceRowsOp&>(*n.op);
      const Value& in = g.value(n.inputs[0]);
      const int64_t per_token = in.shape().elements(1);
      const int64_t first = op.chunk() * op.rows() * per_token, count = T * per_token;
      RefValue& part = vals[n.outputs[0]];
      if (in.dtype() == DType::i32) {
        const int32_t* ids = ids_of(n.inputs[0]);
        part.ids.assign(ids + first, ids + first + count);
      } else {
        const float* x = floats(n.inputs[0]);
        part.data.assign(x + first, x + first + count);
      }
      continue;
    }
    if (kind == "concat_rows") {
      std::vector<double>& joined = vals[n.outputs[0]].data;
      for (ValueId v : n.inputs) joined.insert(joined.end(), vals.at(v).data.begin(), vals.at(v).data.end());
      continue;
    }
    if (T == 0) {  // an empty chunk: nothing to compute
      for (ValueId v : n.outputs) vals[v] = RefValue{};
      continue;
    }
    const int64_t H = g.value(n.inputs[0]).shape()[1].fixed;
    if (kind == "gate") {
      const auto& op = static_cast<const GateOp&>(*n.op);
      const RoutingRule& rule = op.rule();
      std::vector<double> logits = reference::router_logits(floats(n.inputs[0]), floats(n.inputs[1]), T,
                                                             static_cast<int>(H), rule.experts);
      reference::RoutingAgreement a;
      const float* bias = rule.use_bias ? floats(n.inputs[2]) : nullptr;
      reference::Routing r = reference::route(rule, logits, bias, T,
                                              static_cast<const int32_t*>(engine_data(n.outputs[0])), 1e-3, &a);
      result.agreement.tokens_differing += a.tokens_differing;
      result.agreement.tokens_adopted += a.tokens_adopted;
      result.agreement.max_adopted_gap = std::max(result.agreement.max_adopted_gap, a.max_adopted_gap);
      if (a.min_rejected_gap > 0 && (result.agreement.min_rejected_gap == 0 || a.min_rejected_gap < result.agreement.min_rejected_gap))
        result.agreement.min_rejected_gap = a.min_rejected_gap;
      if (a.min_margin >= 0 && (result.agreement.min_margin < 0 || a.min_margin < result.agreement.min_margin))
        result.agreement.min_margin = a.min_margin;
      result.agreement.tokens_within_tie_gap += a.tokens_within_tie_gap;
      vals[n.outputs[0]].ids = std::move(r.ids);
      vals[n.outputs[1]].data = std::move(r.weights);
      vals[n.outputs[2]].data = std::move(logits);
    } else if (kind == "shared_expert") {
      const auto& op = static_cast<const SharedExpertOp&>(*n.op);
      reference::SharedMlp mlp{floats(n.inputs[1]), floats(n.inputs[2]), op.gated() ? floats(n.inputs[3]) : nullptr,
                               op.intermediate()};
      vals[n.outputs[0]].data = reference::shared_mlp(floats(n.inputs[0]), T, static_cast<int>(H), mlp);
    } else if (kind == "dispatch") {
      RefValue& rows = vals[n.outputs[0]];
      rows.dispatched_x = n.inputs[0];
      rows.dispatched_ids = n.inputs[1];
    } else if (kind == "experts") {
      RefValue& y = vals[n.outputs[0]];
      const RefValue& rows = vals.at(n.inputs[0]);
      if (rows.dispatched_x < 0)
        fail_input("reference: node '" + n.name + "' reads rows that no dispatch node produced");
      y.dispatched_x = rows.dispatched_x;
      y.dispatched_ids = rows.dispatched_ids;
      y.experts_node = n.id;
    } else if (kind == "combine") {
      const auto& op = static_cast<const CombineOp&>(*n.op);
      const RefValue& y = vals.at(n.inputs[0]);
      if (y.experts_node == kNoNode) fail_input("reference: node '" + n.name + "' reads rows that no experts node made");
      const Node& experts = g.node(y.experts_node);
      const auto& eop = static_cast<const ExpertsOp&>(*experts.op);
      const std::vector<double> w = weights_of(n.inputs[2]);
      std::vector<double> out =
          reference::experts_path(floats(y.dispatched_x), T, static_cast<int>(H), eop.intermediate(), op.top_k(),
                                  ids_of(y.dispatched_ids), w.data(), floats(experts.inputs[2]), floats(experts.inputs[3]));
      for (int a = 0; a < op.addends(); ++a) {  // the shared experts' outputs (ops/fold_shared_add.hpp)
        const std::vector<double>& addend = vals.at(n.inputs[3 + static_cast<std::size_t>(a)]).data;
        for (std::size_t i = 0; i < out.size(); ++i) out[i] += addend[i];
      }
      vals[n.outputs[0]].data = std::move(out);
    } else if (kind == "fused_experts") {  // the fuse pass's dispatch → experts → combine
      const auto& op = static_cast<const FusedExpertsOp&>(*n.op);
      const std::vector<double> w = weights_of(n.inputs[2]);
      std::vector<double> out =
          reference::experts_path(floats(n.inputs[0]), T, static_cast<int>(H), op.intermediate(), op.top_k(),
                                  ids_of(n.inputs[1]), w.data(), floats(n.inputs[3]), floats(n.inputs[4]));
      if (const auto& shared = op.shared()) {  // the folded shared expert and the reduce that added it
        reference::SharedMlp mlp{floats(n.inputs[5]), floats(n.inputs[6]), shared->gated ? floats(n.inputs[7]) : nullptr,
                                 shared->intermediate};
        const std::vector<double> y = reference::shared_mlp(floats(n.inputs[0]), T, static_cast<int>(H), mlp);
        for (std::size_t i = 0; i < out.size(); ++i) out[i] += y[i];
      }
      for (int a = 0; a < op.addends(); ++a) {  // the shared experts' outputs, their add folded in
        const std::vector<double>& addend = vals.at(n.inputs[5 + static_cast<std::size_t>(a)]).data;
        for (std::size_t i = 0; i < out.size(); ++i) out[i] += addend[i];
      }
      vals[n.outputs[0]].data = std::move(out);
    } else if (kind == "reduce") {
      std::vector<double> sum(static_cast<std::size_t>(T * H), 0.0);
      for (ValueId v : n.inputs) {
        const std::vector<double>& a = vals.at(v).data;
        for (std::size_t i = 0; i < sum.size(); ++i) sum[i] += a[i];
      }
      vals[n.outputs[0]].data = std::move(sum);
    } else {
      fail_input("reference: no reference for op '" + kind + "' (node '" + n.name + "')");
    }
  }
  result.output = vals.at(g.outputs().at(0)).data;
  return result;
}

CheckReport check_output(const float* engine_output, const ReferenceResult& ref, double tolerance) {
  CheckReport r;
  r.comparison = reference::compare(engine_output, ref.output);
  r.agreement = ref.agreement;
  r.tolerance = tolerance;
  const bool routing_ok = ref.agreement.tokens_differing == ref.agreement.tokens_adopted;
  r.pass = routing_ok && r.comparison.passes(tolerance);
  return r;
}

}  // namespace moeflow
