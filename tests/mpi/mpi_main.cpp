// main() of the multi-rank tests: MPI around GoogleTest. Every rank runs every test; only rank 0
// prints (so the test list CTest discovers through mpirun appears once), and the process fails
// when any rank's tests failed (mpirun returns the first non-zero status).
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdio>

int main(int argc, char** argv) {
  // Collectives run on whichever oneTBB worker reaches them, one at a time (the lowering chains them).
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_SERIALIZED, &provided);
  if (provided < MPI_THREAD_SERIALIZED) {
    std::fprintf(stderr, "MPI gives thread level %d, below MPI_THREAD_SERIALIZED\n", provided);
    MPI_Abort(MPI_COMM_WORLD, 3);
  }
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank != 0) {
    std::fflush(stdout);
    if (!std::freopen("/dev/null", "w", stdout)) return 3;
  }
  testing::InitGoogleTest(&argc, argv);
  const int failed = RUN_ALL_TESTS();
  int any = 0;
  MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return any;
}
