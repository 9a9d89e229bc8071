#include "wick/safetensors.h"

#include "fs.h"
#include "module_state.h"
#include "safetensors_internal.h"

#include <c10/util/Exception.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "wick's safetensors reader and writer assume a little-endian host, as the format is"
#endif

namespace wick {

namespace {

using json = nlohmann::json;
using ordered_json = nlohmann::ordered_json;

constexpr const char* kWho = "safetensors";
constexpr const char* kMetadataKey = "__metadata__";
// The reference implementation's limit (safetensors' MAX_HEADER_SIZE).
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

// ---------------------------------------------------------------- dtypes

struct Dtype {
  const char* name;
  c10::ScalarType type;
};

// Every safetensors dtype with a LibTorch counterpart. F4 packs two values a
// byte, as torch's float4_e2m1fn_x2 does along the last dimension.
constexpr Dtype kDtypes[] = {
    {"F64", c10::kDouble},
    {"F32", c10::kFloat},
    {"F16", c10::kHalf},
    {"BF16", c10::kBFloat16},
    {"I64", c10::kLong},
    {"I32", c10::kInt},
    {"I16", c10::kShort},
    {"I8", c10::kChar},
    {"U64", c10::kUInt64},
    {"U32", c10::kUInt32},
    {"U16", c10::kUInt16},
    {"U8", c10::kByte},
    {"BOOL", c10::kBool},
    {"C64", c10::kComplexFloat},
    {"F8_E4M3", c10::kFloat8_e4m3fn},
    {"F8_E4M3FNUZ", c10::kFloat8_e4m3fnuz},
    {"F8_E5M2", c10::kFloat8_e5m2},
    {"F8_E5M2FNUZ", c10::kFloat8_e5m2fnuz},
    {"F8_E8M0", c10::kFloat8_e8m0fnu},
    {"F4", c10::kFloat4_e2m1fn_x2},
};

const Dtype* dtype_named(const std::string& name) {
  for (const auto& d : kDtypes)
    if (name == d.name) return &d;
  return nullptr;
}

const Dtype* dtype_of(c10::ScalarType type) {
  for (const auto& d : kDtypes)
    if (type == d.type) return &d;
  return nullptr;
}

std::string known_dtypes() {
  std::string s;
  for (const auto& d : kDtypes) s += (s.empty() ? "" : " ") + std::string(d.name);
  return s;
}

bool is_f4(c10::ScalarType type) { return type == c10::kFloat4_e2m1fn_x2; }

// ---------------------------------------------------------------- header

struct Entry {
  std::string name;
  c10::ScalarType type;
  std::vector<int64_t> shape;  // torch's (for F4: the last dimension halved)
  uint64_t begin = 0, end = 0;
};

struct Header {
  std::vector<Entry> entries;  // by data offset
  std::map<std::string, std::string> metadata;
  uint64_t data_start = 0;  // 8 + the header's length
};

class BadFile {
 public:
  explicit BadFile(std::string what) : what_(std::move(what)) {}
  template <typename... Args>
  [[noreturn]] void operator()(const Args&... args) const {
    C10_THROW_ERROR(Error, c10::str(kWho, " '", what_, "': ", args...));
  }

