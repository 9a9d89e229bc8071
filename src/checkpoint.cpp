#include "wick/checkpoint.h"

#include "checkpoint_internal.h"
#include "format.h"  // first: it sets fmt's namespace
#include "fs.h"
#include "host_snapshot.h"
#include "module_state.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <c10/util/Exception.h>
#include <fcntl.h>
#include <limits.h>  // NOLINT(modernize-deprecated-headers): POSIX PATH_MAX, not in <climits>
#include <signal.h>  // NOLINT(modernize-deprecated-headers): POSIX kill(), not in <csignal>
#include <sys/stat.h>
#include <torch/version.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <limits>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <system_error>
#include <tuple>
#include <utility>

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace wick {

namespace {

constexpr int kFormatVersion = 1;
constexpr const char* kFormatName = "wick-checkpoint";
constexpr const char* kMetaFile = "meta.json";
constexpr const char* kRngSection = "rng_state";

// ---------------------------------------------------------------- errors

using detail::errno_text;

[[noreturn]] void fail(const std::string& msg) { C10_THROW_ERROR(Error, msg); }

[[noreturn]] void fail_errno(const std::string& what, const fs::path& p, int err) {
  detail::fail_errno("Checkpoint", what, p.string(), err);
}

std::string where(const std::string& path) { return path.empty() ? "<in memory>" : path; }

using detail::message_of;

// ---------------------------------------------------------------- names

void check_section_name(const std::string& name) {
  bool ok = !name.empty() && name.size() <= 128 && name[0] != '.' && name[0] != '-';
  for (char c : name) {
    ok = ok && ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                c == '_' || c == '-' || c == '.');
  }
  TORCH_CHECK(ok,
              "Checkpoint: section name must be 1-128 characters of [A-Za-z0-9_.-] not starting "
              "with '.' or '-' (it names the file <section>.pt), got '",
              name, "'");
}

// Temporary directories beside a checkpoint: ".<name>.tmp-<host>-<pid>-<hex>".
// The host and pid let prune_checkpoints() tell a leftover of a dead writer
// from a save in progress.
std::string this_host() {
  char buf[256] = {0};
  if (::gethostname(buf, sizeof(buf) - 1) != 0) return "unknown";
  std::string h(buf);
  for (char& c : h) {
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-'))
      c = '_';
  }
  return h.empty() ? "unknown" : h;
}

std::string random_hex() {
  static thread_local std::mt19937_64 gen{std::random_device{}() ^
                                          (static_cast<uint64_t>(::getpid()) << 32)};
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(gen()));
  return buf;
}

std::string temp_name(const std::string& target_name) {
  return c10::str(".", target_name, ".tmp-", this_host(), "-", ::getpid(), "-", random_hex());
}

struct TempInfo {
  std::string host;
  long pid = 0;
};

// Parses ".<anything>.tmp-<host>-<pid>-<16 hex>"; nullopt when `name` is not one.
std::optional<TempInfo> parse_temp_name(const std::string& name) {
  if (name.size() < 2 || name[0] != '.') return std::nullopt;
  const auto tmp = name.rfind(".tmp-");
  if (tmp == std::string::npos || tmp == 0) return std::nullopt;
  const std::string rest = name.substr(tmp + 5);  // <host>-<pid>-<hex>
  const auto dash_hex = rest.rfind('-');
  if (dash_hex == std::string::npos || rest.size() - dash_hex - 1 != 16) return std::nullopt;
  for (size_t i = dash_hex + 1; i < rest.size(); ++i) {
    if (!std::isxdigit(static_cast<unsigned char>(rest[i]))) return std::nullopt;
  }
  const auto dash_pid = rest.rfind('-', dash_hex - 1);
  if (dash_pid == std::string::npos || dash_pid == 0 || dash_pid + 1 == dash_hex)
    return std::nullopt;
  const std::string pid = rest.substr(dash_pid + 1, dash_hex - dash_pid - 1);
  if (pid.size() > 10 || !std::all_of(pid.begin(), pid.end(), [](char c) {
        return std::isdigit(static_cast<unsigned char>(c)) != 0;
      })) {
    return std::nullopt;
  }
  return TempInfo{rest.substr(0, dash_pid), std::stol(pid)};
}

// Parses "step-<digits>"; nullopt otherwise.
std::optional<int64_t> parse_checkpoint_name(const std::string& name) {
  if (name.size() < 6 || name.size() > 5 + 18 || name.compare(0, 5, "step-") != 0)
    return std::nullopt;
  for (size_t i = 5; i < name.size(); ++i) {
    if (!std::isdigit(static_cast<unsigned char>(name[i]))) return std::nullopt;
  }
  const int64_t step = std::stoll(name.substr(5));
  // Only the spelling checkpoint_name() gives: "step-7" or "step-000000007" are not ours.
  if (name != checkpoint_name(step)) return std::nullopt;
  return step;
}

