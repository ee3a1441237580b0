#pragma once
// The NCCL transport of comm::Communicator (device buffers, on the stream set by use_stream), made
// over the ranks of a host communicator that bootstraps it (rank 0's unique id travels through it)
// and stays its host() side. Variable-count collectives are NCCL groups: all_gather_v a broadcast
// per root, reduce_scatter_sum_v a reduce per root, all_to_all_v a send and a receive per peer.
// Every NCCL and CUDA call is checked; a failure throws Error(resource) naming the call, the rank
// and NCCL's message, closes the groups this communicator opened and aborts it, so no later call
// of this rank waits on it. Not covered yet: a peer that hangs without any call here failing (NCCL
// reports that only through ncclCommGetAsyncError, which nothing polls); a peer that dies is
// covered by mpirun's termination of the job.
#include <memory>

#include "kernels/comm/communicator.hpp"

namespace moeflow::comm {

// Collective over `bootstrap`'s ranks; `device` is this rank's CUDA device. `bootstrap` must
// outlive the result.
std::unique_ptr<Communicator> nccl_group(Communicator& bootstrap, int device);

// Whether this build has the NCCL transport.
bool have_nccl();

}  // namespace moeflow::comm
