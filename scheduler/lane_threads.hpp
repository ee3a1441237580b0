#pragma once
// Issuing each lane of a plan from its own host thread. One issuing thread is enough while issuing
// never blocks; a step that waits on the host (counts a collective needs there, a to_host copy) would
// hold every other lane's issue behind it, so the GPU idles where the plan overlaps. With a thread
// per lane only that lane waits.
//
// Cross-lane waits need the host too: a stream can only wait on an event already recorded, so a lane
// waits (IssueOrder::wait_issued) until the step it depends on has been issued by its own lane.
#include <condition_variable>
#include <cstddef>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace moeflow {

// Which steps of the current run have been issued; wakes the lanes waiting on them. A failed lane
// aborts it, so no lane waits for a step that will never come.
class IssueOrder {
 public:
  void reset(std::size_t steps);
  void mark_issued(std::size_t step);
  // Returns once `step` is issued; throws when another lane failed first.
  void wait_issued(std::size_t step);
  void abort();

 private:
  std::mutex m_;
  std::condition_variable cv_;
  std::vector<bool> issued_;
  bool aborted_ = false;
};

// Persistent threads for lanes 1..n-1 (lane 0 runs on the caller), so a run pays a wake-up, not a
// thread start, per lane.
class LaneThreads {
 public:
  explicit LaneThreads(int lanes);
  ~LaneThreads();
  LaneThreads(const LaneThreads&) = delete;
  LaneThreads& operator=(const LaneThreads&) = delete;

  // Runs body(lane) for every lane at once and returns when all have returned; rethrows the first
  // exception any lane threw (after `order` is aborted, so the other lanes stop waiting and return).
  void run(const std::function<void(int lane)>& body, IssueOrder& order);

 private:
  void worker(int lane);
  std::vector<std::thread> threads_;
  std::mutex m_;
  std::condition_variable start_, finished_;
  const std::function<void(int)>* body_ = nullptr;
  IssueOrder* order_ = nullptr;
  unsigned long generation_ = 0;
  int running_ = 0;
  bool stopping_ = false;
  std::exception_ptr first_error_;
};

}  // namespace moeflow
