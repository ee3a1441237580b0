#include "ops/lower_parallel.hpp"

#include <algorithm>
#include <map>
#include <memory>
#include <numeric>
#include <set>
#include <tuple>

#include "graph/error.hpp"
#include "ops/combine_op.hpp"
#include "ops/comm_ops.hpp"
#include "ops/dispatch_op.hpp"
#include "ops/experts_op.hpp"

namespace moeflow {

namespace {

// One routed block of the input graph.
struct Block {
  NodeId dispatch = kNoNode, experts = kNoNode, combine = kNoNode;
  NodeId gate = kNoNode;  // the node producing the routing, when it is a gate
  int chunk = -1;
};

NodeId only_consumer(const Graph& g, ValueId v, const std::string& kind, const Node& from) {
  const Value& val = g.value(v);
  if (val.consumers.size() != 1 || g.node(val.consumers[0]).op->kind() != kind)
    fail_input("lower_parallel: '" + val.name + "' of node '" + from.name + "' must feed exactly one " + kind +
               " node (a routed block is dispatch -> experts -> combine)");
  return val.consumers[0];
}

std::vector<Block> routed_blocks(const Graph& g) {
  std::vector<Block> blocks;
  for (const Node& n : g.nodes()) {
    if (n.op->kind() != "dispatch") continue;
    Block b;
    b.dispatch = n.id;
    b.experts = only_consumer(g, n.outputs[0], "experts", n);
    b.combine = only_consumer(g, g.node(b.experts).outputs[0], "combine", g.node(b.experts));
    if (g.node(b.combine).inputs[1] != n.outputs[2])
      fail_input("lower_parallel: combine '" + g.node(b.combine).name + "' must read the slot_of of dispatch '" + n.name + "'");
    const NodeId router = g.value(n.inputs[1]).producer;
    if (router != kNoNode && g.node(router).op->kind() == "gate") b.gate = router;
    b.chunk = n.chunk;
    blocks.push_back(b);
  }
  return blocks;
}

class Lowering {
 public:
  Lowering(const Graph& g, const ParallelLayout& l, int rank) : g_(g), l_(l), me_(rank), out_(name(g, l, rank), g.max_tokens()) {
    out_.set_description(g.description() + (g.description().empty() ? "" : "; ") + l.str() + ", rank " +
                         std::to_string(rank));
    if (g.chunks() > 0) out_.set_chunking(g.chunks(), g.chunk_rows());
  }

  Graph run() {
    const std::vector<Block> blocks = routed_blocks(g_);
    std::map<NodeId, const Block*> block_at;
    std::set<NodeId> skipped;
    std::set<ValueId> expert_weights;
    for (const Block& b : blocks) {
      const auto& xop = static_cast<const ExpertsOp&>(*g_.node(b.experts).op);
      const int w = l_.world();
      if (l_.ep && xop.experts() % w != 0)
        fail_input("lower_parallel: node '" + g_.node(b.experts).name + "' has " + std::to_string(xop.experts()) +
                   " experts, which do not divide over " + std::to_string(w) + " ranks (--ep)");
      if (!l_.ep && xop.intermediate() % w != 0)
        fail_input("lower_parallel: node '" + g_.node(b.experts).name + "' has intermediate size " +
                   std::to_string(xop.intermediate()) + ", which does not divide over " + std::to_string(w) + " ranks");
      block_at[b.dispatch] = &b;
      skipped.insert({b.experts, b.combine});
      const Node& x = g_.node(b.experts);
      expert_weights.insert({x.inputs[2], x.inputs[3]});
      if (route_after_gather(b) && gate_only_routes(b)) skipped.insert(b.gate);
    }
    for (ValueId id : g_.graph_inputs()) declare_input(id, expert_weights, blocks);
    for (const Node& n : g_.nodes()) {
      if (auto it = block_at.find(n.id); it != block_at.end()) lower_block(*it->second);
      else if (!skipped.count(n.id)) copy_node(n);
    }
    for (ValueId v : g_.outputs()) out_.mark_output(map_.at(v));
    chain_communication();
    out_.validate();
    return std::move(out_);
  }

 private:
  static std::string name(const Graph& g, const ParallelLayout& l, int rank) {
    return g.name() + "@rank" + std::to_string(rank) + "of" + std::to_string(l.world());
  }

  bool route_after_gather(const Block& b) const { return l_.dispatch == DispatchKind::allgather && b.gate != kNoNode; }