// ---------------------------------------------------------------- files

using detail::Fd;

uint32_t crc32_of(const std::string& data) {
  uLong crc = ::crc32(0L, Z_NULL, 0);
  const auto* p = reinterpret_cast<const Bytef*>(data.data());
  size_t left = data.size();
  while (left > 0) {
    const uInt n = static_cast<uInt>(std::min<size_t>(left, 1u << 30));
    crc = ::crc32(crc, p, n);
    p += n;
    left -= n;
  }
  return static_cast<uint32_t>(crc);
}

std::string crc_hex(uint32_t crc) { return fmt::format("{:08x}", crc); }

// Creates `p` (which must not exist), writes `data`, fsyncs and closes it.
void write_file_synced(const fs::path& p, const std::string& data) {
  Fd fd(::open(p.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644));
  if (fd.get() < 0) fail_errno("cannot create", p, errno);
  detail::write_all(fd.get(), data.data(), data.size(), "Checkpoint", p.string());
  if (::fsync(fd.get()) != 0) fail_errno("cannot fsync", p, errno);
  if (int err = fd.close()) fail_errno("cannot close", p, err);
}

// Creates `p` (which must not exist), streams the archive `write` fills into
// it, fsyncs and closes it; returns its size and CRC-32. The archive's bytes
// are never held in memory whole: each record (a tensor's storage) goes from
// its tensor to the file.
std::pair<uint64_t, uint32_t> stream_file_synced(
    const fs::path& p, const std::function<void(torch::serialize::OutputArchive&)>& write) {
  Fd fd(::open(p.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644));
  if (fd.get() < 0) fail_errno("cannot create", p, errno);
  torch::serialize::OutputArchive archive;
  write(archive);
  uint64_t size = 0;
  uLong crc = ::crc32(0L, Z_NULL, 0);
  std::string write_error;
  archive.save_to([&](const void* buf, size_t n) -> size_t {
    // Called from within torch's zip writer: after a failed write the rest is
    // only counted, never thrown through it or reported to it as a short
    // write (its destructor would then fail again while unwinding).
    if (!write_error.empty()) return n;
    const auto* data = static_cast<const char*>(buf);
    for (size_t off = 0; off < n;) {
      const ssize_t w = ::write(fd.get(), data + off, std::min<size_t>(n - off, size_t{1} << 30));
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) {
        write_error = c10::str(
            "Checkpoint: cannot write '", p.string(), "' (after ", size + off,
            " bytes): ", w < 0 ? errno_text(errno) : std::string("the write made no progress"));
        return n;
      }
      off += static_cast<size_t>(w);
    }
    const auto* bytes = static_cast<const Bytef*>(buf);
    for (size_t left = n; left > 0;) {
      const uInt chunk = static_cast<uInt>(std::min<size_t>(left, 1u << 30));
      crc = ::crc32(crc, bytes, chunk);
      bytes += chunk;
      left -= chunk;
    }
    size += n;
    return n;
  });
  if (!write_error.empty()) fail(write_error);
  if (::fsync(fd.get()) != 0) fail_errno("cannot fsync", p, errno);
  if (int err = fd.close()) fail_errno("cannot close", p, err);
  return {size, static_cast<uint32_t>(crc)};
}

void fsync_dir(const fs::path& p) { detail::fsync_dir(p.string(), "Checkpoint"); }

// Reads the whole of `p`, checking first that it holds `expected_size` bytes
// (when given). Throws naming `p`.
std::string read_file(const fs::path& p, std::optional<uint64_t> expected_size,
                      const char* missing_what) {
  Fd fd(::open(p.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) {
    const int err = errno;
    if (err == ENOENT) {
      fail(c10::str("Checkpoint: ", missing_what, " '", p.string(),
                    "' is missing: ", errno_text(err)));
    }
    fail_errno("cannot open", p, err);
  }
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) fail_errno("cannot stat", p, errno);
  if (!S_ISREG(st.st_mode)) fail(c10::str("Checkpoint: '", p.string(), "' is not a regular file"));
  const auto size = static_cast<uint64_t>(st.st_size);
  if (expected_size && size != *expected_size) {
    fail(c10::str("Checkpoint: '", p.string(), "' has ", size, " bytes but meta.json records ",
                  *expected_size, " (",
                  size < *expected_size ? "truncated" : "overwritten or appended to", ")"));
  }
  std::string data(size, '\0');
  size_t off = 0;
  while (off < size) {
    const ssize_t r = ::read(fd.get(), data.data() + off, std::min<size_t>(size - off, 1u << 30));
    if (r < 0) {
      if (errno == EINTR) continue;
      fail_errno("cannot read", p, errno);
    }
    if (r == 0) {
      fail(c10::str("Checkpoint: '", p.string(), "' ended after ", off, " of ", size,
                    " bytes (truncated while reading)"));
    }
    off += static_cast<size_t>(r);
  }
  return data;
}

