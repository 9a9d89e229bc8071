// Sharded checkpoints: every rank writes the parts of the parameters and of
// the optimizer state it owns into a safetensors file of its own; rank 0
// adds those files to an ordinary wick::Checkpoint (atomic, verified) with a
// manifest of the global tensors. Loading reads, for each shard of the new
// layout (any world size, any strategy), the parts of the files that overlap
// it, so no rank ever holds more than its shard.

#include "wick/checkpoint.h"
#include "wick/distributed.h"
#include "wick/optim.h"
#include "wick/safetensors.h"
#include "wick/shard.h"

#include "checkpoint_internal.h"
#include "format.h"  // first of fmt: it sets fmt's namespace
#include "fs.h"
#include "host_snapshot.h"
#include "module_state.h"
#include "safetensors_internal.h"
#include "shard_impl.h"

#include <zlib.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace wick {
namespace {

using json = nlohmann::json;
constexpr const char* kSdpCheckpointName = "ShardedDataParallel";
constexpr const char* kManifestKey = "sharding";
constexpr const char* kGroupsSection = "optimizer_groups";
constexpr int64_t kManifestVersion = 1;

std::string shard_file(int64_t rank, int64_t world) {
  return fmt::format("shard-{:05d}-of-{:05d}", static_cast<long long>(rank),
                     static_cast<long long>(world));
}

// ---- an elementwise optimizer's per-parameter state, as named tensors ----

struct Fields {
  std::map<std::string, torch::Tensor> elementwise;  // shaped like the parameter
  std::map<std::string, torch::Tensor> scalars;      // one value per parameter
};

std::string optimizer_kind(const torch::optim::Optimizer& o) {
  namespace optim = torch::optim;
  if (dynamic_cast<const FusedAdam*>(&o)) return "fused_adam";
  if (dynamic_cast<const optim::AdamW*>(&o)) return "adamw";
  if (dynamic_cast<const optim::Adam*>(&o)) return "adam";
  if (dynamic_cast<const optim::SGD*>(&o)) return "sgd";
  if (dynamic_cast<const optim::RMSprop*>(&o)) return "rmsprop";
  if (dynamic_cast<const optim::Adagrad*>(&o)) return "adagrad";
  return "";
}

torch::Tensor step_tensor(int64_t step) { return torch::tensor(step, torch::kInt64); }

Fields to_fields(const torch::optim::OptimizerParamState& state) {
  namespace optim = torch::optim;
  Fields f;
  auto put = [&](const char* name, const torch::Tensor& t) {
    if (t.defined()) f.elementwise[name] = t;
  };
  if (const auto* a = dynamic_cast<const FusedAdamParamState*>(&state)) {
    f.scalars["step"] = a->step();
    put("exp_avg", a->exp_avg());
    put("exp_avg_sq", a->exp_avg_sq());
    put("max_exp_avg_sq", a->max_exp_avg_sq());
  } else if (const auto* w = dynamic_cast<const optim::AdamWParamState*>(&state)) {
    f.scalars["step"] = step_tensor(w->step());
    put("exp_avg", w->exp_avg());
    put("exp_avg_sq", w->exp_avg_sq());
    put("max_exp_avg_sq", w->max_exp_avg_sq());
  } else if (const auto* a2 = dynamic_cast<const optim::AdamParamState*>(&state)) {
    f.scalars["step"] = step_tensor(a2->step());
    put("exp_avg", a2->exp_avg());
    put("exp_avg_sq", a2->exp_avg_sq());
    put("max_exp_avg_sq", a2->max_exp_avg_sq());
  } else if (const auto* s = dynamic_cast<const optim::SGDParamState*>(&state)) {
    put("momentum_buffer", s->momentum_buffer());
  } else if (const auto* r = dynamic_cast<const optim::RMSpropParamState*>(&state)) {
    f.scalars["step"] = step_tensor(r->step());
    put("square_avg", r->square_avg());
    put("momentum_buffer", r->momentum_buffer());
    put("grad_avg", r->grad_avg());
  } else if (const auto* g = dynamic_cast<const optim::AdagradParamState*>(&state)) {
    f.scalars["step"] = step_tensor(g->step());
    put("sum", g->sum());
  } else {
    TORCH_CHECK(false, kSdpCheckpointName, ": cannot checkpoint this optimizer's state by shards");
  }
  return f;
}

std::unique_ptr<torch::optim::OptimizerParamState> from_fields(const std::string& kind,
                                                               const Fields& f) {
  namespace optim = torch::optim;
  auto get = [&](const char* name) {
    auto it = f.elementwise.find(name);
    return it == f.elementwise.end() ? torch::Tensor() : it->second;
  };
  auto step = [&] {
    auto it = f.scalars.find("step");
    TORCH_CHECK(it != f.scalars.end(), kSdpCheckpointName,
                ": the checkpoint's optimizer state has no step");
    return it->second;
  };
  if (kind == "fused_adam") {
    auto s = std::make_unique<FusedAdamParamState>();
    s->step(step().to(torch::kFloat32).clone());
    s->exp_avg(get("exp_avg"));
    s->exp_avg_sq(get("exp_avg_sq"));
    s->max_exp_avg_sq(get("max_exp_avg_sq"));
    return s;
  }
  if (kind == "adam" || kind == "adamw") {
    auto fill = [&](auto s) {
      s->step(step().to(torch::kInt64).item<int64_t>());
      s->exp_avg(get("exp_avg"));
      s->exp_avg_sq(get("exp_avg_sq"));
      s->max_exp_avg_sq(get("max_exp_avg_sq"));
      return s;
    };
    if (kind == "adam") return fill(std::make_unique<optim::AdamParamState>());
    return fill(std::make_unique<optim::AdamWParamState>());
  }
  if (kind == "sgd") {
    auto s = std::make_unique<optim::SGDParamState>();
    s->momentum_buffer(get("momentum_buffer"));
    return s;
  }
  if (kind == "rmsprop") {
    auto s = std::make_unique<optim::RMSpropParamState>();
    s->step(step().to(torch::kInt64).item<int64_t>());
    s->square_avg(get("square_avg"));
    s->momentum_buffer(get("momentum_buffer"));
    s->grad_avg(get("grad_avg"));
    return s;
  }
  if (kind == "adagrad") {
    auto s = std::make_unique<optim::AdagradParamState>();
    s->step(step().to(torch::kInt64).item<int64_t>());
    s->sum(get("sum"));
    return s;
  }
  TORCH_CHECK(false, kSdpCheckpointName, ": unknown optimizer kind '", kind, "' in the checkpoint");
}

std::string part_key(const char* kind, const std::string& field, const std::string& name,
                     int64_t start) {
  return fmt::format("{}/{}/{}/{}", kind, field, name, static_cast<long long>(start));
}

// The manifest's record of one parameter: where each saved rank's part of it is.
struct SavedParam {
  std::vector<int64_t> shape;
  int64_t numel = 0;
  struct Part {
    int64_t rank, start, numel;
  };
  std::vector<Part> parts;
};

struct SavedLayout {
  int64_t world_size = 0;
  std::string optimizer;  // "" when the optimizer had no state
  std::vector<std::string> elementwise, scalars;
  std::map<std::string, SavedParam> params;
  std::vector<std::string> params_in_order;
  std::vector<std::string> buffers;
};

SavedLayout parse_manifest(const Checkpoint& ckpt) {
  auto text = ckpt.meta(kManifestKey);
  TORCH_CHECK(text.has_value(), kSdpCheckpointName, ": checkpoint ", ckpt.path(),
              " is not sharded (its meta.json has no \"", kManifestKey,
              "\"); load it with Checkpoint::restore_module and restore_optimizer");
  SavedLayout layout;
  try {
    const json m = json::parse(*text);
    TORCH_CHECK(m.at("version").get<int64_t>() == kManifestVersion, kSdpCheckpointName,
                ": checkpoint ", ckpt.path(), " has sharding manifest version ",
                m.at("version").dump(), "; this build reads version ", kManifestVersion);
    layout.world_size = m.at("world_size").get<int64_t>();
    layout.optimizer = m.at("optimizer").get<std::string>();
    layout.elementwise = m.at("elementwise").get<std::vector<std::string>>();
    layout.scalars = m.at("scalars").get<std::vector<std::string>>();
    layout.buffers = m.at("buffers").get<std::vector<std::string>>();
    for (const auto& p : m.at("params")) {
      SavedParam sp;
      sp.shape = p.at("shape").get<std::vector<int64_t>>();
      sp.numel = p.at("numel").get<int64_t>();
      for (const auto& part : p.at("parts")) {
        sp.parts.push_back(
            {part.at(0).get<int64_t>(), part.at(1).get<int64_t>(), part.at(2).get<int64_t>()});
      }
      const auto name = p.at("name").get<std::string>();
      layout.params_in_order.push_back(name);
      layout.params.emplace(name, std::move(sp));
    }
  } catch (const json::exception& e) {
    TORCH_CHECK(false, kSdpCheckpointName, ": checkpoint ", ckpt.path(),
                " has a malformed sharding manifest: ", e.what());
  }
  return layout;
}

// Reads ranges of the saved global tensors from the rank files, opening each
// file (mapped, verified) the first time one of its parts is needed.
class PartReader {
 public:
  PartReader(const Checkpoint& ckpt, const SavedLayout& layout) : ckpt_(ckpt), layout_(layout) {}

