#pragma once
// FusedAdam: Adam and AdamW as one ATen call per step (at::_fused_adam_ /
// at::_fused_adamw_, CPU and CUDA kernels) instead of torch::optim::Adam's
// eight ops per parameter. A torch::optim::Optimizer like any other: param
// groups, get_lr/set_lr (so wick's LR schedulers), save/load (so
// wick::Checkpoint and Trainer resume) all work.
//
//   wick::FusedAdam opt(model->parameters(),
//                       wick::FusedAdamOptions(3e-4).weight_decay(0.01).decoupled_weight_decay(true));
//   for (...) { loss.backward(); opt.step(); opt.zero_grad(); }
//
// The update is Python's torch.optim.Adam(fused=True) (AdamW(fused=True) with
// decoupled_weight_decay): the same kernel, so the same numbers.

#include <torch/torch.h>

#include <tuple>
#include <vector>

namespace wick {

struct FusedAdamOptions : public torch::optim::OptimizerCloneableOptions<FusedAdamOptions> {
  /// `lr`: learning rate, >= 0.
  FusedAdamOptions(double lr = 1e-3);  // NOLINT: implicit, as torch::optim::AdamOptions
  /// Learning rate, >= 0. Default 1e-3.
  TORCH_ARG(double, lr) = 1e-3;
  typedef std::tuple<double, double> betas_t;
  /// Decay rates of the running mean of the gradient and of its square, each
  /// in [0, 1). Default (0.9, 0.999).
  TORCH_ARG(betas_t, betas) = std::make_tuple(0.9, 0.999);
  /// Added to the denominator for stability, >= 0. Default 1e-8.
  TORCH_ARG(double, eps) = 1e-8;
  /// Weight decay, >= 0: an L2 term added to the gradient (Adam), or with
  /// decoupled_weight_decay, param *= 1 - lr * weight_decay before the update
  /// (AdamW). Default 0.
  TORCH_ARG(double, weight_decay) = 0;
  /// AMSGrad: divide by the running maximum of the second moment. Default false.
  TORCH_ARG(bool, amsgrad) = false;
  /// false: Adam (torch.optim.Adam); true: AdamW (torch.optim.AdamW). Default false.
  TORCH_ARG(bool, decoupled_weight_decay) = false;
  /// Maximize the objective instead of minimizing it. Default false.
  TORCH_ARG(bool, maximize) = false;
  /// Pass the learning rate to the kernel as a float32 tensor on the
  /// parameters' device (ATen's _fused_adam(w)_.tensor_lr overloads) instead
  /// of a host double. A CUDA graph that captured step() then reads the lr at
  /// each replay: FusedAdam::update_lr_tensors() (wick::CudaGraphStep calls
  /// it) copies the group's current lr into the tensor before the replay, so
  /// an LR schedule keeps working. Outside a capture, step() refreshes the
  /// tensor itself. Same update as the double path, up to the lr's rounding
  /// to float32. Default false.
  TORCH_ARG(bool, tensor_lr) = false;

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  friend bool operator==(const FusedAdamOptions& lhs, const FusedAdamOptions& rhs);
  double get_lr() const override;
  void set_lr(const double lr) override;
};

/// Per-parameter state. `step` is a float32 scalar tensor on the parameter's
/// device, as the fused kernels (and Python's fused Adam) keep it.
/// Loading torch::optim::Adam's saved state (an int64 step) works too.
struct FusedAdamParamState
    : public torch::optim::OptimizerCloneableParamState<FusedAdamParamState> {
  TORCH_ARG(torch::Tensor, step);
  TORCH_ARG(torch::Tensor, exp_avg);
  TORCH_ARG(torch::Tensor, exp_avg_sq);
  /// Defined only with amsgrad.
  TORCH_ARG(torch::Tensor, max_exp_avg_sq);

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  friend bool operator==(const FusedAdamParamState& lhs, const FusedAdamParamState& rhs);
};

/// Adam / AdamW with the whole update in one fused kernel call per (device,
/// dtype) of each parameter group. Parameters without a gradient are skipped;
/// sparse gradients are an error. Parameters must be floating point.
class FusedAdam : public torch::optim::Optimizer {
 public:
  /// Checks `defaults` and every group's own options (lr >= 0, betas in
  /// [0, 1), eps >= 0, weight_decay >= 0).
  explicit FusedAdam(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
                     const FusedAdamOptions& defaults = {});
  explicit FusedAdam(std::vector<torch::Tensor> params, const FusedAdamOptions& defaults = {});

  torch::Tensor step(LossClosure closure = nullptr) override;
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

  /// Copies each tensor_lr group's lr into its lr tensors (one per device the
  /// group's parameters live on). Not during a CUDA graph capture: it is what
  /// runs eagerly before a replay.
  void update_lr_tensors();

 private:
  struct LrTensor {
    size_t group;
    c10::Device device;
    torch::Tensor lr;  // float32 scalar on `device`
  };
  torch::Tensor lr_tensor(size_t group, const c10::Device& device);
  std::vector<LrTensor> lr_tensors_;
};

}  // namespace wick
