#include "graph/json_file.hpp"

#include <algorithm>
#include <fstream>

#include "graph/error.hpp"

namespace moeflow {

nlohmann::json read_json_file(const std::string& path, const std::string& what) {
  std::ifstream in(path);
  if (!in) fail_input(what + " '" + path + "': cannot be opened for reading");
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    std::string message = what + " '" + path + "': malformed JSON: " + e.what();
    std::replace(message.begin(), message.end(), '\n', ' ');
    fail_input(message);
  }
}

}  // namespace moeflow