  // The gate's outputs go only to its block (so the block may run it again on gathered rows instead).
  bool gate_only_routes(const Block& b) const {
    for (ValueId v : g_.node(b.gate).outputs)
      for (NodeId c : g_.value(v).consumers)
        if (c != b.dispatch && c != b.combine) return false;
    return true;
  }

  void declare_input(ValueId id, const std::set<ValueId>& expert_weights, const std::vector<Block>& blocks) {
    const Value& v = g_.value(id);
    ValueType type = *v.type;
    std::optional<SourceSlice> source;
    const int w = l_.world();
    if (expert_weights.count(id)) {
      // w13 [E, 2I, H] or w2 [E, H, I]: which one is told by the experts node's input position.
      const Node& x = g_.node(blocks_reading(id, blocks));
      const auto& op = static_cast<const ExpertsOp&>(*x.op);
      const bool w13 = x.inputs[2] == id;
      const int64_t E = op.experts(), I = op.intermediate();
      std::vector<Dim> dims = type.shape.dims();
      SourceSlice s{v.name, std::vector<SliceDim>(3)};
      if (l_.ep) {
        dims[0] = Dim::of(E / w);
        s.dims[0] = {me_ * (E / w), E, 1};
      } else if (w13) {
        dims[1] = Dim::of(2 * I / w);
        s.dims[1] = {me_ * (I / w), 2 * I, 2};
      } else {
        dims[2] = Dim::of(I / w);
        s.dims[2] = {me_ * (I / w), I, 1};
      }
      type.shape = Shape(dims);
      source = s;
    } else if (v.role == ValueRole::input && type.shape.rank() > 0 && type.shape[0].symbolic()) {
      SourceSlice s{v.name, std::vector<SliceDim>(static_cast<std::size_t>(type.shape.rank()))};
      s.dims[0].offset = l_.first_token(l_.dp_rank(me_));
      source = s;
    }
    const ValueId in = out_.add_input(v.name, type, v.role, v.init_scale);
    Value& copy = out_.mutable_value(in);
    copy.init = v.init;
    copy.init_choices = v.init_choices;
    copy.source = source;
    map_[id] = in;
  }

  NodeId blocks_reading(ValueId weight, const std::vector<Block>& blocks) const {
    for (const Block& b : blocks) {
      const Node& x = g_.node(b.experts);
      if (x.inputs[2] == weight || x.inputs[3] == weight) return b.experts;
    }
    fail_input("lower_parallel: weight '" + g_.value(weight).name + "' is read by no experts node");
  }

  void copy_node(const Node& n) {
    std::vector<ValueId> inputs, outputs;
    for (ValueId v : n.inputs) inputs.push_back(map_.at(v));
    for (ValueId v : n.outputs) {
      outputs.push_back(out_.add_value(g_.value(v).name));
      map_[v] = outputs.back();
    }
    const NodeId copy = out_.add_node(n.name, n.op, inputs, outputs);
    if (n.chunk >= 0) out_.set_chunk(copy, n.chunk);
  }

  // Adds a node of the block, tagged with its chunk and working on `rows` rows whatever T is.
  std::vector<ValueId> add(const std::string& name, std::shared_ptr<const OpSchema> op, std::vector<ValueId> inputs,
                           int chunk, int64_t rows, std::vector<int64_t> output_rows) {
    std::vector<ValueId> outputs;
    for (const std::string& suffix : op->output_names()) outputs.push_back(out_.add_value(name + "." + suffix));
    const bool communicates = dynamic_cast<const CommOp*>(op.get()) != nullptr;
    const NodeId n = out_.add_node(name, std::move(op), std::move(inputs), outputs);
    if (chunk >= 0) out_.set_chunk(n, chunk);
    out_.set_fixed_rows(n, rows);
    for (std::size_t i = 0; i < outputs.size() && i < output_rows.size(); ++i)
      if (output_rows[i] >= 0) out_.mutable_value(outputs[i]).fixed_rows = output_rows[i];
    if (communicates) comm_.push_back(n);
    return outputs;
  }

  // Rows of DP rank d's tokens in chunk c (all of them unchunked).
  int64_t chunk_rows(int d, int c) const {
    const int64_t t = l_.tokens.at(static_cast<std::size_t>(d));
    if (c < 0) return t;
    return std::clamp<int64_t>(t - c * g_.chunk_rows(), 0, g_.chunk_rows());
  }

