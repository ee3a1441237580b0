#pragma once
// A read-only safetensors reader: one .safetensors file, or a sharded checkpoint folder with
// model.safetensors.index.json. Files are memory-mapped and their headers validated at open
// (every refusal is one fail_input line naming the file and the tensor); tensor bytes are only
// touched when read_f32 asks for them. BF16, F16 and F32 tensors are supported and read as fp32.
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace moeflow {

struct TensorInfo {
  std::string name, dtype, file;  // dtype: "BF16", "F16" or "F32"; file: the shard's path
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // byte range relative to the file's data section
  uint64_t numel() const;       // product of shape (1 for a scalar)
};

// Exact conversions used by read_f32 (exposed for tests).
float fp16_to_f32(uint16_t h);
float bf16_to_f32(uint16_t b);

class SafetensorsCheckpoint {
 public:
  // A .safetensors file, a folder with model.safetensors, or a folder with
  // model.safetensors.index.json ({"weight_map": {tensor: shard file}}).
  static SafetensorsCheckpoint open(const std::string& path);

  const TensorInfo* find(const std::string& name) const;  // null when absent
  std::vector<std::string> names() const;                  // sorted
  std::string metadata(const std::string& key) const;      // "" when absent (first file's __metadata__)
  const std::string& path() const { return path_; }

  // Converts tensor `name` to fp32 into dst; its shape must equal `shape` exactly, else
  // fail_input naming file, tensor and both shapes. A missing tensor names it and the path.
  void read_f32(const std::string& name, const std::vector<int64_t>& shape, float* dst) const;
  // `count` elements starting at flat element `first` (row blocks); must lie inside the tensor.
  void read_f32_slice(const std::string& name, uint64_t first, uint64_t count, float* dst) const;

  SafetensorsCheckpoint(SafetensorsCheckpoint&&) noexcept;
  SafetensorsCheckpoint& operator=(SafetensorsCheckpoint&&) noexcept;
  SafetensorsCheckpoint(const SafetensorsCheckpoint&) = delete;
  SafetensorsCheckpoint& operator=(const SafetensorsCheckpoint&) = delete;
  ~SafetensorsCheckpoint();

  struct MappedFile;  // one mmapped file (defined in safetensors.cpp)

 private:
  SafetensorsCheckpoint() = default;
  const TensorInfo& require(const std::string& name) const;
  const unsigned char* data_of(const TensorInfo& t) const;

  std::string path_;
  std::vector<std::unique_ptr<MappedFile>> files_;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, size_t> file_of_;  // tensor name -> index in files_
  std::map<std::string, std::string> metadata_;
};

}  // namespace moeflow