  // Elements [a, b) of parameter `name`'s flattened `field` ("param": its
  // values) into `out` (b - a elements).
  void read(const char* kind, const std::string& field, const std::string& name, int64_t a,
            int64_t b, const torch::Tensor& out) {
    const auto& sp = layout_.params.at(name);
    int64_t covered = 0;
    for (const auto& part : sp.parts) {
      const int64_t lo = std::max(a, part.start), hi = std::min(b, part.start + part.numel);
      if (hi <= lo) continue;
      const auto& t = tensor(part.rank, part_key(kind, field, name, part.start));
      TORCH_CHECK(t.numel() == part.numel, kSdpCheckpointName, ": checkpoint ", ckpt_.path(), ": '",
                  part_key(kind, field, name, part.start), "' has ", t.numel(),
                  " elements, the manifest says ", part.numel);
      out.narrow(0, lo - a, hi - lo).copy_(t.narrow(0, lo - part.start, hi - lo));
      covered += hi - lo;
    }
    TORCH_CHECK(covered == b - a, kSdpCheckpointName, ": checkpoint ", ckpt_.path(),
                ": the manifest's parts of '", name, "' do not cover elements [", a, ", ", b, ")");
  }

  // A scalar field of the part of `name` that holds element `a`.
  torch::Tensor scalar(const std::string& field, const std::string& name, int64_t a) {
    for (const auto& part : layout_.params.at(name).parts) {
      if (a >= part.start && a < part.start + part.numel) {
        return tensor(part.rank, part_key("c", field, name, part.start));
      }
    }
    TORCH_CHECK(false, kSdpCheckpointName, ": checkpoint ", ckpt_.path(), " has no part of '", name,
                "' holding element ", a);
  }

