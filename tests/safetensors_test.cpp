// wick's safetensors reader and writer, held against Python's `safetensors`
// package (tests/py/interop.py) both ways, and against the format's rules.

#include "python_reference.h"
#include "support.h"

#include <wick/safetensors.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace {

using wick::testing::TempDir;
using Json = nlohmann::json;

// Every dtype wick reads and writes, by LibTorch's name (as Python's str(dtype) ends).
const std::vector<std::pair<std::string, c10::ScalarType>> kDtypes = {
    {"float64", c10::kDouble},
    {"float32", c10::kFloat},
    {"float16", c10::kHalf},
    {"bfloat16", c10::kBFloat16},
    {"int64", c10::kLong},
    {"int32", c10::kInt},
    {"int16", c10::kShort},
    {"int8", c10::kChar},
    {"uint64", c10::kUInt64},
    {"uint32", c10::kUInt32},
    {"uint16", c10::kUInt16},
    {"uint8", c10::kByte},
    {"bool", c10::kBool},
    {"complex64", c10::kComplexFloat},
    {"float8_e4m3fn", c10::kFloat8_e4m3fn},
    {"float8_e4m3fnuz", c10::kFloat8_e4m3fnuz},
    {"float8_e5m2", c10::kFloat8_e5m2},
    {"float8_e5m2fnuz", c10::kFloat8_e5m2fnuz},
    {"float8_e8m0fnu", c10::kFloat8_e8m0fnu},
    {"float4_e2m1fn_x2", c10::kFloat4_e2m1fn_x2},
};

std::string torch_name(c10::ScalarType t) {
  for (const auto& [name, type] : kDtypes)
    if (type == t) return name;
  return "?";
}

std::string hex_of(const torch::Tensor& t) {
  const torch::Tensor c = t.contiguous();
  const auto* p = static_cast<const unsigned char*>(c.data_ptr());
  std::string out;
  char buf[3];
  for (int64_t i = 0; i < c.numel() * c.element_size(); ++i) {
    std::snprintf(buf, sizeof(buf), "%02x", p[i]);
    out += buf;
  }
  return out;
}

// A tensor of `dtype` whose bytes are random (every bit pattern; 0/1 for bool).
torch::Tensor random_bytes_as(c10::ScalarType dtype, std::vector<int64_t> shape) {
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(dtype));
  torch::Tensor raw = torch::randint(0, 256, {bytes}, torch::kByte);
  if (dtype == c10::kBool) raw = raw.remainder(2);
  return raw.view(dtype).reshape(shape);
}

// One tensor of every dtype, with shapes that cover scalars and empty tensors.
wick::NamedTensors every_dtype() {
  const std::vector<std::vector<int64_t>> shapes = {{3, 5}, {7}, {2, 3, 2}, {}, {0, 4}};
  wick::NamedTensors out;
  for (size_t i = 0; i < kDtypes.size(); ++i) {
    auto shape = shapes[i % shapes.size()];
    if (kDtypes[i].second == c10::kFloat4_e2m1fn_x2 && shape.empty()) shape = {3};
    out.emplace_back("w" + std::to_string(i) + "." + kDtypes[i].first,
                     random_bytes_as(kDtypes[i].second, shape));
  }
  return out;
}

// Compares a file's tensors with a manifest (Python's view of the same file).
void expect_matches_manifest(const wick::SafetensorsFile& f, const Json& manifest) {
  ASSERT_EQ(f.tensors.size(), manifest["tensors"].size());
  std::map<std::string, torch::Tensor> by_name = f.to_map();
  for (const auto& m : manifest["tensors"]) {
    const std::string name = m["name"];
    ASSERT_TRUE(by_name.count(name)) << name;
    const torch::Tensor& t = by_name[name];
    EXPECT_EQ(torch_name(t.scalar_type()), m["dtype"].get<std::string>()) << name;
    EXPECT_EQ(t.sizes().vec(), m["shape"].get<std::vector<int64_t>>()) << name;
    EXPECT_EQ(hex_of(t), m["hex"].get<std::string>()) << name << " differs in its bytes";
  }
  EXPECT_EQ(Json(f.metadata), manifest["metadata"]);
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}

