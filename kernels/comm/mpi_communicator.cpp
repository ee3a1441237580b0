// The MPI transport of comm::Communicator (host buffers). Errors come back as return codes
// (MPI_ERRORS_RETURN on every communicator made here) and are thrown with MPI's own message.
// Every call during the runs of a layer (PeerDeadline) has a deadline (peer_timeout()): a peer that
// stays alive but never enters a collective leaves no error to return, so a watchdog thread ends
// this rank with status 3 instead, saying which call it was stuck in; mpirun then ends the job.
#include <mpi.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "graph/error.hpp"
#include "kernels/comm/communicator.hpp"

namespace moeflow::comm {

namespace {

// The MPI call in progress (collectives run one at a time: MPI_THREAD_SERIALIZED) and since when;
// a thread started with the first call checks it a few times a second.
class CallDeadline {
 public:
  static CallDeadline& get() {
    static CallDeadline* deadline = new CallDeadline();  // never destroyed: its thread outlives main
    return *deadline;
  }
  // This rank's name in the message, known once MPI is up.
  void name_rank(int rank, int size) { rank_ = rank, size_ = size; }

  // Times one call: `call` must be a string literal.
  class Scope {
   public:
    explicit Scope(const char* call) : d_(get()) { d_.enter(call); }
    ~Scope() { d_.since_ms_.store(0, std::memory_order_release); }
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    CallDeadline& d_;
  };

 private:
  CallDeadline() = default;
  static int64_t now_ms() {
    return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
  }
  void enter(const char* call) {
    if (!PeerDeadline::armed()) return;  // outside the runs: no deadline (since_ms_ stays 0)
    std::call_once(started_, [this] {
      timeout_ = peer_timeout();
      std::thread([this] { watch(); }).detach();
    });
    call_.store(call, std::memory_order_relaxed);
    since_ms_.store(now_ms(), std::memory_order_release);
  }
  [[noreturn]] void watch() {
    const auto poll = std::min<std::chrono::milliseconds>(std::chrono::milliseconds(250), timeout_ / 4 + std::chrono::milliseconds(1));
    for (;;) {
      std::this_thread::sleep_for(poll);
      const int64_t since = since_ms_.load(std::memory_order_acquire);
      if (since == 0 || now_ms() - since <= timeout_.count()) continue;
      char line[320];
      const int n = std::snprintf(line, sizeof line,
                                  "moeflow: error: rank %d of %d: %s had not returned after %.3g s: a peer rank is alive "
                                  "but never entered it (hung?); giving up (MOEFLOW_PEER_TIMEOUT sets the deadline)\n",
                                  rank_, size_, call_.load(std::memory_order_relaxed), timeout_.count() / 1000.0);
      const ssize_t written = write(STDERR_FILENO, line, static_cast<std::size_t>(std::max(0, std::min(n, 319))));
      (void)written;
      _exit(3);
    }
  }