  const torch::Tensor& tensor(int64_t rank, const std::string& key) {
    auto& file = files_[rank];
    if (!file) {
      file = std::make_unique<std::map<std::string, torch::Tensor>>(
          load_safetensors(ckpt_.file_path(shard_file(rank, layout_.world_size))).to_map());
    }
    auto it = file->find(key);
    TORCH_CHECK(it != file->end(), kSdpCheckpointName, ": checkpoint ", ckpt_.path(), ": ",
                shard_file(rank, layout_.world_size), " has no tensor '", key, "'");
    return it->second;
  }

 private:
  const Checkpoint& ckpt_;
  const SavedLayout& layout_;
  std::map<int64_t, std::unique_ptr<std::map<std::string, torch::Tensor>>> files_;
};

// Rank 0's `text` on every rank.
std::string broadcast_string(ProcessGroup& pg, const std::string& text) {
  const auto options = torch::dtype(torch::kInt64).device(pg.device());
  auto length = torch::full({1}, static_cast<int64_t>(text.size()), options);
  pg.broadcast({length}, 0);
  const int64_t n = length.cpu().item<int64_t>();
  auto bytes = torch::zeros({std::max<int64_t>(n, 1)}, options.dtype(torch::kUInt8));
  if (pg.rank() == 0 && n > 0) {
    bytes.copy_(torch::from_blob(const_cast<char*>(text.data()), {n}, torch::kUInt8));
  }
  pg.broadcast({bytes}, 0);
  bytes = bytes.cpu();
  return std::string(reinterpret_cast<const char*>(bytes.data_ptr<uint8_t>()),
                     static_cast<size_t>(n));
}

// The module's buffers and frozen parameters: whole on every rank, saved by rank 0.
std::vector<std::pair<std::string, torch::Tensor>> unsharded_state(const torch::nn::Module& m) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& item : m.named_parameters(/*recurse=*/true)) {
    if (!item.value().requires_grad()) out.emplace_back(item.key(), item.value());
  }
  for (const auto& item : m.named_buffers(/*recurse=*/true)) {
    if (item.value().defined()) out.emplace_back(item.key(), item.value());
  }
  return out;
}

// ---- saving ----

// What one rank writes at a save: its parts of the parameters and of the
// optimizer state (and, on rank 0, the module's buffers), taken at one moment.
struct ShardContents {
  NamedTensors tensors;
  std::optional<bool> has_state;  // nullopt: the rank holds no parameter
  std::vector<std::string> elementwise, scalars;
};

