#pragma once
// The one way tests assert a refusal: `f` must throw Error(bad_input) with a one-line message,
// which is returned for the caller's matchers.
#include <gtest/gtest.h>

#include <functional>
#include <string>

#include "graph/error.hpp"

namespace moeflow::testing_errors {

inline std::string bad_input_message(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::bad_input) << e.what();
    const std::string msg = e.what();
    EXPECT_EQ(msg.find('\n'), std::string::npos) << "message must be one line: " << msg;
    return msg;
  }
  ADD_FAILURE() << "expected Error(bad_input), nothing was thrown";
  return "";
}

}  // namespace moeflow::testing_errors
