#include "fs.h"

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <system_error>
#include <utility>

#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

namespace wick::detail {

std::string errno_text(int err) {
  return c10::str(std::error_code(err, std::generic_category()).message(), " (errno ", err, ")");
}

void fail_errno(const char* who, const std::string& what, const std::string& path, int err) {
  C10_THROW_ERROR(Error, c10::str(who, ": ", what, " '", path, "': ", errno_text(err)));
}

PathKind path_kind(const std::string& path, const char* who, bool follow_symlinks) {
  struct stat st {};
  if ((follow_symlinks ? ::stat(path.c_str(), &st) : ::lstat(path.c_str(), &st)) != 0) {
    const int err = errno;
    if (err == ENOENT || err == ENOTDIR) return PathKind::kMissing;
    fail_errno(who, "cannot stat", path, err);
  }
  if (S_ISDIR(st.st_mode)) return PathKind::kDirectory;
  if (S_ISREG(st.st_mode)) return PathKind::kRegular;
  return PathKind::kOther;
}

std::vector<std::string> list_dir(const std::string& path, const char* who) {
  DIR* d = ::opendir(path.c_str());
  if (d == nullptr) fail_errno(who, "cannot list directory", path, errno);
  std::vector<std::string> names;
  errno = 0;
  while (const dirent* e = ::readdir(d)) {
    const std::string n = e->d_name;
    if (n != "." && n != "..") names.push_back(n);
    errno = 0;
  }
  const int err = errno;
  ::closedir(d);
  if (err != 0) fail_errno(who, "cannot list directory", path, err);
  return names;
}

void fsync_dir(const std::string& path, const char* who) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) fail_errno(who, "cannot open directory", path, errno);
  const int r = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  // Some file systems cannot fsync a directory (EINVAL): nothing more to do there.
  if (r != 0 && err != EINVAL) fail_errno(who, "cannot fsync directory", path, err);
}

void make_directories(const std::string& path, const char* who, bool fsync_parents) {
  for (size_t end = 1; end <= path.size(); ++end) {
    if (end != path.size() && path[end] != '/') continue;
    const std::string prefix = path.substr(0, end);
    if (prefix.empty() || prefix.back() == '/' || prefix == "." || prefix == "..") continue;
    if (::mkdir(prefix.c_str(), 0755) == 0) {
      if (fsync_parents) {
        const auto slash = prefix.find_last_of('/');
        fsync_dir(slash == std::string::npos ? "."
                  : slash == 0               ? "/"
                                             : prefix.substr(0, slash),
                  who);
      }
      continue;
    }
    const int err = errno;
    if (err != EEXIST) fail_errno(who, "cannot create directory", prefix, err);
    struct stat st {};
    if (::stat(prefix.c_str(), &st) != 0) fail_errno(who, "cannot create directory", prefix, errno);
    if (!S_ISDIR(st.st_mode)) fail_errno(who, "cannot create directory", prefix, ENOTDIR);
  }
}

int remove_tree(const std::string& path) {
  const int r = ::nftw(
      path.c_str(),
      [](const char* f, const struct stat*, int, struct FTW*) {
        return ::remove(f) == 0 ? 0 : errno;
      },
      16, FTW_DEPTH | FTW_PHYS);
  if (r == -1) return errno == ENOENT ? 0 : errno;
  return r;
}

std::string join_path(const std::string& dir, const std::string& name) {
  if (dir.empty()) return name;
  return dir.back() == '/' ? dir + name : dir + "/" + name;
}

Fd::~Fd() {
  if (fd_ >= 0) ::close(fd_);
}

int Fd::close() {
  const int r = ::close(fd_);
  fd_ = -1;
  return r == 0 ? 0 : errno;
}

void write_all(int fd, const void* data, size_t size, const char* who, const std::string& path) {
  const auto* p = static_cast<const char*>(data);
  size_t off = 0;
  while (off < size) {
    const size_t n = std::min<size_t>(size - off, size_t{1} << 30);
    const ssize_t w = ::write(fd, p + off, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      C10_THROW_ERROR(Error, c10::str(who, ": cannot write '", path, "' (after ", off, " of ", size,
                                      " bytes): ", errno_text(errno)));
    }
    if (w == 0) {
      C10_THROW_ERROR(
          Error, c10::str(who, ": cannot write '", path, "': the write made no progress after ",
                          off, " of ", size, " bytes"));
    }
    off += static_cast<size_t>(w);
  }
}

namespace {
uint64_t next_temp_number() {
  static std::atomic<uint64_t> counter{0};
  return counter.fetch_add(1);
}

std::string parent_of(const std::string& path) {
  const auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

// The temporary file's name beside `path`, once `path` is known to name a file.
std::string temp_name_for(const std::string& path, const char* who) {
  TORCH_CHECK(!path.empty() && path.back() != '/', who, ": '", path, "' is not a file name");
  return c10::str(path, ".tmp-", ::getpid(), "-", next_temp_number());
}
}  // namespace

AtomicFile::AtomicFile(std::string path, const char* who)
    : path_(std::move(path)),
      tmp_(temp_name_for(path_, who)),
      who_(who),
      fd_(::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644)) {
  if (fd_.get() < 0) fail_errno(who_, "cannot create", tmp_, errno);
}

AtomicFile::~AtomicFile() {
  if (!tmp_.empty()) ::unlink(tmp_.c_str());
}

void AtomicFile::write(const void* data, size_t size) {
  TORCH_INTERNAL_ASSERT(!tmp_.empty(), "AtomicFile::write after commit");
  write_all(fd_.get(), data, size, who_, tmp_);
}

void AtomicFile::commit() {
  TORCH_INTERNAL_ASSERT(!tmp_.empty(), "AtomicFile::commit twice");
  if (::fsync(fd_.get()) != 0) fail_errno(who_, "cannot fsync", tmp_, errno);
  if (const int err = fd_.close()) fail_errno(who_, "cannot close", tmp_, err);
  if (::rename(tmp_.c_str(), path_.c_str()) != 0) {
    const int err = errno;
    fail_errno(who_, c10::str("cannot rename '", tmp_, "' to"), path_, err);
  }
  tmp_.clear();
  fsync_dir(parent_of(path_), who_);
}

}  // namespace wick::detail