// File system operations through src/fs.h (POSIX, not std::filesystem; see there).

using Kind = detail::PathKind;
Kind kind_of(const fs::path& p) { return detail::path_kind(p.string(), "Checkpoint"); }
std::vector<std::string> list_dir(const fs::path& p) {
  return detail::list_dir(p.string(), "Checkpoint");
}
// mkdir -p, fsyncing the parent of every directory it creates.
void make_directories(const fs::path& p) {
  detail::make_directories(p.string(), "Checkpoint", true);
}
int remove_tree(const fs::path& p) { return detail::remove_tree(p.string()); }

// `p` made absolute with symlinks resolved where it exists, else lexically.
fs::path normalized(const fs::path& p) {
  char buf[PATH_MAX];
  if (::realpath(p.c_str(), buf) != nullptr) return fs::path(buf);
  fs::path abs = p;
  if (p.is_relative() && ::getcwd(buf, sizeof(buf)) != nullptr) abs = fs::path(buf) / p;
  return abs.lexically_normal();
}

// ---------------------------------------------------------------- archives

std::string to_bytes(torch::serialize::OutputArchive& archive) {
  std::string bytes;
  archive.save_to([&bytes](const void* buf, size_t n) -> size_t {
    bytes.append(static_cast<const char*>(buf), n);
    return n;
  });
  return bytes;
}

// The layout of torch::nn::Module::save: own parameters and buffers by their
// local names, children as nested archives. torch::load(module, "<section>.pt")
// reads it too.
void write_module(torch::serialize::OutputArchive& archive, const torch::nn::Module& module) {
  for (const auto& p : module.named_parameters(/*recurse=*/false)) {
    if (p.value().defined()) archive.write(p.key(), p.value().detach());
  }
  for (const auto& b : module.named_buffers(/*recurse=*/false)) {
    if (b.value().defined()) archive.write(b.key(), b.value().detach(), /*is_buffer=*/true);
  }
  for (const auto& child : module.named_children()) {
    torch::serialize::OutputArchive child_archive(archive.compilation_unit());
    write_module(child_archive, *child.value());
    archive.write(child.key(), child_archive);
  }
}

// Every tensor in a module archive by dotted name.
void read_module(torch::serialize::InputArchive& archive, const std::string& prefix,
                 std::map<std::string, torch::Tensor>& out) {
  for (const auto& key : archive.keys()) {
    torch::Tensor t;
    if (archive.try_read(key, t)) {
      out[prefix + key] = t;
      continue;
    }
    torch::serialize::InputArchive child;
    if (archive.try_read(key, child)) read_module(child, prefix + key + ".", out);
  }
}

}  // namespace

// ---------------------------------------------------------------- Checkpoint

std::string detail::checkpoint_temp_name(const std::string& target_name) {
  return temp_name(target_name);
}

struct Checkpoint::Section {
  std::string kind;   // "module", "optimizer", "archive", "rng"
  std::string bytes;  // the serialized torch archive, exactly as in <section>.pt
  // Instead of `bytes`, in a host snapshot: the host copies, serialized by save().
  std::shared_ptr<const detail::SectionSnapshot> snapshot;
};

struct Checkpoint::File {
  std::string source;  // before save(): where the file is
  uint64_t size = 0;
  std::string crc32;
  mutable bool verified = false;  // after load(): file_path() checked it
};

std::string crc32_hex(const void* data, size_t size) {
  uLong crc = ::crc32(0L, Z_NULL, 0);
  const auto* p = static_cast<const Bytef*>(data);
  while (size > 0) {
    const uInt n = static_cast<uInt>(std::min<size_t>(size, 1u << 30));
    crc = ::crc32(crc, p, n);
    p += n;
    size -= n;
  }
  return crc_hex(static_cast<uint32_t>(crc));
}

void Checkpoint::put_file(const std::string& name, const std::string& source, uint64_t size,
                          const std::string& crc32_hex) {
  check_section_name(name);
  TORCH_CHECK(sections_.count(name) == 0, "Checkpoint: '", name, "' is already a section");
  TORCH_CHECK(kind_of(source) == Kind::kRegular, "Checkpoint: put_file('", name, "'): '", source,
              "' is not a regular file");
  files_[name] = std::make_unique<File>(File{source, size, crc32_hex, false});
}

bool Checkpoint::has_file(const std::string& name) const { return files_.count(name) != 0; }

std::string Checkpoint::file_path(const std::string& name) const {
  auto it = files_.find(name);
  TORCH_CHECK(it != files_.end(), "Checkpoint: ", where(path_), " has no file '", name, "'");
  const fs::path file = fs::path(path_) / (name + ".bin");
  if (!it->second->verified) {
    const std::string bytes = read_file(file, it->second->size, "file");
    const std::string actual = crc_hex(crc32_of(bytes));
    if (actual != it->second->crc32) {
      fail(c10::str("Checkpoint: '", file.string(), "' is corrupted: its CRC-32 is ", actual,
                    " but meta.json records ", it->second->crc32));
    }
    it->second->verified = true;
  }
  return file.string();
}

