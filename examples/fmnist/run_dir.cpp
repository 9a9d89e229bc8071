#include "run_dir.h"

#include <wick/checkpoint.h>

#include <torch/torch.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <system_error>

namespace fmnist {
namespace {

namespace fs = std::filesystem;

constexpr const char* kVersionPrefix = "version_";

// N of `name` = "version_N", or -1.
int64_t version_of(const std::string& name) {
  const std::string prefix = kVersionPrefix;
  if (name.size() <= prefix.size() || name.compare(0, prefix.size(), prefix) != 0) return -1;
  const std::string digits = name.substr(prefix.size());
  if (digits.find_first_not_of("0123456789") != std::string::npos || digits.size() > 9) return -1;
  return std::stoll(digits);
}

// The highest N of the version_N directories under `parent` (-1: none); with
// `with_checkpoint`, only those whose checkpoints/ holds a complete checkpoint.
int64_t highest_version(const fs::path& parent, bool with_checkpoint) {
  int64_t highest = -1;
  std::error_code ec;
  for (fs::directory_iterator it(parent, ec), end; !ec && it != end; it.increment(ec)) {
    const int64_t n = version_of(it->path().filename().string());
    if (n < 0 || !it->is_directory(ec)) continue;
    if (with_checkpoint && !wick::latest_checkpoint((it->path() / "checkpoints").string()))
      continue;
    highest = std::max(highest, n);
  }
  return highest;
}

}  // namespace

RunDirs resolve_run_dirs(const std::string& run_dir, bool run_dir_given,
                         const std::string& checkpoint_dir, const std::string& resume,
                         wick::ProcessGroup& pg) {
  RunDirs dirs;
  if (run_dir_given) {
    dirs.run_dir = run_dir;
  } else if (resume == "latest" && checkpoint_dir.empty()) {
    const int64_t n = highest_version(run_dir, /*with_checkpoint=*/true);
    TORCH_CHECK(n >= 0, "--resume latest: no run under ", run_dir,
                " (version_N/checkpoints) holds a checkpoint");
    dirs.run_dir = (fs::path(run_dir) / (kVersionPrefix + std::to_string(n))).string();
  } else {
    // Rank 0 chooses N and creates the directory; the others take its N, so
    // every rank of a data-parallel run agrees.
    auto n = torch::zeros({1}, torch::kFloat64);
    if (pg.is_main()) {
      int64_t next = highest_version(run_dir, /*with_checkpoint=*/false) + 1;
      std::error_code ec;
      fs::create_directories(run_dir, ec);
      // create_directory is false when another run took this N meanwhile.
      while (
          !fs::create_directory(fs::path(run_dir) / (kVersionPrefix + std::to_string(next)), ec)) {
        TORCH_CHECK(!ec, "cannot create a run directory under ", run_dir, ": ", ec.message());
        ++next;
      }
      n.fill_(static_cast<double>(next));
    }
    if (pg.world_size() > 1) pg.allreduce_sum({n});
    dirs.run_dir = (fs::path(run_dir) /
                    (kVersionPrefix + std::to_string(static_cast<int64_t>(n.item<double>()))))
                       .string();
  }
  dirs.checkpoint_dir = checkpoint_dir.empty() ? dirs.run_dir + "/checkpoints" : checkpoint_dir;
  if (resume.empty()) {
    const auto theirs = wick::latest_checkpoint(dirs.checkpoint_dir);
    TORCH_CHECK(!theirs.has_value(), dirs.checkpoint_dir,
                " already holds another run's checkpoints (newest ", *theirs,
                "); a fresh run there would mix its checkpoints with them. Pass --resume latest "
                "to continue that run, or another --run-dir / --checkpoint-dir (without "
                "--run-dir every run gets its own version_N directory)");
  }
  return dirs;
}

}  // namespace fmnist
