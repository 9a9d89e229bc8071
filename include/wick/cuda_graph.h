#pragma once
// CudaGraphStep: a whole training step (forward, loss, backward, gradient
// clipping, optimizer step) captured once as a CUDA graph and replayed for
// every later batch, which removes the CPU's kernel-launch cost (for a
// GPT-2-small step, thousands of launches) from the step time.
//
// It follows PyTorch's "whole network capture" recipe (torch/cuda/graphs.py
// and the CUDA graphs notes): the batch is copied into static input / target
// buffers; the first `warmup_steps` steps run eagerly on a side stream (lazy
// initialisation, the optimizer's state, cuBLAS workspaces); then the grads
// are set to none and one step is captured, so that backward allocates the
// gradients inside the graph's private memory pool; from then on every step is
// copy_ + replay. The loss comes back as the graph's static tensor.
//
//   wick::FusedAdam opt(model->parameters(),
//                       wick::FusedAdamOptions(3e-4).decoupled_weight_decay(true).tensor_lr(true));
//   wick::CudaGraphStep step(model->parameters(), opt,
//       [&](const torch::Tensor& x, const torch::Tensor& y) { return loss_fn(model->forward(x), y);
//       }, wick::CudaGraphStepOptions().precision(wick::Precision::kBF16).grad_clip_norm(1.0));
//   for (...) {
//     scheduler.step();                               // sets the groups' lr (host doubles)
//     torch::Tensor loss = step.step(input, target);  // copies the lr into the graph's lr tensors,
//     replays
//   }
//
// What it refuses, with an error naming the cause:
// - parameters not on one CUDA device, or a wick build without CUDA: there is
//   nothing to capture on the CPU;
// - Precision::kFP16: GradScaler's skip-the-step-on-inf is a host decision per
//   step (and its scale changes), which a replayed graph cannot take;
// - an optimizer group without FusedAdamOptions::tensor_lr: its lr would be
//   baked into the graph and an LR schedule silently ignored;
// - a batch whose shape or dtype differs from the first one's (the graph's
//   shapes are static): the error names both shapes. Pad or drop the last
//   partial batch (TensorBatchSourceOptions::drop_last).
// What it cannot see, so the caller must avoid: host synchronisation in the
// loss function (.item(), printing a tensor), data-dependent shapes
// (nonzero, boolean indexing: e.g. a routed mixture of experts), CPU tensors
// created in the step, and DDP's bucketed all-reduce (not supported here).
// Between steps, leave the parameters' .grad alone (zero_grad would free the
// graph's gradient memory); the optimizer's state and the parameters may be
// read (e.g. for a checkpoint) after synchronising.

#include <wick/amp.h>
#include <wick/optim.h>

#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

namespace wick {

struct CudaGraphStepOptions {
  /// Eager steps on a side stream before the capture; >= 1. PyTorch's recipe
  /// uses 3 (DDP would need 11).
  TORCH_ARG(int64_t, warmup_steps) = 3;
  /// kFP32 (no autocast; see wick::set_tf32) or kBF16 (autocast to bfloat16,
  /// its weight cache off during capture); kFP16 is refused.
  TORCH_ARG(Precision, precision) = Precision::kBF16;
  /// > 0: clip the gradients' global 2-norm to this (capturable: the norm and
  /// the scale stay on the device, as clip_grad_norm_tensor); 0: no clipping.
  TORCH_ARG(double, grad_clip_norm) = 0.0;
};

/// Scales the gradients of `parameters` so that their global 2-norm is at most
/// `max_norm` and returns the norm before clipping as a scalar tensor on the
/// gradients' device, without a host synchronisation (so a CUDA graph can
/// capture it): Python's clip_grad_norm_ (foreach) arithmetic, coefficient
/// min(1, max_norm / (norm + 1e-6)). Parameters without a gradient are skipped;
/// gradients must all be on one device. max_norm > 0.
torch::Tensor clip_grad_norm_tensor(const std::vector<torch::Tensor>& parameters, double max_norm);

class CudaGraphStep {
 public:
  /// Computes the loss (a scalar) from the static input and target; runs under
  /// the step's autocast. Called during the warm-up steps and once for the capture.
  using LossFn =
      std::function<torch::Tensor(const torch::Tensor& input, const torch::Tensor& target)>;

  /// `parameters`: what backward fills and the optimizer updates (on one CUDA
  /// device). `optimizer` must have tensor_lr in every group. Throws for what
  /// cannot be captured (see above). Keeps references to both.
  CudaGraphStep(std::vector<torch::Tensor> parameters, FusedAdam& optimizer, LossFn loss_fn,
                CudaGraphStepOptions options = {});
  ~CudaGraphStep();
  CudaGraphStep(const CudaGraphStep&) = delete;
  CudaGraphStep& operator=(const CudaGraphStep&) = delete;

  /// One training step on (input, target), copied into the static buffers
  /// (any device; same shape and dtype every call). Returns the loss: the
  /// graph's static tensor on the device, valid until the next step() (clone
  /// it to keep it); reading it synchronises, so read it only every few steps.
  torch::Tensor step(const torch::Tensor& input, const torch::Tensor& target);

  /// Whether the graph has been captured (after warmup_steps + 1 steps).
  bool captured() const;
  /// Steps run so far (warm-up, capture and replays).
  int64_t steps() const;
  /// The last step's gradient norm before clipping (static, like the loss);
  /// undefined without grad_clip_norm.
  torch::Tensor grad_norm() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace wick
