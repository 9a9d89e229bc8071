#pragma once
// Private to wick: file-system helpers on POSIX calls.
//
// Not std::filesystem: the torch wheel's libtorch.so exports its own copies of
// many std::filesystem functions, built against another libstdc++, and they
// bind ahead of the system's (remove_all on a non-empty directory crashes).
// std::filesystem::path's lexical operations are safe; its operations on the
// file system are not. Errors throw c10::Error as "<who>: <what> '<path>': <reason>".

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

}  // namespace wick::detail