// `take` maps each tensor to what is written: itself (a synchronous save) or
// a host copy (an asynchronous one).
ShardContents collect_shard(ShardedDataParallel::Impl& impl,
                            const std::function<torch::Tensor(const torch::Tensor&)>& take) {
  auto& opt = *impl.optimizer;
  const int64_t rank = impl.rank();
  ShardContents c;
  std::lock_guard<std::mutex> lock(impl.mutex);
  for (const auto& unit : impl.units) {
    const int64_t begin = rank * unit.shard_numel;
    for (const auto& piece : unit.pieces) {
      auto it = opt.state().find(piece.tensor.unsafeGetTensorImpl());
      std::optional<Fields> fields;
      if (it != opt.state().end()) fields = to_fields(*it->second);
      TORCH_CHECK(!c.has_state.has_value() || *c.has_state == fields.has_value(),
                  kSdpCheckpointName,
                  ": the optimizer has state for some shards and not for others; save after "
                  "a step, or before the first");
      c.has_state = fields.has_value();
      if (fields && c.elementwise.empty() && c.scalars.empty()) {
        for (const auto& [n, t] : fields->elementwise) c.elementwise.push_back(n);
        for (const auto& [n, t] : fields->scalars) c.scalars.push_back(n);
      }
      const int64_t lo = begin + piece.offset, hi = lo + piece.numel;
      for (size_t i : unit.params) {
        const auto& p = impl.params[i];
        const int64_t a = std::max(lo, p.offset), b = std::min(hi, p.offset + p.numel);
        if (b <= a) continue;
        const int64_t start = a - p.offset;  // in the parameter's elements
        c.tensors.emplace_back(part_key("p", "param", p.name, start),
                               take(unit.shard.narrow(0, a - begin, b - a)));
        if (!fields) continue;
        for (const auto& [n, t] : fields->elementwise) {
          c.tensors.emplace_back(part_key("s", n, p.name, start),
                                 take(t.reshape(-1).narrow(0, a - lo, b - a)));
        }
        for (const auto& [n, t] : fields->scalars) {
          c.tensors.emplace_back(part_key("c", n, p.name, start), take(t));
        }
      }
    }
  }
  if (rank == 0) {
    for (const auto& [name, t] : unsharded_state(*impl.module)) {
      c.tensors.emplace_back("b/" + name, take(t.detach()));
    }
  }
  return c;
}

// A rank's file as written: its size and CRC-32.
struct WrittenFile {
  int64_t size = 0;
  uint32_t crc = 0;
};

WrittenFile write_shard(const ShardContents& c, const std::string& staging, int64_t rank,
                        int64_t world) {
  // Streamed: the tensors are already the caller's host copies, so the file
  // goes out one tensor at a time, without a second copy of the shard in memory.
  const std::map<std::string, std::string> metadata = {{"wick", "sharded checkpoint"},
                                                       {"rank", std::to_string(rank)},
                                                       {"world_size", std::to_string(world)}};
  detail::AtomicFile out(detail::join_path(staging, shard_file(rank, world)), kSdpCheckpointName);
  WrittenFile written;
  uLong crc = ::crc32_z(0L, Z_NULL, 0);
  detail::write_safetensors(c.tensors, metadata, kSdpCheckpointName, [&](const void* p, size_t n) {
    out.write(p, n);
    crc = ::crc32_z(crc, static_cast<const Bytef*>(p), n);
    written.size += static_cast<int64_t>(n);
  });
  out.commit();
  written.crc = static_cast<uint32_t>(crc);
  return written;
}

// Rank 0's part of a save besides its file: the manifest of the global
// tensors and the optimizer's group options, into `checkpoint`.
void put_manifest(ShardedDataParallel::Impl& impl, const std::string& kind, const ShardContents& c,
                  Checkpoint& checkpoint) {
  const int64_t world = impl.world();
  json params = json::array();
  for (const auto& p : impl.params) {
    json parts = json::array();
    const auto& unit = impl.units[p.unit];
    for (int64_t r = 0; r < world; ++r) {
      const int64_t lo = r * unit.shard_numel, hi = lo + unit.shard_numel;
      const int64_t a = std::max(lo, p.offset), b = std::min(hi, p.offset + p.numel);
      if (b > a) parts.push_back({r, a - p.offset, b - a});
    }
    params.push_back({{"name", p.name}, {"shape", p.shape}, {"numel", p.numel}, {"parts", parts}});
  }
  std::vector<std::string> buffers;
  for (const auto& [name, t] : unsharded_state(*impl.module)) buffers.push_back(name);
  const json manifest = {{"version", kManifestVersion},
                         {"world_size", world},
                         {"strategy", to_string(impl.options.strategy())},
                         {"optimizer", c.has_state.value_or(false) ? kind : ""},
                         {"elementwise", c.elementwise},
                         {"scalars", c.scalars},
                         {"params", params},
                         {"buffers", buffers}};
  checkpoint.set_meta(kManifestKey, manifest.dump());
  auto& opt = *impl.optimizer;
  checkpoint.put(kGroupsSection, [&](torch::serialize::OutputArchive& archive) {
    archive.write("count", c10::IValue(static_cast<int64_t>(opt.param_groups().size())));
    for (size_t g = 0; g < opt.param_groups().size(); ++g) {
      torch::serialize::OutputArchive group;
      opt.param_groups()[g].options().serialize(group);
      archive.write("group" + std::to_string(g), group);
    }
  });
}

