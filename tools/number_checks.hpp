#pragma once
// Number checks for the command line whose messages say what was wanted. CLI11's PositiveNumber
// reports `--chunks 0` as "Value 0 not in range 0.000000 to 1.797...e+308" and a word as the same
// range; these say "--chunks: 0 is not positive" and "--chunks: 'two' is not a number". The option's
// own type (an int, a double) then parses the value as before.
#include <CLI/CLI.hpp>

#include <cstdlib>
#include <string>

namespace moeflow::cli {

namespace detail {
// The check of one value: a number, above 0 (or at least 0 where zero is allowed).
inline CLI::Validator number_check(bool zero_allowed) {
  return CLI::Validator(
      [zero_allowed](std::string& text) -> std::string {
        char* end = nullptr;
        const double v = std::strtod(text.c_str(), &end);
        if (text.empty() || end == text.c_str() || *end != '\0') return "'" + text + "' is not a number";
        if (zero_allowed ? v < 0 : v <= 0) return text + (zero_allowed ? " is negative" : " is not positive");
        return "";
      },
      zero_allowed ? "NONNEGATIVE" : "POSITIVE");
}
}  // namespace detail

inline const CLI::Validator Positive = detail::number_check(false);
inline const CLI::Validator NonNegative = detail::number_check(true);

}  // namespace moeflow::cli
