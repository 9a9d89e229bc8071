#pragma once
// Atomic, verified checkpoints of a whole training state.
//
//   wick::Checkpoint ckpt;
//   ckpt.put_module("model", *model);
//   ckpt.put_optimizer("optimizer", optimizer);
//   ckpt.put("scaler", [&](auto& a) { scaler.save(a); });
//   ckpt.put_rng_state();
//   ckpt.set_train_state({/*step=*/100, /*epoch=*/1, /*batch_in_epoch=*/37,
//   /*samples_seen=*/12800}); ckpt.save("runs/a/checkpoints/step-00000100");            // atomic
//
//   auto back = wick::Checkpoint::load(*wick::latest_checkpoint("runs/a/checkpoints"));
//   back.restore_module("model", *model);                      // names and shapes checked
//   back.restore_optimizer("optimizer", optimizer);
//   back.get("scaler", [&](auto& a) { scaler.load(a); });
//   back.restore_rng_state();
//
// On disk a checkpoint is a directory: one torch archive per section
// (<section>.pt) and meta.json (format version, train state, fingerprint,
// user metadata, and the size and CRC-32 of every section file). save() writes
// into a temporary directory beside the target, fsyncs every file and the
// directory, then renames it into place, so a crash leaves either the old
// checkpoint or the new one, never a mix. load() verifies sizes and checksums
// before anything is deserialized: a truncated or corrupted file is an error
// that names it, never a silent fresh start. To save in the background while
// training goes on, see AsyncCheckpointWriter (wick/async_checkpoint.h).

#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace wick {

namespace detail {
class HostStaging;
}
class AsyncCheckpointWriter;

/// Where a training run stands.
struct TrainState {
  int64_t step = 0;            ///< optimizer steps taken
  int64_t epoch = 0;           ///< epoch in progress (0-based)
  int64_t batch_in_epoch = 0;  ///< micro-batches of `epoch` already consumed
  int64_t samples_seen = 0;    ///< training samples consumed since the start
};

class Checkpoint {
 public:
  using Writer = std::function<void(torch::serialize::OutputArchive&)>;
  using Reader = std::function<void(torch::serialize::InputArchive&)>;

  Checkpoint();
  ~Checkpoint();
  Checkpoint(Checkpoint&&) noexcept;
  Checkpoint& operator=(Checkpoint&&) noexcept;

  /// A checkpoint whose put_module and put_optimizer only copy tensors to host
  /// memory (each storage once, GPU tensors device -> host) and leave their
  /// serialization to save(), which may then run on another thread while
  /// training changes the originals: the file holds the values of the moment
  /// of the put. Optimizers of other types than torch::optim::Adam, AdamW,
  /// SGD, RMSprop, Adagrad and wick::FusedAdam, put() and put_rng_state()
  /// serialize at once, as in a plain Checkpoint. AsyncCheckpointWriter builds
  /// its checkpoints this way.
  static Checkpoint host_snapshot();
  /// Whether put_module / put_optimizer copy to host memory (host_snapshot()).
  bool is_host_snapshot() const { return host_snapshot_; }

  // ---- building (before save) ----

  /// Every parameter and buffer of `module`, by its dotted name.
  void put_module(const std::string& section, const torch::nn::Module& module);
  /// The optimizer's state (torch::optim::Optimizer::save).
  void put_optimizer(const std::string& section, const torch::optim::Optimizer& optimizer);
  /// Any state through a torch archive, serialized at once (in a host
  /// snapshot too: `write` may read live tensors only during this call).
  void put(const std::string& section, const Writer& write);
  /// The CPU generator's state and, when CUDA is available, every CUDA device's.
  void put_rng_state();

  /// A file written elsewhere (by another rank of a sharded run, say), put
  /// into the checkpoint as `name` by save() (hard-linked, or copied across
  /// file systems) with its `size` and CRC-32 (crc32_hex) recorded in
  /// meta.json. load() does not read it; file_path() checks it when asked.
  void put_file(const std::string& name, const std::string& source, uint64_t size,
                const std::string& crc32_hex);

