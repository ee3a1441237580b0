#include "kernels/comm/communicator.hpp"

#include <atomic>
#include <cstdlib>
#include <string>

#include "graph/error.hpp"
#include "kernels/comm/nccl_communicator.hpp"

namespace moeflow::comm {

#ifdef MOEFLOW_HAVE_MPI
bool have_mpi() { return true; }
#else
bool have_mpi() { return false; }
std::unique_ptr<Communicator> mpi_world() {
  fail_resource("this moeflow was built without MPI (configure with -DMOEFLOW_MPI=ON): no multi-rank runs");
}
void mpi_start(int*, char***) { mpi_world(); }
bool mpi_started() { return false; }
int mpi_world_rank() { return 0; }
int mpi_world_size() { return 1; }
void mpi_stop() {}
void mpi_abort(int status) { std::_Exit(status); }
#endif

#ifndef MOEFLOW_HAVE_NCCL
bool have_nccl() { return false; }
std::unique_ptr<Communicator> nccl_group(Communicator&, int) {
  fail_resource("this moeflow was built without NCCL (configure with CUDA and NCCL found): no multi-rank GPU runs");
}
#endif

std::chrono::milliseconds peer_timeout() {
  const char* text = std::getenv("MOEFLOW_PEER_TIMEOUT");
  if (text == nullptr || *text == '\0') return std::chrono::seconds(60);
  char* end = nullptr;
  const double seconds = std::strtod(text, &end);
  if (end == text || *end != '\0' || !(seconds >= 1) || seconds > 1e6)
    fail_input(std::string("MOEFLOW_PEER_TIMEOUT=") + text + ": expected a number of seconds, at least 1");
  return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000.0));
}

namespace {
std::atomic<int> peer_deadlines{0};
}  // namespace

PeerDeadline::PeerDeadline() { peer_deadlines.fetch_add(1, std::memory_order_relaxed); }
PeerDeadline::~PeerDeadline() { peer_deadlines.fetch_sub(1, std::memory_order_relaxed); }
bool PeerDeadline::armed() { return peer_deadlines.load(std::memory_order_relaxed) > 0; }

// OpenMPI's launcher (and the PMIx it uses) sets these for every rank it starts.
bool launched_by_mpirun() {
  return std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr || std::getenv("PMIX_RANK") != nullptr ||
         std::getenv("PMI_RANK") != nullptr;
}

}  // namespace moeflow::comm
