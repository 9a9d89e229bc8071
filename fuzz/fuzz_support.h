#pragma once
// Shared by the libFuzzer targets in fuzz/ (docs/fuzzing.md).
//
// What a target treats as fine: the parser returns, or throws c10::Error whose
// message names the component (e.g. "read_idx", "Checkpoint"). Everything else
// is a finding and aborts, so libFuzzer saves the input: any other exception
// (a std::exception from a library underneath leaking out), an error message
// that does not say who failed, a broken invariant on success, and what the
// sanitizers and libFuzzer catch themselves (memory errors, undefined
// behaviour, leaks, -timeout hangs, -malloc_limit_mb allocations).
//
// Files go into a scratch directory made with mkdtemp and removed with
// wick::detail::remove_tree (POSIX only; src/fs.h says why not std::filesystem).

#include "fs.h"

#include <c10/util/Exception.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace wick::fuzz {

[[noreturn]] inline void finding(const std::string& what) {
  std::fprintf(stderr, "\n==wick-fuzz== FINDING: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

inline void expect(bool ok, const std::string& what) {
  if (!ok) finding(what);
}

/// A directory under $TMPDIR (or /tmp) for the whole process, removed at exit;
/// fresh() empties and returns a sub-directory for one input.
class ScratchDir {
 public:
  ScratchDir() {
    const char* tmp = std::getenv("TMPDIR");
    std::string pattern = std::string(tmp && tmp[0] ? tmp : "/tmp") + "/wick-fuzz-XXXXXX";
    if (::mkdtemp(pattern.data()) == nullptr)
      finding("mkdtemp failed: " + std::string(std::strerror(errno)));
    root_ = pattern;
  }
  ~ScratchDir() { detail::remove_tree(root_); }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;

  /// An empty directory <root>/<name>.
  std::string fresh(const std::string& name = "in") {
    const std::string dir = root_ + "/" + name;
    if (int err = detail::remove_tree(dir))
      finding("cannot empty " + dir + ": " + detail::errno_text(err));
    if (::mkdir(dir.c_str(), 0755) != 0)
      finding("cannot create " + dir + ": " + detail::errno_text(errno));
    return dir;
  }
  const std::string& root() const { return root_; }

 private:
  std::string root_;
};

/// The process's scratch directory (destroyed at exit).
inline ScratchDir& scratch() {
  static ScratchDir dir;
  return dir;
}

inline void write_file(const std::string& path, const void* data, size_t size) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) finding("cannot create " + path + ": " + detail::errno_text(errno));
  const auto* p = static_cast<const char*>(data);
  size_t off = 0;
  while (off < size) {
    const ssize_t w = ::write(fd, p + off, size - off);
    if (w <= 0) finding("cannot write " + path + ": " + detail::errno_text(errno));
    off += static_cast<size_t>(w);
  }
  ::close(fd);
}

inline void write_file(const std::string& path, const std::string& data) {
  write_file(path, data.data(), data.size());
}

/// Runs `f`; returns true when it returned, false when it threw c10::Error
/// whose message contains `component`. Anything else is a finding.
template <typename F>
bool expect_clear_error(const char* component, F&& f) {
  try {
    f();
    return true;
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    if (msg.find(component) == std::string::npos)
      finding(std::string("c10::Error without the component '") + component +
              "' in its message: " + msg);
    return false;
  } catch (const std::exception& e) {
    finding(std::string("non-c10 exception (") + typeid(e).name() + ") escaped: " + e.what());
  } catch (...) {
    finding("an exception that is not a std::exception escaped");
  }
}

/// Once per process: one intra-op thread (libFuzzer runs inputs one at a time),
/// and the scratch directory made before the first input.
inline void init() {
  torch::set_num_threads(1);
  // LibTorch's TORCH_WARN (e.g. Adam's "old serialization format") would print
  // on most inputs; what matters here is what throws or crashes.
  struct Silent : c10::WarningHandler {
    void process(const c10::Warning&) override {}
  };
  static Silent silent;
  c10::WarningUtils::set_warning_handler(&silent);
  (void)scratch();
}

}  // namespace wick::fuzz
