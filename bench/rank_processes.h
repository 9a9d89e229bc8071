#pragma once
// Multi-rank runs for wick-bench: a set of child processes with torchrun's
// variables for a Gloo group over 127.0.0.1, each writing its figures as JSON
// into a scratch folder that the parent reads. The children may be this
// binary (/proc/self/exe <subcommand> --rank-child ...) or a Python peer
// (python bench/peers/<peer>.py ...), so C++ and Python ranks are started,
// timed out and read the same way.
//
//   ScratchFolder dir("shard");
//   auto ranks = run_rank_processes({"/proc/self/exe", "shard", "--rank-child",
//                                    "--out-dir", dir.path}, 2, dir.path, 300, "wick zero1");
//   // ranks[r]: the JSON object rank r wrote to <dir>/rank<r>.json

#include "bench_common.h"

#include <string>
#include <vector>

namespace wick_bench {

/// A scratch folder under $TMPDIR (else /tmp), removed with its files.
/// (No std::filesystem: libtorch.so exports its own copies of some of its
/// functions, which crash when called.)
class ScratchFolder {
 public:
  explicit ScratchFolder(const std::string& tag);
  ~ScratchFolder();
  ScratchFolder(const ScratchFolder&) = delete;
  ScratchFolder& operator=(const ScratchFolder&) = delete;
  std::string path;
};

/// A TCP port on 127.0.0.1 that was free a moment ago.
int free_loopback_port();

/// The whole text of a file ("" when it cannot be read).
std::string read_text_file(const std::string& path);

/// Starts `world` processes running `argv` (argv[0] the program: a path, or a
/// name looked up in PATH), each with RANK, LOCAL_RANK, WORLD_SIZE,
/// LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT (a free port) and
/// OMP_NUM_THREADS=1, its stdout and stderr in <dir>/rank<r>.log. Waits up to
/// `timeout_s` seconds (then kills them), and returns what each rank wrote to
/// <dir>/rank<r>.json, by rank. Throws naming `what` with the logs of the
/// ranks that failed or wrote nothing. `group_of_one` false: a world of 1
/// runs without the torchrun variables (unset, so wick::init_process_group
/// makes no group), as a plain program would.
std::vector<Json> run_rank_processes(const std::vector<std::string>& argv, int world,
                                     const std::string& dir, int timeout_s, const std::string& what,
                                     bool group_of_one = true);

}  // namespace wick_bench
