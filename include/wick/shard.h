#pragma once
// Sharded data parallelism: each rank keeps only its share of the optimizer
// state (ZeRO-1), of the gradients too (ZeRO-2), or of the parameters as well
// (full sharding, by units such as transformer blocks), so a model whose
// replica with its optimizer state does not fit in one rank's memory still
// trains. The C++ counterpart of Python's ZeroRedundancyOptimizer and FSDP2's
// fully_shard, on wick's ProcessGroup (Gloo on CPU, NCCL on GPUs).
//
//   auto pg = wick::init_process_group();
//   auto model = std::make_shared<Gpt>(config);
//   wick::FusedAdam opt(model->parameters(), wick::FusedAdamOptions(3e-4));
//   wick::ShardedDataParallel sdp(model, pg, opt,
//                                 wick::ShardingOptions()
//                                     .strategy(wick::ShardingStrategy::kFull)
//                                     .units(model->block_modules()));
//   for (auto& batch : my_shard) {
//     sdp.prepare_forward();                    // parameters current, buffers from rank 0
//     auto loss = loss_fn(model->forward(batch.data), batch.target);
//     loss.backward();                          // gradients reduce-scattered as units finish
//     sdp.finalize_backward();                  // this rank's gradient shards are ready
//     sdp.clip_grad_norm_(1.0);                 // optional: the global norm across ranks
//     opt.step();                               // updates this rank's shards only
//     opt.zero_grad();
//   }
//
// The optimizer is rewired: its parameter groups then hold this rank's flat
// shards (views of one flat master tensor per unit) instead of the module's
// parameters, so its state covers 1/world of the model. Its type, options and
// learning-rate schedules are kept. It must update elementwise (SGD, Adam,
// AdamW, FusedAdam, RMSprop, Adagrad; LBFGS is refused), which makes the
// update of a shard equal to the update of the same elements in a replica.
//
// Full sharding needs the model's forward to run each unit through
// wick::unit_call, which gathers the unit's parameters for it:
//
//   for (auto& block : blocks) x = wick::unit_call(*block, [&] { return block->forward(x); });
//
// Without a ShardedDataParallel over the model, unit_call just calls, so the
// same model code trains unsharded too.

#include <wick/async_checkpoint.h>

#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace wick {

class Checkpoint;
class ProcessGroup;

enum class ShardingStrategy {
  kZero1,  ///< optimizer state sharded; gradients all-reduced (every rank holds them whole)
  kZero2,  ///< optimizer state and gradients sharded (gradients reduce-scattered to their owner)
  kFull,   ///< parameters too: sharded at rest, gathered per unit for its forward and backward
};

/// "zero1", "zero2", "full".
std::string to_string(ShardingStrategy strategy);
/// Parses "zero1" / "zero2" / "full" (also "zero-1", "zero-2", "fsdp"); throws naming the value.
ShardingStrategy parse_sharding_strategy(const std::string& text);

struct ShardingOptions {
  TORCH_ARG(ShardingStrategy, strategy) = ShardingStrategy::kZero2;
  /// kFull: the submodules that each form one unit (e.g. every transformer
  /// block), run through wick::unit_call in the model's forward. Units may not
  /// nest. The trainable parameters outside every unit form the root unit,
  /// gathered by prepare_forward() and kept until finalize_backward().
  /// Ignored by kZero1 and kZero2.
  TORCH_ARG(std::vector<std::shared_ptr<torch::nn::Module>>, units) = {};
  /// kZero1 and kZero2: the parameters are packed, in reverse registration
  /// order, into flat buckets of about this many MiB (> 0), one collective
  /// each, started while backward still runs. Default 25.
  TORCH_ARG(double, bucket_cap_mb) = 25.0;
  /// Broadcast rank 0's buffers (BatchNorm statistics) in every prepare_forward(). Default true.
  TORCH_ARG(bool, broadcast_buffers) = true;
  /// A parameter that gets no gradient in a synchronized backward counts as
  /// a zero gradient (false: finalize_backward() throws naming it). Default false.
  TORCH_ARG(bool, find_unused_parameters) = false;
  /// kFull: free a unit's gathered parameters when its forward returns and
  /// gather them again for its backward (false: keep them from forward to
  /// backward; one all-gather less per unit and step, more memory). Default true.
  TORCH_ARG(bool, reshard_after_forward) = true;
  /// kFull: start the all-gather of the unit expected next (in forward, the
  /// one that followed in the previous forward; in backward, the one that
  /// preceded) while the current one computes. Default true.
  TORCH_ARG(bool, prefetch) = true;
};

