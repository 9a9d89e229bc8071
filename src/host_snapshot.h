#pragma once
// Private to wick: host copies of a module's and an optimizer's tensors for
// Checkpoint::host_snapshot() (and so AsyncCheckpointWriter), serialized later,
// on another thread, into exactly the archive Checkpoint::put_module /
// put_optimizer would have written at the moment of the copy.
//
// A copy is taken per storage, not per tensor: views of one storage (tied
// weights, a flat buffer) stay views of one copied storage, with their
// offsets and strides, so the archive holds what torch's own serializer would
// write for the originals (it too writes each storage once, whole).

#include <torch/torch.h>

#include <cstdint>
#include <map>
#include <memory>
#include <utility>
#include <vector>

namespace wick::detail {

/// Host memory of snapshots. Copies the tensors it is given to host buffers
/// (pinned for CUDA sources), one buffer per source storage within a section;
/// with `reuse`, the buffers of the last snapshot are taken again by the next
/// one of the same sizes instead of being allocated afresh (no page faults,
/// no pinned allocations per save). Used from one thread at a time.
class HostStaging {
 public:
  explicit HostStaging(bool reuse) : reuse_(reuse) {}

  /// A host tensor with `t`'s values, dtype, sizes, strides, storage offset
  /// and requires_grad; undefined for an undefined `t`. Blocks until copied.
  torch::Tensor copy(const torch::Tensor& t);
  /// A contiguous host tensor with `t`'s values, dtype and sizes, of `t`'s
  /// elements alone (copy() takes `t`'s whole storage: a slice of a big flat
  /// buffer would copy the buffer); undefined for an undefined `t`. Blocks
  /// until copied.
  torch::Tensor copy_compact(const torch::Tensor& t);
  /// Ends a section: later copies no longer share storages with earlier ones.
  void end_section() { memo_.clear(); }
  /// Ends a snapshot: pooled buffers it did not take are freed.
  void end_snapshot();
  /// Host bytes copied since the last recycle().
  int64_t bytes() const { return bytes_; }
  /// The snapshot's buffers are no longer read (its checkpoint was written
  /// and destroyed): keep them for the next snapshot (with `reuse`, each one
  /// nothing else still holds), or free them.
  void recycle();

 private:
  torch::Tensor buffer(int64_t nbytes, bool pinned);

  struct Copied {
    c10::Storage source;  // kept alive, so its address is not reused within the section
    torch::Tensor bytes;  // the host copy of the whole storage, as uint8
  };
  bool reuse_;
  std::map<const void*, Copied> memo_;  // source StorageImpl -> its copy, within a section
  std::multimap<std::pair<int64_t, bool>, torch::Tensor> free_;  // (bytes, pinned) -> buffer
  std::vector<std::pair<bool, torch::Tensor>> used_;  // (pinned, buffer) of the current snapshot
  int64_t bytes_ = 0;
};

/// A section captured as host copies; write() fills an archive exactly as the
/// synchronous put_* would have at the time of the copy. const and safe to
/// call from another thread than the one that made it.
class SectionSnapshot {
 public:
  virtual ~SectionSnapshot() = default;
  virtual void write(torch::serialize::OutputArchive& archive) const = 0;
};

/// Every parameter and buffer of `module` (recursively, the layout of
/// torch::nn::Module::save).
std::shared_ptr<const SectionSnapshot> snapshot_module(const torch::nn::Module& module,
                                                       HostStaging& staging);

/// The optimizer's state, for the optimizer types whose state wick knows
/// (torch::optim::Adam, AdamW, SGD, RMSprop, Adagrad and wick::FusedAdam, by
/// exact type); nullptr for any other, which the caller serializes at once.
std::shared_ptr<const SectionSnapshot> snapshot_optimizer(const torch::optim::Optimizer& optimizer,
                                                          HostStaging& staging);

}  // namespace wick::detail
