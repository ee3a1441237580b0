#include "kernels/comm/nccl_communicator.hpp"

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstring>
#include <string>
#include <vector>

#include "graph/error.hpp"

namespace moeflow::comm {

bool have_nccl() { return true; }

namespace {

ncclDataType_t nccl_type(Element e) {
  switch (e) {
    case Element::f32: return ncclFloat32;
    case Element::i32: return ncclInt32;
    case Element::bf16: return ncclBfloat16;
  }
  return ncclFloat32;
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(Communicator& bootstrap, int device) : host_(bootstrap), rank_(bootstrap.rank()), size_(bootstrap.size()) {
    cuda(cudaSetDevice(device), "cudaSetDevice");
    ncclUniqueId id{};
    if (rank_ == 0) check(ncclGetUniqueId(&id), "ncclGetUniqueId");
    // The id travels as 32-bit words through the host communicator (rank 0's block to everyone).
    static_assert(sizeof(ncclUniqueId) % 4 == 0);
    constexpr int64_t words = sizeof(ncclUniqueId) / 4;
    std::vector<int32_t> all(static_cast<std::size_t>(words * size_));
    std::vector<int32_t> mine(static_cast<std::size_t>(words));
    std::memcpy(mine.data(), &id, sizeof id);
    host_.all_gather(mine.data(), all.data(), words, Element::i32);
    std::memcpy(&id, all.data(), sizeof id);
    check(ncclCommInitRank(&comm_, size_, id, rank_), "ncclCommInitRank");
  }
  ~NcclCommunicator() override {
    if (comm_) ncclCommDestroy(comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string transport() const override { return "nccl"; }
  void use_stream(void* stream) override { stream_ = static_cast<cudaStream_t>(stream); }
  Communicator& host() override { return host_; }

  void all_gather(const void* in, void* out, int64_t count, Element e) override {
    check(ncclAllGather(in, out, static_cast<size_t>(count), nccl_type(e), comm_, stream_), "ncclAllGather");
  }
  void all_gather_v(const void* in, void* out, const int64_t* counts, Element e) override {
    const std::size_t b = element_bytes(e);
    group_start();
    int64_t at = 0;
    for (int r = 0; r < size_; ++r) {
      void* dst = static_cast<std::byte*>(out) + at * static_cast<int64_t>(b);
      if (counts[r] > 0)
        check(ncclBroadcast(r == rank_ ? in : dst, dst, static_cast<size_t>(counts[r]), nccl_type(e), r, comm_, stream_),
              "ncclBroadcast (all_gather_v)");
      at += counts[r];
    }
    group_end();
  }
  void reduce_scatter_sum(const void* in, void* out, int64_t count, Element e) override {
    check(ncclReduceScatter(in, out, static_cast<size_t>(count), nccl_type(e), ncclSum, comm_, stream_),
          "ncclReduceScatter");
  }
  void reduce_scatter_sum_v(const void* in, void* out, const int64_t* counts, Element e) override {
    const std::size_t b = element_bytes(e);
    group_start();
    int64_t at = 0;
    for (int r = 0; r < size_; ++r) {
      if (counts[r] > 0)
        check(ncclReduce(static_cast<const std::byte*>(in) + at * static_cast<int64_t>(b), r == rank_ ? out : nullptr,
                         static_cast<size_t>(counts[r]), nccl_type(e), ncclSum, r, comm_, stream_),
              "ncclReduce (reduce_scatter_v)");
      at += counts[r];
    }
    group_end();
  }
  void all_reduce_sum(const void* in, void* out, int64_t count, Element e) override {
    check(ncclAllReduce(in, out, static_cast<size_t>(count), nccl_type(e), ncclSum, comm_, stream_), "ncclAllReduce");
  }
  void all_to_all_v(const void* in, const int64_t* send_counts, const int64_t* send_offsets, void* out,
                    const int64_t* recv_counts, const int64_t* recv_offsets, Element e) override {
    const int64_t b = static_cast<int64_t>(element_bytes(e));
    group_start();
    for (int r = 0; r < size_; ++r) {
      if (send_counts[r] > 0)
        check(ncclSend(static_cast<const std::byte*>(in) + send_offsets[r] * b, static_cast<size_t>(send_counts[r]),
                       nccl_type(e), r, comm_, stream_),
              "ncclSend");
      if (recv_counts[r] > 0)
        check(ncclRecv(static_cast<std::byte*>(out) + recv_offsets[r] * b, static_cast<size_t>(recv_counts[r]),
                       nccl_type(e), r, comm_, stream_),
              "ncclRecv");
    }
    group_end();
  }
  void check_async() override {
    if (!comm_) return;
    ncclResult_t async = ncclSuccess;
    check(ncclCommGetAsyncError(comm_, &async), "ncclCommGetAsyncError");
    if (async != ncclSuccess && async != ncclInProgress) check(async, "a collective in flight (asynchronous error)");
  }
  void abort() override {
    if (!comm_) return;
    for (; open_groups_ > 0; --open_groups_) (void)ncclGroupEnd();
    ncclCommAbort(comm_);
    comm_ = nullptr;
  }
  void group_start() override {
    check(ncclGroupStart(), "ncclGroupStart");
    ++open_groups_;
  }
  void group_end() override {
    --open_groups_;
    check(ncclGroupEnd(), "ncclGroupEnd");
  }
  void barrier() override {
    cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    host_.barrier();
  }
  std::unique_ptr<Communicator> split(int, int) override {
    fail_input("NCCL communicators are made per group with nccl_group() over a split host communicator");
  }

 private:
  void check(ncclResult_t status, const char* call) {
    if (status == ncclSuccess) return;
    std::string message = std::string(call) + " failed on rank " + std::to_string(rank_) + " of " +
                          std::to_string(size_) + ": " + ncclGetErrorString(status);
    if (comm_) {
      if (const char* last = ncclGetLastError(comm_); last && *last) message += std::string(" (") + last + ")";
      // Groups this communicator opened are closed first: NCCL's group depth is the thread's, and a
      // group left open would hold every later NCCL call of this thread (another communicator's
      // too) unlaunched while the peers wait.
      for (; open_groups_ > 0; --open_groups_) (void)ncclGroupEnd();
      ncclCommAbort(comm_);  // no later call may wait on this communicator
      comm_ = nullptr;
    }
    fail_resource(message);
  }
  void cuda(cudaError_t status, const char* call) const {
    if (status != cudaSuccess)
      fail_resource(std::string(call) + " failed on rank " + std::to_string(rank_) + ": " + cudaGetErrorString(status));
  }

  Communicator& host_;
  int rank_, size_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  int open_groups_ = 0;  // groups opened through this communicator and not yet closed (see check())
};

}  // namespace

std::unique_ptr<Communicator> nccl_group(Communicator& bootstrap, int device) {
  return std::make_unique<NcclCommunicator>(bootstrap, device);
}

}  // namespace moeflow::comm
