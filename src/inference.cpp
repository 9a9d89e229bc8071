#include "wick/inference.h"

#include <wick/checkpoint.h>

#include <torch/torch.h>

#include <utility>

namespace wick {
namespace {

// Where the module's parameters (else buffers) live; CPU for one without any.
torch::Device device_of(const torch::nn::Module& module) {
  for (const auto& p : module.parameters()) return p.device();
  for (const auto& b : module.buffers()) return b.device();
  return torch::kCPU;
}

}  // namespace

InferenceSession::InferenceSession(std::shared_ptr<torch::nn::Module> module, Forward forward,
                                   const std::string& checkpoint, InferenceSessionOptions options)
    : checkpoint_(checkpoint), options_(std::move(options)) {
  TORCH_CHECK(module != nullptr, "InferenceSession: module must not be null");
  TORCH_CHECK(forward != nullptr, "InferenceSession: forward must be a function, got an empty one");
  TORCH_CHECK(options_.num_threads() >= 0, "InferenceSession: num_threads must be >= 0, got ",
              options_.num_threads());
  TORCH_CHECK(options_.warmup_iterations() >= 0,
              "InferenceSession: warmup_iterations must be >= 0, got ",
              options_.warmup_iterations());
  for (int64_t d : options_.warmup_shape()) {
    TORCH_CHECK(d >= 0, "InferenceSession: warmup_shape must have sizes >= 0, got ",
                c10::IntArrayRef(options_.warmup_shape()));
  }
  if (options_.num_threads() > 0) torch::set_num_threads(options_.num_threads());

  // Transform first: the checkpoint's structure is the transformed model's.
  if (options_.transform()) options_.transform()(*module);

  if (!checkpoint.empty()) {
    Checkpoint ckpt;
    try {
      ckpt = Checkpoint::load(checkpoint);
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, "InferenceSession: cannot load checkpoint '", checkpoint,
                  "': ", e.what_without_backtrace());
    }
    TORCH_CHECK(ckpt.has(options_.section()), "InferenceSession: checkpoint '", checkpoint,
                "' has no section '", options_.section(),
                "' (it has: ", c10::Join(", ", ckpt.sections()), ")");
    try {
      ckpt.restore_module(options_.section(), *module);
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, "InferenceSession: the model does not fit checkpoint '", checkpoint, "'",
                  options_.transform() ? " (after the transform)" : "", ": ",
                  e.what_without_backtrace());
    }
  }

  auto state = std::make_shared<State>();
  state->device = options_.device().value_or(device_of(*module));
  module->to(state->device);
  module->eval();
  state->module = std::move(module);
  state->forward = std::move(forward);
  state_ = std::move(state);

  if (!options_.warmup_shape().empty()) {
    auto x = torch::zeros(options_.warmup_shape(),
                          torch::TensorOptions().dtype(options_.warmup_dtype()));
    for (int64_t i = 0; i < options_.warmup_iterations(); ++i) run(x);
  }
}

torch::Tensor InferenceSession::run_on(const State& state, const torch::Tensor& input) {
  TORCH_CHECK(input.defined(), "InferenceSession: run() needs a defined input tensor");
  c10::InferenceMode guard;
  return state.forward(input.device() == state.device ? input : input.to(state.device));
}

torch::Tensor InferenceSession::run(const torch::Tensor& input) const {
  return run_on(*state_, input);
}

TensorBatcher::BatchFn InferenceSession::batch_fn() const {
  return stack_batches([state = state_](const torch::Tensor& x) { return run_on(*state, x); });
}

}  // namespace wick