// Rank 0: adds every rank's file to `checkpoint` and saves it at `path`.
void commit(Checkpoint& checkpoint, const std::string& staging, const std::string& path,
            const std::vector<WrittenFile>& files) {
  const auto world = static_cast<int64_t>(files.size());
  for (int64_t r = 0; r < world; ++r) {
    checkpoint.put_file(shard_file(r, world), detail::join_path(staging, shard_file(r, world)),
                        static_cast<uint64_t>(files[r].size),
                        fmt::format("{:08x}", static_cast<unsigned long long>(files[r].crc)));
  }
  checkpoint.save(path);
}

// The staging directory of a save at `path`: beside the checkpoint (so on its
// file system: the checkpoint takes the files by hard links), named by rank 0
// like any checkpoint temporary, so prune_checkpoints() clears it after a
// crash. Rank 0 creates it; collective, throws on every rank when it cannot.
std::string make_staging(ShardedDataParallel::Impl& impl, const std::string& path) {
  const int64_t rank = impl.rank();
  std::string target = path;
  while (target.size() > 1 && target.back() == '/') target.pop_back();
  const auto slash = target.rfind('/');
  const std::string parent = slash == std::string::npos ? "." : target.substr(0, slash);
  const std::string name = slash == std::string::npos ? target : target.substr(slash + 1);
  std::string staging = detail::join_path(
      parent, broadcast_string(*impl.pg, rank == 0 ? detail::checkpoint_temp_name(name) : ""));
  std::string error;
  if (rank == 0) {
    try {
      detail::make_directories(staging, kSdpCheckpointName);
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  auto failed = torch::full({1}, error.empty() ? 0 : 1,
                            torch::dtype(torch::kInt64).device(impl.pg->device()));
  impl.pg->broadcast({failed}, 0);
  if (failed.cpu().item<int64_t>() != 0) {
    TORCH_CHECK(rank != 0, kSdpCheckpointName, ": cannot save checkpoint '", path, "': ", error,
                "; nothing was changed at '", path, "'");
    TORCH_CHECK(false, kSdpCheckpointName, ": cannot save checkpoint '", path,
                "': rank 0 could not create its staging directory (its log says why); nothing "
                "was changed at '",
                path, "'");
  }
  return staging;
}

// Every rank's "failed" flag (0 or 1), on every rank.
std::vector<int64_t> flags_of_all(ProcessGroup& pg, bool failed) {
  auto table = torch::zeros({pg.world_size()}, torch::dtype(torch::kInt64).device(pg.device()));
  table[pg.rank()].fill_(failed ? 1 : 0);
  pg.allreduce_sum({table});
  table = table.cpu();
  return {table.data_ptr<int64_t>(), table.data_ptr<int64_t>() + table.numel()};
}

// An asynchronous save's status file: beside rank r's file in the staging
// directory, written (atomically) once the file is, or failed.
std::string status_file(int64_t rank, int64_t world) { return shard_file(rank, world) + ".status"; }

void write_status(const std::string& staging, int64_t rank, int64_t world, const WrittenFile& file,
                  const std::string& error) {
  constexpr size_t kMaxError = 2000;  // a status file stays small, even when files are limited
  const json status =
      error.empty()
          ? json{{"ok", true}, {"size", file.size}, {"crc", file.crc}}
          : json{{"ok", false},
                 {"error", error.size() <= kMaxError ? error : error.substr(0, kMaxError) + "..."}};
  const std::string text = status.dump(-1, ' ', false, json::error_handler_t::replace);
  detail::AtomicFile out(detail::join_path(staging, status_file(rank, world)), kSdpCheckpointName);
  out.write(text.data(), text.size());
  out.commit();
}

// Rank 0, in the background: every rank's status file, waited for up to
// `timeout`. Throws naming the first rank that failed or never reported.
std::vector<WrittenFile> wait_statuses(const std::string& staging, int64_t world,
                                       std::chrono::milliseconds timeout, const std::string& path) {
  std::vector<std::optional<WrittenFile>> files(world);
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  auto pause = std::chrono::microseconds(200);
  for (int64_t pending = world; pending > 0;) {
    pending = 0;
    for (int64_t r = 0; r < world; ++r) {
      if (files[r]) continue;
      const std::string file = detail::join_path(staging, status_file(r, world));
      std::ifstream in(file);
      if (!in) {
        ++pending;
        continue;
      }
      json status;
      try {
        status = json::parse(in);
      } catch (const json::exception& e) {
        TORCH_CHECK(false, kSdpCheckpointName, ": cannot save checkpoint '", path, "': rank ", r,
                    "'s status file '", file, "' is malformed: ", e.what());
      }
      TORCH_CHECK(status.value("ok", false), kSdpCheckpointName, ": cannot save checkpoint '", path,
                  "': rank ", r,
                  " could not write its shard: ", status.value("error", std::string("?")));
      files[r] = WrittenFile{status.at("size").get<int64_t>(), status.at("crc").get<uint32_t>()};
    }
    if (pending == 0) break;
    if (std::chrono::steady_clock::now() > deadline) {
      for (int64_t r = 0; r < world; ++r) {
        TORCH_CHECK(files[r].has_value(), kSdpCheckpointName, ": cannot save checkpoint '", path,
                    "': rank ", r, " did not report its shard written within ", timeout.count(),
                    " ms");
      }
    }
    std::this_thread::sleep_for(pause);
    pause = std::min<std::chrono::microseconds>(pause * 2, std::chrono::milliseconds(20));
  }
  std::vector<WrittenFile> out;
  out.reserve(files.size());
  for (auto& f : files) out.push_back(*f);
  return out;
}

}  // namespace

namespace {

std::string checked_optimizer_kind(const torch::optim::Optimizer& opt) {
  std::string kind = optimizer_kind(opt);
  TORCH_CHECK(!kind.empty() || opt.state().empty(), kSdpCheckpointName,
              ": cannot checkpoint this optimizer's state by shards (SGD, Adam, AdamW, FusedAdam, "
              "RMSprop and Adagrad can be)");
  return kind;
}

}  // namespace

void ShardedDataParallel::save_checkpoint(Checkpoint& checkpoint, const std::string& path) {
  auto& impl = *impl_;
  const int64_t rank = impl.rank(), world = impl.world();
  const std::string kind = checked_optimizer_kind(*impl.optimizer);
  const std::string staging = make_staging(impl, path);

  // 1. Every rank writes its file; every rank learns every rank's outcome.
  std::string error;
  ShardContents contents;
  WrittenFile written;
  try {
    contents = collect_shard(impl, [](const torch::Tensor& t) { return t; });
    written = write_shard(contents, staging, rank, world);
  } catch (const std::exception& e) {
    error = e.what();
  }
  // Row r: rank r's file size, CRC-32, and 1 when it failed.
  auto table = torch::zeros({world, 3}, torch::dtype(torch::kInt64).device(impl.pg->device()));
  table[rank].copy_(torch::tensor(
      {written.size, static_cast<int64_t>(written.crc), int64_t{error.empty() ? 0 : 1}}));
  impl.pg->allreduce_sum({table});
  table = table.cpu();
  for (int64_t r = 0; r < world; ++r) {
    if (table[r][2].item<int64_t>() == 0) continue;
    if (rank == 0) detail::remove_tree(staging);
    TORCH_CHECK(r != rank, kSdpCheckpointName, ": cannot save checkpoint '", path, "': rank ", rank,
                " could not write its shard: ", error, "; nothing was changed at '", path, "'");
    TORCH_CHECK(false, kSdpCheckpointName, ": cannot save checkpoint '", path, "': rank ", r,
                " could not write its shard (its log says why); nothing was changed at '", path,
                "'");
  }

  // 2. Rank 0 adds the files and the manifest, and saves atomically.
  bool failed = false;
  if (rank == 0) {
    try {
      put_manifest(impl, kind, contents, checkpoint);
      std::vector<WrittenFile> files;
      for (int64_t r = 0; r < world; ++r) {
        files.push_back(
            {table[r][0].item<int64_t>(), static_cast<uint32_t>(table[r][1].item<int64_t>())});
      }
      commit(checkpoint, staging, path, files);
    } catch (const std::exception& e) {
      error = e.what();
      failed = true;
    }
    detail::remove_tree(staging);
  }
  auto outcome =
      torch::full({1}, failed ? 1 : 0, torch::dtype(torch::kInt64).device(impl.pg->device()));
  impl.pg->broadcast({outcome}, 0);
  if (outcome.cpu().item<int64_t>() != 0) {
    TORCH_CHECK(rank != 0, error);
    TORCH_CHECK(false, kSdpCheckpointName, ": rank 0 could not save checkpoint '", path,
                "' (its log says why); nothing was changed at '", path, "'");
  }
}

void ShardedDataParallel::wait_checkpoint(AsyncCheckpointWriter& writer) {
  auto& impl = *impl_;
  std::string error;
  try {
    writer.wait();
  } catch (const std::exception& e) {
    error = detail::message_of(e);
  }
  const auto failed = flags_of_all(*impl.pg, !error.empty());
  TORCH_CHECK(error.empty(), error);  // this rank's own failure says the most
  std::string ranks;
  for (int64_t r = 0; r < impl.world(); ++r) {
    if (failed[r] != 0) ranks += (ranks.empty() ? "rank " : ", rank ") + std::to_string(r);
  }
  TORCH_CHECK(ranks.empty(), kSdpCheckpointName, ": a background checkpoint save failed on ", ranks,
              " (the logs there say why)");
}

void ShardedDataParallel::save_checkpoint_async(AsyncCheckpointWriter& writer,
                                                const std::string& path,
                                                const AsyncCheckpointWriter::Build& build,
                                                AsyncCheckpointWriter::AfterWrite after_write) {
  TORCH_CHECK(!path.empty(), kSdpCheckpointName,
              ": save_checkpoint_async needs a path, got an empty string");
  TORCH_CHECK(build, kSdpCheckpointName, ": save_checkpoint_async('", path,
              "') needs a build function");
  auto& impl = *impl_;
  const int64_t rank = impl.rank(), world = impl.world();
  const std::string kind = checked_optimizer_kind(*impl.optimizer);
  wait_checkpoint(writer);  // the previous save: done, or raised on every rank
  const std::string staging = make_staging(impl, path);
  // A rank's write may outlast a collective's timeout (a big shard, a slow
  // disk): rank 0 waits for the others' files at least 30 minutes.
  const auto timeout =
      std::max<std::chrono::milliseconds>(impl.pg->timeout(), std::chrono::minutes(30));
  try {
    writer.submit(
        path,
        [&](Checkpoint& checkpoint, detail::HostStaging& host) -> AsyncCheckpointWriter::Job {
          auto contents = std::make_shared<ShardContents>(
              collect_shard(impl, [&](const torch::Tensor& t) { return host.copy_compact(t); }));
          if (rank == 0) {
            build(checkpoint);
            put_manifest(impl, kind, *contents, checkpoint);
          }
          return [contents, staging, path, rank, world, timeout](Checkpoint& ckpt) {
            std::string error;
            WrittenFile written;
            try {
              written = write_shard(*contents, staging, rank, world);
            } catch (const std::exception& e) {
              error = detail::message_of(e);
            }
            write_status(staging, rank, world, written, error);
            if (!error.empty() && rank == 0) detail::remove_tree(staging);
            TORCH_CHECK(error.empty(), kSdpCheckpointName, ": cannot save checkpoint '", path,
                        "': rank ", rank, " could not write its shard: ", error);
            if (rank != 0) return;
            try {
              commit(ckpt, staging, path, wait_statuses(staging, world, timeout, path));
            } catch (...) {
              detail::remove_tree(staging);
              throw;
            }
            detail::remove_tree(staging);
          };
        },
        std::move(after_write));
  } catch (...) {
    if (rank == 0) detail::remove_tree(staging);
    throw;
  }
}

void ShardedDataParallel::load_checkpoint(const Checkpoint& checkpoint) {
  auto& impl = *impl_;
  auto& opt = *impl.optimizer;
  const SavedLayout layout = parse_manifest(checkpoint);
  // The same trainable parameters, by name and shape.
  for (const auto& p : impl.params) {
    auto it = layout.params.find(p.name);
    TORCH_CHECK(it != layout.params.end(), kSdpCheckpointName, ": checkpoint ", checkpoint.path(),
                " has no parameter '", p.name, "'");
    TORCH_CHECK(it->second.shape == p.shape, kSdpCheckpointName, ": checkpoint ", checkpoint.path(),
                ": parameter '", p.name, "' has shape ", c10::IntArrayRef(it->second.shape),
                " there but ", c10::IntArrayRef(p.shape), " in the module");
  }
  TORCH_CHECK(layout.params.size() == impl.params.size(), kSdpCheckpointName, ": checkpoint ",
              checkpoint.path(), " has ", layout.params.size(),
              " trainable parameters, the module ", impl.params.size());
  const std::string kind = optimizer_kind(opt);
  TORCH_CHECK(layout.optimizer.empty() || layout.optimizer == kind, kSdpCheckpointName,
              ": checkpoint ", checkpoint.path(), " holds the state of a ", layout.optimizer,
              " optimizer, not of this ", kind.empty() ? "unknown kind" : kind);

  PartReader reader(checkpoint, layout);
  std::lock_guard<std::mutex> lock(impl.mutex);
  torch::NoGradGuard no_grad;
  opt.state().clear();
  for (auto& unit : impl.units) {
    const int64_t begin = impl.rank() * unit.shard_numel;
    for (size_t i : unit.params) {
      const auto& p = impl.params[i];
      const int64_t a = std::max(begin, p.offset);
      const int64_t b = std::min(begin + unit.shard_numel, p.offset + p.numel);
      if (b <= a) continue;
      reader.read("p", "param", p.name, a - p.offset, b - p.offset,
                  unit.shard.narrow(0, a - begin, b - a));
    }
    if (layout.optimizer.empty()) continue;
    for (auto& piece : unit.pieces) {
      Fields fields;
      for (const auto& name : layout.elementwise) {
        fields.elementwise[name] = torch::zeros({piece.numel}, piece.tensor.options());
      }
      const int64_t lo = begin + piece.offset, hi = lo + piece.numel;
      bool first = true;
      for (size_t i : unit.params) {
        const auto& p = impl.params[i];
        const int64_t a = std::max(lo, p.offset), b = std::min(hi, p.offset + p.numel);
        if (b <= a) continue;
        for (auto& [name, t] : fields.elementwise) {
          reader.read("s", name, p.name, a - p.offset, b - p.offset, t.narrow(0, a - lo, b - a));
        }
        for (const auto& name : layout.scalars) {
          auto value = reader.scalar(name, p.name, a - p.offset);
          if (first) {
            fields.scalars[name] = value.clone();
          } else {
            TORCH_CHECK(torch::equal(fields.scalars[name], value), kSdpCheckpointName,
                        ": checkpoint ", checkpoint.path(), ": the optimizer's ", name,
                        " differs between parameters that now share a shard ('", p.name,
                        "'); it cannot be resharded");
          }
        }
        first = false;
      }
      opt.state()[piece.tensor.unsafeGetTensorImpl()] = from_fields(layout.optimizer, fields);
    }
  }
  // Every rank restores the same group options, buffers and frozen parameters.
  checkpoint.get(kGroupsSection, [&](torch::serialize::InputArchive& archive) {
    c10::IValue count;
    archive.read("count", count);
    TORCH_CHECK(count.toInt() == static_cast<int64_t>(opt.param_groups().size()),
                kSdpCheckpointName, ": checkpoint ", checkpoint.path(), " has ", count.toInt(),
                " optimizer parameter groups, the optimizer ", opt.param_groups().size());
    for (size_t g = 0; g < opt.param_groups().size(); ++g) {
      torch::serialize::InputArchive group;
      archive.read("group" + std::to_string(g), group);
      opt.param_groups()[g].options().serialize(group);
    }
  });
  for (const auto& [name, t] : unsharded_state(*impl.module)) {
    t.detach().copy_(reader.tensor(0, "b/" + name));
  }
  // The module's parameters follow the shards at the next gather.
  impl.stale_params = true;
  impl.stale_grads = false;
  for (auto& p : impl.params) p.tensor.mutable_grad().reset();
  if (impl.full()) {
    impl.pinned = false;
    for (size_t u = 0; u < impl.units.size(); ++u) impl.release(u);
  }
}

namespace {

// The whole model of a sharded checkpoint: parameters, then buffers.
NamedTensors assemble(const Checkpoint& ckpt) {
  const SavedLayout layout = parse_manifest(ckpt);
  PartReader reader(ckpt, layout);
  NamedTensors tensors;
  for (const auto& name : layout.params_in_order) {
    const auto& sp = layout.params.at(name);
    auto first =
        reader.tensor(sp.parts.front().rank, part_key("p", "param", name, sp.parts.front().start));
    auto whole = torch::empty({sp.numel}, first.options());
    reader.read("p", "param", name, 0, sp.numel, whole);
    tensors.emplace_back(name, whole.view(sp.shape));
  }
  for (const auto& name : layout.buffers) tensors.emplace_back(name, reader.tensor(0, "b/" + name));
  return tensors;
}

}  // namespace

void consolidate_sharded_checkpoint(const std::string& checkpoint_path,
                                    const std::string& safetensors_path) {
  save_safetensors(safetensors_path, assemble(Checkpoint::load(checkpoint_path)),
                   {{"source", "wick sharded checkpoint " + checkpoint_path}});
}

void restore_module_from_sharded_checkpoint(const Checkpoint& checkpoint,
                                            torch::nn::Module& module) {
  const auto tensors = assemble(checkpoint);
  detail::restore_module_state(module, {tensors.begin(), tensors.end()},
                               c10::str("sharded checkpoint '", checkpoint.path(), "'"),
                               "the checkpoint");
}

}  // namespace wick