namespace {

// The section's serialized archive: its bytes, or a host snapshot's archive
// serialized now into `scratch`. (A template only to name the private Section.)
template <typename S>
const std::string& archive_bytes(const S& s, std::string& scratch) {
  if (!s.snapshot) return s.bytes;
  torch::serialize::OutputArchive archive;
  s.snapshot->write(archive);
  scratch = to_bytes(archive);
  return scratch;
}

}  // namespace

Checkpoint::Checkpoint() = default;
Checkpoint::~Checkpoint() = default;
Checkpoint::Checkpoint(Checkpoint&&) noexcept = default;
Checkpoint& Checkpoint::operator=(Checkpoint&&) noexcept = default;

Checkpoint Checkpoint::host_snapshot() {
  return host_snapshot(std::make_shared<detail::HostStaging>(/*reuse=*/false));
}

Checkpoint Checkpoint::host_snapshot(std::shared_ptr<detail::HostStaging> staging) {
  TORCH_INTERNAL_ASSERT(staging != nullptr);
  Checkpoint ckpt;
  ckpt.host_snapshot_ = true;
  ckpt.staging_ = std::move(staging);
  return ckpt;
}

void Checkpoint::put_module(const std::string& section, const torch::nn::Module& module) {
  check_section_name(section);
  TORCH_CHECK(section != kRngSection, "Checkpoint: section name '", section,
              "' is reserved for put_rng_state()");
  if (host_snapshot_) {
    auto snapshot = detail::snapshot_module(module, *staging_);
    sections_[section] = std::make_unique<Section>(Section{"module", {}, std::move(snapshot)});
    return;
  }
  torch::serialize::OutputArchive archive;
  write_module(archive, module);
  sections_[section] = std::make_unique<Section>(Section{"module", to_bytes(archive), nullptr});
}

void Checkpoint::put_optimizer(const std::string& section,
                               const torch::optim::Optimizer& optimizer) {
  check_section_name(section);
  TORCH_CHECK(section != kRngSection, "Checkpoint: section name '", section,
              "' is reserved for put_rng_state()");
  if (host_snapshot_) {
    if (auto snapshot = detail::snapshot_optimizer(optimizer, *staging_)) {
      sections_[section] = std::make_unique<Section>(Section{"optimizer", {}, std::move(snapshot)});
      return;
    }
    // An optimizer type whose state wick cannot copy: serialized now.
  }
  torch::serialize::OutputArchive archive;
  optimizer.save(archive);
  sections_[section] = std::make_unique<Section>(Section{"optimizer", to_bytes(archive), nullptr});
}

void Checkpoint::put(const std::string& section, const Writer& write) {
  check_section_name(section);
  TORCH_CHECK(section != kRngSection, "Checkpoint: section name '", section,
              "' is reserved for put_rng_state()");
  TORCH_CHECK(write, "Checkpoint: put('", section, "') needs a writer function");
  torch::serialize::OutputArchive archive;
  write(archive);
  sections_[section] = std::make_unique<Section>(Section{"archive", to_bytes(archive), nullptr});
}

void Checkpoint::put_rng_state() {
  torch::serialize::OutputArchive archive;
  {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    archive.write("cpu", gen.get_state());
  }
  int64_t cuda_devices = 0;
  if (torch::cuda::is_available()) {
    // NOLINTNEXTLINE(bugprone-signed-char-misuse): c10::DeviceIndex (int8_t) is a count here
    cuda_devices = static_cast<int64_t>(torch::cuda::device_count());
    for (int64_t i = 0; i < cuda_devices; ++i) {
      auto gen = at::globalContext().defaultGenerator(
          c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(i)));
      std::lock_guard<std::mutex> lock(gen.mutex());
      archive.write("cuda/" + std::to_string(i), gen.get_state());
    }
  }
  archive.write("cuda/count", torch::tensor(cuda_devices));
  sections_[kRngSection] = std::make_unique<Section>(Section{"rng", to_bytes(archive), nullptr});
}

