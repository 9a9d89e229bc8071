#pragma once
// Private to wick: what DistributedDataParallel and ShardedDataParallel share
// when they take a module over (every rank must hold the same model; rank 0's
// weights win).

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

/// Copies rank 0's `tensors` into every rank's, one broadcast per dtype and device.
void broadcast_coalesced(ProcessGroup& pg, const std::vector<torch::Tensor>& tensors);

}  // namespace wick::detail
