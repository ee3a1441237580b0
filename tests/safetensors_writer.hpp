#pragma once
// A tiny safetensors writer for tests: the 8-byte little-endian header length, the JSON header,
// then the data section. Lets tests craft valid files and files that lie.
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace moeflow::testing_safetensors {

struct Tensor {
  std::string name, dtype;
  std::vector<int64_t> shape;
  std::string bytes;  // raw little-endian data
};

template <class T> std::string raw(const std::vector<T>& v) {
  std::string s(v.size() * sizeof(T), '\0');
  if (!v.empty()) std::memcpy(s.data(), v.data(), s.size());
  return s;
}

inline void write_raw(const std::filesystem::path& p, const std::string& header, const std::string& data,
                      uint64_t declared_len) {
  std::string len(8, '\0');
  for (int i = 0; i < 8; ++i) len[static_cast<std::size_t>(i)] = static_cast<char>((declared_len >> (8 * i)) & 0xff);
  std::ofstream(p, std::ios::binary) << len << header << data;
}
inline void write_raw(const std::filesystem::path& p, const std::string& header, const std::string& data) {
  write_raw(p, header, data, header.size());
}

inline void write_st(const std::filesystem::path& p, const std::vector<Tensor>& ts,
                     const nlohmann::json& metadata = nlohmann::json()) {
  nlohmann::json h = nlohmann::json::object();
  if (!metadata.is_null()) h["__metadata__"] = metadata;
  std::string data;
  for (const Tensor& t : ts) {
    h[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {data.size(), data.size() + t.bytes.size()}}};
    data += t.bytes;
  }
  write_raw(p, h.dump(), data);
}

}  // namespace moeflow::testing_safetensors
