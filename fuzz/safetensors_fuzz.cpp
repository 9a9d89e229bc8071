// libFuzzer target: wick's safetensors parser (src/safetensors.cpp) on
// arbitrary bytes, from memory and from a file (memory-mapped and read).
//
// Fine: a SafetensorsFile, or a c10::Error naming safetensors. On success:
// the three ways of reading agree; the tensors' bytes fill the file after the
// header exactly; each tensor's bytes are the file's at the offsets the header
// gives (read here with nlohmann directly); and writing the result and reading
// that back gives the same names, dtypes, shapes, bytes and metadata.

#include "fuzz_support.h"

#include <wick/safetensors.h>

#include <nlohmann/json.hpp>

namespace {

using wick::fuzz::expect;

bool same(const wick::SafetensorsFile& a, const wick::SafetensorsFile& b) {
  if (a.metadata != b.metadata || a.tensors.size() != b.tensors.size()) return false;
  for (size_t i = 0; i < a.tensors.size(); ++i) {
    const auto& [na, ta] = a.tensors[i];
    const auto& [nb, tb] = b.tensors[i];
    if (na != nb || ta.scalar_type() != tb.scalar_type() || ta.sizes() != tb.sizes()) return false;
    const size_t n = ta.numel() * ta.element_size();
    if (n > 0 && std::memcmp(ta.data_ptr(), tb.data_ptr(), n) != 0) return false;
  }
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  wick::fuzz::init();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  wick::SafetensorsFile f;
  if (!wick::fuzz::expect_clear_error("safetensors",
                                      [&] { f = wick::load_safetensors_from_bytes(data, size); })) {
    return 0;
  }

  const std::string path = wick::fuzz::scratch().fresh() + "/in.safetensors";
  wick::fuzz::write_file(path, data, size);
  for (bool mmap : {true, false}) {
    wick::SafetensorsFile g;
    expect(
        wick::fuzz::expect_clear_error(
            "safetensors",
            [&] { g = wick::load_safetensors(path, wick::SafetensorsLoadOptions().mmap(mmap)); }),
        "the file was refused but the same bytes in memory were read");
    expect(same(f, g), mmap ? "the mapped file reads differently from memory"
                            : "the read file reads differently from memory");
  }

  // The header, read independently: each tensor's bytes are the file's.
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | data[i];
  const auto header = nlohmann::json::parse(data + 8, data + 8 + n);
  uint64_t covered = 0;
  for (const auto& [name, t] : f.tensors) {
    const auto& offsets = header.at(name).at("data_offsets");
    const auto begin = offsets[0].get<uint64_t>(), end = offsets[1].get<uint64_t>();
    const size_t bytes = t.numel() * t.element_size();
    expect(end - begin == bytes, "a tensor's size differs from its data_offsets");
    expect(bytes == 0 || std::memcmp(t.data_ptr(), data + 8 + n + begin, bytes) == 0,
           "a tensor's bytes differ from the file's");
    covered += bytes;
  }
  expect(covered == size - 8 - n, "the tensors do not fill the data section");

  wick::SafetensorsFile back;
  expect(wick::fuzz::expect_clear_error(
             "safetensors",
             [&] {
               const std::string bytes = wick::save_safetensors_to_bytes(f.tensors, f.metadata);
               back = wick::load_safetensors_from_bytes(bytes.data(), bytes.size());
             }),
         "what was read could not be written and read back");
  std::sort(f.tensors.begin(), f.tensors.end(), [](const auto& a, const auto& b) {
    return a.second.element_size() > b.second.element_size();
  });
  expect(same(f, back), "writing what was read and reading it back changed it");
  return 0;
}