  void set_train_state(const TrainState& state) { train_state_ = state; }
  /// A digest of the options that must match on resume (the Trainer's fingerprint).
  void set_fingerprint(const std::string& fingerprint) { fingerprint_ = fingerprint; }
  /// Free-form string metadata kept in meta.json (e.g. a monitored metric's value).
  void set_meta(const std::string& key, const std::string& value) { meta_[key] = value; }

  /// Writes the checkpoint atomically to directory `path` (replacing one that is
  /// there). On failure throws naming the path and the reason, and leaves any
  /// previous checkpoint at `path` intact.
  void save(const std::string& path) const;

  // ---- reading (after load) ----

  /// Reads meta.json and verifies every section file's size and CRC-32.
  /// Throws naming the file for a missing, truncated or corrupted checkpoint.
  static Checkpoint load(const std::string& path);

  bool has(const std::string& section) const;
  std::vector<std::string> sections() const;
  /// Copies the section's tensors into `module`'s parameters and buffers. Throws
  /// naming the checkpoint and the parameter when one is missing, unexpected or
  /// of another shape; the module is left unchanged on error.
  void restore_module(const std::string& section, torch::nn::Module& module) const;
  /// optimizer.load() on the section. When all the optimizer's parameters are
  /// on one device, the state is loaded onto it (as PyTorch's
  /// load_state_dict moves state to its parameter's device), whichever device
  /// it was saved from; otherwise onto the device it was saved from.
  void restore_optimizer(const std::string& section, torch::optim::Optimizer& optimizer) const;
  /// Reads a section written with put(); throws naming the section when absent.
  void get(const std::string& section, const Reader& read) const;
  /// Restores what put_rng_state() saved; throws when the checkpoint has none.
  void restore_rng_state() const;
  /// Whether the checkpoint holds a file put with put_file().
  bool has_file(const std::string& name) const;
  /// The path of file `name` of a loaded checkpoint, after checking (once)
  /// its size and CRC-32 against meta.json; throws naming the file when it is
  /// missing, truncated or corrupted.
  std::string file_path(const std::string& name) const;

  const TrainState& train_state() const { return train_state_; }
  const std::string& fingerprint() const { return fingerprint_; }
  /// Metadata value, or nullopt.
  std::optional<std::string> meta(const std::string& key) const;
  /// The directory this checkpoint was loaded from ("" when built in memory).
  const std::string& path() const { return path_; }

 private:
  friend class AsyncCheckpointWriter;
  struct Section;
  struct File;
  static Checkpoint host_snapshot(std::shared_ptr<detail::HostStaging> staging);

  std::map<std::string, std::unique_ptr<Section>> sections_;
  std::map<std::string, std::unique_ptr<File>> files_;
  TrainState train_state_;
  std::string fingerprint_;
  std::map<std::string, std::string> meta_;
  std::string path_;
  bool host_snapshot_ = false;
  std::shared_ptr<detail::HostStaging> staging_;  // host memory of a host snapshot's copies
};

/// The CRC-32 (zlib's) of `size` bytes at `data`, as the 8 hex digits
/// meta.json records.
std::string crc32_hex(const void* data, size_t size);

/// "step-00000100": the directory name the Trainer gives the checkpoint of `step`.
std::string checkpoint_name(int64_t step);
/// Complete checkpoints (directories named by checkpoint_name holding a
/// meta.json) under `dir`, oldest step first, each as a full path
/// (`dir + "/" + name`, e.g. "runs/a/checkpoints/step-00000100", ready for
/// Checkpoint::load); temporary leftovers are ignored.
std::vector<std::string> list_checkpoints(const std::string& dir);
/// The newest complete checkpoint under `dir` as a full path, like
/// list_checkpoints, or nullopt when there is none.
std::optional<std::string> latest_checkpoint(const std::string& dir);
/// Deletes all but the newest `keep_last_k` checkpoints under `dir` (and stale
/// temporary directories), never one listed in `keep`. keep_last_k <= 0 keeps all.
void prune_checkpoints(const std::string& dir, int64_t keep_last_k,
                       const std::vector<std::string>& keep = {});

}  // namespace wick
