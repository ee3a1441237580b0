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

 private:
  ErrorKind kind_;
};

[[noreturn]] inline void fail_input(const std::string& message) { throw Error(ErrorKind::bad_input, message); }
[[noreturn]] inline void fail_resource(const std::string& message) { throw Error(ErrorKind::resource, message); }

}  // namespace moeflow
