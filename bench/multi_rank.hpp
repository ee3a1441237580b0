#pragma once
// What one rank of a multi-rank run needs around the parallel lowering: its communicators (world
// and TP group, from MPI), the agreement check that every rank runs the same graph and
// configuration, the graphs (lowered for this rank, and the one-process graph of its tokens that
// the check compares with), and that check.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "bench/cpu_session.hpp"
#include "kernels/comm/communicator.hpp"
#include "ops/comm_ops.hpp"
#include "ops/moe_layer.hpp"
#include "ops/parallel_layout.hpp"

namespace moeflow {

// This rank's communicators for a layout (MPI must be initialised; the world's size is checked
// against the layout by check_layout before this is called).
struct RankComms {
  std::unique_ptr<comm::Communicator> world;
  std::unique_ptr<comm::Communicator> tp;  // the ranks of this rank's TP group
  CommGroups groups;
};
RankComms make_rank_comms(std::unique_ptr<comm::Communicator> world, const ParallelLayout& layout);

// Every rank states what it is about to run (a canonical text: model fields, layout, plan, seed);
// all gather a hash of it. Throws Error(bad_input) on every rank alike (Error::on_every_rank),
// naming the ranks that differ from rank 0, when they do not all agree.
void agree_across_ranks(comm::Communicator& world, const std::string& what);

// Every rank's `text`, in rank order (traces and reports travel to rank 0 this way).
std::vector<std::string> all_gather_strings(comm::Communicator& world, const std::string& text);

// The transport's own all-to-all (host buffers, MPI): `bytes` to and from every other rank, the
// ranks started together; median seconds of `reps` (the yardstick of the dispatch kinds' bytes/s).
double time_host_alltoall(comm::Communicator& world, int64_t bytes, int reps);

// The built-in kernels plus an `experts` kernel that copies its rows (y = rows), ahead of the
// others: a run with it times the exchanges without the experts' compute, and so without waiting
// for the rank whose experts got the most rows. For benchmarks only: it computes no MoE.
const KernelRegistry& exchange_timing_kernels();

struct RankGraphOptions {
  std::string scope = "layer";  // layer | experts
  int chunks = 0;               // 0: unchunked
  int64_t chunk_tokens = 0;
  DType dtype = DType::f32;  // bf16 on the GPU
};

// The one-process graph (built for every rank's largest token count, chunked as asked) lowered for
// `rank`.
std::shared_ptr<const Graph> rank_graph(const MoEConfig& config, const ParallelLayout& layout, int rank,
                                        const RankGraphOptions& options);

// The one-process graph of rank `rank`'s tokens: its token inputs are drawn from the rows of the
// batch of all DP ranks that this rank's DP rank holds, so its output is what the rank must produce.
std::shared_ptr<const Graph> rank_reference_graph(const MoEConfig& config, const ParallelLayout& layout, int rank,
                                                  const std::string& scope, DType dtype = DType::f32);

// Runs the reference graph in one process (fp32, serial plan, same seed) and compares `output`
// [T_rank, H] with the fp64 reference of those tokens: the check of DESIGN.md for one rank.
CheckReport check_rank_output(const float* output, const MoEConfig& config, const ParallelLayout& layout, int rank,
                              const std::string& scope, uint64_t seed, double tolerance);

}  // namespace moeflow
