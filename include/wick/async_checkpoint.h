#pragma once
// Checkpoints written in the background: the caller's thread only copies the
// state to host memory; serialization and the atomic write run on a thread of
// the writer's own.
//
//   wick::AsyncCheckpointWriter writer;
//   for (int64_t step = 1; step <= steps; ++step) {
//     writer.check();                                  // a failed background save throws here
//     train_one_step();
//     if (step % 100 == 0) {
//       const std::string path = dir + "/" + wick::checkpoint_name(step);
//       writer.save(path, [&](wick::Checkpoint& ckpt) {  // blocks for the host copy only
//         ckpt.put_module("model", *model);
//         ckpt.put_optimizer("optimizer", optimizer);
//         ckpt.put_rng_state();
//         ckpt.set_train_state({step, 0, 0, step * batch});
//       }, [dir] { wick::prune_checkpoints(dir, /*keep_last_k=*/3); });  // after the write
//     }
//   }
//   writer.wait();  // the last save is on disk, or its failure throws here
//
// At most one save is in flight: save() first waits for the previous one.
// The file written is the one Checkpoint::save would have written at the
// moment of save() (byte for byte for CPU state), through the same atomic
// write (temporary directory, fsync, rename), so a crash at any moment leaves
// the previous checkpoint or the new one, never a partial one.

#include <wick/checkpoint.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

namespace wick {

struct AsyncCheckpointWriterOptions {
  /// Keep the host buffers of a snapshot, once written, for the next one of
  /// the same tensor sizes: no fresh allocation (page faults, pinned memory
  /// for GPU state) per save, at the price of holding one host copy of the
  /// state for the writer's lifetime. false: freed after each write. Default true.
  TORCH_ARG(bool, reuse_host_buffers) = true;
};

/// What the writer has done. Times in seconds.
struct AsyncCheckpointStats {
  int64_t saves_started = 0;    ///< save() calls that got to their background write
  int64_t saves_completed = 0;  ///< written, renamed into place, after_write done
  int64_t saves_failed = 0;     ///< background writes (or after_write) that threw
  /// The caller's time in the last save(): waiting for the previous save plus the snapshot.
  double last_blocked_s = 0;
  /// The part of last_blocked_s spent waiting for the previous save to finish.
  double last_wait_s = 0;
  /// The part of last_blocked_s spent copying the state to host memory (build).
  double last_snapshot_s = 0;
  /// The background part of the last finished save: serialization, the atomic
  /// write with its fsyncs, and after_write.
  double last_write_s = 0;
  /// Host memory of the last snapshot's tensor copies, in bytes.
  int64_t last_snapshot_bytes = 0;
  /// Path of the last save that completed ("" if none).
  std::string last_completed_path;
};

/// Saves checkpoints in the background, one at a time.
///
/// save(path, build, after_write):
///  1. raises the failure of the previous save, if it failed and was not
///     raised yet (and starts nothing);
///  2. waits for the save in flight, if any (the caller is blocked meanwhile);
///  3. calls build(ckpt) on the caller's thread with an empty
///     Checkpoint::host_snapshot(): put_module and put_optimizer copy the
///     tensors to host memory there (GPU tensors device -> host); put(),
///     put_rng_state() and optimizers of types wick cannot copy serialize at
///     once. When save() returns, training may change every tensor: the file
///     will hold the values of this moment;
///  4. on the writer's thread: Checkpoint::save(path) (atomic), then
///     after_write() (e.g. prune_checkpoints: after the new checkpoint is in
///     place, never racing its write).
///
/// A failure of step 4 is kept and raised once, naming the path and the
/// cause, by the next call of save(), check() or wait(), whichever comes
/// first: "AsyncCheckpointWriter: the background save of '<path>' failed:
/// Checkpoint: cannot save '<path>': ...". The destructor waits for the save
/// in flight and never throws; a failure nobody raised is then reported as a
/// torch warning (TORCH_WARN), so call wait() before destroying a writer.
///
/// Memory: one host copy of the state (the snapshot) while a save is in
/// flight, and between saves too with reuse_host_buffers.
///
/// save(), check() and wait() are meant for one thread (the training loop);
/// stats() and in_flight() may be called from any.
class AsyncCheckpointWriter {
 public:
  using Build = std::function<void(Checkpoint&)>;
  using AfterWrite = std::function<void()>;

  explicit AsyncCheckpointWriter(AsyncCheckpointWriterOptions options = {});
  /// Waits for the save in flight; never throws.
  ~AsyncCheckpointWriter();
  AsyncCheckpointWriter(const AsyncCheckpointWriter&) = delete;
  AsyncCheckpointWriter& operator=(const AsyncCheckpointWriter&) = delete;

  /// Snapshots the state through `build` and writes it to checkpoint directory
  /// `path` in the background, then runs `after_write` there; see above.
  /// Throws a previous save's failure, or what `build` throws (nothing is
  /// started then).
  void save(const std::string& path, const Build& build, AfterWrite after_write = {});
  /// Raises the failure of a finished background save not raised yet; never blocks.
  void check();
  /// Blocks until no save is in flight, then as check().
  void wait();
  /// Whether a background save is running.
  bool in_flight() const;
  AsyncCheckpointStats stats() const;

 private:
  friend class ShardedDataParallel;  // ShardedDataParallel::save_checkpoint_async
  /// The background part of a save, given the snapshot's checkpoint.
  using Job = std::function<void(Checkpoint&)>;
  /// Runs on the caller's thread with an empty host-snapshot checkpoint and
  /// the writer's host staging (for host copies of other tensors); returns
  /// the background job.
  using Snapshot = std::function<Job(Checkpoint&, detail::HostStaging&)>;
  /// save()'s general form: as save(), with `snapshot` for build and its
  /// job for Checkpoint::save(path). `path` names the save in stats and errors.
  void submit(const std::string& path, const Snapshot& snapshot, AfterWrite after_write);

  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace wick