  std::once_flag started_;
  std::chrono::milliseconds timeout_{0};
  std::atomic<int64_t> since_ms_{0};  // 0: no call in progress
  std::atomic<const char*> call_{""};
  int rank_ = 0, size_ = 1;
};

MPI_Datatype mpi_type(Element e) {
  if (e == Element::bf16) fail_input("the MPI transport moves host f32 and i32, not bf16");
  return e == Element::f32 ? MPI_FLOAT : MPI_INT32_T;
}

int mpi_count(int64_t count, const char* call) {
  if (count < 0 || count > std::numeric_limits<int>::max())
    fail_input(std::string("MPI ") + call + ": count " + std::to_string(count) + " outside [0, INT_MAX]");
  return static_cast<int>(count);
}

class MpiCommunicator final : public Communicator {
 public:
  explicit MpiCommunicator(MPI_Comm comm) : comm_(comm) {
    check(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    check(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
  }
  ~MpiCommunicator() override {
    if (comm_ != MPI_COMM_WORLD) MPI_Comm_free(&comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string transport() const override { return "mpi"; }

  void all_gather(const void* in, void* out, int64_t count, Element e) override {
    const int n = mpi_count(count, "all_gather");
    const CallDeadline::Scope timed("MPI_Allgather");
    check(MPI_Allgather(in, n, mpi_type(e), out, n, mpi_type(e), comm_), "MPI_Allgather");
  }
  void all_gather_v(const void* in, void* out, const int64_t* counts, Element e) override {
    std::vector<int> c(static_cast<std::size_t>(size_)), displ(c.size());
    int64_t at = 0;
    for (std::size_t r = 0; r < c.size(); ++r) {
      c[r] = mpi_count(counts[r], "all_gather_v count");
      displ[r] = mpi_count(at, "all_gather_v offset");
      at += counts[r];
    }
    const CallDeadline::Scope timed("MPI_Allgatherv");
    check(MPI_Allgatherv(in, c[static_cast<std::size_t>(rank_)], mpi_type(e), out, c.data(), displ.data(), mpi_type(e),
                         comm_),
          "MPI_Allgatherv");
  }
  void reduce_scatter_sum_v(const void* in, void* out, const int64_t* counts, Element e) override {
    std::vector<int> c(static_cast<std::size_t>(size_));
    for (std::size_t r = 0; r < c.size(); ++r) c[r] = mpi_count(counts[r], "reduce_scatter_v count");
    const CallDeadline::Scope timed("MPI_Reduce_scatter");
    check(MPI_Reduce_scatter(in, out, c.data(), mpi_type(e), MPI_SUM, comm_), "MPI_Reduce_scatter");
  }
  void reduce_scatter_sum(const void* in, void* out, int64_t count, Element e) override {
    const int n = mpi_count(count, "reduce_scatter");
    const CallDeadline::Scope timed("MPI_Reduce_scatter_block");
    check(MPI_Reduce_scatter_block(in, out, n, mpi_type(e), MPI_SUM, comm_), "MPI_Reduce_scatter_block");
  }
  void all_reduce_sum(const void* in, void* out, int64_t count, Element e) override {
    const int n = mpi_count(count, "all_reduce");
    const CallDeadline::Scope timed("MPI_Allreduce");
    check(MPI_Allreduce(in == out ? MPI_IN_PLACE : in, out, n, mpi_type(e), MPI_SUM, comm_), "MPI_Allreduce");
  }
  void all_to_all_v(const void* in, const int64_t* send_counts, const int64_t* send_offsets, void* out,
                    const int64_t* recv_counts, const int64_t* recv_offsets, Element e) override {
    std::vector<int> sc(static_cast<std::size_t>(size_)), so(sc.size()), rc(sc.size()), ro(sc.size());
    for (std::size_t r = 0; r < sc.size(); ++r) {
      sc[r] = mpi_count(send_counts[r], "all_to_all_v send count");
      so[r] = mpi_count(send_offsets[r], "all_to_all_v send offset");
      rc[r] = mpi_count(recv_counts[r], "all_to_all_v receive count");
      ro[r] = mpi_count(recv_offsets[r], "all_to_all_v receive offset");
    }
    const CallDeadline::Scope timed("MPI_Alltoallv");
    check(MPI_Alltoallv(in, sc.data(), so.data(), mpi_type(e), out, rc.data(), ro.data(), mpi_type(e), comm_),
          "MPI_Alltoallv");
  }
  void barrier() override {
    const CallDeadline::Scope timed("MPI_Barrier");
    check(MPI_Barrier(comm_), "MPI_Barrier");
  }
  std::unique_ptr<Communicator> split(int color, int key) override {
    MPI_Comm sub = MPI_COMM_NULL;
    const CallDeadline::Scope timed("MPI_Comm_split");
    check(MPI_Comm_split(comm_, color, key, &sub), "MPI_Comm_split");
    return std::make_unique<MpiCommunicator>(sub);
  }

 private:
  void check(int status, const char* call) const {
    if (status == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING];
    int length = 0;
    MPI_Error_string(status, text, &length);
    fail_resource(std::string(call) + " failed on rank " + std::to_string(rank_) + " of " + std::to_string(size_) +
                  ": " + std::string(text, static_cast<std::size_t>(length)));
  }

  MPI_Comm comm_;
  int rank_ = -1, size_ = 0;
};

}  // namespace

void mpi_start(int* argc, char*** argv) {
  (void)peer_timeout();  // a bad MOEFLOW_PEER_TIMEOUT fails here, on every rank, before MPI starts
  int provided = 0;
  if (MPI_Init_thread(argc, argv, MPI_THREAD_SERIALIZED, &provided) != MPI_SUCCESS)
    fail_resource("MPI_Init_thread failed");
  if (provided < MPI_THREAD_SERIALIZED)
    fail_resource("MPI gives thread level " + std::to_string(provided) +
                  ", below MPI_THREAD_SERIALIZED (collectives run on worker threads, one at a time)");
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  CallDeadline::get().name_rank(mpi_world_rank(), mpi_world_size());
}

bool mpi_started() {
  int initialised = 0, finalised = 0;
  MPI_Initialized(&initialised);
  MPI_Finalized(&finalised);
  return initialised && !finalised;
}

int mpi_world_rank() {
  int r = 0;
  if (mpi_started()) MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

int mpi_world_size() {
  int n = 1;
  if (mpi_started()) MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

void mpi_stop() {
  if (!mpi_started()) return;
  {
    const CallDeadline::Scope timed("MPI_Barrier (at the end)");
    MPI_Barrier(MPI_COMM_WORLD);
  }
  MPI_Finalize();
}

void mpi_abort(int status) {
  if (mpi_started()) MPI_Abort(MPI_COMM_WORLD, status);
  std::_Exit(status);
}

std::unique_ptr<Communicator> mpi_world() {
  int initialised = 0;
  MPI_Initialized(&initialised);
  if (!initialised) fail_resource("MPI is not initialised (run under mpirun through moeflow's command line)");
  return std::make_unique<MpiCommunicator>(MPI_COMM_WORLD);
}

}  // namespace moeflow::comm
