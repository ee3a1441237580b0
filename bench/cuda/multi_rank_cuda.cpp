#include "bench/cuda/multi_rank_cuda.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>

#include "bench/cuda/cuda_session.hpp"
#include "graph/error.hpp"
#include "kernels/comm/nccl_communicator.hpp"
#include "kernels/cuda/check.cuh"
#include "kernels/cuda/lane_context.hpp"
#include "ops/kernel_registry.hpp"
#include "kernels/cuda/device.hpp"

namespace moeflow {

int rank_device() {
  const int devices = cuda::device_count();
  if (devices == 0) fail_resource("--backend cuda: no CUDA device on this rank's host");
  const char* local = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK");
  return (local ? std::atoi(local) : 0) % devices;
}

DeviceComms make_device_comms(RankComms& host, int device) {
  DeviceComms d;
  d.world = comm::nccl_group(*host.world, device);
  d.tp = comm::nccl_group(*host.tp, device);
  d.groups.world = d.world.get();
  d.groups.tp = d.tp.get();
  return d;
}

void add_cuda_identity_experts(KernelRegistry& r) {
  r.add({"experts", Backend::cuda, "bench.identity_rows", 100,
         [](const Graph&, const Node&) { return Support::yes("copies its rows: exchange timing only, not an MoE"); },
         [](const KernelCall& c) {
           const Value& rows = c.input_value(0);
           MOEFLOW_CUDA_CHECK(cudaMemcpyAsync(c.outputs[0], c.inputs[0], static_cast<std::size_t>(rows.bytes(c.tokens)),
                                              cudaMemcpyDeviceToDevice,
                                              static_cast<const cuda::LaneContext*>(c.lane)->stream));
         },
         {}});
}

double time_device_alltoall(comm::Communicator& nccl, comm::Communicator& host, int device, int64_t bytes, int reps) {
  MOEFLOW_CUDA_CHECK(cudaSetDevice(device));
  const int n = nccl.size();
  const int64_t per = std::max<int64_t>(1, bytes / 2);  // bf16 elements
  void *in = nullptr, *out = nullptr;
  MOEFLOW_CUDA_CHECK(cudaMalloc(&in, static_cast<std::size_t>(2 * per * n)));
  MOEFLOW_CUDA_CHECK(cudaMalloc(&out, static_cast<std::size_t>(2 * per * n)));
  MOEFLOW_CUDA_CHECK(cudaMemset(in, 0, static_cast<std::size_t>(2 * per * n)));
  cudaStream_t stream = nullptr;
  MOEFLOW_CUDA_CHECK(cudaStreamCreate(&stream));
  nccl.use_stream(stream);
  std::vector<int64_t> counts(static_cast<std::size_t>(n), per), offsets(static_cast<std::size_t>(n));
  for (int r = 0; r < n; ++r) offsets[static_cast<std::size_t>(r)] = r * per;
  counts[static_cast<std::size_t>(nccl.rank())] = 0;
  std::vector<double> t;
  for (int i = 0; i < reps + 2; ++i) {
    MOEFLOW_CUDA_CHECK(cudaStreamSynchronize(stream));
    host.barrier();
    const auto t0 = std::chrono::steady_clock::now();
    nccl.all_to_all_v(in, counts.data(), offsets.data(), out, counts.data(), offsets.data(), comm::Element::bf16);
    MOEFLOW_CUDA_CHECK(cudaStreamSynchronize(stream));
    if (i > 1) t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  cudaStreamDestroy(stream);
  cudaFree(in);
  cudaFree(out);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

CheckReport check_rank_output_cuda(const std::vector<float>& output, const MoEConfig& config,
                                   const ParallelLayout& layout, int rank, const std::string& scope, uint64_t seed,
                                   int device, double tolerance) {
  CudaSessionOptions o;
  o.seed = seed;
  o.plan.backend = Backend::cuda;
  o.plan.device = device;
  CudaSession single(rank_reference_graph(config, layout, rank, scope, DType::bf16), o);
  single.set_tokens(layout.tokens_of(rank));
  single.run();  // the gate's ids, which the reference follows where choices are near-ties
  return single.check_against(output.data(), tolerance);
}

}  // namespace moeflow
