// libFuzzer target: wick::read_idx (src/data.cpp) on arbitrary file contents,
// plain or gzip-compressed (zlib reads both).
//
// Fine: a uint8 tensor, or a c10::Error naming read_idx. On success the
// tensor's shape must be the header's and, for an uncompressed file, its bytes
// the file's payload.

#include "fuzz_support.h"

#include <wick/data.h>

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  wick::fuzz::init();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using wick::fuzz::expect;
  const std::string dir = wick::fuzz::scratch().fresh();
  const std::string path = dir + "/input-idx3-ubyte";
  wick::fuzz::write_file(path, data, size);

  torch::Tensor t;
  if (!wick::fuzz::expect_clear_error("read_idx", [&] { t = wick::read_idx(path); })) return 0;

  expect(t.scalar_type() == torch::kUInt8 && t.is_contiguous(),
         "read_idx returned a non-contiguous or non-uint8 tensor");
  const bool gzip = size >= 2 && data[0] == 0x1f && data[1] == 0x8b;
  if (gzip) return 0;
  // Plain file: 0 0 0x08 ndims, ndims big-endian uint32 sizes, then the data.
  expect(size >= 4 && data[0] == 0 && data[1] == 0 && data[2] == 0x08,
         "read_idx accepted a bad magic number");
  const int ndims = data[3];
  expect(t.dim() == ndims, "read_idx: dimensions differ from the header");
  const size_t header = 4 + 4 * static_cast<size_t>(ndims);
  expect(size >= header, "read_idx accepted a truncated header");
  for (int d = 0; d < ndims; ++d) {
    const uint8_t* b = data + 4 + 4 * d;
    const int64_t dim =
        (int64_t{b[0]} << 24) | (int64_t{b[1]} << 16) | (int64_t{b[2]} << 8) | int64_t{b[3]};
    expect(t.size(d) == dim, "read_idx: a dimension differs from the header");
  }
  expect(static_cast<size_t>(t.numel()) == size - header,
         "read_idx: element count differs from the payload size");
  expect(std::memcmp(t.data_ptr(), data + header, size - header) == 0,
         "read_idx: the data differ from the file's");
  return 0;
}
