// Probe, not part of the build: the latency of each piece of a host-counted alltoall dispatch (MPI
// count exchange, device-to-host sync, NCCL send/recv with and without the small ids and weights
// sends) on one host's GPUs, rank r on GPU r; rank 0 prints the slowest rank's median of 100.
// Built and run on the GPU machine (bench/NOTES.md has its figures):
//   nvcc -O2 -std=c++17 -arch=sm_90a $(mpicxx --showme:compile) bench/probes/alltoall_latency.cu -o /tmp/probe \
//     $(mpicxx --showme:link | sed 's/-pthread//; s/-Wl,/-Xlinker /g') -lnccl
//   NCCL_NVLS_ENABLE=0 mpirun -np 2 -x NCCL_NVLS_ENABLE /tmp/probe [bytes per peer, default 58720256]
#include <mpi.h>
#include <nccl.h>
#include <cuda_runtime.h>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#define CK(x) do { auto e = (x); if (e != 0) { std::printf("error %d at %s:%d\n", (int)e, __FILE__, __LINE__); std::exit(1); } } while (0)

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank, size;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  CK(cudaSetDevice(rank));
  ncclUniqueId id;
  if (rank == 0) ncclGetUniqueId(&id);
  MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, MPI_COMM_WORLD);
  ncclComm_t comm;
  CK(ncclCommInitRank(&comm, size, id, rank));
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  const size_t bytes = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 58720256;
  void *in, *out, *small_in, *small_out, *dev_counts;
  CK(cudaMalloc(&in, bytes * size));
  CK(cudaMalloc(&out, bytes * size));
  CK(cudaMalloc(&small_in, 1 << 20));
  CK(cudaMalloc(&small_out, 1 << 20));
  CK(cudaMalloc(&dev_counts, 4096));
  int64_t* pinned;
  CK(cudaMallocHost(&pinned, 4096));
  auto time = [&](const char* what, const std::function<void()>& f) {
    std::vector<double> t;
    for (int i = 0; i < 120; ++i) {
      MPI_Barrier(MPI_COMM_WORLD);
      const auto t0 = std::chrono::steady_clock::now();
      f();
      CK(cudaStreamSynchronize(s));
      if (i >= 20) t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() * 1e6);
    }
    std::sort(t.begin(), t.end());
    double worst = t[t.size() / 2];
    MPI_Allreduce(MPI_IN_PLACE, &worst, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    if (rank == 0) std::printf("%-58s %9.1f us\n", what, worst);
  };
  auto sendrecv = [&](void* a, void* b, size_t n) {
    for (int r = 0; r < size; ++r) {
      if (r == rank) continue;
      CK(ncclSend(static_cast<char*>(a) + r * n, n, ncclChar, r, comm, s));
      CK(ncclRecv(static_cast<char*>(b) + r * n, n, ncclChar, r, comm, s));
    }
  };
  std::vector<int64_t> sendc(size, 1), recvc(size);
  time("MPI_Alltoall of one int64 per rank", [&] { MPI_Alltoall(sendc.data(), 1, MPI_INT64_T, recvc.data(), 1, MPI_INT64_T, MPI_COMM_WORLD); });
  time("D2H 64 B + stream sync (idle stream)", [&] { CK(cudaMemcpyAsync(pinned, dev_counts, 64, cudaMemcpyDeviceToHost, s)); CK(cudaStreamSynchronize(s)); });
  time("NCCL alltoall of 8 B per peer (group)", [&] { ncclGroupStart(); sendrecv(small_in, small_out, 8); ncclGroupEnd(); });
  time("NCCL alltoall of 8 B + D2H + sync", [&] { ncclGroupStart(); sendrecv(small_in, small_out, 8); ncclGroupEnd();
    CK(cudaMemcpyAsync(pinned, small_out, 64, cudaMemcpyDeviceToHost, s)); CK(cudaStreamSynchronize(s)); });
  time("NCCL data only (bytes per peer, one buffer)", [&] { ncclGroupStart(); sendrecv(in, out, bytes); ncclGroupEnd(); });
  time("NCCL data + two small values, one group", [&] { ncclGroupStart(); sendrecv(in, out, bytes); sendrecv(small_in, small_out, 131072); sendrecv(small_in, small_out, 131072); ncclGroupEnd(); });
  time("D2H+sync, MPI counts, NCCL data + two small (the protocol)", [&] {
    CK(cudaMemcpyAsync(pinned, dev_counts, 64, cudaMemcpyDeviceToHost, s)); CK(cudaStreamSynchronize(s));
    MPI_Alltoall(sendc.data(), 1, MPI_INT64_T, recvc.data(), 1, MPI_INT64_T, MPI_COMM_WORLD);
    ncclGroupStart(); sendrecv(in, out, bytes); sendrecv(small_in, small_out, 131072); sendrecv(small_in, small_out, 131072); ncclGroupEnd(); });
  time("device copy of bytes (the self rows' gather, roughly)", [&] { CK(cudaMemcpyAsync(out, in, bytes, cudaMemcpyDeviceToDevice, s)); });
  ncclCommDestroy(comm);
  MPI_Finalize();
}
