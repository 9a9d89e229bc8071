#include <wick/cuda_graph.h>

#include <ATen/autocast_mode.h>
#include <ATen/ops/_foreach_mul.h>
#include <ATen/ops/_foreach_norm.h>

#ifdef WICK_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/cuda.h>
#endif

#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace wick {

torch::Tensor clip_grad_norm_tensor(const std::vector<torch::Tensor>& parameters, double max_norm) {
  TORCH_CHECK(max_norm > 0, "clip_grad_norm_tensor: max_norm must be > 0, got ", max_norm);
  std::vector<torch::Tensor> grads;
  for (const auto& p : parameters) {
    if (p.grad().defined()) grads.push_back(p.grad());
  }
  if (grads.empty()) return torch::zeros({});
  const auto device = grads[0].device();
  for (size_t i = 1; i < grads.size(); ++i) {
    TORCH_CHECK(grads[i].device() == device,
                "clip_grad_norm_tensor: gradients must be on one device, got ", device, " and ",
                grads[i].device());
  }
  torch::NoGradGuard no_grad;
  const auto norms = at::_foreach_norm(grads, 2);
  auto total = torch::linalg_vector_norm(torch::stack(norms).to(torch::kFloat), 2, c10::nullopt,
                                         false, c10::nullopt);
  auto coef = (max_norm / (total + 1e-6)).clamp_max(1.0);
  at::_foreach_mul_(grads, coef);
  return total;
}

namespace {

void check_optimizer(FusedAdam& optimizer) {
  const auto& groups = optimizer.param_groups();
  for (size_t g = 0; g < groups.size(); ++g) {
    const auto& o = static_cast<const FusedAdamOptions&>(groups[g].options());
    TORCH_CHECK(o.tensor_lr(), "CudaGraphStep: parameter group ", g,
                " of the optimizer has tensor_lr false; its lr would be baked into the graph (set "
                "FusedAdamOptions::tensor_lr(true) in every group)");
  }
}

}  // namespace

struct CudaGraphStep::Impl {
  std::vector<torch::Tensor> params;
  FusedAdam& optimizer;
  LossFn loss_fn;
  CudaGraphStepOptions options;
  torch::Device device{torch::kCPU};
  torch::Tensor static_input, static_target, static_loss, static_norm;
  int64_t steps = 0;
  bool captured = false;
#ifdef WICK_WITH_CUDA
  std::unique_ptr<at::cuda::CUDAGraph> graph;
#endif

  Impl(std::vector<torch::Tensor> p, FusedAdam& opt, LossFn fn, CudaGraphStepOptions o)
      : params(std::move(p)), optimizer(opt), loss_fn(std::move(fn)), options(o) {}

  // forward + loss + backward + clip + optimizer step on the static buffers,
  // on the current stream (the side stream while warming up or capturing).
  void body() {
    torch::Tensor loss;
    {
      const bool cache = at::autocast::is_autocast_cache_enabled();
      at::autocast::set_autocast_cache_enabled(false);
      try {
        AutocastGuard autocast(device, options.precision());
        loss = loss_fn(static_input, static_target);
      } catch (...) {
        at::autocast::set_autocast_cache_enabled(cache);
        throw;
      }
      at::autocast::set_autocast_cache_enabled(cache);
    }
    TORCH_CHECK(loss.defined() && loss.numel() == 1,
                "CudaGraphStep: the loss function must return a scalar, got ",
                loss.defined() ? loss.sizes() : c10::IntArrayRef{});
    loss.backward();
    if (options.grad_clip_norm() > 0)
      static_norm = clip_grad_norm_tensor(params, options.grad_clip_norm());
    optimizer.step();
    static_loss = loss.detach();
  }
};

