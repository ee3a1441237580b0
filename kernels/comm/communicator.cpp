#include "kernels/comm/communicator.hpp"

#include <cstdlib>

#include "graph/error.hpp"

namespace moeflow::comm {

#ifdef MOEFLOW_HAVE_MPI
bool have_mpi() { return true; }
#else
bool have_mpi() { return false; }
std::unique_ptr<Communicator> mpi_world() {
  fail_resource("this moeflow was built without MPI (configure with -DMOEFLOW_MPI=ON): no multi-rank runs");
}
#endif

// OpenMPI's launcher (and the PMIx it uses) sets these for every rank it starts.
bool launched_by_mpirun() {
  return std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr || std::getenv("PMIX_RANK") != nullptr ||
         std::getenv("PMI_RANK") != nullptr;
}

}  // namespace moeflow::comm