// A file from a header text and data bytes, the length written as given.
std::string file_of(const std::string& header, const std::string& data, uint64_t length) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((length >> (8 * i)) & 0xff);
  return out + header + data;
}
std::string file_of(const std::string& header, const std::string& data) {
  return file_of(header, data, header.size());
}

// Whether `p` lies in a mapping of `path` (per /proc/self/maps).
bool address_maps_file(const void* p, const std::string& path) {
  std::ifstream maps("/proc/self/maps");
  const auto addr = reinterpret_cast<uintptr_t>(p);
  std::string line;
  while (std::getline(maps, line)) {
    uintptr_t lo = 0, hi = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx", &lo, &hi) != 2) continue;
    if (addr >= lo && addr < hi)
      return line.size() >= path.size() &&
             line.compare(line.size() - path.size(), path.size(), path) == 0;
  }
  return false;
}

class SafetensorsTest : public wick::testing::SeededTest {};

TEST_F(SafetensorsTest, ReadsWhatPythonWroteBitForBitInEveryDtype) {
  TempDir dir;
  const std::string path = dir.str() + "/python.safetensors";
  const Json manifest = wick::testing::python_reference(
      "interop.py", "safetensors_write",
      {{"path", path}, {"seed", 7}, {"metadata", {{"format", "pt"}, {"note", "from Python"}}}});
  ASSERT_EQ(manifest["tensors"].size(), kDtypes.size());
  for (bool mmap : {true, false}) {
    SCOPED_TRACE(mmap ? "mmap" : "read");
    expect_matches_manifest(wick::load_safetensors(path, wick::SafetensorsLoadOptions().mmap(mmap)),
                            manifest);
  }
  const std::string bytes = read_bytes(path);
  expect_matches_manifest(wick::load_safetensors_from_bytes(bytes.data(), bytes.size()), manifest);
}

TEST_F(SafetensorsTest, WritesWhatPythonReadsBitForBitInEveryDtype) {
  TempDir dir;
  const std::string path = dir.str() + "/wick.safetensors";
  const wick::NamedTensors tensors = every_dtype();
  const std::map<std::string, std::string> metadata = {{"framework", "wick"}, {"step", "12"}};
  wick::save_safetensors(path, tensors, metadata);
  const Json manifest =
      wick::testing::python_reference("interop.py", "safetensors_read", {{"path", path}});
  ASSERT_EQ(manifest["tensors"].size(), tensors.size());
  std::map<std::string, Json> by_name;
  for (const auto& m : manifest["tensors"]) by_name[m["name"]] = m;
  for (const auto& [name, t] : tensors) {
    ASSERT_TRUE(by_name.count(name)) << name;
    EXPECT_EQ(by_name[name]["dtype"].get<std::string>(), torch_name(t.scalar_type())) << name;
    EXPECT_EQ(by_name[name]["shape"].get<std::vector<int64_t>>(), t.sizes().vec()) << name;
    EXPECT_EQ(by_name[name]["hex"].get<std::string>(), hex_of(t)) << name;
  }
  EXPECT_EQ(Json(metadata), manifest["metadata"]);
}

TEST_F(SafetensorsTest, RoundTripsInFileOrderWithEveryTensorAlignedForAZeroCopyLoad) {
  TempDir dir;
  const std::string path = dir.str() + "/a.safetensors";
  const wick::NamedTensors tensors = every_dtype();
  wick::save_safetensors(path, tensors);
  const wick::SafetensorsFile f = wick::load_safetensors(path);
  ASSERT_EQ(f.tensors.size(), tensors.size());
  // Largest element size first, otherwise as given.
  size_t last_size = 16;
  for (const auto& [name, t] : f.tensors) {
    EXPECT_LE(t.element_size(), last_size) << name;
    last_size = t.element_size();
  }
  for (const auto& [name, t] : tensors) {
    const torch::Tensor back = f.get(name);
    EXPECT_EQ(back.scalar_type(), t.scalar_type()) << name;
    EXPECT_EQ(back.sizes(), t.sizes()) << name;
    EXPECT_EQ(hex_of(back), hex_of(t)) << name;
    // Non-empty tensors are views of the mapped file, not copies.
    if (back.numel() > 0) {
      EXPECT_TRUE(address_maps_file(back.data_ptr(), path)) << name << " was copied";
    }
  }
  const std::string bytes = wick::save_safetensors_to_bytes(tensors);
  EXPECT_EQ(bytes, read_bytes(path));
  EXPECT_EQ(bytes.size() % 8, 0u) << "the header is padded to 8 bytes";
}