  void lower_block(const Block& b) {
    const Node& D = g_.node(b.dispatch);
    const Node& X = g_.node(b.experts);
    const Node& C = g_.node(b.combine);
    const auto& dop = static_cast<const DispatchOp&>(*D.op);
    const auto& xop = static_cast<const ExpertsOp&>(*X.op);
    const int c = b.chunk, w = l_.world(), k = dop.top_k(), E = dop.experts();
    const std::string sfx = c >= 0 ? "\u00b7c" + std::to_string(c) : "";
    const std::string base = D.name.substr(0, D.name.size() - sfx.size());

    // Rows each rank sends: its TP share of its DP rank's rows of this chunk.
    std::vector<int64_t> sent(static_cast<std::size_t>(w));
    for (int r = 0; r < w; ++r)
      sent[static_cast<std::size_t>(r)] = l_.tp_share_rows(chunk_rows(l_.dp_rank(r), c), l_.tp_rank(r));
    const int64_t gathered = std::accumulate(sent.begin(), sent.end(), int64_t{0});
    const int64_t mine_rows = chunk_rows(l_.dp_rank(me_), c);
    const int64_t my_sent = sent[static_cast<std::size_t>(me_)];
    auto share = [&](ValueId v, const std::string& what) {
      if (l_.tp == 1) return v;
      const int64_t first = l_.tp_share_first(mine_rows, l_.tp_rank(me_));
      return add("tp_share_" + what + sfx, std::make_shared<TakeRowsOp>(first, my_sent), {v}, c, my_sent, {my_sent})[0];
    };

    const bool route_first = !route_after_gather(b);
    const ValueId x_share = share(map_.at(D.inputs[0]), "x");
    ValueId rows, ids, weights, layout = -1, counts = -1;
    if (l_.dispatch == DispatchKind::alltoall) {
      const auto got = add(base + "_alltoall" + sfx,
                           std::make_shared<AlltoallDispatchOp>(sent, l_.ep ? E / w : 0, k),
                           {x_share, share(map_.at(D.inputs[1]), "ids"), share(map_.at(C.inputs[2]), "weights")}, c,
                           gathered, {gathered, gathered, gathered, -1, -1});
      rows = got[0], ids = got[1], weights = got[2], layout = got[3], counts = got[4];
    } else if (route_first) {
      const auto got = add(base + "_all_gather" + sfx, std::make_shared<AllGatherRowsOp>(CommGroup::world, sent, 3),
                           {x_share, share(map_.at(D.inputs[1]), "ids"), share(map_.at(C.inputs[2]), "weights")}, c,
                           gathered, {gathered, gathered, gathered});
      rows = got[0], ids = got[1], weights = got[2];
    } else {
      rows = add(base + "_all_gather" + sfx, std::make_shared<AllGatherRowsOp>(CommGroup::world, sent, 1), {x_share}, c,
                 gathered, {gathered})[0];
      // Route the gathered rows here (every rank routes all of them: no logits move).
      const Node& G = g_.node(b.gate);
      std::vector<ValueId> gate_in{rows};
      for (std::size_t i = 1; i < G.inputs.size(); ++i) gate_in.push_back(map_.at(G.inputs[i]));
      const auto routed = add(G.name.substr(0, G.name.size() - sfx.size()) + "_gathered" + sfx, G.op, gate_in, c,
                              gathered, {gathered, gathered, gathered});
      // Which gate output is the ids and which the weights: the block's dispatch and combine say.
      ids = routed[static_cast<std::size_t>(std::find(G.outputs.begin(), G.outputs.end(), D.inputs[1]) - G.outputs.begin())];
      weights = routed[static_cast<std::size_t>(std::find(G.outputs.begin(), G.outputs.end(), C.inputs[2]) - G.outputs.begin())];
    }

    // This rank's experts on the rows it holds: a Partial sum.
    const int local_experts = l_.ep ? E / w : E;
    std::shared_ptr<const OpSchema> local_dispatch =
        l_.ep ? std::make_shared<DispatchOp>(local_experts, k, DispatchOp::Share{me_ * local_experts, E})
              : std::make_shared<DispatchOp>(E, k);
    const auto d = add(D.name, local_dispatch, {rows, ids}, c, gathered, {gathered, -1, gathered});
    const auto y = add(X.name,
                       std::make_shared<ExpertsOp>(local_experts, k, l_.ep ? xop.intermediate() : xop.intermediate() / w, true),
                       {d[0], d[1], map_.at(X.inputs[2]), map_.at(X.inputs[3])}, c, gathered, {gathered});
    const ValueId partial = add(C.name, C.op, {y[0], d[2], weights}, c, gathered, {gathered})[0];

    // The sum over ranks, paid once, lands on the rows this rank sent.
    ValueId whole;
    if (l_.dispatch == DispatchKind::alltoall)
      whole = add(base + "_alltoall_back" + sfx, std::make_shared<AlltoallCombineOp>(sent, k),
                  {partial, layout, counts}, c, gathered, {my_sent})[0];
    else
      whole = add(base + "_reduce_scatter" + sfx, std::make_shared<ReduceScatterRowsOp>(CommGroup::world, sent),
                  {partial}, c, gathered, {my_sent})[0];
    if (l_.tp > 1) {
      // The TP group's shares back together: every TP rank holds all of its DP rank's rows again.
      std::vector<int64_t> members;
      for (int j = 0; j < l_.tp; ++j) members.push_back(l_.tp_share_rows(mine_rows, j));
      whole = add(base + "_tp_gather" + sfx, std::make_shared<AllGatherRowsOp>(CommGroup::tp, members, 1), {whole}, c,
                  mine_rows, {c >= 0 ? -1 : mine_rows})[0];
    }
    map_[C.outputs[0]] = whole;
  }

