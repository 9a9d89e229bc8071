// libFuzzer target: gpt::load_fortunes (examples/gpt/corpus.cpp), Debian
// fortune files split into fortunes at "%" lines.
//
// Input: byte 0 picks val_every (2..33); the rest is split at "\n%%%%\n" into
// up to 4 files fortunes-0 .. fortunes-3 (plus an ignored fortunes-0.dat), so
// several files, empty ones and every line ending get exercised.
//
// Fine: a Corpus, or a c10::Error naming load_fortunes. On success the
// tensors are int64 byte values, and the fortunes counted add up.

#include "fuzz_support.h"

#include "corpus.h"

#include <string_view>

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  wick::fuzz::init();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using wick::fuzz::expect;
  if (size < 1) return 0;
  const int64_t val_every = 2 + data[0] % 32;
  std::string_view rest(reinterpret_cast<const char*>(data) + 1, size - 1);
  const std::string dir = wick::fuzz::scratch().fresh();
  const std::string_view sep = "\n%%%%\n";
  int files = 0;
  while (files < 4) {
    const size_t cut = files == 3 ? std::string_view::npos : rest.find(sep);
    const std::string_view part = rest.substr(0, cut);
    wick::fuzz::write_file(dir + "/fortunes-" + std::to_string(files), part.data(), part.size());
    ++files;
    if (cut == std::string_view::npos) break;
    rest.remove_prefix(cut + sep.size());
  }
  wick::fuzz::write_file(dir + "/fortunes-0.dat", "\x00\x00\x00\x02", 4);

  gpt::Corpus c;
  if (!wick::fuzz::expect_clear_error("load_fortunes",
                                      [&] { c = gpt::load_fortunes(dir, val_every); }))
    return 0;
  expect(c.files == files, "load_fortunes: file count " + std::to_string(c.files) + ", wrote " +
                               std::to_string(files));
  expect(c.train.scalar_type() == torch::kLong && c.val.scalar_type() == torch::kLong &&
             c.train.dim() == 1 && c.val.dim() == 1,
         "load_fortunes: tensors are not 1-d int64");
  expect(c.train_fortunes >= 0 && c.val_fortunes >= 0 &&
             c.val_fortunes >= c.train_fortunes / (val_every - 1) &&
             c.val_fortunes <= c.train_fortunes / (val_every - 1) + 1,
         "load_fortunes: the split is not every val_every-th fortune");
  // Every fortune ends in "\n" and holds at least one byte besides.
  expect(c.train.numel() >= 2 * c.train_fortunes && c.val.numel() >= 2 * c.val_fortunes,
         "load_fortunes: fewer bytes than fortunes");
  if (c.train.numel() > 0)
    expect(c.train.min().item<int64_t>() >= 0 && c.train.max().item<int64_t>() <= 255,
           "load_fortunes: not bytes");
  if (c.val.numel() > 0)
    expect(c.val.min().item<int64_t>() >= 0 && c.val.max().item<int64_t>() <= 255,
           "load_fortunes: not bytes");
  return 0;
}