TEST_F(SafetensorsTest, WritingALoadedTensorNeverChangesTheFile) {
  TempDir dir;
  const std::string path = dir.str() + "/a.safetensors";
  wick::save_safetensors(path, {{"x", torch::arange(6, torch::kFloat)}});
  {
    torch::Tensor x = wick::load_safetensors(path).get("x");
    x.fill_(-1);
    EXPECT_EQ(x.sum().item<float>(), -6);
  }
  EXPECT_TRUE(wick::testing::tensors_equal(wick::load_safetensors(path).get("x"),
                                           torch::arange(6, torch::kFloat)));
}

TEST_F(SafetensorsTest, TensorsOutliveTheirFileObjectAndTheFileName) {
  TempDir dir;
  const std::string path = dir.str() + "/a.safetensors";
  const torch::Tensor w = torch::randn({64, 32});
  wick::save_safetensors(path, {{"w", w}});
  torch::Tensor kept = wick::load_safetensors(path).get("w");
  ASSERT_EQ(std::remove(path.c_str()), 0);
  EXPECT_TRUE(wick::testing::tensors_equal(kept, w));
}

TEST_F(SafetensorsTest, CopiesATensorThatIsNotAlignedInTheFile) {
  // A header of 13 bytes (another writer need not pad) puts F32 data at file
  // offset 21: not a multiple of 4, so the tensor must be a copy, value intact.
  const float values[2] = {1.5f, -2.25f};
  const std::string data(reinterpret_cast<const char*>(values), sizeof(values));
  const std::string header = R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  TempDir dir;
  const std::string path = dir.str() + "/odd.safetensors";
  write_bytes(path, file_of(header, data));
  ASSERT_NE((8 + header.size()) % 4, 0u);
  const torch::Tensor x = wick::load_safetensors(path).get("x");
  EXPECT_EQ(reinterpret_cast<uintptr_t>(x.data_ptr()) % 4, 0u);
  EXPECT_TRUE(wick::testing::tensors_equal(x, torch::tensor({1.5f, -2.25f})));
}

TEST_F(SafetensorsTest, SavesAndRestoresAModuleByItsParameterNames) {
  torch::nn::Sequential a(torch::nn::Linear(4, 3), torch::nn::BatchNorm1d(3),
                          torch::nn::Linear(3, 2));
  a->train();
  a->forward(torch::randn({8, 4}));  // running statistics move away from their initial values
  TempDir dir;
  const std::string path = dir.str() + "/m.safetensors";
  wick::save_safetensors(path, *a, {{"epoch", "3"}});

  const wick::SafetensorsFile f = wick::load_safetensors(path);
  std::vector<std::string> names;
  for (const auto& nt : f.tensors) names.push_back(nt.first);
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"0.bias", "0.weight", "1.bias",
                                             "1.num_batches_tracked", "1.running_mean",
                                             "1.running_var", "1.weight", "2.bias", "2.weight"}));

  torch::nn::Sequential b(torch::nn::Linear(4, 3), torch::nn::BatchNorm1d(3),
                          torch::nn::Linear(3, 2));
  const auto metadata = wick::load_safetensors(path, *b);
  EXPECT_EQ(metadata.at("epoch"), "3");
  const auto pa = a->named_parameters(), pb = b->named_parameters();
  for (const auto& p : pa) EXPECT_TRUE(wick::testing::tensors_equal(p.value(), pb[p.key()]));
  const auto ba = a->named_buffers(), bb = b->named_buffers();
  for (const auto& p : ba) EXPECT_TRUE(wick::testing::tensors_equal(p.value(), bb[p.key()]));
}

