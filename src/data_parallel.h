#pragma once
// Private to wick: what DistributedDataParallel and ShardedDataParallel share
// when they take a module over (every rank must hold the same model; rank 0's
// weights win).

#include <torch/csrc/autograd/function_hook.h>
#include <torch/torch.h>

#include <string>
#include <utility>
#include <vector>

namespace wick {
class ProcessGroup;
}

namespace wick::detail {

/// Throws, on every rank together, when the ranks' `named` parameters differ
/// in number, name, shape or dtype from rank 0's; the message names the first
/// difference and begins with `who`.
void check_same_parameters(ProcessGroup& pg,
                           const std::vector<std::pair<std::string, torch::Tensor>>& named,
                           const char* who);

/// A post-hook on a parameter's gradient accumulator that tells `owner`
/// (owner->on_grad_ready(index)) that parameter `index`'s gradient arrived.
template <typename Owner>
struct GradReadyHook : torch::autograd::FunctionPostHook {
  GradReadyHook(Owner* owner, size_t index) : owner_(owner), index_(index) {}
  torch::autograd::variable_list operator()(
      const torch::autograd::variable_list& outputs,
      const torch::autograd::variable_list& /*inputs*/) override {
    owner_->on_grad_ready(index_);
    return outputs;
  }
  Owner* owner_;
  size_t index_;
};

/// Copies rank 0's `tensors` into every rank's, one broadcast per dtype and device.
void broadcast_coalesced(ProcessGroup& pg, const std::vector<torch::Tensor>& tensors);

}  // namespace wick::detail