void Checkpoint::save(const std::string& path) const {
  TORCH_CHECK(!path.empty(), "Checkpoint: save() needs a path, got an empty string");
  fs::path target = fs::path(path).lexically_normal();
  if (!target.has_filename()) target = target.parent_path();  // "dir/" -> "dir"
  const std::string name = target.filename().string();
  TORCH_CHECK(!name.empty() && name != "." && name != "..",
              "Checkpoint: save() needs a path that ends in a directory name, got '", path, "'");
  fs::path parent = target.parent_path();
  if (parent.empty()) parent = ".";

  // The parent may not exist yet on the first save of a run.
  make_directories(parent);

  // Refuse to replace something that is not a checkpoint: a mistyped path must
  // not delete a run directory.
  const Kind target_kind = kind_of(target);
  const bool exists = target_kind != Kind::kMissing;
  if (exists) {
    TORCH_CHECK(target_kind == Kind::kDirectory, "Checkpoint: cannot save to '", target.string(),
                "': it exists and is not a directory");
    const bool is_checkpoint = kind_of(target / kMetaFile) == Kind::kRegular;
    TORCH_CHECK(is_checkpoint || list_dir(target).empty(), "Checkpoint: refusing to replace '",
                target.string(), "': it is a non-empty directory without ", kMetaFile,
                ", so not a checkpoint");
  }

  // 1. Everything goes into a fresh temporary directory beside the target.
  fs::path tmp;
  for (int attempt = 0;; ++attempt) {
    tmp = parent / temp_name(name);
    if (::mkdir(tmp.c_str(), 0755) == 0) break;
    const int err = errno;
    if (err != EEXIST || attempt >= 8) {
      // Named like the write failures below: the checkpoint first, then the cause.
      fail(c10::str("Checkpoint: cannot save '", target.string(),
                    "': cannot create temporary directory '", tmp.string(), "': ",
                    detail::errno_text(err), "; nothing was changed at '", target.string(), "'"));
    }
  }
  auto remove_tmp = [&tmp] { remove_tree(tmp); };

  try {
    json sections = json::object();
    for (const auto& [section, s] : sections_) {
      const std::string file = section + ".pt";
      uint64_t size = s->bytes.size();
      uint32_t crc = 0;
      if (s->snapshot) {
        const auto& snapshot = *s->snapshot;
        std::tie(size, crc) = stream_file_synced(
            tmp / file,
            [&snapshot](torch::serialize::OutputArchive& archive) { snapshot.write(archive); });
      } else {
        write_file_synced(tmp / file, s->bytes);
        crc = crc32_of(s->bytes);
      }
      sections[section] = {
          {"file", file}, {"kind", s->kind}, {"size", size}, {"crc32", crc_hex(crc)}};
    }
    json files = json::object();
    for (const auto& [name, f] : files_) {
      const fs::path dest = tmp / (name + ".bin");
      if (::link(f->source.c_str(), dest.c_str()) != 0) {
        // Another file system: a copy, synced like the sections.
        write_file_synced(dest, read_file(f->source, f->size, "file"));
      }
      files[name] = {{"file", name + ".bin"}, {"size", f->size}, {"crc32", f->crc32}};
    }
    json meta = {
        {"format", kFormatName},
        {"format_version", kFormatVersion},
        {"torch_version", TORCH_VERSION},
        {"train_state",
         {{"step", train_state_.step},
          {"epoch", train_state_.epoch},
          {"batch_in_epoch", train_state_.batch_in_epoch},
          {"samples_seen", train_state_.samples_seen}}},
        {"fingerprint", fingerprint_},
        {"meta", meta_},
        {"sections", sections},
        {"files", files},
    };
    // meta.json last: a directory holding it holds every section.
    write_file_synced(tmp / kMetaFile, meta.dump(2) + "\n");
    fsync_dir(tmp);
  } catch (const c10::Error& e) {
    remove_tmp();
    std::string why = e.msg();
    if (why.rfind("Checkpoint: ", 0) == 0) why = why.substr(12);
    fail(c10::str("Checkpoint: cannot save '", target.string(), "': ", why,
                  "; nothing was changed at '", target.string(), "'"));
  } catch (...) {
    remove_tmp();
    throw;
  }

  // 2. Into place. The target path always holds one complete checkpoint (the
  // old or the new) when the file system can exchange two names atomically;
  // see docs/checkpoints.md for the fallback's crash window.
  if (!exists) {
    if (::rename(tmp.c_str(), target.c_str()) != 0) {
      const int err = errno;
      remove_tmp();
      fail(c10::str("Checkpoint: cannot rename '", tmp.string(), "' to '", target.string(),
                    "': ", errno_text(err)));
    }
  } else {
    bool swapped = false;
#ifdef RENAME_EXCHANGE
    if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, target.c_str(), RENAME_EXCHANGE) == 0) {
      swapped = true;  // tmp now holds the old checkpoint
    } else if (errno != EINVAL && errno != ENOSYS && errno != ENOTSUP) {
      const int err = errno;
      remove_tmp();
      fail(c10::str("Checkpoint: cannot exchange '", tmp.string(), "' with '", target.string(),
                    "': ", errno_text(err)));
    }
