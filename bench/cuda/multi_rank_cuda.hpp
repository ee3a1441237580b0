#pragma once
// The GPU side of a multi-rank run: NCCL communicators bootstrapped from MPI's, each rank's device,
// and the check of a rank's bf16 output against one GPU running the one-process graph of its tokens
// (same bf16 numbers; the fp64 reference follows that run's near-ties).
#include <memory>
#include <vector>

#include "bench/multi_rank.hpp"

namespace moeflow {

// The CUDA device of this rank: its rank among the ranks of its host (mpirun's local rank) modulo
// the devices there.
int rank_device();

// NCCL world and TP group over the ranks of `host` (MPI), on `device`; `host` must outlive them.
struct DeviceComms {
  std::unique_ptr<comm::Communicator> world, tp;
  CommGroups groups;
};
DeviceComms make_device_comms(RankComms& host, int device);

// NCCL's own all-to-all (device buffers): `bytes` to and from every other rank, started together
// (a host barrier); median seconds of `reps`.
double time_device_alltoall(comm::Communicator& nccl, comm::Communicator& host, int device, int64_t bytes, int reps);

CheckReport check_rank_output_cuda(const std::vector<float>& output, const MoEConfig& config,
                                   const ParallelLayout& layout, int rank, const std::string& scope, uint64_t seed,
                                   int device, double tolerance);

}  // namespace moeflow
