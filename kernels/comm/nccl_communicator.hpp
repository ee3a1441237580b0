#pragma once
// The NCCL transport of comm::Communicator (device buffers, on the stream set by use_stream), made
// over the ranks of a host communicator that bootstraps it (rank 0's unique id travels through it)
// and stays its host() side. Variable-count collectives are NCCL groups: all_gather_v a broadcast
// per root, reduce_scatter_sum_v a reduce per root, all_to_all_v a send and a receive per peer.
// Every NCCL and CUDA call is checked; a failure throws Error(resource) naming the call, the rank
// and NCCL's message, and aborts the NCCL communicator so no later call waits on a lost peer.
#include <memory>

#include "kernels/comm/communicator.hpp"

namespace moeflow::comm {

// Collective over `bootstrap`'s ranks; `device` is this rank's CUDA device. `bootstrap` must
// outlive the result.
std::unique_ptr<Communicator> nccl_group(Communicator& bootstrap, int device);

// Whether this build has the NCCL transport.
bool have_nccl();

}  // namespace moeflow::comm
