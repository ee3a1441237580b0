#include "scheduler/lane_threads.hpp"

namespace moeflow {

namespace {
// Thrown by a lane that stops waiting because another failed: never the cause of a failure.
struct IssueAborted {};
}  // namespace

void IssueOrder::reset(std::size_t steps) {
  std::lock_guard lock(m_);
  issued_.assign(steps, false);
  aborted_ = false;
}

void IssueOrder::mark_issued(std::size_t step) {
  {
    std::lock_guard lock(m_);
    issued_.at(step) = true;
  }
  cv_.notify_all();
}

void IssueOrder::wait_issued(std::size_t step) {
  std::unique_lock lock(m_);
  cv_.wait(lock, [&] { return aborted_ || issued_.at(step); });
  if (!issued_[step]) throw IssueAborted{};
}

void IssueOrder::abort() {
  {
    std::lock_guard lock(m_);
    aborted_ = true;
  }
  cv_.notify_all();
}

LaneThreads::LaneThreads(int lanes) {
  for (int l = 1; l < lanes; ++l) threads_.emplace_back([this, l] { worker(l); });
}

LaneThreads::~LaneThreads() {
  {
    std::lock_guard lock(m_);
    stopping_ = true;
  }
  start_.notify_all();
  for (std::thread& t : threads_) t.join();
}

void LaneThreads::worker(int lane) {
  unsigned long seen = 0;
  for (;;) {
    const std::function<void(int)>* body = nullptr;
    IssueOrder* order = nullptr;
    {
      std::unique_lock lock(m_);
      start_.wait(lock, [&] { return stopping_ || generation_ != seen; });
      if (stopping_) return;
      seen = generation_;
      body = body_;
      order = order_;
    }
    std::exception_ptr error;
    try {
      (*body)(lane);
    } catch (const IssueAborted&) {
    } catch (...) {
      error = std::current_exception();
      order->abort();
    }
    {
      std::lock_guard lock(m_);
      if (error && !first_error_) first_error_ = error;
      --running_;
    }
    finished_.notify_all();
  }
}

void LaneThreads::run(const std::function<void(int lane)>& body, IssueOrder& order) {
  {
    std::lock_guard lock(m_);
    body_ = &body;
    order_ = &order;
    first_error_ = nullptr;
    running_ = static_cast<int>(threads_.size());
    ++generation_;
  }
  start_.notify_all();
  try {
    body(0);
  } catch (const IssueAborted&) {
  } catch (...) {
    // The first error of any lane is the one reported: a later one (lane 0 tripping over a sticky
    // CUDA error a worker caused) would name the wrong call.
    {
      std::lock_guard lock(m_);
      if (!first_error_) first_error_ = std::current_exception();
    }
    order.abort();
  }
  std::unique_lock lock(m_);
  finished_.wait(lock, [&] { return running_ == 0; });
  if (first_error_) std::rethrow_exception(first_error_);
}

}  // namespace moeflow