#endif
    if (!swapped) {
      // Old aside, new into place. A crash between the two renames leaves no
      // directory at `target` but both complete copies under temporary names.
      const fs::path old = parent / temp_name(name);
      if (::rename(target.c_str(), old.c_str()) != 0) {
        const int err = errno;
        remove_tmp();
        fail(c10::str("Checkpoint: cannot move the old checkpoint '", target.string(),
                      "' aside to '", old.string(), "': ", errno_text(err)));
      }
      if (::rename(tmp.c_str(), target.c_str()) != 0) {
        const int err = errno;
        ::rename(old.c_str(), target.c_str());  // put the old one back
        remove_tmp();
        fail(c10::str("Checkpoint: cannot rename '", tmp.string(), "' to '", target.string(),
                      "': ", errno_text(err)));
      }
      tmp = old;
    }
  }
  // 3. Make the rename durable, then drop the old checkpoint (now under tmp).
  fsync_dir(parent);
  if (exists) remove_tree(tmp);  // a leftover is a stale temp dir for prune_checkpoints()
}

Checkpoint Checkpoint::load(const std::string& path) {
  TORCH_CHECK(!path.empty(), "Checkpoint: load() needs a path, got an empty string");
  const fs::path dir(path);
  const Kind kind = kind_of(dir);
  TORCH_CHECK(kind != Kind::kMissing, "Checkpoint: cannot load '", path, "': no such directory");
  TORCH_CHECK(kind == Kind::kDirectory, "Checkpoint: cannot load '", path, "': not a directory");
  const fs::path meta_path = dir / kMetaFile;
  const std::string text = read_file(meta_path, std::nullopt, "metadata file");

  Checkpoint ckpt;
  ckpt.path_ = path;
  json meta;
  try {
    meta = json::parse(text);
  } catch (const json::exception& e) {
    fail(c10::str("Checkpoint: '", meta_path.string(), "' is not valid JSON: ", e.what()));
  }
  std::vector<std::pair<std::string, json>> section_entries;
  try {
    TORCH_CHECK(meta.is_object(), "Checkpoint: '", meta_path.string(), "' is not a JSON object");
    TORCH_CHECK(meta.value("format", std::string()) == kFormatName, "Checkpoint: '",
                meta_path.string(), "' is not a wick checkpoint (\"format\" is not \"", kFormatName,
                "\")");
    TORCH_CHECK(meta.contains("format_version") && meta["format_version"].is_number_integer(),
                "Checkpoint: '", meta_path.string(), "' has no integer format_version");
    const auto version = meta["format_version"].get<int64_t>();
    TORCH_CHECK(version == kFormatVersion, "Checkpoint: '", meta_path.string(),
                "' has unknown format version ", version, "; this build of wick reads version ",
                kFormatVersion);
    const auto& ts = meta.at("train_state");
    // Integers only, in [0, 2^63): nlohmann's get<int64_t>() would truncate 7.5,
    // wrap 2^64 - 1 to -1, and convert 1e300 with undefined behaviour (UBSan
    // under fuzz/checkpoint_fuzz.cpp); a negative step or epoch would only
    // fail later, inside the Trainer's resume.
    auto count = [&](const char* key) -> int64_t {
      const json& v = ts.at(key);
      TORCH_CHECK(
          v.is_number_unsigned() &&
              v.get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()),
          "Checkpoint: '", meta_path.string(), "' has train_state.", key, " = ", v.dump(),
          "; it must be an integer in [0, 2^63)");
      return v.get<int64_t>();
    };
    ckpt.train_state_.step = count("step");
    ckpt.train_state_.epoch = count("epoch");
    ckpt.train_state_.batch_in_epoch = count("batch_in_epoch");
    ckpt.train_state_.samples_seen = count("samples_seen");
    ckpt.fingerprint_ = meta.at("fingerprint").get<std::string>();
    ckpt.meta_ = meta.at("meta").get<std::map<std::string, std::string>>();
    for (const auto& [name, entry] : meta.at("sections").items())
      section_entries.emplace_back(name, entry);
    if (meta.contains("files")) {
      for (const auto& [name, entry] : meta.at("files").items()) {
        const json& size = entry.at("size");
        TORCH_CHECK(size.is_number_unsigned(), "Checkpoint: '", meta_path.string(),
                    "' has a malformed entry for file '", name, "': size = ", size.dump());
        check_section_name(name);
        ckpt.files_[name] = std::make_unique<File>(
            File{"", size.get<uint64_t>(), entry.at("crc32").get<std::string>(), false});
      }
    }
  } catch (const json::exception& e) {
    fail(c10::str("Checkpoint: '", meta_path.string(), "' is malformed: ", e.what()));
  }

  for (const auto& [name, entry] : section_entries) {
    try {
      check_section_name(name);
    } catch (const c10::Error&) {
      fail(c10::str("Checkpoint: '", meta_path.string(), "' lists an invalid section name '", name,
                    "'"));
    }
    uint64_t size = 0;
    std::string crc, kind;
    try {
      const json& size_json = entry.at("size");
      // get<uint64_t>() would wrap -1 and convert 1e300 with undefined behaviour.
      TORCH_CHECK(size_json.is_number_unsigned(), "Checkpoint: '", meta_path.string(),
                  "' has a malformed entry for section '", name, "': size = ", size_json.dump(),
                  "; it must be a non-negative integer");
      size = size_json.get<uint64_t>();
      crc = entry.at("crc32").get<std::string>();
      kind = entry.at("kind").get<std::string>();
    } catch (const json::exception& e) {
      fail(c10::str("Checkpoint: '", meta_path.string(), "' has a malformed entry for section '",
                    name, "': ", e.what()));
    }
    // The file name follows from the section name; meta.json's "file" is informative.
    const fs::path file = dir / (name + ".pt");
    std::string bytes = read_file(file, size, "section file");
    const std::string actual = crc_hex(crc32_of(bytes));
    if (actual != crc) {
      fail(c10::str("Checkpoint: '", file.string(), "' is corrupted: its CRC-32 is ", actual,
                    " but meta.json records ", crc));
    }
    ckpt.sections_[name] = std::make_unique<Section>(Section{kind, std::move(bytes), nullptr});
  }
  return ckpt;
}

