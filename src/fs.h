#pragma once
// Private to wick: file-system helpers on POSIX calls.
//
// Not std::filesystem: the torch wheel's libtorch.so exports its own copies of
// many std::filesystem functions, built against another libstdc++, and they
// bind ahead of the system's (remove_all on a non-empty directory crashes).
// std::filesystem::path's lexical operations are safe; its operations on the
// file system are not. Errors throw c10::Error as "<who>: <what> '<path>': <reason>".

#include <cstddef>
#include <string>
#include <vector>

namespace wick::detail {

enum class PathKind { kMissing, kDirectory, kRegular, kOther };

/// strerror text with the number: "No space left on device (errno 28)".
std::string errno_text(int err);
/// Throws "<who>: <what> '<path>': <errno_text(err)>".
[[noreturn]] void fail_errno(const char* who, const std::string& what, const std::string& path,
                             int err);

/// What `path` is; a final symlink is followed only with `follow_symlinks`.
/// kMissing covers ENOENT and ENOTDIR (a parent is not a directory); other
/// errors throw.
PathKind path_kind(const std::string& path, const char* who, bool follow_symlinks = false);
/// Names in directory `path` (without "." and ".."), unsorted.
std::vector<std::string> list_dir(const std::string& path, const char* who);
/// mkdir -p. With `fsync_parents`, fsyncs the parent of each directory it
/// creates, so the new entries survive a crash.
void make_directories(const std::string& path, const char* who, bool fsync_parents = false);
/// fsync of a directory (its entries: created, renamed, removed files).
void fsync_dir(const std::string& path, const char* who);
/// rm -rf; returns 0 or the first errno met. A missing `path` is no error.
int remove_tree(const std::string& path);
/// `dir` + "/" + `name`, without doubling a trailing slash.
std::string join_path(const std::string& dir, const std::string& name);

/// An owned file descriptor, closed by the destructor.
class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd();
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  /// Closes and returns 0 or the errno (close can report a deferred write error).
  int close();

 private:
  int fd_;
};

/// Writes all `size` bytes to `fd` (retrying short writes and EINTR); throws
/// "<who>: cannot write '<path>' (after k of n bytes): <reason>".
void write_all(int fd, const void* data, size_t size, const char* who, const std::string& path);

/// A file that appears at `path` complete or not at all: written to a
/// temporary file beside it, fsynced, renamed over `path` by commit(), its
/// directory fsynced. Destroyed uncommitted (an error on the way), the
/// temporary file is removed and whatever was at `path` is untouched.
class AtomicFile {
 public:
  AtomicFile(std::string path, const char* who);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  void write(const void* data, size_t size);
  void commit();

 private:
  std::string path_, tmp_;
  const char* who_;
  Fd fd_;
};

}  // namespace wick::detail
