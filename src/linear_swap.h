#pragma once
// Replacing the torch::nn::Linear layers of a module tree by other modules
// (wick::QuantizedLinear, wick::SemiStructuredLinear): in the registered
// children and in the containers' own lists, and, for whoever still holds an
// old Linear (a custom module's member), by redirecting that Linear's forward.

#include <torch/torch.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace wick::detail {

/// What replaces one Linear.
struct LinearReplacement {
  std::shared_ptr<torch::nn::Module> module;  ///< what the tree holds from now on
  torch::nn::AnyModule any;                   ///< the same module, for Sequential's list
  /// What the old module's forward runs from now on (the new module's forward).
  std::function<at::Tensor(const at::Tensor&)> forward;
};

struct SwappedLinear {
  std::string path;  ///< first path of the layer in the tree ("0", "encoder.fc1")
  std::shared_ptr<torch::nn::LinearImpl> old_module;
  std::shared_ptr<torch::nn::Module> new_module;
  int64_t bytes_before = 0;  ///< the old weight and bias
};

using SelectLinear =
    std::function<bool(const std::string& path, const torch::nn::LinearImpl& linear)>;
using MakeReplacement =
    std::function<LinearReplacement(const std::string& path, torch::nn::LinearImpl& linear)>;

/// Replaces every Linear of `root`'s tree for which `select` says yes (all
/// when it is empty) with make(...)'s module, once per Linear object even if it
/// is registered twice. Then retires each old Linear: frees its weight and
/// bias and makes its forward run the replacement's. `who` names the caller
/// in error messages. A failure in `make` is rethrown with the layer's path
/// before anything is retired; layers already swapped stay swapped.
std::vector<SwappedLinear> swap_linears(torch::nn::Module& root, const MakeReplacement& make,
                                        const SelectLinear& select, const std::string& who);

}  // namespace wick::detail
