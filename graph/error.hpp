#pragma once
// The one exception type of moeflow. It carries what a user needs to find the problem (the node,
// the value, the shapes, the rank) inside its message, and a category that the command line maps
// to its exit status: 1 a check failed, 2 bad input, 3 resources.
#include <stdexcept>
#include <string>

namespace moeflow {

enum class ErrorKind {
  check_failed = 1,  // a result did not match the reference
  bad_input = 2,     // flags, config, graph, shapes, dtypes
  resource = 3,      // memory, no device, a lost peer
};

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const noexcept { return kind_; }
  int exit_status() const noexcept { return static_cast<int>(kind_); }
  // In a multi-rank run: every rank raised this same error at the same point (a check of flags or
  // layout, or the agreement between ranks), so each can report it and stop without taking the
  // others down; any other error on one rank must abort them all.
  bool on_every_rank() const noexcept { return every_rank_; }
  Error& raised_on_every_rank() noexcept {
    every_rank_ = true;
    return *this;
  }

 private:
  ErrorKind kind_;
  bool every_rank_ = false;
};

[[noreturn]] inline void fail_input(const std::string& message) { throw Error(ErrorKind::bad_input, message); }
[[noreturn]] inline void fail_resource(const std::string& message) { throw Error(ErrorKind::resource, message); }

}  // namespace moeflow
