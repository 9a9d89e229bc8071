#pragma once
// wick-fmnist's run directories: where a run's metrics, report and
// checkpoints go, chosen so a fresh run never meets another run's checkpoints.

#include <wick/distributed.h>

#include <string>

namespace fmnist {

struct RunDirs {
  std::string run_dir;         ///< metrics, report, trace, int8 model
  std::string checkpoint_dir;  ///< the Trainer's checkpoints
};

/// Chooses the run's directories (every rank gets the same ones).
///  - `run_dir_given` (--run-dir DIR): DIR itself.
///  - otherwise `run_dir` is a parent (runs/fmnist) and each fresh run gets its
///    own `<parent>/version_N`, N one past the highest there (Lightning's
///    version_N); `--resume latest` continues the newest version holding a
///    checkpoint.
/// `checkpoint_dir` ("" = <run dir>/checkpoints) is used as given. A fresh run
/// (`resume` empty) whose checkpoint directory already holds a checkpoint is
/// refused with an error naming it: its checkpoints would interleave with the
/// other run's, keep_last_k would delete theirs, and "latest" could be theirs.
RunDirs resolve_run_dirs(const std::string& run_dir, bool run_dir_given,
                         const std::string& checkpoint_dir, const std::string& resume,
                         wick::ProcessGroup& pg);

}  // namespace fmnist
