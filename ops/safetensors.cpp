#include "ops/safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "graph/error.hpp"

namespace moeflow {

static_assert(std::endian::native == std::endian::little, "safetensors data is little-endian");

namespace {

using nlohmann::json;
namespace fs = std::filesystem;

constexpr uint64_t kMaxHeader = 100ull * 1000 * 1000;

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

uint64_t dtype_size(const std::string& d) {
  if (d == "F32") return 4;
  if (d == "BF16" || d == "F16") return 2;
  return 0;
}

// The start of every message about `file` (and `tensor`, when there is one).
std::string where(const std::string& file, const std::string& tensor = "") {
  std::string s = "safetensors file '" + file + "'";
  if (!tensor.empty()) s += ", tensor '" + tensor + "'";
  return s + ": ";
}

// A JSON value quoted for a message, kept to one short line.
std::string brief(const json& j) {
  std::string s = j.dump(-1, ' ', false, json::error_handler_t::replace);
  if (s.size() > 80) s = s.substr(0, 77) + "...";
  return s;
}

}  // namespace

uint64_t TensorInfo::numel() const {
  uint64_t n = 1;
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return n;
}

float bf16_to_f32(uint16_t b) { return std::bit_cast<float>(static_cast<uint32_t>(b) << 16); }

float fp16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;  // +-0
    } else {  // subnormal: normalise into an fp32 normal
      uint32_t e = 127 - 15 + 1;
      while (!(mant & 0x400u)) {
        mant <<= 1;
        --e;
      }
      bits = sign | (e << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf, nan (payload kept)
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  return std::bit_cast<float>(bits);
}

struct SafetensorsCheckpoint::MappedFile {
  std::string path;
  const unsigned char* base = nullptr;
  uint64_t size = 0;
  uint64_t data_start = 0;  // 8 + header length
  std::map<std::string, TensorInfo> tensors;
  std::map<std::string, std::string> metadata;

  MappedFile() = default;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile() {
    if (base) munmap(const_cast<unsigned char*>(base), size);
  }
};

namespace {

using MappedFile = SafetensorsCheckpoint::MappedFile;

void map_file(MappedFile& f) {
  const int fd = ::open(f.path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail_input(where(f.path) + "cannot open: " + std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    fail_input(where(f.path) + "cannot stat: " + std::strerror(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail_input(where(f.path) + "not a regular file");
  }
  f.size = static_cast<uint64_t>(st.st_size);
  if (f.size < 8) {
    ::close(fd);
    fail_input(where(f.path) + "file is " + std::to_string(f.size) +
               " bytes, shorter than the 8-byte header length");
  }
  void* p = mmap(nullptr, f.size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int err = errno;
  ::close(fd);  // the mapping stays valid
  if (p == MAP_FAILED) fail_input(where(f.path) + "cannot mmap: " + std::strerror(err));
  f.base = static_cast<const unsigned char*>(p);
}

// Parses and validates the header of a mapped file into f.tensors and f.metadata.
void parse_header(MappedFile& f) {
  uint64_t n = 0;
  std::memcpy(&n, f.base, 8);
  if (n > kMaxHeader)
    fail_input(where(f.path) + "header length " + std::to_string(n) + " exceeds the 100 MB limit");
  if (n > f.size - 8)
    fail_input(where(f.path) + "header length " + std::to_string(n) + " is beyond the end of the file (" +
               std::to_string(f.size) + " bytes)");
  f.data_start = 8 + n;
  const uint64_t data_size = f.size - f.data_start;
  const char* h = reinterpret_cast<const char*>(f.base + 8);

  json j;
  try {
    j = json::parse(h, h + n);
  } catch (const json::exception& e) {
    std::string what = e.what();
    std::replace(what.begin(), what.end(), '\n', ' ');
    fail_input(where(f.path) + "header is not valid JSON: " + what);
  }
  if (!j.is_object()) fail_input(where(f.path) + "header is not a JSON object");

  struct Range {
    uint64_t begin, end;
    const std::string* name;
  };
  std::vector<Range> ranges;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    const json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) fail_input(where(f.path) + "__metadata__ is not an object");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string())
          fail_input(where(f.path) + "__metadata__ value for '" + m.key() + "' is not a string");
        f.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string at = where(f.path, name);
    if (!v.is_object()) fail_input(at + "entry is not an object: " + brief(v));
    for (const char* key : {"dtype", "shape", "data_offsets"})
      if (!v.contains(key)) fail_input(at + "entry has no '" + key + "'");
    const json& jd = v["dtype"];
    const json& js = v["shape"];
    const json& jo = v["data_offsets"];
    if (!jd.is_string()) fail_input(at + "dtype is not a string: " + brief(jd));
    if (!js.is_array()) fail_input(at + "shape is not an array: " + brief(js));
    if (!jo.is_array() || jo.size() != 2 || !jo[0].is_number_integer() || !jo[1].is_number_integer())
      fail_input(at + "data_offsets is not an array of two integers: " + brief(jo));

    TensorInfo t;
    t.name = name;
    t.file = f.path;
    t.dtype = jd.get<std::string>();
    const uint64_t esize = dtype_size(t.dtype);
    if (esize == 0) fail_input(at + "unsupported dtype '" + t.dtype + "' (supported: BF16, F16, F32)");

    uint64_t numel = 1;
    bool overflow = false, zero = false;
    for (const json& d : js) {
      if (!d.is_number_integer()) fail_input(at + "shape has a non-integer dimension: " + brief(js));
      if (!d.is_number_unsigned() && d.get<int64_t>() < 0)
        fail_input(at + "shape " + brief(js) + " has a negative dimension");
      const uint64_t u = d.get<uint64_t>();
      if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        fail_input(at + "shape " + brief(js) + " has a dimension that is too large");
      t.shape.push_back(static_cast<int64_t>(u));
      if (u == 0) zero = true;
      else if (numel > std::numeric_limits<uint64_t>::max() / u) overflow = true;
      numel *= u;
    }
    if (zero) numel = 0, overflow = false;
    if (overflow || numel > std::numeric_limits<uint64_t>::max() / esize)
      fail_input(at + "shape " + shape_str(t.shape) + " is too large");

    if (!jo[0].is_number_unsigned() || !jo[1].is_number_unsigned())
      fail_input(at + "data_offsets " + brief(jo) + " are negative");
    t.begin = jo[0].get<uint64_t>();
    t.end = jo[1].get<uint64_t>();
    if (t.begin > t.end) fail_input(at + "data_offsets " + brief(jo) + " have begin > end");
    if (t.end > data_size)
      fail_input(at + "data_offsets end " + std::to_string(t.end) + " is beyond the data section (" +
                 std::to_string(data_size) + " bytes): file truncated?");
    if (t.end - t.begin != numel * esize)
      fail_input(at + "data_offsets span " + std::to_string(t.end - t.begin) + " bytes, but shape " +
                 shape_str(t.shape) + " of " + t.dtype + " needs " + std::to_string(numel * esize));
    auto [pos, inserted] = f.tensors.emplace(name, std::move(t));
    if (!inserted) fail_input(at + "appears twice in the header");  // unreachable with nlohmann
    if (pos->second.end > pos->second.begin) ranges.push_back({pos->second.begin, pos->second.end, &pos->first});
  }

  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) { return a.begin < b.begin; });
  for (size_t i = 1; i < ranges.size(); ++i)
    if (ranges[i].begin < ranges[i - 1].end)
      fail_input(where(f.path, *ranges[i].name) + "bytes [" + std::to_string(ranges[i].begin) + ", " +
                 std::to_string(ranges[i].end) + ") overlap tensor '" + *ranges[i - 1].name + "' at [" +
                 std::to_string(ranges[i - 1].begin) + ", " + std::to_string(ranges[i - 1].end) + ")");
}

std::unique_ptr<MappedFile> open_file(const std::string& path) {
  auto f = std::make_unique<MappedFile>();
  f->path = path;
  map_file(*f);
  parse_header(*f);
  return f;
}

}  // namespace

