#pragma once
// Reading a JSON file the user named (a model config, a trace, a tuning cache): one place for the
// errors, so each names the file and fits on one line (the CLI prints errors as one line).
#include <string>

#include <nlohmann/json.hpp>

namespace moeflow {

// The whole file as JSON. Bad input naming `what` and the file when it cannot be opened or is not
// JSON ("config 'a.json': malformed JSON: ...").
nlohmann::json read_json_file(const std::string& path, const std::string& what);

}  // namespace moeflow
