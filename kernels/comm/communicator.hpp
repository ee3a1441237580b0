#pragma once
// One group of ranks and the collectives moeflow's parallel lowering needs, behind one interface for
// every transport (DESIGN.md: NCCL between GPUs, MPI between CPU ranks and for bootstrapping NCCL).
// Buffers are host memory for the MPI transport. Every call is collective: each rank of the group
// enters it with matching counts. A failure throws Error(resource) naming the call, the rank and
// the transport's own message; nothing is retried or dropped.
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

namespace moeflow::comm {

// Element types the collectives move (kernels/ sees no graph types). bf16: device transports only.
enum class Element { f32, i32, bf16 };
inline std::size_t element_bytes(Element e) { return e == Element::bf16 ? 2 : 4; }

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string transport() const = 0;  // "mpi", "nccl"
  // Device transports: the stream the following calls are ordered on (a lane's stream). Host
  // transports ignore it.
  virtual void use_stream(void* /*stream*/) {}
  // The host-side communicator over the same ranks in the same order (itself for MPI; NCCL's
  // bootstrap): small exchanges whose results the host needs (counts) go through it.
  virtual Communicator& host() { return *this; }
  // Calls between group_start and group_end may be fused into one launch (NCCL groups); host
  // transports run them one by one.
  virtual void group_start() {}
  virtual void group_end() {}
  // Device transports run their collectives after the calls return: a peer lost meanwhile shows
  // only as an asynchronous error. Throws Error(resource) naming it, after aborting the transport
  // (its pending work then stops), where there is one; abort() alone gives up without a reason (a
  // caller's deadline passed). Host transports fail in the call itself: nothing to do.
  virtual void check_async() {}
  virtual void abort() {}

  // out [size() * count]: every rank's `count` elements of `in`, in rank order.
  virtual void all_gather(const void* in, void* out, int64_t count, Element e) = 0;
  // out [Σ counts]: rank r's counts[r] elements of `in`, packed in rank order (counts: size() of them,
  // the same on every rank; this rank sends counts[rank()]).
  virtual void all_gather_v(const void* in, void* out, const int64_t* counts, Element e) = 0;
  // in [Σ counts]: this rank receives in `out` [counts[rank()]] the sum over ranks of their block
  // `rank()` (blocks packed in rank order).
  virtual void reduce_scatter_sum_v(const void* in, void* out, const int64_t* counts, Element e) = 0;
  // in [size() * count]: rank r receives in `out` [count] the sum over ranks of their block r.
  virtual void reduce_scatter_sum(const void* in, void* out, int64_t count, Element e) = 0;
  // out [count]: the sum over ranks of `in` [count] (out may equal in).
  virtual void all_reduce_sum(const void* in, void* out, int64_t count, Element e) = 0;
  // Sends send_counts[r] elements from in + send_offsets[r] to rank r and receives recv_counts[r]
  // elements from rank r into out + recv_offsets[r] (counts and offsets in elements, size() each).
  virtual void all_to_all_v(const void* in, const int64_t* send_counts, const int64_t* send_offsets, void* out,
                            const int64_t* recv_counts, const int64_t* recv_offsets, Element e) = 0;
  virtual void barrier() = 0;
  // The ranks that pass the same `color`, ordered by `key` (then by rank here): TP, DP and EP groups.
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;
};

// How long a rank waits for its peers before it gives up on them: one MPI call (a collective a peer
// never enters: that peer alive but stuck), or one GPU run's exchanges. 60 s, or the environment's
// MOEFLOW_PEER_TIMEOUT in seconds (at least 1; anything else throws Error(bad_input)).
std::chrono::milliseconds peer_timeout();

// The deadline on MPI calls holds only while a PeerDeadline lives: around the runs of a layer, where
// every rank enters each collective within about a layer's time of the others. Outside them (set-up,
// checks against the reference, reports) one rank may keep the others waiting longer, legitimately.
class PeerDeadline {
 public:
  PeerDeadline();
  ~PeerDeadline();
  PeerDeadline(const PeerDeadline&) = delete;
  PeerDeadline& operator=(const PeerDeadline&) = delete;
  static bool armed();
};

// MPI's world (MPI must be initialised: moeflow's command line does it under mpirun). Throws
// Error(resource) when this build has no MPI or MPI is not initialised.
std::unique_ptr<Communicator> mpi_world();
// Whether this build has MPI, and whether the process was started by mpirun (its environment).
bool have_mpi();
bool launched_by_mpirun();

// The MPI runtime of one process (the command line starts it under mpirun). Collectives are called
// from whichever worker thread runs a communication node, one at a time, so MPI must give at least
// MPI_THREAD_SERIALIZED; mpi_start throws Error(resource) otherwise.
void mpi_start(int* argc, char*** argv);
bool mpi_started();
int mpi_world_rank();  // 0 when MPI is not started
int mpi_world_size();  // 1 when MPI is not started
// Waits for every rank, then finalises (after an error every rank raised alike, or a normal end).
void mpi_stop();
// Takes every rank down with `status` (an error on this rank alone; the peers may be inside a
// collective that this rank will never enter).
[[noreturn]] void mpi_abort(int status);

}  // namespace moeflow::comm