CudaGraphStep::CudaGraphStep(std::vector<torch::Tensor> parameters, FusedAdam& optimizer,
                             LossFn loss_fn, CudaGraphStepOptions options) {
  TORCH_CHECK(options.warmup_steps() >= 1, "CudaGraphStep: warmup_steps must be >= 1, got ",
              options.warmup_steps());
  TORCH_CHECK(options.grad_clip_norm() >= 0, "CudaGraphStep: grad_clip_norm must be >= 0, got ",
              options.grad_clip_norm());
  TORCH_CHECK(options.precision() != Precision::kFP16,
              "CudaGraphStep: precision fp16 cannot be captured: GradScaler skips a step on "
              "inf/NaN and changes its "
              "scale, host decisions a replayed graph cannot take; use bf16 or fp32");
  TORCH_CHECK(loss_fn != nullptr, "CudaGraphStep: loss_fn must be set");
  TORCH_CHECK(!parameters.empty(), "CudaGraphStep: parameters must not be empty");
  check_optimizer(optimizer);
  const auto device = parameters[0].device();
  for (size_t i = 0; i < parameters.size(); ++i) {
    TORCH_CHECK(parameters[i].device().is_cuda(),
                "CudaGraphStep: parameters must be on a CUDA device (a CUDA graph "
                "captures GPU work), got parameter ",
                i, " on ", parameters[i].device());
    TORCH_CHECK(parameters[i].device() == device,
                "CudaGraphStep: parameters must be on one device, got ", device, " and ",
                parameters[i].device(), " (parameter ", i, ")");
  }
#ifndef WICK_WITH_CUDA
  TORCH_CHECK(false, "CudaGraphStep: this wick build has no CUDA paths (WICK_WITH_CUDA is off)");
#endif
  impl_ = std::make_unique<Impl>(std::move(parameters), optimizer, std::move(loss_fn), options);
  impl_->device = device;
}

CudaGraphStep::~CudaGraphStep() = default;

bool CudaGraphStep::captured() const { return impl_->captured; }

int64_t CudaGraphStep::steps() const { return impl_->steps; }

torch::Tensor CudaGraphStep::grad_norm() const { return impl_->static_norm; }

torch::Tensor CudaGraphStep::step(const torch::Tensor& input, const torch::Tensor& target) {
  auto& s = *impl_;
  TORCH_CHECK(input.defined() && target.defined(),
              "CudaGraphStep: input and target must be defined");
  if (!s.static_input.defined()) {
    s.static_input = torch::empty(input.sizes(), input.options().device(s.device));
    s.static_target = torch::empty(target.sizes(), target.options().device(s.device));
  }
  auto check_static = [](const char* name, const torch::Tensor& got, const torch::Tensor& fixed) {
    TORCH_CHECK(got.sizes() == fixed.sizes() && got.scalar_type() == fixed.scalar_type(),
                "CudaGraphStep: the graph's shapes are static: ", name, " must be ", fixed.sizes(),
                " ", fixed.scalar_type(), " as in the first step, got ", got.sizes(), " ",
                got.scalar_type());
  };
  check_static("input", input, s.static_input);
  check_static("target", target, s.static_target);
#ifdef WICK_WITH_CUDA
  c10::cuda::CUDAGuard device_guard(s.device);
  {
    torch::NoGradGuard no_grad;
    s.static_input.copy_(input, /*non_blocking=*/true);
    s.static_target.copy_(target, /*non_blocking=*/true);
  }
  auto current = c10::cuda::getCurrentCUDAStream(s.device.index());
  if (s.captured) {
    s.optimizer.update_lr_tensors();
    s.graph->replay();
    ++s.steps;
    return s.static_loss;
  }
  // Warm-up and capture run on a side stream (capture cannot use the legacy
  // default stream; warming up there too sets up what the capture will use).
  auto side = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, s.device.index());
  at::cuda::CUDAEvent ready;
  ready.record(current);
  ready.block(side);
  if (s.steps < s.options.warmup_steps()) {
    {
      c10::cuda::CUDAStreamGuard stream_guard(side);
      s.optimizer.zero_grad(/*set_to_none=*/true);
      s.body();
    }
    at::cuda::CUDAEvent done;
    done.record(side);
    done.block(current);
    ++s.steps;
    return s.static_loss;
  }
  // Capture. Gradients set to none: backward allocates them in the graph's
  // pool, where every replay writes them again.
  s.optimizer.zero_grad(/*set_to_none=*/true);
  torch::cuda::synchronize(s.device.index());
  s.graph = std::make_unique<at::cuda::CUDAGraph>();
  {
    c10::cuda::CUDAStreamGuard stream_guard(side);
    s.graph->capture_begin();
    try {
      s.body();
    } catch (...) {
      try {
        s.graph->capture_end();
      } catch (...) {
      }
      s.graph.reset();
      throw;
    }
    s.graph->capture_end();
  }
  torch::cuda::synchronize(s.device.index());
  s.captured = true;
  // The capture recorded the work without running it: run this step's batch.
  s.optimizer.update_lr_tensors();
  s.graph->replay();
  ++s.steps;
  return s.static_loss;
#else
  TORCH_CHECK(false, "CudaGraphStep: this wick build has no CUDA paths (WICK_WITH_CUDA is off)");
#endif
}

}  // namespace wick