/// Sizes and counters, per rank.
struct ShardingStats {
  int64_t rank = 0;
  int64_t world_size = 1;
  /// Flat units (kFull: the marked units plus the root; else buckets).
  int64_t num_units = 0;
  /// Trainable parameter elements of the whole model (every unit).
  int64_t param_numel = 0;
  /// Elements this rank owns, padding included (sum over units of
  /// ceil(unit numel / world)), and the padding among them.
  int64_t shard_numel = 0;
  int64_t padding_numel = 0;
  /// Bytes of this rank's master shards (kZero1, kZero2: its slices of the whole
  /// parameters, no extra memory; kFull: copies, all it holds of the parameters at rest).
  int64_t shard_bytes = 0;
  /// Bytes of the optimizer's state on this rank (its tensors' storage).
  int64_t optimizer_state_bytes = 0;
  /// Bytes of unsharded (gathered) parameter storage this rank holds now,
  /// and the most it held since construction or reset_peak(). kZero1 and
  /// kZero2 hold every parameter whole at all times; kFull at rest holds none.
  int64_t gathered_param_bytes = 0;
  int64_t peak_gathered_param_bytes = 0;
  /// Collectives started, and all-gathers started ahead of their unit (prefetch).
  int64_t all_gathers = 0;
  int64_t reduce_scatters = 0;
  int64_t allreduces = 0;
  int64_t prefetched_all_gathers = 0;
  /// Synchronized backwards finalized.
  int64_t synced_steps = 0;
};

class ShardedDataParallel {
 public:
  /// Takes `module` over: checks that every rank built the same model
  /// (throws on every rank naming the first difference), copies rank 0's
  /// parameters and buffers to all ranks, lays the trainable parameters out
  /// in flat units, keeps this rank's shard of each, and rewires `optimizer`
  /// (whose parameter groups must hold exactly the module's trainable
  /// parameters, and which must not have stepped yet) to those shards.
  /// Frozen parameters (requires_grad false) stay whole on every rank.
  ShardedDataParallel(std::shared_ptr<torch::nn::Module> module, std::shared_ptr<ProcessGroup> pg,
                      torch::optim::Optimizer& optimizer, ShardingOptions options = {});
  /// Leaves the module whole, with the latest shards' values (an all-gather:
  /// destroy it on every rank together). The optimizer keeps the shards.
  ~ShardedDataParallel();
  ShardedDataParallel(const ShardedDataParallel&) = delete;
  ShardedDataParallel& operator=(const ShardedDataParallel&) = delete;

  /// Call before each forward: brings the parameters up to date after an
  /// optimizer step (kZero1/kZero2: all-gathers the updated shards; kFull:
  /// gathers the root unit), clears the gradients a finished synchronized
  /// backward left in the module (kZero1), and broadcasts buffers.
  void prepare_forward();

  /// Call after each backward: waits for the gradient collectives and leaves
  /// this rank's averaged gradient shards in the optimizer's parameters
  /// (kZero1: the averaged gradients in the module's parameters too). A no-op
  /// after a backward with synchronization off. kFull: frees every gathered unit.
  void finalize_backward();

  /// Synchronization off: backward keeps gradients local and accumulating
  /// (whole, in the module's parameters); the next synchronized backward
  /// reduces the sum. The counterpart of DDP's no_sync.
  void set_sync(bool enabled);
  bool sync_enabled() const;

  /// Clips the gradient shards so that the 2-norm of the whole model's
  /// gradient (across all ranks) is at most `max_norm` (> 0), as
  /// torch::nn::utils::clip_grad_norm_ on a replica; returns the norm before
  /// clipping. Every rank must call it, after finalize_backward().
  double clip_grad_norm_(double max_norm);

  /// Gathers every parameter whole into the module (kFull: every unit, held
  /// until reshard(), so forwards in between communicate nothing;
  /// kZero1/kZero2: the latest shards), e.g. to evaluate, export or save the
  /// module. Every rank must call it.
  void gather_full_params();
  /// kFull: frees every gathered unit (after gather_full_params() or an
  /// evaluation forward). No-op otherwise.
  void reshard();

  /// Sharded checkpoint (every rank calls it, with the same `path`): each
  /// rank writes the parts of the parameters and of the optimizer state it
  /// owns to a file of its own (nothing is gathered); rank 0 adds those
  /// files, the manifest of the global tensors (names, shapes, which rank
  /// holds which part), the optimizer's group options and the module's
  /// buffers to `checkpoint` (whose sections and train state rank 0 filled)
  /// and saves it with Checkpoint::save's guarantees: `path` holds the old
  /// checkpoint or the new one, complete. A failure on any rank throws on
  /// every rank, naming the rank. The optimizer must be SGD, Adam, AdamW,
  /// FusedAdam, RMSprop or Adagrad (their state is elementwise).
  void save_checkpoint(Checkpoint& checkpoint, const std::string& path);
  /// save_checkpoint in the background (every rank calls it, with the same
  /// `path` and each rank's own writer): the caller blocks for the host
  /// copies of its shards (device -> host for GPU state) and, on rank 0,
  /// for build(checkpoint) on a Checkpoint::host_snapshot() (the sections
  /// and train state of save_checkpoint's `checkpoint`; build runs on rank 0
  /// only). Then on each rank's writer thread: the rank writes its file and
  /// a status file beside it, and rank 0 waits for every rank's status (up
  /// to the process group's timeout), adds the files and the manifest and
  /// saves atomically, as save_checkpoint does; `after_write` runs on each
  /// rank once its part is done (on rank 0: once the checkpoint is in
  /// place). No collective runs in the background: the process group stays
  /// the training loop's.
  ///
  /// At most one save is in flight per writer. A failed background save is
  /// raised on every rank, naming the failing rank, by the next
  /// save_checkpoint_async or wait_checkpoint, which agree on it
  /// collectively (a rank alone raising at another step would leave the
  /// others waiting in their next collective). Memory: a host copy of this
  /// rank's shards and optimizer state while a save is in flight (kept for
  /// the next save with the writer's reuse_host_buffers).
  void save_checkpoint_async(AsyncCheckpointWriter& writer, const std::string& path,
                             const AsyncCheckpointWriter::Build& build,
                             AsyncCheckpointWriter::AfterWrite after_write = {});
  /// Waits for `writer`'s save in flight on every rank and raises a failed
  /// one on every rank (see save_checkpoint_async). Every rank must call it,
  /// e.g. at the end of training: then the last checkpoint is in place.
  void wait_checkpoint(AsyncCheckpointWriter& writer);
  /// Restores the shards, the optimizer's state and group options, the
  /// buffers and frozen parameters from a checkpoint written by
  /// save_checkpoint with any world size and strategy: each rank reads only
  /// the parts of the files that overlap its shards (verified by size and
  /// CRC-32). The module's parameters follow at the next prepare_forward()
  /// or unit gather. Throws naming the checkpoint and the parameter when the
  /// trainable parameters' names or shapes differ, or the optimizer's kind.
  void load_checkpoint(const Checkpoint& checkpoint);