TEST_F(SafetensorsTest, RestoringNamesEveryMismatchAndLeavesTheModuleUnchanged) {
  TempDir dir;
  const std::string path = dir.str() + "/m.safetensors";
  // Missing 0.bias; 0.weight the wrong shape; 1.bias not in the module;
  // scale in a dtype that cannot become float.
  wick::save_safetensors(path, {{"0.weight", torch::zeros({2, 4})},
                                {"1.bias", torch::zeros({3})},
                                {"scale", random_bytes_as(c10::kFloat4_e2m1fn_x2, {2})}});
  torch::nn::Sequential m(torch::nn::Linear(4, 3));
  m->register_parameter("scale", torch::ones({2}));
  const auto before = wick::testing::clone_parameters(*m);
  std::string msg;
  try {
    wick::load_safetensors(path, *m);
  } catch (const c10::Error& e) {
    msg = e.what_without_backtrace();
  }
  EXPECT_NE(msg.find("safetensors '" + path + "' does not fit the module"), std::string::npos)
      << msg;
  EXPECT_NE(msg.find("parameter '0.bias' (shape [3]) is missing from the file"), std::string::npos)
      << msg;
  EXPECT_NE(msg.find("parameter '0.weight' has shape [2, 4] in the file but [3, 4] in the module"),
            std::string::npos)
      << msg;
  EXPECT_NE(msg.find("the file has '1.bias' (shape [3]) which the module lacks"), std::string::npos)
      << msg;
  EXPECT_NE(msg.find("parameter 'scale' has dtype Float4_e2m1fn_x2 in the file, which cannot be "
                     "converted to the module's Float"),
            std::string::npos)
      << msg;
  EXPECT_NE(msg.find("the module is unchanged"), std::string::npos) << msg;
  const auto after = wick::testing::clone_parameters(*m);
  ASSERT_EQ(before.size(), after.size());
  for (size_t i = 0; i < before.size(); ++i)
    EXPECT_TRUE(wick::testing::tensors_equal(before[i], after[i]));
}

TEST_F(SafetensorsTest, ConvertsTheFilesDtypeToTheModules) {
  TempDir dir;
  const std::string path = dir.str() + "/half.safetensors";
  torch::nn::Linear a(3, 2);
  wick::NamedTensors halves;
  for (const auto& p : a->named_parameters())
    halves.emplace_back(p.key(), p.value().to(torch::kHalf));
  wick::save_safetensors(path, halves);
  torch::nn::Linear b(3, 2);
  wick::load_safetensors(path, *b);
  EXPECT_EQ(b->weight.scalar_type(), torch::kFloat);
  EXPECT_TRUE(
      wick::testing::tensors_equal(b->weight, a->weight.to(torch::kHalf).to(torch::kFloat)));
}

TEST_F(SafetensorsTest, RefusesTensorsTheFormatCannotHoldAndKeepsThePreviousFile) {
  TempDir dir;
  const std::string path = dir.str() + "/keep.safetensors";
  wick::save_safetensors(path, {{"old", torch::ones({2})}});
  const std::string before = read_bytes(path);
  EXPECT_THROWS_WITH(
      wick::save_safetensors(path, {{"a", torch::ones({2})}, {"a", torch::ones({1})}}),
      "two tensors are named 'a'");
  EXPECT_THROWS_WITH(wick::save_safetensors(path, {{"__metadata__", torch::ones({2})}}),
                     "cannot be named '__metadata__'");
  EXPECT_THROWS_WITH(wick::save_safetensors(path, {{"c", torch::ones({2}, torch::kComplexDouble)}}),
                     "tensor 'c' has dtype ComplexDouble, which the format has no type for");
  EXPECT_THROWS_WITH(wick::save_safetensors(path, {{"s", torch::eye(3).to_sparse()}}),
                     "tensor 's' has layout Sparse");
  EXPECT_THROWS_WITH(wick::save_safetensors(path, {{"u", torch::Tensor()}}),
                     "tensor 'u' is undefined");
  EXPECT_THROWS_WITH(wick::save_safetensors(dir.str() + "/", {{"a", torch::ones({1})}}),
                     "is not a file name");
  EXPECT_THROWS_WITH(
      wick::save_safetensors(dir.str() + "/no/such/dir/x.safetensors", {{"a", torch::ones({1})}}),
      "cannot create");
  EXPECT_EQ(read_bytes(path), before);
  // Nothing but the file itself is left in the directory.
  int entries = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir.path())) entries += e.exists();
  EXPECT_EQ(entries, 1);
}

