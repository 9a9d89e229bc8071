// Regression tests for what the libFuzzer targets in fuzz/ found in wick's
// parsers of outside bytes (docs/fuzzing.md lists them): each feeds the input
// that broke a parser and checks for the clear error or the right result.
#include <wick/checkpoint.h>
#include <wick/data.h>
#include <wick/report.h>

#include <zlib.h>
#include <nlohmann/json.hpp>

#include <cstdio>

#include <cstdint>
#include <fstream>
#include <functional>
#include <iterator>

#include <gtest/gtest.h>

#include "support.h"

namespace {

using wick::testing::TempDir;

std::string write(const TempDir& dir, const std::string& name, const std::string& bytes) {
  const std::string path = dir.str() + "/" + name;
  std::ofstream out(path, std::ios::binary);
  out << bytes;
  return path;
}

std::string embedded_logs(const std::string& html) {
  const std::string open = "<script type=\"application/json\" id=\"wick-logs\">";
  const auto a = html.find(open);
  EXPECT_NE(a, std::string::npos);
  const auto b = html.find("</script>", a);
  return html.substr(a + open.size(), b - a - open.size());
}

// fuzz/metrics_jsonl_fuzz.cpp: {"kind": 1} made render_run_report throw
// nlohmann's type_error (not a c10::Error) while counting train/val logs.
TEST(ParsersTest, RunReportTakesANonStringKind) {
  TempDir dir;
  const auto path =
      write(dir, "metrics.jsonl",
            "{\"kind\": 1, \"step\": 1}\n{\"kind\": null}\n{\"kind\": \"train\", \"step\": 2}\n");
  const std::string html = wick::render_run_report(wick::RunReportOptions(path, "unused.html"));
  EXPECT_NE(html.find("1 train, 0 validation"), std::string::npos);
  EXPECT_EQ(nlohmann::json::parse(embedded_logs(html)).size(), 3u);
}

// A logged string "<!--<script>" put the browser's parser into the script's
// "double escaped" state, where the element's real "</script>" no longer
// ends it: the page lost its charts. Every '<' is now \u003c in the JSON.
TEST(ParsersTest, RunReportLogsCannotEndOrGarbleTheirScriptElement) {
  TempDir dir;
  const auto path = write(
      dir, "metrics.jsonl",
      "{\"kind\": \"train\", \"step\": 1, \"note\": \"<!--<script></script></SCRIPT <b>\"}\n");
  const std::string html = wick::render_run_report(wick::RunReportOptions(path, "unused.html"));
  const std::string logs = embedded_logs(html);
  EXPECT_EQ(logs.find('<'), std::string::npos) << logs;
  EXPECT_EQ(nlohmann::json::parse(logs)[0]["note"], "<!--<script></script></SCRIPT <b>");
}

TEST(ParsersTest, RunReportNamesTheLineThatIsNotAnObject) {
  TempDir dir;
  const auto path = write(dir, "metrics.jsonl", "{\"kind\": \"train\"}\n\n[1, 2]\n");
  EXPECT_THROWS_WITH(wick::render_run_report(wick::RunReportOptions(path, "unused.html")),
                     "RunReport: line 3 of '" + path + "' is not a JSON object");
}

// A 20-byte IDX file whose header declares 2^35 bytes: a clear "truncated"
// error, read in chunks that grow with the file (it reserved 64 MiB first).
TEST(ParsersTest, IdxHeaderDeclaringHugeDataOverATinyFile) {
  TempDir dir;
  const std::string header("\x00\x00\x08\x03\x00\x00\x80\x00\x00\x00\x80\x00\x00\x00\x00\x20", 16);
  const auto path = write(dir, "huge-idx3-ubyte", header + "abcd");
  EXPECT_THROWS_WITH(wick::read_idx(path),
                     "is truncated: its header declares shape [32768, 32768, 32] = "
                     "34359738368 bytes of data, but the file has 4");
}

// Checkpoint meta.json numbers: get<int64_t>() truncated 7.5, wrapped
// 2^64 - 1 to -1, converted 1e300 with undefined behaviour (UBSan under
// fuzz/checkpoint_fuzz.cpp), and load() took a negative step or epoch that
// only failed later inside the Trainer's resume; get<uint64_t>() took a
// section size of -1 as 2^64 - 1.
TEST(ParsersTest, CheckpointMetaNumbersMustBeNonNegativeIntegers) {
  TempDir dir;
  const std::string path = dir.str() + "/step-00000007";
  {
    wick::Checkpoint c;
    c.put("extra", [](torch::serialize::OutputArchive& a) { a.write("x", torch::arange(3)); });
    c.set_train_state({7, 1, 3, 28});
    c.save(path);
  }
  std::string original;
  {
    std::ifstream in(path + "/meta.json");
    original.assign(std::istreambuf_iterator<char>(in), {});
  }
  const auto meta = nlohmann::json::parse(original);
  auto load_with = [&](const std::function<void(nlohmann::json&)>& edit) {
    nlohmann::json m = meta;
    edit(m);
    std::ofstream(path + "/meta.json") << m.dump(2);
    return wick::Checkpoint::load(path);
  };
  EXPECT_EQ(load_with([](nlohmann::json&) {}).train_state().samples_seen, 28);
  const std::string where = "Checkpoint: '" + path + "/meta.json' has train_state.";
  EXPECT_THROWS_WITH(load_with([](auto& m) { m["train_state"]["step"] = -1; }),
                     where + "step = -1; it must be an integer in [0, 2^63)");
  EXPECT_THROWS_WITH(load_with([](auto& m) { m["train_state"]["epoch"] = 1e300; }),
                     where + "epoch = 1e+300");
  EXPECT_THROWS_WITH(load_with([](auto& m) { m["train_state"]["batch_in_epoch"] = 7.5; }),
                     where + "batch_in_epoch = 7.5");
  EXPECT_THROWS_WITH(load_with([](auto& m) { m["train_state"]["samples_seen"] = UINT64_MAX; }),
                     where + "samples_seen = 18446744073709551615");
  EXPECT_THROWS_WITH(load_with([](auto& m) { m["train_state"]["step"] = "7"; }),
                     where + "step = \"7\"");
  EXPECT_THROWS_WITH(
      load_with([](auto& m) { m["sections"]["extra"]["size"] = -1; }),
      "has a malformed entry for section 'extra': size = -1; it must be a non-negative integer");
  EXPECT_THROWS_WITH(load_with([](auto& m) { m["sections"]["extra"]["size"] = 1e300; }),
                     "size = 1e+300; it must be a non-negative integer");
}

// fuzz/checkpoint_fuzz.cpp: four bytes changed in the TorchScript code inside
// a section's archive (its CRC-32 in meta.json updated to match) made
// LibTorch's loader throw std::runtime_error (torch::jit::ErrorReport), which
// get(), restore_module() and restore_optimizer() let escape: they caught
// c10::Error only. Now a c10::Error naming the checkpoint and the section.
TEST(ParsersTest, CheckpointSectionWithCorruptCodeIsAClearError) {
  TempDir dir;
  const std::string path = dir.str() + "/step-00000001";
  {
    wick::Checkpoint c;
    c.put("extra", [](torch::serialize::OutputArchive& a) { a.write("x", torch::arange(3)); });
    c.save(path);
  }
  std::string pt;
  {
    std::ifstream in(path + "/extra.pt", std::ios::binary);
    pt.assign(std::istreambuf_iterator<char>(in), {});
  }
  const auto at = pt.find("__buffers__ = ");
  ASSERT_NE(at, std::string::npos);
  pt.replace(at + 12, 4, "\xc3\xdf\xa4\x9c");  // the fuzzer's mutation
  std::ofstream(path + "/extra.pt", std::ios::binary | std::ios::trunc) << pt;
  std::string meta_text;
  {
    std::ifstream in(path + "/meta.json");
    meta_text.assign(std::istreambuf_iterator<char>(in), {});
  }
  auto meta = nlohmann::json::parse(meta_text);
  char crc[9];
  std::snprintf(crc, sizeof crc, "%08x",
                static_cast<unsigned>(::crc32(::crc32(0L, Z_NULL, 0),
                                              reinterpret_cast<const Bytef*>(pt.data()),
                                              static_cast<uInt>(pt.size()))));
  meta["sections"]["extra"]["crc32"] = crc;
  std::ofstream(path + "/meta.json", std::ios::trunc) << meta.dump(2);

  const auto ckpt = wick::Checkpoint::load(path);  // sizes and CRCs match
  EXPECT_THROWS_WITH(ckpt.get("extra", [](torch::serialize::InputArchive&) {}),
                     "Checkpoint '" + path + "': cannot restore section 'extra': ");
  torch::nn::Linear module(3, 2);
  EXPECT_THROWS_WITH(ckpt.restore_module("extra", *module),
                     "cannot read section 'extra' as a module: ");
  torch::optim::SGD sgd(module->parameters(), 0.1);
  EXPECT_THROWS_WITH(ckpt.restore_optimizer("extra", sgd), "cannot restore section 'extra'");
}

}  // namespace