  // Every rank must enter its collectives in one order, so they are chained by order edges. The
  // order is the two-micro-batch one: chunk c+1's way out goes before chunk c's way back, so chunk
  // c+1's rows travel while chunk c's experts compute, and chunk c's results travel while chunk
  // c+1's do. Key: (chunk + experts passed on the way here, communication depth, creation); a
  // topological pass over the communication nodes keeps the chain a valid order whatever the key
  // says. Everything the key reads is the graph's structure, which every rank shares.
  void chain_communication() {
    const std::size_t count = out_.nodes().size();
    std::vector<int> experts_before(count, 0), depth(count, 0);
    std::vector<std::set<NodeId>> comm_before(count);  // communication nodes with a path to each node
    for (const Node& n : out_.nodes()) {  // nodes were added after their inputs' producers
      const auto i = static_cast<std::size_t>(n.id);
      for (ValueId v : n.inputs) {
        const NodeId p = out_.value(v).producer;
        if (p == kNoNode) continue;
        const auto j = static_cast<std::size_t>(p);
        const Node& pn = out_.node(p);
        experts_before[i] = std::max(experts_before[i], experts_before[j] + (pn.op->kind() == "experts" ? 1 : 0));
        depth[i] = std::max(depth[i], depth[j]);
        comm_before[i].insert(comm_before[j].begin(), comm_before[j].end());
        if (pn.op->communicates()) comm_before[i].insert(p);
      }
      if (n.op->communicates()) ++depth[i];
    }
    auto key = [&](NodeId n) {
      const auto i = static_cast<std::size_t>(n);
      return std::tuple(std::max(out_.node(n).chunk, 0) + experts_before[i], depth[i], n);
    };
    std::vector<NodeId> left = comm_;
    NodeId last = kNoNode;
    std::set<NodeId> chained;
    while (!left.empty()) {
      auto next = left.end();
      for (auto it = left.begin(); it != left.end(); ++it) {
        const auto& before = comm_before[static_cast<std::size_t>(*it)];
        const bool ready = std::all_of(before.begin(), before.end(), [&](NodeId p) { return chained.count(p) > 0; });
        if (ready && (next == left.end() || key(*it) < key(*next))) next = it;
      }
      if (last != kNoNode) out_.add_order(last, *next);
      last = *next;
      chained.insert(last);
      left.erase(next);
    }
  }

  const Graph& g_;
  const ParallelLayout& l_;
  int me_;
  Graph out_;
  std::map<ValueId, ValueId> map_;
  std::vector<NodeId> comm_;  // communication nodes, in creation order
};

}  // namespace

Graph lower_parallel(const Graph& g, const ParallelLayout& layout, int rank) {
  if (!g.validated()) fail_input("lower_parallel: graph '" + g.name() + "' is not validated");
  if (rank < 0 || rank >= layout.world())
    fail_input("lower_parallel: rank " + std::to_string(rank) + " outside a world of " + std::to_string(layout.world()));
  if (static_cast<int>(layout.tokens.size()) != layout.dp)
    fail_input("lower_parallel: " + std::to_string(layout.tokens.size()) + " token counts for " +
               std::to_string(layout.dp) + " DP ranks");
  if (layout.max_tokens() > g.max_tokens())
    fail_input("lower_parallel: a DP rank has " + std::to_string(layout.max_tokens()) + " tokens but graph '" + g.name() +
               "' was built for at most " + std::to_string(g.max_tokens()));
  return Lowering(g, layout, rank).run();
}

}  // namespace moeflow
