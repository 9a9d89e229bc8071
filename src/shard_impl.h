#pragma once
// Private to wick: ShardedDataParallel's state, shared by src/shard.cpp (the
// training side) and src/shard_checkpoint.cpp (sharded checkpoints).

#include "wick/distributed.h"
#include "wick/shard.h"

#include "data_parallel.h"

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace wick {

struct ShardedDataParallel::Impl : std::enable_shared_from_this<ShardedDataParallel::Impl> {
  struct Param {
    std::string name;
    torch::Tensor tensor;  // the module's parameter
    std::vector<int64_t> shape;
    int64_t numel = 0;
    int64_t offset = 0;  // in its unit's flat tensor
    size_t unit = 0;
    size_t group = 0;     // optimizer parameter group
    torch::Tensor view;   // the parameter's place in its unit's flat tensor
    torch::Tensor empty;  // what the parameter holds at rest (kFull): no element
    std::shared_ptr<torch::autograd::Node> accumulator;
    uintptr_t hook_key = 0;
  };
  struct Piece {
    size_t group = 0;
    int64_t offset = 0;  // in the shard
    int64_t numel = 0;
    torch::Tensor tensor;  // a view of the shard: the optimizer's parameter
  };
  struct Unit {
    std::string name;
    const torch::nn::Module* module = nullptr;  // kFull: the marked module; nullptr: root or bucket
    std::vector<size_t> params;
    int64_t numel = 0, padded = 0, shard_numel = 0;
    torch::Tensor full;   // [padded]: the gathered parameters (kFull: storage empty at rest)
    torch::Tensor shard;  // [shard_numel]: this rank's master copy
    std::vector<Piece> pieces;
    bool gathered = false;
    std::shared_ptr<ProcessGroup::Work> gather_work;  // an all-gather in flight
    int64_t shard_version = -1;  // the shard's version when last gathered (kZero)
    // Backward:
    size_t pending = 0;
    bool copied = false;  // its gradients are in grad_flat, waiting for their turn
    bool launched = false;
    bool pre_backward_done = false;
    torch::Tensor grad_flat;  // [padded]: the collective's input
    torch::Tensor grad_out;   // [shard_numel]: the reduce-scatter's output
    // kZero1: the last round's grad_flat, taken again by the next round once
    // nothing else holds it (the gradients handed out in finalize dropped by
    // zero_grad): no fresh pages, and no page faults, per step.
    torch::Tensor spare_grad_flat;
    std::shared_ptr<ProcessGroup::Work> grad_work;
    bool grad_done = false;  // grad_work waited for (and, but for kZero1, grad_flat freed)
  };

  std::shared_ptr<torch::nn::Module> module;
  std::shared_ptr<ProcessGroup> pg;
  torch::optim::Optimizer* optimizer = nullptr;
  ShardingOptions options;
  std::vector<Param> params;
  std::vector<Unit> units;
  size_t root = SIZE_MAX;  // kFull: the root unit's index (SIZE_MAX: none)
  std::vector<char> grad_ready;
  // Every rank must start the same collectives in the same order, whatever
  // order its autograd finishes the units in (data-dependent graphs such as
  // a mixture of experts differ between ranks). Gradient collectives go out
  // in launch_order (kZero: the buckets' order; kFull: the units in reverse
  // forward order, then the rest); the gathers backward needs go out in
  // regather_order (the units freed after their forward, last first) on a
  // communicator of their own, so that the two sequences cannot interleave
  // differently on different ranks.
  std::vector<size_t> launch_order;
  size_t next_launch = 0;
  std::vector<size_t> in_flight;  // units whose gradient collective is running, oldest first
  std::vector<size_t> regather_order;
  size_t next_regather = 0;
  std::shared_ptr<ProcessGroup> gather_pg;  // kFull: the all-gathers' communicator
  bool allreduce_gradients = false;         // Gloo: all-reduce, not reduce-scatter (launch)
  bool sync = true;
  bool stale_params = false;  // kZero: a step may have changed the shards since the last gather
  bool stale_grads = false;   // kZero1: the module's gradients are last step's averages
  bool pinned = false;        // kFull: gather_full_params() holds every unit until reshard()
  std::vector<size_t> forward_order, last_forward_order;
  ShardingStats stats;
  int64_t gathered_bytes = 0;
  mutable std::mutex mutex;

  bool full() const { return options.strategy() == ShardingStrategy::kFull; }
  int64_t world() const { return pg->world_size(); }
  int64_t rank() const { return pg->rank(); }

  // ---- construction ----
  void build(const std::vector<std::pair<std::string, torch::Tensor>>& named,
             torch::optim::Optimizer& opt);
  std::vector<std::vector<size_t>> plan_units(
      const std::vector<std::pair<std::string, torch::Tensor>>& trainable);
  void make_unit(Unit& unit);
  void rewire(torch::optim::Optimizer& opt);
  void register_hooks();
  void remove_hooks() noexcept;

  // ---- gathering ----
  void start_gather(size_t u, bool prefetch);
  void finish_gather(size_t u);
  void release(size_t u);
  void account(int64_t delta) {
    gathered_bytes += delta;
    stats.peak_gathered_param_bytes = std::max(stats.peak_gathered_param_bytes, gathered_bytes);
  }
  void enter_unit(size_t u);
  void exit_unit(size_t u, const std::vector<torch::Tensor>& outputs);
  void pre_backward(size_t u);

  // ---- backward ----
  void on_grad_ready(size_t index);
  void copy_grads(size_t u);
  void launch(size_t u);
  void wait_gradients(size_t u);
  void launch_in_order();
  void issue_regathers_through(size_t position);
  void finish_regathers();
  void wait_all() noexcept;
  void reset_round();
  void finalize();
};

}  // namespace wick
