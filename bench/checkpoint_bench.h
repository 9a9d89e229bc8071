#pragma once
// What a checkpoint costs the training loop: a synchronous save
// (Checkpoint::save) against an asynchronous one (AsyncCheckpointWriter),
// of the same state, in the same run. `wick-bench checkpoint` measures it
// on a model and its Adam state; other subcommands (`wick-bench shard`)
// call measure_async_checkpoint on their own state.

#include "bench_common.h"

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace wick {
class AsyncCheckpointWriter;
class Checkpoint;
}  // namespace wick

namespace wick_bench {

struct AsyncCheckpointMeasureOptions {
  /// Directory the checkpoints are written under (each is deleted after its
  /// round, outside the timed parts). Created when missing.
  std::string dir = "/tmp";
  /// Timed rounds; each saves once synchronously and once asynchronously,
  /// the order alternating. One untimed round of each comes first.
  int rounds = 5;
  /// Run while the asynchronous write is in the background, as training
  /// would (e.g. an optimizer step that changes the state in place); its
  /// time is not counted. Default: nothing.
  std::function<void()> between;
};

/// Saves what `build` puts into a checkpoint synchronously and through an
/// AsyncCheckpointWriter (waiting for each write before the next round, so
/// the blocked time is the snapshot's alone) and returns, in ms and medians
/// over the rounds: sync_save_ms (build + Checkpoint::save: serialization,
/// write, fsyncs), async_blocked_ms (the caller's time in
/// AsyncCheckpointWriter::save), async_snapshot_ms (its build part),
/// async_write_ms (the background part), async_blocked_ratio =
/// async_blocked_ms / sync_save_ms, state_mb (the host snapshot's size),
/// checkpoint_mb (the files' size), each round's figures (runs_*), and
/// async_first_blocked_ms (the untimed first round: host buffers allocated).
/// rm -rf through libc (the torch wheel's std::filesystem is not safe to call).
void remove_tree(const std::string& path);

/// The figures of synchronous and asynchronous saves, round by round.
struct AsyncCheckpointRounds {
  std::vector<double> sync_ms, blocked_ms, snapshot_ms, write_ms;
  double first_blocked_ms = 0;  // the untimed first asynchronous save's
  int64_t snapshot_bytes = 0;
  /// Runs an untimed asynchronous save, an untimed synchronous one, then
  /// `rounds` timed pairs whose order alternates. `sync_save` returns its ms;
  /// `async_save` returns the ms it blocked, after which the save's write is
  /// waited for (untimed) and `writer`'s stats are read.
  void run(int rounds, const std::function<double()>& sync_save,
           const std::function<double()>& async_save, const wick::AsyncCheckpointWriter& writer);
};

Json measure_async_checkpoint(const std::function<void(wick::Checkpoint&)>& build,
                              const AsyncCheckpointMeasureOptions& options);

}  // namespace wick_bench