TEST_F(SafetensorsTest, NonContiguousTensorsAreWrittenAsTheirValues) {
  TempDir dir;
  const std::string path = dir.str() + "/t.safetensors";
  const torch::Tensor base = torch::arange(12, torch::kFloat).reshape({3, 4});
  wick::save_safetensors(path, {{"t", base.t()}, {"s", base.slice(1, 1, 3)}});
  const auto f = wick::load_safetensors(path);
  EXPECT_TRUE(wick::testing::tensors_equal(f.get("t"), base.t().contiguous()));
  EXPECT_TRUE(wick::testing::tensors_equal(f.get("s"), base.slice(1, 1, 3).contiguous()));
  EXPECT_THROWS_WITH(f.get("nope"), "no tensor named 'nope' (the file has 't', 's')");
}

TEST_F(SafetensorsTest, LoadsOntoTheRequestedDevice) {
  if (!wick::testing::cuda_available()) GTEST_SKIP() << "needs a CUDA device";
  TempDir dir;
  const std::string path = dir.str() + "/g.safetensors";
  const torch::Tensor w = torch::randn({5, 3}).to(torch::kCUDA);
  wick::save_safetensors(path, {{"w", w}});
  const auto f = wick::load_safetensors(path, wick::SafetensorsLoadOptions().device(torch::kCUDA));
  EXPECT_TRUE(f.get("w").is_cuda());
  EXPECT_TRUE(wick::testing::tensors_equal(f.get("w"), w));
}

// ---------------------------------------------------------------- malformed files

struct BadCase {
  const char* what;
  std::string bytes;
  const char* message;
  /// Python's safetensors refuses it too (see the one exception below).
  bool python_refuses = true;
};

std::vector<BadCase> bad_cases() {
  const std::string x8(8, '\x01');
  const auto one = [](const std::string& info) { return "{\"x\":" + info + "}"; };
  const std::string f32x2 = R"({"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  return {
      {"short", std::string(5, '\0'), "fewer than the 8 of the header length"},
      {"huge header", file_of("{}", "", 200'000'000), "above the format's limit of 100000000"},
      {"header past the end", file_of("{}", "", 64),
       "the header length is 64 bytes but only 2 follow"},
      {"bad JSON", file_of("{\"x\":", ""), "the header is not valid JSON"},
      {"top-level array", file_of("[1]", ""), "the header is array, not a JSON object"},
      {"duplicate name", file_of(R"({"x":)" + f32x2 + R"(,"x":)" + f32x2 + "}", x8 + x8),
       "the header names 'x' twice"},
      {"duplicate field",
       file_of(one(R"({"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]})"), x8),
       "the header names 'dtype' twice"},
      {"unknown dtype",
       file_of(one(R"({"dtype":"F6_E2M3","shape":[2],"data_offsets":[0,2]})"), "ab"),
       "dtype F6_E2M3, which LibTorch has no type for"},
      {"missing field", file_of(one(R"({"dtype":"F32","shape":[2]})"), x8),
       "has no \"data_offsets\""},
      {"negative dim", file_of(one(R"({"dtype":"F32","shape":[-2],"data_offsets":[0,8]})"), x8),
       "shape holds -2, not a non-negative integer"},
      {"float dim", file_of(one(R"({"dtype":"F32","shape":[2.5],"data_offsets":[0,8]})"), x8),
       "shape holds 2.5"},
      {"one offset", file_of(one(R"({"dtype":"F32","shape":[2],"data_offsets":[8]})"), x8),
       "data_offsets is [8], not [begin, end]"},
      {"reversed offsets", file_of(one(R"({"dtype":"F32","shape":[0],"data_offsets":[8,0]})"), x8),
       "end before they begin"},
      {"size mismatch", file_of(one(R"({"dtype":"F32","shape":[3],"data_offsets":[0,8]})"), x8),
       "needs 12 bytes, but data_offsets [0, 8] hold 8"},
      {"overflowing shape",
       file_of(one(R"({"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]})"), x8),
       "whose size overflows 64 bits"},
      {"overflowing strides of an empty tensor",
       file_of(one(R"({"dtype":"F32","shape":[0,4294967296,4294967296],"data_offsets":[0,0]})"),
               ""),
       "whose size overflows 64 bits", /*python_refuses=*/false},
      {"dim past int64",
       file_of(one(R"({"dtype":"U8","shape":[0,9223372036854775808],"data_offsets":[0,0]})"), ""),
       "whose size overflows 64 bits"},
      {"odd F4", file_of(one(R"({"dtype":"F4","shape":[3],"data_offsets":[0,2]})"), "ab"),
       "its last dimension must be even"},
      {"gap",
       file_of(
           R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[4,6]}})",
           "abcdef"),
       "tensor 'b' begins at data offset 4 but the tensor before it, 'a', ends at 2 (a gap)"},
      {"overlap",
       file_of(
           R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}})",
           "abcd"),
       "tensor 'b' begins at data offset 2 but the tensor before it, 'a', ends at 4 (overlapping)"},
      {"not from zero", file_of(one(R"({"dtype":"U8","shape":[2],"data_offsets":[2,4]})"), "abcd"),
       "tensor 'x' begins at data offset 2 but the data starts at 0 (a gap)"},
      {"trailing bytes", file_of(one(f32x2), x8 + "zz"), "(trailing bytes)"},
      {"truncated", file_of(one(f32x2), "abc"), "(truncated)"},
      {"metadata not strings", file_of(R"({"__metadata__":{"epoch":3}})", ""),
       "\"__metadata__\" has 'epoch' = 3, not a string"},
      {"entry not an object", file_of(R"({"x":[1,2]})", ""), "tensor 'x' is described by array"},
  };
}