SafetensorsCheckpoint::SafetensorsCheckpoint(SafetensorsCheckpoint&&) noexcept = default;
SafetensorsCheckpoint& SafetensorsCheckpoint::operator=(SafetensorsCheckpoint&&) noexcept = default;
SafetensorsCheckpoint::~SafetensorsCheckpoint() = default;

SafetensorsCheckpoint SafetensorsCheckpoint::open(const std::string& path) {
  SafetensorsCheckpoint ck;
  ck.path_ = path;
  std::error_code ec;
  if (!fs::is_directory(path, ec)) {
    ck.files_.push_back(open_file(path));
    for (const auto& [name, t] : ck.files_[0]->tensors) {
      ck.tensors_[name] = t;
      ck.file_of_[name] = 0;
    }
    ck.metadata_ = ck.files_[0]->metadata;
    return ck;
  }

  const fs::path dir(path);
  const fs::path index = dir / "model.safetensors.index.json";
  if (!fs::exists(index, ec)) {
    const fs::path single = dir / "model.safetensors";
    if (!fs::exists(single, ec))
      fail_input("safetensors folder '" + path +
                 "': has neither model.safetensors.index.json nor model.safetensors");
    SafetensorsCheckpoint one = open(single.string());
    one.path_ = path;
    return one;
  }

  const std::string ipath = index.string();
  json j;
  {
    const int fd = ::open(ipath.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail_input("safetensors index '" + ipath + "': cannot open: " + std::strerror(errno));
    std::string text;
    char buf[65536];
    for (;;) {
      const ssize_t r = ::read(fd, buf, sizeof buf);
      if (r < 0) {
        const int err = errno;
        ::close(fd);
        fail_input("safetensors index '" + ipath + "': cannot read: " + std::strerror(err));
      }
      if (r == 0) break;
      text.append(buf, static_cast<size_t>(r));
      if (text.size() > kMaxHeader) {
        ::close(fd);
        fail_input("safetensors index '" + ipath + "': larger than 100 MB");
      }
    }
    ::close(fd);
    try {
      j = json::parse(text);
    } catch (const json::exception& e) {
      std::string what = e.what();
      std::replace(what.begin(), what.end(), '\n', ' ');
      fail_input("safetensors index '" + ipath + "': not valid JSON: " + what);
    }
  }
  if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
    fail_input("safetensors index '" + ipath + "': has no \"weight_map\" object");
  const json& wm = j["weight_map"];

  // Every referenced shard, opened once, in name order (the first one gives the metadata).
  std::map<std::string, size_t> shard_index;
  for (auto it = wm.begin(); it != wm.end(); ++it) {
    if (!it.value().is_string())
      fail_input("safetensors index '" + ipath + "': tensor '" + it.key() + "' maps to a non-string " +
                 brief(it.value()));
    shard_index.emplace(it.value().get<std::string>(), 0);
  }
  for (auto& [shard, idx] : shard_index) {
    idx = ck.files_.size();
    ck.files_.push_back(open_file((dir / shard).string()));
  }
  if (!ck.files_.empty()) ck.metadata_ = ck.files_[0]->metadata;

  for (auto it = wm.begin(); it != wm.end(); ++it) {
    const size_t idx = shard_index.at(it.value().get<std::string>());
    const MappedFile& f = *ck.files_[idx];
    auto t = f.tensors.find(it.key());
    if (t == f.tensors.end())
      fail_input("safetensors index '" + ipath + "': tensor '" + it.key() + "' is listed in shard '" + f.path +
                 "', which does not contain it");
    ck.tensors_[it.key()] = t->second;
    ck.file_of_[it.key()] = idx;
  }
  return ck;
}

const TensorInfo* SafetensorsCheckpoint::find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

std::vector<std::string> SafetensorsCheckpoint::names() const {
  std::vector<std::string> out;
  out.reserve(tensors_.size());
  for (const auto& [name, t] : tensors_) out.push_back(name);
  return out;
}

std::string SafetensorsCheckpoint::metadata(const std::string& key) const {
  auto it = metadata_.find(key);
  return it == metadata_.end() ? std::string() : it->second;
}

const TensorInfo& SafetensorsCheckpoint::require(const std::string& name) const {
  const TensorInfo* t = find(name);
  if (!t) fail_input("safetensors checkpoint '" + path_ + "': tensor '" + name + "' is missing");
  return *t;
}

const unsigned char* SafetensorsCheckpoint::data_of(const TensorInfo& t) const {
  const MappedFile& f = *files_[file_of_.at(t.name)];
  return f.base + f.data_start + t.begin;
}

void SafetensorsCheckpoint::read_f32(const std::string& name, const std::vector<int64_t>& shape,
                                     float* dst) const {
  const TensorInfo& t = require(name);
  if (shape != t.shape)
    fail_input(where(t.file, name) + "shape " + shape_str(t.shape) + " in the file, expected " + shape_str(shape));
  read_f32_slice(name, 0, t.numel(), dst);
}

void SafetensorsCheckpoint::read_f32_slice(const std::string& name, uint64_t first, uint64_t count,
                                           float* dst) const {
  const TensorInfo& t = require(name);
  const uint64_t numel = t.numel();
  if (first > numel || count > numel - first)
    fail_input(where(t.file, name) + "slice of " + std::to_string(count) + " elements at " + std::to_string(first) +
               " is outside its " + std::to_string(numel) + " elements " + shape_str(t.shape));
  if (count == 0) return;
  const unsigned char* src = data_of(t);
  if (t.dtype == "F32") {
    std::memcpy(dst, src + first * 4, count * 4);
    return;
  }
  const unsigned char* p = src + first * 2;
  const bool bf16 = t.dtype == "BF16";
  for (uint64_t i = 0; i < count; ++i) {
    uint16_t v;
    std::memcpy(&v, p + 2 * i, 2);
    dst[i] = bf16 ? bf16_to_f32(v) : fp16_to_f32(v);
  }
}

}  // namespace moeflow
