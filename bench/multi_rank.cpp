#include "bench/multi_rank.hpp"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <vector>

#include "graph/chunk.hpp"
#include "graph/error.hpp"
#include "kernels/common/random.hpp"
#include "ops/lower_parallel.hpp"

namespace moeflow {

RankComms make_rank_comms(std::unique_ptr<comm::Communicator> world, const ParallelLayout& layout) {
  RankComms c;
  c.world = std::move(world);
  const int rank = c.world->rank();
  // Collective on the world: every rank splits, each into its own DP rank's TP group.
  c.tp = c.world->split(layout.dp_rank(rank), layout.tp_rank(rank));
  c.groups.world = c.world.get();
  c.groups.tp = c.tp.get();
  return c;
}

void agree_across_ranks(comm::Communicator& world, const std::string& what) {
  const uint64_t h = rng::name_key(what);
  const int32_t mine[2] = {static_cast<int32_t>(h & 0xffffffffu), static_cast<int32_t>(h >> 32)};
  std::vector<int32_t> all(static_cast<std::size_t>(2 * world.size()));
  world.all_gather(mine, all.data(), 2, comm::Element::i32);
  std::string differ;
  for (int r = 1; r < world.size(); ++r)
    if (all[static_cast<std::size_t>(2 * r)] != all[0] || all[static_cast<std::size_t>(2 * r + 1)] != all[1])
      differ += (differ.empty() ? "" : ", ") + std::to_string(r);
  if (!differ.empty())
    throw Error(ErrorKind::bad_input, "ranks " + differ + " run another graph or configuration than rank 0 (their model, layout, plan or seed " +
               "differ; every rank must be given the same flags); this is rank " + std::to_string(world.rank()) +
               ", running: " + what)
        .raised_on_every_rank();  // every rank sees the same gathered hashes
}

std::vector<std::string> all_gather_strings(comm::Communicator& world, const std::string& text) {
  const int n = world.size();
  const int32_t length = static_cast<int32_t>(text.size());
  std::vector<int32_t> lengths(static_cast<std::size_t>(n));
  world.all_gather(&length, lengths.data(), 1, comm::Element::i32);
  // Bytes travel as 32-bit words (the transports move f32 and i32).
  auto words = [](int32_t bytes) { return (static_cast<int64_t>(bytes) + 3) / 4; };
  std::vector<int32_t> mine(static_cast<std::size_t>(words(length)), 0);
  std::memcpy(mine.data(), text.data(), text.size());
  std::vector<int64_t> counts;
  int64_t total = 0;
  for (int32_t l : lengths) {
    counts.push_back(words(l));
    total += words(l);
  }
  std::vector<int32_t> all(static_cast<std::size_t>(std::max<int64_t>(total, 1)));
  world.all_gather_v(mine.data(), all.data(), counts.data(), comm::Element::i32);
  std::vector<std::string> out;
  int64_t at = 0;
  for (int r = 0; r < n; ++r) {
    out.emplace_back(reinterpret_cast<const char*>(all.data() + at), static_cast<std::size_t>(lengths[static_cast<std::size_t>(r)]));
    at += counts[static_cast<std::size_t>(r)];
  }
  return out;
}

#ifdef MOEFLOW_HAVE_CUDA
void add_cuda_identity_experts(KernelRegistry& r);  // bench/cuda/multi_rank_cuda.cpp
#endif

const KernelRegistry& exchange_timing_kernels() {
  static const KernelRegistry registry = [] {
    KernelRegistry r = KernelRegistry::builtin();
    r.add({"experts", Backend::cpu, "bench.identity_rows", 100,
           [](const Graph&, const Node&) { return Support::yes("copies its rows: exchange timing only, not an MoE"); },
           [](const KernelCall& c) {
             const Value& rows = c.input_value(0);
             std::memcpy(c.outputs[0], c.inputs[0], static_cast<std::size_t>(rows.bytes(c.tokens)));
           },
           {}});
#ifdef MOEFLOW_HAVE_CUDA
    add_cuda_identity_experts(r);
#endif
    return r;
  }();
  return registry;
}

double time_host_alltoall(comm::Communicator& world, int64_t bytes, int reps) {
  const int n = world.size();
  const int64_t per = std::max<int64_t>(1, bytes / 4);
  std::vector<float> in(static_cast<std::size_t>(per * n), 1.0f), out(in.size());
  std::vector<int64_t> counts(static_cast<std::size_t>(n), per), offsets(static_cast<std::size_t>(n));
  for (int r = 0; r < n; ++r) offsets[static_cast<std::size_t>(r)] = r * per;
  counts[static_cast<std::size_t>(world.rank())] = 0;  // nothing to itself: the same bytes as the exchanges move
  std::vector<double> t;
  for (int i = 0; i < reps + 1; ++i) {
    world.barrier();
    const auto t0 = std::chrono::steady_clock::now();
    world.all_to_all_v(in.data(), counts.data(), offsets.data(), out.data(), counts.data(), offsets.data(), comm::Element::f32);
    if (i > 0) t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

namespace {

Graph scope_graph(const MoEConfig& config, const std::string& scope, int64_t max_tokens, DType dtype) {
  if (scope != "layer" && scope != "experts")
    fail_input("multi-rank runs take scope layer or experts, not '" + scope + "'");
  return build_scope_graph(config, scope, {.max_tokens = max_tokens, .dtype = dtype});
}

}  // namespace

std::shared_ptr<const Graph> rank_graph(const MoEConfig& config, const ParallelLayout& layout, int rank,
                                        const RankGraphOptions& o) {
  Graph g = scope_graph(config, o.scope, layout.max_tokens(), o.dtype);
  if (o.chunks > 0 || o.chunk_tokens > 0) g = chunk_tokens(g, {.chunks = o.chunks, .chunk_tokens = o.chunk_tokens});
  return std::make_shared<const Graph>(lower_parallel(g, layout, rank));
}

std::shared_ptr<const Graph> rank_reference_graph(const MoEConfig& config, const ParallelLayout& layout, int rank,
                                                  const std::string& scope, DType dtype) {
  Graph g = scope_graph(config, scope, layout.tokens_of(rank), dtype);
  for (ValueId id : g.graph_inputs()) {
    Value& v = g.mutable_value(id);
    if (v.role != ValueRole::input || !v.shape()[0].symbolic()) continue;
    SourceSlice s{v.name, std::vector<SliceDim>(static_cast<std::size_t>(v.shape().rank()))};
    s.dims[0].offset = layout.first_token(layout.dp_rank(rank));
    v.source = s;
  }
  return std::make_shared<const Graph>(std::move(g));
}

CheckReport check_rank_output(const float* output, const MoEConfig& config, const ParallelLayout& layout, int rank,
                              const std::string& scope, uint64_t seed, double tolerance) {
  SessionOptions o;
  o.seed = seed;
  CpuSession single(rank_reference_graph(config, layout, rank, scope), o);
  single.set_tokens(layout.tokens_of(rank));
  single.run();  // the gate's ids, which the reference follows where choices are near-ties
  return single.check_against(output, tolerance);
}

}  // namespace moeflow
