// The parallel lowering on GPUs (NCCL), under mpirun with 2 and 4 ranks on the GPU machine: each
// rank's bf16 output against one GPU running the one-process graph of its tokens (relative norm
// error < 1e-2 to the fp64 reference on the same bf16 numbers), reruns bit-identical. Skipped
// where the build has no NCCL or a rank has no GPU.
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "bench/multi_rank.hpp"
#include "kernels/comm/nccl_communicator.hpp"
#ifdef MOEFLOW_HAVE_CUDA
#include "bench/cuda/cuda_session.hpp"
#include "bench/cuda/multi_rank_cuda.hpp"
#include "kernels/cuda/device.hpp"
#endif

using namespace moeflow;

namespace {

struct GpuCase {
  DispatchKind kind;
  bool ep;
  int tp;
  int chunks;
  Policy policy = Policy::serial;
  std::string dispatch_kernel = {};  // forced on the alltoall dispatch; empty: the planner's choice
};

std::string gpu_case_name(const GpuCase& c) {
  std::string n = std::string(to_string(c.kind)) + (c.ep ? "_ep" : "_split_I") + "_tp" + std::to_string(c.tp) + "_chunks" +
                  std::to_string(c.chunks) + "_" + to_string(c.policy) +
                  (c.dispatch_kernel.empty() ? std::string() : "_" + c.dispatch_kernel.substr(c.dispatch_kernel.find('.') + 1));
  for (char& ch : n)
    if (ch == '-') ch = '_';
  return n;
}

class LoweredGpu : public testing::TestWithParam<GpuCase> {};

TEST_P(LoweredGpu, EveryRankMatchesOneGpuOnItsTokens) {
#ifndef MOEFLOW_HAVE_CUDA
  GTEST_SKIP() << "no CUDA backend in this build";
#else
  if (!comm::have_nccl()) GTEST_SKIP() << "no NCCL transport in this build";
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const GpuCase c = GetParam();
  auto world = comm::mpi_world();
  const int w = world->size();
  if (w % c.tp != 0) GTEST_SKIP() << "tp " << c.tp << " does not divide " << w << " ranks";
  // H and I multiples of 8 (the bf16 kernels' 16-byte rows), E and I divisible by 4 ranks.
  const MoEConfig config = load_config("qwen1.5-moe-a2.7b", {"hidden_size=256", "moe_intermediate_size=64", "num_experts=16",
                                                             "num_experts_per_tok=4", "shared_expert_intermediate_size=128"});
  ParallelLayout layout{.dp = w / c.tp, .tp = c.tp, .ep = c.ep, .dispatch = c.kind, .tokens = {}};
  const int64_t pattern[] = {40, 17, 3, 29};
  for (int d = 0; d < layout.dp; ++d) layout.tokens.push_back(pattern[d % 4]);
  check_layout(layout, config, w);
  RankComms comms = make_rank_comms(std::move(world), layout);
  const int rank = comms.world->rank();
  const int device = rank_device();
  DeviceComms nccl = make_device_comms(comms, device);
  CudaSessionOptions o;
  o.seed = 11;
  o.plan.backend = Backend::cuda;
  o.plan.policy = c.policy;
  o.plan.device = device;
  if (!c.dispatch_kernel.empty()) o.plan.forced_kernels["alltoall_dispatch"] = c.dispatch_kernel;
  o.comm = &nccl.groups;
  CudaSession s(rank_graph(config, layout, rank, {.scope = "layer", .chunks = c.chunks, .dtype = DType::bf16}), o);
  s.set_tokens(layout.tokens_of(rank));
  s.run();
  const std::vector<float> first = s.output();
  s.run();
  const std::vector<float> again = s.output();
  EXPECT_EQ(0, std::memcmp(first.data(), again.data(), sizeof(float) * first.size())) << "rank " << rank << ": a rerun differs";
  const CheckReport r = check_rank_output_cuda(first, config, layout, rank, "layer", 11, device, 1e-2);
  EXPECT_TRUE(r.pass) << "rank " << rank << " " << layout.str() << " rel_norm " << r.comparison.rel_norm;
#endif
}

std::vector<GpuCase> gpu_cases() {
  std::vector<GpuCase> all;
  for (DispatchKind k : {DispatchKind::allgather, DispatchKind::topk_allgather, DispatchKind::alltoall})
    for (bool ep : {false, true})
      for (int tp : {1, 2})
        for (int chunks : {1, 2})
          if (ep || k != DispatchKind::alltoall) all.push_back({k, ep, tp, chunks});
  all.push_back({DispatchKind::alltoall, true, 1, 2, Policy::concurrent});
  all.push_back({DispatchKind::allgather, false, 2, 2, Policy::concurrent});
  // Both alltoall dispatch kernels whichever the planner would take on this many ranks: the rows
  // counted on the host, and the fixed blocks (uneven tokens per rank, empty chunk rows included).
  for (const char* kernel : {"nccl.alltoall_v", "nccl.alltoall_blocks"}) {
    for (int chunks : {1, 2}) all.push_back({DispatchKind::alltoall, true, 1, chunks, Policy::serial, kernel});
    all.push_back({DispatchKind::alltoall, true, 2, 2, Policy::concurrent, kernel});
  }
  return all;
}

INSTANTIATE_TEST_SUITE_P(Layouts, LoweredGpu, testing::ValuesIn(gpu_cases()),
                         [](const testing::TestParamInfo<GpuCase>& i) { return gpu_case_name(i.param); });

}  // namespace
