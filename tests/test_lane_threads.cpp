// Issuing lanes from their own threads: a lane waits for the steps of other lanes it depends on, a
// lane blocked on the host does not hold the others, and a failing lane stops the run without a hang.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "scheduler/lane_threads.hpp"

using namespace moeflow;
using namespace std::chrono_literals;

TEST(LaneThreads, ALaneWaitsForTheStepsOfOtherLanesItDependsOn) {
  // Steps 0..5 alternate lanes 0 and 1; each step depends on the one before it (on the other lane),
  // and lane 1's steps are slow, so without the waits lane 0 would run ahead.
  LaneThreads threads(2);
  IssueOrder order;
  for (int run = 0; run < 20; ++run) {
    order.reset(6);
    std::mutex m;
    std::vector<int> issued;
    threads.run(
        [&](int lane) {
          for (int step = lane; step < 6; step += 2) {
            if (step > 0) order.wait_issued(static_cast<std::size_t>(step - 1));
            if (lane == 1) std::this_thread::sleep_for(100us);
            {
              std::lock_guard lock(m);
              issued.push_back(step);
            }
            order.mark_issued(static_cast<std::size_t>(step));
          }
        },
        order);
    ASSERT_EQ(issued, (std::vector<int>{0, 1, 2, 3, 4, 5})) << "run " << run;
  }
}

TEST(LaneThreads, ALaneHeldOnTheHostDoesNotHoldTheOthers) {
  LaneThreads threads(3);
  IssueOrder order;
  order.reset(1);
  std::atomic<bool> others_done{false};
  std::atomic<int> finished{0};
  threads.run(
      [&](int lane) {
        if (lane == 2) {
          // Like a collective waiting for counts: it returns only once the other lanes are through.
          while (finished.load() < 2) std::this_thread::sleep_for(50us);
          others_done = true;
        } else {
          finished.fetch_add(1);
        }
      },
      order);
  EXPECT_TRUE(others_done.load());
}

TEST(LaneThreads, AFailingLaneStopsTheRunAndItsErrorIsTheOneRaised) {
  LaneThreads threads(3);
  IssueOrder order;
  for (int failing = 0; failing < 3; ++failing) {
    order.reset(3);
    // Every lane but the failing one waits for a step the failing lane never issues.
    try {
      threads.run(
          [&](int lane) {
            if (lane == failing) throw std::runtime_error("lane " + std::to_string(lane) + " failed");
            order.wait_issued(static_cast<std::size_t>(failing));
            FAIL() << "lane " << lane << " went on past a step that was never issued";
          },
          order);
      FAIL() << "no error";
    } catch (const std::runtime_error& e) {
      EXPECT_EQ(std::string(e.what()), "lane " + std::to_string(failing) + " failed");
    }
  }
  // The threads serve the next run as before.
  order.reset(1);
  std::atomic<int> ran{0};
  threads.run([&](int) { ran.fetch_add(1); }, order);
  EXPECT_EQ(ran.load(), 3);
}

TEST(LaneThreads, AnErrorRaisedAfterAnotherLanesIsNotTheOneReported) {
  LaneThreads threads(2);
  IssueOrder order;
  order.reset(2);
  // Lane 1 fails first; lane 0 then fails on what lane 1 left behind (as a sticky CUDA error would
  // make it): the first error is the one the run raises.
  std::atomic<bool> lane1_failed{false};
  try {
    threads.run(
        [&](int lane) {
          if (lane == 1) {
            lane1_failed = true;
            throw std::runtime_error("lane 1: the cause");
          }
          while (!lane1_failed) std::this_thread::sleep_for(1ms);
          std::this_thread::sleep_for(200ms);  // lane 1's error is recorded by now
          throw std::runtime_error("lane 0: a consequence");
        },
        order);
    FAIL() << "no error";
  } catch (const std::runtime_error& e) {
    EXPECT_EQ(std::string(e.what()), "lane 1: the cause");
  }
}