TEST_F(SafetensorsTest, RejectsEveryMalformedFileNamingTheRule) {
  TempDir dir;
  for (const auto& c : bad_cases()) {
    SCOPED_TRACE(c.what);
    const std::string path = dir.str() + "/bad.safetensors";
    write_bytes(path, c.bytes);
    for (bool mmap : {true, false}) {
      EXPECT_THROWS_WITH(wick::load_safetensors(path, wick::SafetensorsLoadOptions().mmap(mmap)),
                         c.message);
      EXPECT_THROWS_WITH(wick::load_safetensors(path, wick::SafetensorsLoadOptions().mmap(mmap)),
                         "safetensors '" + path + "'");
    }
    EXPECT_THROWS_WITH(wick::load_safetensors_from_bytes(c.bytes.data(), c.bytes.size()),
                       c.message);
  }
}

TEST_F(SafetensorsTest, TheReferenceImplementationRejectsTheSameFiles) {
  // Each malformed file above is also refused by Python's safetensors, with
  // one exception: an empty tensor whose contiguous strides overflow int64.
  // Python returns it with made-up strides ((0, 2^32, 1) for [0, 2^32, 2^32]);
  // LibTorch cannot create it contiguous (torch::empty: "Stride calculation
  // overflowed"), so wick refuses it by name.
  TempDir dir;
  Json paths = Json::array();
  const auto cases = bad_cases();
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string path = dir.str() + "/bad" + std::to_string(i) + ".safetensors";
    write_bytes(path, cases[i].bytes);
    paths.push_back(path);
  }
  const Json result =
      wick::testing::python_reference("interop.py", "safetensors_rejects", {{"paths", paths}});
  for (size_t i = 0; i < cases.size(); ++i) {
    EXPECT_EQ(result["rejected"][i].get<bool>(), cases[i].python_refuses)
        << cases[i].what << ": " << result["messages"][i].get<std::string>();
  }
}

TEST_F(SafetensorsTest, NamesAMissingFileAndADirectory) {
  TempDir dir;
  EXPECT_THROWS_WITH(wick::load_safetensors(dir.str() + "/none.safetensors"),
                     "safetensors: cannot open '" + dir.str() + "/none.safetensors'");
  EXPECT_THROWS_WITH(wick::load_safetensors(dir.str()), "not a regular file");
}

}  // namespace
