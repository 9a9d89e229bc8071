// libFuzzer target: wick::Checkpoint::load (src/checkpoint.cpp) on a
// checkpoint directory of arbitrary files, then restore_module,
// restore_optimizer, get and restore_rng_state on what it loaded.
//
// Input format (so mutations reach meta.json and the section payloads alike):
//   byte 0        flags; bit 0: before loading, rewrite meta.json's "size" and
//                 "crc32" of every listed section to match the file present
//                 (when meta.json parses), so mutated payloads get past the
//                 CRC check into LibTorch's archive reader; bits 1-2: after a
//                 load, 0 restore_module, 1 restore_optimizer, 2 get, 3
//                 restore_rng_state
//   then entries  [u8 name length][name][u32 little-endian size][bytes]
//                 written as files of the checkpoint directory (at most 16;
//                 '/' in a name becomes '_'; a short last entry keeps what is there)
//
// Fine: a Checkpoint, or a c10::Error naming "Checkpoint". On success the
// train state is non-negative and every section restores into a small known
// module (Linear + BatchNorm1d) / Adam optimizer, or fails with a clear error
// and leaves the module unchanged.
//
// WICK_FUZZ_MAKE_SEEDS=<dir>: write the seed corpus into <dir> and exit
// (fuzz/corpus/checkpoint was made so; docs/fuzzing.md).

#include "fuzz_support.h"

#include <wick/checkpoint.h>

#include <zlib.h>
#include <nlohmann/json.hpp>

#include <map>
#include <vector>

namespace {

using Files = std::vector<std::pair<std::string, std::string>>;

torch::nn::Sequential make_module() {
  return torch::nn::Sequential(torch::nn::Linear(3, 2), torch::nn::BatchNorm1d(2));
}

std::string crc_hex(const std::string& s) {
  uLong crc = ::crc32(0L, Z_NULL, 0);
  crc = ::crc32(crc, reinterpret_cast<const Bytef*>(s.data()), static_cast<uInt>(s.size()));
  char buf[9];
  std::snprintf(buf, sizeof(buf), "%08x", static_cast<unsigned>(crc));
  return buf;
}

Files unpack(const uint8_t* data, size_t size, uint8_t& flags) {
  Files files;
  flags = size > 0 ? data[0] : 0;
  size_t pos = 1;
  while (pos < size && files.size() < 16) {
    const size_t name_len = data[pos++];
    if (name_len == 0 || pos + name_len > size) break;
    std::string name(reinterpret_cast<const char*>(data) + pos, name_len);
    pos += name_len;
    for (char& c : name) {
      if (c == '/' || c == '\0') c = '_';
    }
    uint32_t len = 0;
    for (int i = 0; i < 4 && pos < size; ++i) len |= uint32_t{data[pos++]} << (8 * i);
    const size_t n = std::min<size_t>(len, size - pos);
    if (name == "." || name == "..") name = "_" + name;
    files.emplace_back(name, std::string(reinterpret_cast<const char*>(data) + pos, n));
    pos += n;
  }
  return files;
}

std::string pack(uint8_t flags, const Files& files) {
  std::string out(1, static_cast<char>(flags));
  for (const auto& [name, bytes] : files) {
    out += static_cast<char>(name.size());
    out += name;
    for (int i = 0; i < 4; ++i) out += static_cast<char>((bytes.size() >> (8 * i)) & 0xFF);
    out += bytes;
  }
  return out;
}

void fix_up_manifest(Files& files) {
  std::map<std::string, const std::string*> by_name;
  for (const auto& f : files) by_name[f.first] = &f.second;
  for (auto& [name, bytes] : files) {
    if (name != "meta.json") continue;
    auto meta = nlohmann::json::parse(bytes, nullptr, /*allow_exceptions=*/false);
    if (meta.is_discarded() || !meta.is_object()) return;
    auto it = meta.find("sections");
    if (it == meta.end() || !it->is_object()) return;
    for (auto& [section, entry] : it->items()) {
      auto file = by_name.find(section + ".pt");
      if (file == by_name.end() || !entry.is_object()) continue;
      entry["size"] = file->second->size();
      entry["crc32"] = crc_hex(*file->second);
    }
    bytes = meta.dump(2, ' ', false, nlohmann::json::error_handler_t::replace);
    return;
  }
}

// Reads and writes a checkpoint directory `dir` holding `files`.
void write_dir(const std::string& dir, const Files& files) {
  for (const auto& [name, bytes] : files) wick::fuzz::write_file(dir + "/" + name, bytes);
}

Files read_dir(const std::string& dir) {
  Files files;
  auto names = wick::detail::list_dir(dir, "fuzz");
  std::sort(names.begin(), names.end());
  for (const auto& name : names) {
    std::FILE* f = std::fopen((dir + "/" + name).c_str(), "rb");
    std::string bytes;
    char buf[4096];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) bytes.append(buf, n);
    std::fclose(f);
    files.emplace_back(name, bytes);
  }
  return files;
}