bool Checkpoint::has(const std::string& section) const { return sections_.count(section) > 0; }

std::vector<std::string> Checkpoint::sections() const {
  std::vector<std::string> names;
  for (const auto& s : sections_) names.push_back(s.first);
  return names;
}

std::optional<std::string> Checkpoint::meta(const std::string& key) const {
  auto it = meta_.find(key);
  if (it == meta_.end()) return std::nullopt;
  return it->second;
}

void Checkpoint::restore_module(const std::string& section, torch::nn::Module& module) const {
  auto it = sections_.find(section);
  TORCH_CHECK(it != sections_.end(), "Checkpoint '", where(path_), "' has no section '", section,
              "'");
  std::string scratch;
  const auto& bytes = archive_bytes(*it->second, scratch);

  std::map<std::string, torch::Tensor> saved;
  try {
    torch::serialize::InputArchive archive;
    archive.load_from(bytes.data(), bytes.size(), torch::Device(torch::kCPU));
    read_module(archive, "", saved);
  } catch (const std::exception& e) {
    fail(c10::str("Checkpoint '", where(path_), "': cannot read section '", section,
                  "' as a module: ", message_of(e)));
  }

  detail::restore_module_state(module, saved,
                               c10::str("Checkpoint '", where(path_), "': section '", section, "'"),
                               "the checkpoint");
}

void Checkpoint::restore_optimizer(const std::string& section,
                                   torch::optim::Optimizer& optimizer) const {
  // Onto the parameters' device when they share one: a checkpoint saved from
  // another device (a GPU run resumed on the CPU, a host snapshot of GPU
  // state) then steps without moving anything.
  std::optional<torch::Device> device;
  bool one_device = true;
  for (const auto& group : optimizer.param_groups()) {
    for (const auto& p : group.params()) {
      if (!device) device = p.device();
      one_device = one_device && p.device() == *device;
    }
  }
  auto it = sections_.find(section);
  TORCH_CHECK(it != sections_.end(), "Checkpoint '", where(path_), "' has no section '", section,
              "'");
  std::string scratch;
  const auto& bytes = archive_bytes(*it->second, scratch);
  torch::serialize::InputArchive archive;
  try {
    if (device && one_device) {
      archive.load_from(bytes.data(), bytes.size(), *device);
    } else {
      archive.load_from(bytes.data(), bytes.size());
    }
    optimizer.load(archive);
  } catch (const std::exception& e) {
    fail(c10::str("Checkpoint '", where(path_), "': cannot restore section '", section,
                  "': ", message_of(e)));
  }
}

void Checkpoint::get(const std::string& section, const Reader& read) const {
  auto it = sections_.find(section);
  TORCH_CHECK(it != sections_.end(), "Checkpoint '", where(path_), "' has no section '", section,
              "'");
  TORCH_CHECK(read, "Checkpoint: get('", section, "') needs a reader function");
  std::string scratch;
  const auto& bytes = archive_bytes(*it->second, scratch);
  torch::serialize::InputArchive archive;
  try {
    archive.load_from(bytes.data(), bytes.size());
    read(archive);
  } catch (const std::exception& e) {
    fail(c10::str("Checkpoint '", where(path_), "': cannot restore section '", section,
                  "': ", message_of(e)));
  }
}