  /// The optimizer's parameters now: this rank's pieces of the flat shards.
  std::vector<torch::Tensor> sharded_parameters() const;
  ShardingStats stats() const;
  /// Resets peak_gathered_param_bytes to the bytes gathered now.
  void reset_peak();
  const ShardingOptions& options() const;
  const std::shared_ptr<ProcessGroup>& process_group() const;
  const std::shared_ptr<torch::nn::Module>& module() const;

  struct Impl;

 private:
  std::shared_ptr<Impl> impl_;
};

/// Writes the whole model of a sharded checkpoint (ShardedDataParallel::
/// save_checkpoint, any world size) to one safetensors file for inference:
/// the trainable parameters assembled from every rank's parts, and the
/// buffers, under the module's own names. No process group needed.
void consolidate_sharded_checkpoint(const std::string& checkpoint_path,
                                    const std::string& safetensors_path);

/// Restores `module`'s parameters and buffers from a sharded checkpoint
/// (ShardedDataParallel::save_checkpoint, any world size), with the checks
/// of Checkpoint::restore_module (names, shapes; the module is unchanged on
/// error). For inference from a sharded run. No process group needed.
void restore_module_from_sharded_checkpoint(const Checkpoint& checkpoint,
                                            torch::nn::Module& module);

/// Bytes of `optimizer`'s state tensors (distinct storages counted once).
int64_t optimizer_state_bytes(const torch::optim::Optimizer& optimizer);

namespace detail {

/// What unit_call does around a unit's forward.
class UnitScope {
 public:
  explicit UnitScope(const torch::nn::Module& unit);  // gathers the unit when it is sharded
  ~UnitScope();                                       // after an exception: frees what it gathered
  UnitScope(const UnitScope&) = delete;
  UnitScope& operator=(const UnitScope&) = delete;
  /// The forward returned `outputs`: hooks them so that backward gathers
  /// the unit again, and frees it (reshard_after_forward).
  void finish(const std::vector<torch::Tensor>& outputs);

 private:
  std::shared_ptr<ShardedDataParallel::Impl> impl_;
  size_t unit_ = 0;
  bool finished_ = false;
};

inline void collect_tensors(const torch::Tensor& t, std::vector<torch::Tensor>& out) {
  out.push_back(t);
}
inline void collect_tensors(const std::vector<torch::Tensor>& ts, std::vector<torch::Tensor>& out) {
  out.insert(out.end(), ts.begin(), ts.end());
}
template <typename A, typename B>
void collect_tensors(const std::pair<A, B>& p, std::vector<torch::Tensor>& out) {
  collect_tensors(p.first, out);
  collect_tensors(p.second, out);
}
template <typename... Ts>
void collect_tensors(const std::tuple<Ts...>& t, std::vector<torch::Tensor>& out) {
  std::apply([&](const auto&... items) { (collect_tensors(items, out), ...); }, t);
}

}  // namespace detail

/// Runs `forward` (a callable taking no argument and returning a Tensor, a
/// std::vector<Tensor>, or a pair or tuple of those) as the forward of
/// `unit`: when `unit` is a unit of a fully sharded ShardedDataParallel, its
/// parameters are gathered for the call (and again for its backward, when
/// the gradient of one of the returned tensors arrives); otherwise it just
/// calls. Return every tensor of the unit that backward reaches (an
/// auxiliary loss kept in the module, say): backward through one that is
/// not returned could run before the unit is gathered again.
template <typename F>
auto unit_call(const torch::nn::Module& unit, F&& forward) {
  detail::UnitScope scope(unit);
  auto out = std::forward<F>(forward)();
  std::vector<torch::Tensor> tensors;
  detail::collect_tensors(out, tensors);
  scope.finish(tensors);
  return out;
}

}  // namespace wick
