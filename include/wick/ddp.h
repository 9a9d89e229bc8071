#pragma once
// Data-parallel training: every rank holds a replica of the model, runs its
// own shard of the batch, and the gradients are averaged across ranks while
// backward still runs, in buckets reduced by the process group.
//
//   auto pg = wick::init_process_group();                  // torchrun's env, or a world of one
//   auto model = std::make_shared<Net>();
//   wick::DistributedDataParallel ddp(model, pg);          // checks shapes, broadcasts rank 0's
//   weights torch::optim::SGD opt(model->parameters(), 0.1); for (auto& batch : my_shard) {
//     ddp.prepare_forward();                               // broadcasts buffers (BatchNorm stats)
//     auto loss = loss_fn(model->forward(batch.data), batch.target);
//     opt.zero_grad();
//     loss.backward();                                     // buckets are reduced as gradients
//     arrive ddp.finalize_backward();                             // waits; .grad now holds the
//     average opt.step();
//   }
//
// Accumulation: backward inside `auto guard = ddp.no_sync();` keeps gradients
// local; the next backward without the guard reduces the accumulated sums.

#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace wick {

class ProcessGroup;

struct DistributedDataParallelOptions {
  /// Bucket size in MiB (> 0): gradients are packed, in reverse registration
  /// order, into flat buckets of about this size, one allreduce each. Default 25.
  TORCH_ARG(double, bucket_cap_mb) = 25.0;
  /// Broadcast rank 0's buffers (e.g. BatchNorm running stats) in every
  /// prepare_forward(). Default true.
  TORCH_ARG(bool, broadcast_buffers) = true;
  /// A parameter that gets no gradient in a synchronized backward counts as a
  /// zero gradient (false: finalize_backward() throws naming it). Default false.
  TORCH_ARG(bool, find_unused_parameters) = false;
};

/// Counters for benchmarks and tests.
struct DistributedDataParallelStats {
  /// Number of buckets the parameters are packed into.
  int64_t num_buckets = 0;
  /// Synchronized backwards finalized since construction.
  int64_t synced_steps = 0;
  /// Buckets whose allreduce started from an autograd hook, i.e. while
  /// backward was still running, in total and in the last synchronized backward.
  int64_t buckets_launched_in_backward = 0;
  int64_t last_buckets_launched_in_backward = 0;
  /// Buckets started only in finalize_backward() (unused parameters), in total.
  int64_t buckets_launched_in_finalize = 0;
};

class DistributedDataParallel {
 public:
  /// Wraps `module` (its parameters are updated in place; keep using it for
  /// forward). Throws, on every rank, when the ranks' parameter names or
  /// shapes differ; then copies rank 0's parameters and buffers to all ranks.
  DistributedDataParallel(std::shared_ptr<torch::nn::Module> module,
                          std::shared_ptr<ProcessGroup> pg,
                          DistributedDataParallelOptions options = {});
  ~DistributedDataParallel();
  DistributedDataParallel(DistributedDataParallel&&) noexcept;
  DistributedDataParallel& operator=(DistributedDataParallel&&) noexcept;
  DistributedDataParallel(const DistributedDataParallel&) = delete;
  DistributedDataParallel& operator=(const DistributedDataParallel&) = delete;

  /// Call before each forward: broadcasts buffers from rank 0 when
  /// broadcast_buffers is set (no-op in a world of one).
  void prepare_forward();

  /// prepare_forward(), then `module->forward(input)` for modules whose
  /// forward takes and returns one Tensor (e.g. torch::nn::Sequential or a
  /// `std::shared_ptr<M>` with `Tensor forward(Tensor)`).
  template <typename M>
  torch::Tensor forward(M& module, const torch::Tensor& input) {
    prepare_forward();
    return module->forward(input);
  }

  /// Call after each backward: waits for the buckets' allreduces, averages
  /// them over the ranks and writes the result into the parameters' .grad.
  /// A no-op after a backward under no_sync(). Throws naming a parameter that
  /// got no gradient (unless find_unused_parameters).
  void finalize_backward();

  /// Turns gradient synchronization off (false) or on (true). While off,
  /// backward communicates nothing and gradients accumulate locally.
  void set_sync(bool enabled);
  bool sync_enabled() const;

  /// RAII: synchronization off for the guard's lifetime (restores the previous state).
  class NoSyncGuard {
   public:
    explicit NoSyncGuard(DistributedDataParallel& ddp) : ddp_(&ddp), previous_(ddp.sync_enabled()) {
      ddp.set_sync(false);
    }
    ~NoSyncGuard() {
      if (ddp_ != nullptr) ddp_->set_sync(previous_);
    }
    NoSyncGuard(NoSyncGuard&& other) noexcept : ddp_(other.ddp_), previous_(other.previous_) {
      other.ddp_ = nullptr;
    }
    NoSyncGuard(const NoSyncGuard&) = delete;
    NoSyncGuard& operator=(const NoSyncGuard&) = delete;
    NoSyncGuard& operator=(NoSyncGuard&&) = delete;

   private:
    DistributedDataParallel* ddp_;
    bool previous_;
  };
  [[nodiscard]] NoSyncGuard no_sync() { return NoSyncGuard(*this); }

  const std::shared_ptr<torch::nn::Module>& module() const;
  const std::shared_ptr<ProcessGroup>& process_group() const;
  const DistributedDataParallelOptions& options() const;
  DistributedDataParallelStats stats() const;
  /// The parameter names of each bucket, in launch order.
  std::vector<std::vector<std::string>> bucket_parameter_names() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace wick