void Checkpoint::restore_rng_state() const {
  auto it = sections_.find(kRngSection);
  TORCH_CHECK(it != sections_.end() && it->second->kind == "rng", "Checkpoint '", where(path_),
              "' holds no RNG state (put_rng_state() was not called before saving)");
  const auto& bytes = it->second->bytes;  // never a host snapshot
  // Everything read from the archive is used inside the try, so a corrupt
  // section is one error naming the checkpoint rather than LibTorch's bare
  // message from item() (a count of 0 elements) or set_state() (a wrong size).
  try {
    torch::serialize::InputArchive archive;
    torch::Tensor cpu_state, count;
    archive.load_from(bytes.data(), bytes.size(), torch::Device(torch::kCPU));
    archive.read("cpu", cpu_state);
    archive.read("cuda/count", count);
    TORCH_CHECK(count.numel() == 1 && !count.is_floating_point() && !count.is_complex(),
                "cuda/count must be one integer, got a ", count.scalar_type(), " tensor of shape ",
                count.sizes());
    const int64_t saved_devices = count.item<int64_t>();
    {
      auto gen = at::detail::getDefaultCPUGenerator();
      std::lock_guard<std::mutex> lock(gen.mutex());
      gen.set_state(cpu_state);
    }
    if (saved_devices > 0 && torch::cuda::is_available()) {
      // Devices this machine has beyond the saved ones keep their state; saved
      // ones it lacks are ignored.
      const int64_t n = std::min<int64_t>(saved_devices, torch::cuda::device_count());
      for (int64_t i = 0; i < n; ++i) {
        torch::Tensor state;
        archive.read("cuda/" + std::to_string(i), state);
        auto gen = at::globalContext().defaultGenerator(
            c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(i)));
        std::lock_guard<std::mutex> lock(gen.mutex());
        gen.set_state(state);
      }
    }
  } catch (const std::exception& e) {
    fail(c10::str("Checkpoint '", where(path_), "': cannot read the RNG state: ", message_of(e)));
  }
}

// ---------------------------------------------------------------- directories

std::string checkpoint_name(int64_t step) {
  TORCH_CHECK(step >= 0, "checkpoint_name: step must be >= 0, got ", step);
  char buf[32];
  std::snprintf(buf, sizeof(buf), "step-%08lld", static_cast<long long>(step));
  return buf;
}

namespace {

struct Listed {
  int64_t step;
  fs::path path;
};

std::vector<Listed> list_sorted(const fs::path& dir) {
  std::vector<Listed> found;
  const Kind kind = kind_of(dir);
  if (kind == Kind::kMissing) return found;  // no checkpoint written yet
  TORCH_CHECK(kind == Kind::kDirectory, "Checkpoint: cannot list checkpoints in '", dir.string(),
              "': not a directory");
  for (const auto& name : list_dir(dir)) {
    const auto step = parse_checkpoint_name(name);
    if (!step || kind_of(dir / name) != Kind::kDirectory) continue;
    if (kind_of(dir / name / kMetaFile) != Kind::kRegular) continue;  // incomplete
    found.push_back({*step, dir / name});
  }
  std::sort(found.begin(), found.end(),
            [](const Listed& a, const Listed& b) { return a.step < b.step; });
  return found;
}

bool process_is_gone(long pid) {
  if (pid <= 0) return false;
  return ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH;
}

}  // namespace

std::vector<std::string> list_checkpoints(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& l : list_sorted(dir)) out.push_back(l.path.string());
  return out;
}

std::optional<std::string> latest_checkpoint(const std::string& dir) {
  auto all = list_sorted(dir);
  if (all.empty()) return std::nullopt;
  return all.back().path.string();
}

void prune_checkpoints(const std::string& dir, int64_t keep_last_k,
                       const std::vector<std::string>& keep) {
  const fs::path root(dir);
  std::vector<fs::path> doomed;

  const auto all = list_sorted(root);
  if (keep_last_k > 0 && static_cast<int64_t>(all.size()) > keep_last_k) {
    for (size_t i = 0; i < all.size() - static_cast<size_t>(keep_last_k); ++i) {
      const auto& p = all[i].path;
      const bool kept = std::any_of(keep.begin(), keep.end(), [&](const std::string& k) {
        const fs::path kp(k);
        return kp == p.filename() || normalized(kp) == normalized(p);
      });
      if (!kept) doomed.push_back(p);
    }
  }

  // Stale temporary directories: left by a writer on this host that no longer runs.
  if (kind_of(root) == Kind::kDirectory) {
    const std::string host = this_host();
    for (const auto& name : list_dir(root)) {
      const auto info = parse_temp_name(name);
      if (info && info->host == host && process_is_gone(info->pid) &&
          kind_of(root / name) == Kind::kDirectory) {
        doomed.push_back(root / name);
      }
    }
  }

  for (const auto& p : doomed) {
    // Rename first so a crash mid-delete leaves a temp dir, never a half-deleted
    // checkpoint that still has its meta.json.
    fs::path victim = p;
    if (parse_checkpoint_name(p.filename().string())) {
      const fs::path aside = p.parent_path() / temp_name(p.filename().string());
      if (::rename(p.c_str(), aside.c_str()) != 0) {
        fail_errno("cannot rename for deletion", p, errno);
      }
      victim = aside;
    }
    if (const int err = remove_tree(victim)) fail_errno("cannot delete", victim, err);
  }
}

}  // namespace wick