 private:
  std::string what_;
};

uint64_t read_le64(const unsigned char* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// The header's length from the first 8 bytes, checked against the file's size.
uint64_t header_length(const unsigned char* first8, uint64_t file_size, const BadFile& bad) {
  if (file_size < 8)
    bad("the file has ", file_size, " bytes, fewer than the 8 of the header length");
  const uint64_t n = read_le64(first8);
  if (n > kMaxHeaderBytes)
    bad("the header length is ", n, " bytes, above the format's limit of ", kMaxHeaderBytes);
  if (n > file_size - 8)
    bad("the header length is ", n, " bytes but only ", file_size - 8, " follow it");
  return n;
}

std::string dims_str(const std::vector<uint64_t>& dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

// nlohmann's parser keeps the last of two equal keys; the format does not
// allow them (a name with two data ranges), so they are found here.
json parse_json_rejecting_duplicates(const char* text, size_t size, const BadFile& bad) {
  std::vector<std::set<std::string>> keys;  // one set per open object
  std::string duplicate;
  const auto callback = [&](int /*depth*/, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::object_start) {
      keys.emplace_back();
    } else if (event == json::parse_event_t::object_end) {
      if (!keys.empty()) keys.pop_back();
    } else if (event == json::parse_event_t::key && !keys.empty()) {
      const auto& key = parsed.get_ref<const std::string&>();
      if (!keys.back().insert(key).second && duplicate.empty()) duplicate = key;
    }
    return true;
  };
  json header;
  try {
    header = json::parse(text, text + size, callback);
  } catch (const json::exception& e) {
    bad("the header is not valid JSON: ", e.what());
  }
  if (!duplicate.empty()) bad("the header names '", duplicate, "' twice");
  return header;
}

uint64_t unsigned_of(const json& v, const std::string& name, const char* field,
                     const BadFile& bad) {
  if (!v.is_number_unsigned())
    bad("tensor '", name, "': ", field, " holds ", v.dump(), ", not a non-negative integer");
  return v.get<uint64_t>();
}

Entry parse_entry(const std::string& name, const json& info, const BadFile& bad) {
  if (!info.is_object())
    bad("tensor '", name, "' is described by ", info.type_name(), ", not an object");
  // Other fields are ignored, as the reference implementation ignores them.
  for (const char* field : {"dtype", "shape", "data_offsets"})
    if (!info.contains(field)) bad("tensor '", name, "' has no \"", field, "\"");

  Entry e;
  e.name = name;
  const json& dtype = info.at("dtype");
  if (!dtype.is_string()) bad("tensor '", name, "': dtype is ", dtype.dump(), ", not a string");
  const auto& dtype_name = dtype.get_ref<const std::string&>();
  const Dtype* d = dtype_named(dtype_name);
  if (d == nullptr) {
    bad("tensor '", name, "' has dtype ", dtype_name, ", which LibTorch has no type for ",
        "(wick reads ", known_dtypes(), ")");
  }
  e.type = d->type;

  const json& shape = info.at("shape");
  if (!shape.is_array()) bad("tensor '", name, "': shape is ", shape.dump(), ", not an array");
  std::vector<uint64_t> dims;
  for (const auto& v : shape) dims.push_back(unsigned_of(v, name, "shape", bad));

  const json& offsets = info.at("data_offsets");
  if (!offsets.is_array() || offsets.size() != 2)
    bad("tensor '", name, "': data_offsets is ", offsets.dump(), ", not [begin, end]");
  e.begin = unsigned_of(offsets[0], name, "data_offsets", bad);
  e.end = unsigned_of(offsets[1], name, "data_offsets", bad);
  if (e.end < e.begin)
    bad("tensor '", name, "': data_offsets [", e.begin, ", ", e.end, "] end before they begin");

  // Values, then bytes, with overflow checked at each step; and the
  // contiguous strides LibTorch will compute (zero-sized dimensions count as
  // 1 there) must fit in int64 too.
  uint64_t values = 1, stride = 1;
  for (uint64_t dim : dims) {
    if (dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
        __builtin_mul_overflow(values, dim, &values) ||
        __builtin_mul_overflow(stride, std::max<uint64_t>(dim, 1), &stride) ||
        stride > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      bad("tensor '", name, "' has shape ", dims_str(dims), ", whose size overflows 64 bits");
    }
  }
  if (is_f4(e.type)) {
    // Two 4-bit values a byte, paired along the last dimension as torch's
    // float4_e2m1fn_x2 holds them.
    if (dims.empty() || dims.back() % 2 != 0) {
      bad("tensor '", name, "' is F4 with shape ", dims_str(dims),
          ": its last dimension must be even to pack two values a byte");
    }
    dims.back() /= 2;
    values /= 2;
  }
  uint64_t bytes = 0;
  if (__builtin_mul_overflow(values, static_cast<uint64_t>(c10::elementSize(e.type)), &bytes))
    bad("tensor '", name, "' has shape ", dims_str(dims), ", whose size overflows 64 bits");
  if (bytes != e.end - e.begin) {
    bad("tensor '", name, "' is ", dtype_name, " with shape ", shape.dump(), ", which needs ",
        bytes, " bytes, but data_offsets [", e.begin, ", ", e.end, "] hold ", e.end - e.begin);
  }
  e.shape.assign(dims.begin(), dims.end());
  return e;
}

// Parses and checks the header `text` of a file of `file_size` bytes.
Header parse_header(const char* text, uint64_t n, uint64_t file_size, const BadFile& bad) {
  const json root = parse_json_rejecting_duplicates(text, n, bad);
  if (!root.is_object()) bad("the header is ", root.type_name(), ", not a JSON object");

  Header h;
  h.data_start = 8 + n;
  for (const auto& item : root.items()) {
    const std::string& name = item.key();
    if (name == kMetadataKey) {
      if (!item.value().is_object()) bad("\"", kMetadataKey, "\" is not an object of strings");
      for (const auto& m : item.value().items()) {
        if (!m.value().is_string())
          bad("\"", kMetadataKey, "\" has '", m.key(), "' = ", m.value().dump(), ", not a string");
        h.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    h.entries.push_back(parse_entry(name, item.value(), bad));
  }

  // The data must be laid end to end from offset 0 and fill the file exactly.
  std::sort(h.entries.begin(), h.entries.end(), [](const Entry& a, const Entry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t at = 0;
  const Entry* before = nullptr;
  for (const auto& e : h.entries) {
    if (e.begin != at) {
      const std::string prev =
          before ? c10::str("the tensor before it, '", before->name, "', ends at ", at)
                 : std::string("the data starts at 0");
      bad("tensor '", e.name, "' begins at data offset ", e.begin, " but ", prev, " (",
          e.begin < at ? "overlapping" : "a gap", ")");
    }
    at = e.end;
    before = &e;
  }
  const uint64_t data_bytes = file_size - h.data_start;
  if (at != data_bytes) {
    bad("the tensors' data ends at offset ", at, " but the file holds ", data_bytes,
        " bytes of data after the header (", at < data_bytes ? "trailing bytes" : "truncated", ")");
  }
  return h;
}

// ---------------------------------------------------------------- reading

// A read-only file mapped copy-on-write; unmapped when the last tensor viewing it goes.
class Mapping {
 public:
  Mapping(void* base, size_t size) : base_(base), size_(size) {}
  ~Mapping() { ::munmap(base_, size_); }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  const unsigned char* data() const { return static_cast<const unsigned char*>(base_); }

 private:
  void* base_;
  size_t size_;
};

torch::Tensor empty_for(const Entry& e) {
  return torch::empty(e.shape, torch::TensorOptions().dtype(e.type));
}

// A tensor with the bytes at `p`: a view when `keep_alive` is given and `p`
// is aligned for the dtype, a copy otherwise.
torch::Tensor tensor_at(const Entry& e, const unsigned char* p,
                        const std::shared_ptr<Mapping>& keep_alive) {
  const size_t bytes = e.end - e.begin;
  if (bytes == 0) return empty_for(e);
  const size_t align = c10::elementSize(e.type);
  if (keep_alive && reinterpret_cast<uintptr_t>(p) % align == 0) {
    return torch::from_blob(
        const_cast<unsigned char*>(p), e.shape, [keep_alive](void*) {},  // NOLINT
        torch::TensorOptions().dtype(e.type));
  }
  torch::Tensor t = empty_for(e);
  std::memcpy(t.data_ptr(), p, bytes);
  return t;
}

SafetensorsFile from_header(Header& h, const std::function<torch::Tensor(const Entry&)>& make) {
  SafetensorsFile f;
  f.metadata = std::move(h.metadata);
  f.tensors.reserve(h.entries.size());
  for (const auto& e : h.entries) f.tensors.emplace_back(e.name, make(e));
  return f;
}

void pread_all(int fd, void* out, size_t size, uint64_t offset, const std::string& path) {
  auto* p = static_cast<char*>(out);
  size_t done = 0;
  while (done < size) {
    const ssize_t r = ::pread(fd, p + done, std::min<size_t>(size - done, size_t{1} << 30),
                              static_cast<off_t>(offset + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      detail::fail_errno(kWho, "cannot read", path, errno);
    }
    if (r == 0) BadFile{path}("the file ended while reading (truncated meanwhile)");
    done += static_cast<size_t>(r);
  }
}

// ---------------------------------------------------------------- writing

struct ToWrite {
  std::string name;
  torch::Tensor tensor;  // as given: moved to the CPU only while its bytes are written
  const Dtype* dtype;
  uint64_t bytes;
};

std::vector<ToWrite> plan(const NamedTensors& tensors, const char* who) {
  std::vector<ToWrite> out;
  std::set<std::string> names;
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK(name != kMetadataKey, who, ": a tensor cannot be named '", kMetadataKey,
                "' (the format keeps that key for the metadata)");
    TORCH_CHECK(names.insert(name).second, who, ": two tensors are named '", name, "'");
    TORCH_CHECK(t.defined(), who, ": tensor '", name, "' is undefined");
    TORCH_CHECK(t.layout() == torch::kStrided, who, ": tensor '", name, "' has layout ", t.layout(),
                "; the format holds dense tensors only (call to_dense())");
    const Dtype* d = dtype_of(t.scalar_type());
    TORCH_CHECK(d != nullptr, who, ": tensor '", name, "' has dtype ", t.scalar_type(),
                ", which the format has no type for (it has ", known_dtypes(), ")");
    out.push_back({name, t, d, static_cast<uint64_t>(t.numel()) * t.element_size()});
  }
  // Largest element first (stable): with the header padded to 8 bytes every
  // tensor then starts aligned to its element size, as the Python package lays it out.
  std::stable_sort(out.begin(), out.end(), [](const ToWrite& a, const ToWrite& b) {
    return a.tensor.element_size() > b.tensor.element_size();
  });
  return out;
}

std::string header_bytes(const std::vector<ToWrite>& plan,
                         const std::map<std::string, std::string>& metadata) {
  ordered_json h = ordered_json::object();
  if (!metadata.empty()) {
    ordered_json m = ordered_json::object();
    for (const auto& [k, v] : metadata) m[k] = v;
    h[kMetadataKey] = m;
  }
  uint64_t at = 0;
  for (const auto& w : plan) {
    std::vector<int64_t> shape(w.tensor.sizes().begin(), w.tensor.sizes().end());
    if (is_f4(w.tensor.scalar_type())) {
      TORCH_CHECK(!shape.empty(), kWho, ": F4 tensor '", w.name, "' must have a dimension");
      shape.back() *= 2;  // the file counts 4-bit values
    }
    h[w.name] = {{"dtype", w.dtype->name}, {"shape", shape}, {"data_offsets", {at, at + w.bytes}}};
    at += w.bytes;
  }
  std::string text = h.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::string out(8, '\0');
  uint64_t n = text.size();
  for (int i = 0; i < 8; ++i, n >>= 8) out[i] = static_cast<char>(n & 0xff);
  return out + text;
}

using Sink = std::function<void(const void*, size_t)>;

void write_all_tensors(const std::vector<ToWrite>& plan,
                       const std::map<std::string, std::string>& metadata, const Sink& sink) {
  const std::string header = header_bytes(plan, metadata);
  sink(header.data(), header.size());
  for (const auto& w : plan) {
    if (w.bytes == 0) continue;
    // One tensor at a time on the CPU, so a GPU model is not copied whole.
    const torch::Tensor cpu = w.tensor.detach().to(torch::kCPU).contiguous();
    sink(cpu.data_ptr(), w.bytes);
  }
}

NamedTensors module_tensors(const torch::nn::Module& module) {
  NamedTensors out;
  for (const auto& p : module.named_parameters(/*recurse=*/true))
    if (p.value().defined()) out.emplace_back(p.key(), p.value());
  for (const auto& b : module.named_buffers(/*recurse=*/true))
    if (b.value().defined()) out.emplace_back(b.key(), b.value());
  return out;
}

}  // namespace

// ---------------------------------------------------------------- public

torch::Tensor SafetensorsFile::get(const std::string& name) const {
  for (const auto& [n, t] : tensors)
    if (n == name) return t;
  std::string have;
  for (const auto& nt : tensors) have += (have.empty() ? "'" : ", '") + nt.first + "'";
  TORCH_CHECK(false, "SafetensorsFile: no tensor named '", name, "' (the file has ",
              have.empty() ? std::string("none") : have, ")");
}

std::map<std::string, torch::Tensor> SafetensorsFile::to_map() const {
  return {tensors.begin(), tensors.end()};
}

void detail::write_safetensors(const NamedTensors& tensors,
                               const std::map<std::string, std::string>& metadata, const char* who,
                               const std::function<void(const void*, size_t)>& sink) {
  write_all_tensors(plan(tensors, who), metadata, sink);
}

std::string save_safetensors_to_bytes(const NamedTensors& tensors,
                                      const std::map<std::string, std::string>& metadata) {
  std::string out;
  detail::write_safetensors(
      tensors, metadata, "save_safetensors_to_bytes",
      [&](const void* p, size_t n) { out.append(static_cast<const char*>(p), n); });
  return out;
}

void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata) {
  const auto to_write = plan(tensors, "save_safetensors");  // checked before the file exists
  detail::AtomicFile file(path, kWho);
  write_all_tensors(to_write, metadata, [&](const void* p, size_t n) { file.write(p, n); });
  file.commit();
}

void save_safetensors(const std::string& path, const torch::nn::Module& module,
                      const std::map<std::string, std::string>& metadata) {
  save_safetensors(path, module_tensors(module), metadata);
}

SafetensorsFile load_safetensors_from_bytes(const void* data, size_t size,
                                            const std::string& what) {
  const BadFile bad(what);
  const auto* bytes = static_cast<const unsigned char*>(data);
  const uint64_t n = header_length(bytes, size, bad);
  Header h = parse_header(reinterpret_cast<const char*>(bytes) + 8, n, size, bad);
  return from_header(h, [&](const Entry& e) {
    return tensor_at(e, bytes + h.data_start + e.begin, /*keep_alive=*/nullptr);
  });
}

SafetensorsFile load_safetensors(const std::string& path, const SafetensorsLoadOptions& options) {
  const BadFile bad(path);
  detail::Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) detail::fail_errno(kWho, "cannot open", path, errno);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) detail::fail_errno(kWho, "cannot stat", path, errno);
  if (!S_ISREG(st.st_mode)) bad("not a regular file");
  const auto size = static_cast<uint64_t>(st.st_size);

  SafetensorsFile f;
  if (options.mmap() && size > 0) {
    void* base = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd.get(), 0);
    if (base == MAP_FAILED) detail::fail_errno(kWho, "cannot map", path, errno);
    auto mapping = std::make_shared<Mapping>(base, size);
    const unsigned char* bytes = mapping->data();
    const uint64_t n = header_length(bytes, size, bad);
    Header h = parse_header(reinterpret_cast<const char*>(bytes) + 8, n, size, bad);
    f = from_header(
        h, [&](const Entry& e) { return tensor_at(e, bytes + h.data_start + e.begin, mapping); });
  } else {
    unsigned char first8[8] = {};
    if (size >= 8) pread_all(fd.get(), first8, 8, 0, path);
    const uint64_t n = header_length(first8, size, bad);
    std::string text(n, '\0');
    pread_all(fd.get(), text.data(), n, 8, path);
    Header h = parse_header(text.data(), n, size, bad);
    f = from_header(h, [&](const Entry& e) {
      torch::Tensor t = empty_for(e);
      if (e.end > e.begin)
        pread_all(fd.get(), t.data_ptr(), e.end - e.begin, h.data_start + e.begin, path);
      return t;
    });
  }
  if (options.device() != torch::Device(torch::kCPU))
    for (auto& nt : f.tensors) nt.second = nt.second.to(options.device());
  return f;
}

std::map<std::string, std::string> load_safetensors(const std::string& path,
                                                    torch::nn::Module& module) {
  SafetensorsFile f = load_safetensors(path);
  detail::restore_module_state(module, f.to_map(), c10::str(kWho, " '", path, "'"), "the file");
  return std::move(f.metadata);
}

}  // namespace wick