void make_seeds(const std::string& out) {
  torch::manual_seed(0);
  auto model = make_module();
  torch::optim::Adam adam(model->parameters(), torch::optim::AdamOptions(1e-3));
  model->train();
  auto loss = model->forward(torch::randn({4, 3})).sum();
  loss.backward();
  adam.step();
  auto save = [&](const std::string& name, bool rng, bool optimizer, bool extra) {
    wick::Checkpoint c;
    c.put_module("model", *model);
    if (optimizer) c.put_optimizer("optimizer", adam);
    if (extra)
      c.put("extra", [](torch::serialize::OutputArchive& a) { a.write("x", torch::arange(3)); });
    if (rng) c.put_rng_state();
    c.set_train_state({7, 1, 3, 28});
    c.set_fingerprint("optimizer=adam;lr=0.001");
    c.set_meta("val_loss", "0.5");
    const std::string dir = wick::fuzz::scratch().root() + "/seed-" + name;
    c.save(dir);
    Files files = read_dir(dir);
    wick::fuzz::write_file(out + "/" + name, pack(1, files));  // restore_module
    if (name == "full") {
      wick::fuzz::write_file(out + "/full-optimizer", pack(1 | 1 << 1, files));
      wick::fuzz::write_file(out + "/full-get", pack(1 | 2 << 1, files));
      wick::fuzz::write_file(out + "/full-rng", pack(1 | 3 << 1, files));
    }
    if (name == "full") {
      // Broken on purpose: no fix-up flag and a flipped payload byte (CRC
      // mismatch); a truncated section; meta.json alone.
      for (auto& f : files) {
        if (f.first == "model.pt") f.second[f.second.size() / 2] ^= 0x40;
      }
      wick::fuzz::write_file(out + "/broken-crc", pack(0, files));
      for (auto& f : files) {
        if (f.first == "model.pt") f.second.resize(f.second.size() / 2);
      }
      wick::fuzz::write_file(out + "/broken-truncated", pack(1, files));
      Files meta_only;
      for (auto& f : files) {
        if (f.first == "meta.json") meta_only.push_back(f);
      }
      wick::fuzz::write_file(out + "/broken-meta-only", pack(0, meta_only));
    }
  };
  save("model-only", false, false, false);
  save("full", true, true, true);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  wick::fuzz::init();
  if (const char* out = std::getenv("WICK_FUZZ_MAKE_SEEDS")) {
    make_seeds(out);
    std::exit(0);
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using wick::fuzz::expect;
  uint8_t flags = 0;
  Files files = unpack(data, size, flags);
  if (flags & 1) fix_up_manifest(files);
  const std::string dir = wick::fuzz::scratch().fresh();
  write_dir(dir, files);

  wick::Checkpoint ckpt;
  if (!wick::fuzz::expect_clear_error("Checkpoint", [&] { ckpt = wick::Checkpoint::load(dir); }))
    return 0;
  const auto& ts = ckpt.train_state();
  expect(ts.step >= 0 && ts.epoch >= 0 && ts.batch_in_epoch >= 0 && ts.samples_seen >= 0,
         "Checkpoint::load accepted a negative train state");
  // Bits 1-2 of the flags pick what to do with the sections (one archive
  // parse per section: TorchScript's loader is slow under ASan).
  auto model = make_module();
  torch::optim::Adam adam(model->parameters(), torch::optim::AdamOptions(1e-3));
  const int action = (flags >> 1) & 3;
  if (action == 3) {
    wick::fuzz::expect_clear_error("Checkpoint", [&] { ckpt.restore_rng_state(); });
    return 0;
  }
  for (const auto& section : ckpt.sections()) {
    if (action == 0) {
      std::vector<torch::Tensor> before;
      for (const auto& p : model->parameters()) before.push_back(p.detach().clone());
      if (!wick::fuzz::expect_clear_error("Checkpoint",
                                          [&] { ckpt.restore_module(section, *model); })) {
        const auto params = model->parameters();
        for (size_t i = 0; i < params.size(); ++i)
          expect(torch::equal(params[i], before[i]),
                 "restore_module changed the module and then failed");
      }
    } else if (action == 1) {
      wick::fuzz::expect_clear_error("Checkpoint", [&] { ckpt.restore_optimizer(section, adam); });
    } else {
      wick::fuzz::expect_clear_error("Checkpoint", [&] {
        ckpt.get(section, [](torch::serialize::InputArchive& a) {
          torch::Tensor x;
          a.read("x", x);
        });
      });
    }
  }
  return 0;
}
