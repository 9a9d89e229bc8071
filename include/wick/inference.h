#pragma once
// InferenceSession: a trained model made ready for serving. The caller
// constructs the model; the session optionally transforms it (e.g. into its
// int8 form), loads a wick checkpoint into it, moves it to a device, sets eval
// mode, fixes the intra-op thread count and warms it up. run() then evaluates
// it under c10::InferenceMode, and is safe to call from many threads at once.
//
//   auto net = make_model();                                   // same architecture as trained
//   wick::InferenceSession session(net, *wick::latest_checkpoint("runs/a/checkpoints"),
//       wick::InferenceSessionOptions().num_threads(2).warmup_shape({32, 1, 28, 28}));
//   torch::Tensor logits = session.run(images);               // [B, 10]
//
//   // Behind a DynamicBatcher: requests of one image each, batched.
//   wick::TensorBatcher batcher(session.batch_fn(), wick::BatcherOptions().max_batch_size(32));
//   torch::Tensor one = batcher.submit(image).get();          // [10]
//
// A quantized checkpoint is loaded by giving the transform that produced its
// structure, applied before the state is read:
//   wick::InferenceSessionOptions().transform([](torch::nn::Module& m) { wick::quantize_dynamic(m);
//   })
//
// A model exported from Python, a TorchScript file (torch.jit.script/trace,
// then .save) or an AOTInductor package (torch.export, then
// torch._inductor.aoti_compile_and_package), is loaded by path; which of the
// two the file is, is read from its contents:
//   auto session = wick::InferenceSession::load("model.pt2",
//       wick::InferenceSessionOptions().aoti_runners(2).warmup_shape({32, 1, 28, 28}));
//
// See docs/batching.md and docs/interop.md.

#include <wick/batcher.h>

#include <torch/arg.h>
#include <torch/nn/module.h>
#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace wick {

/// What an InferenceSession serves: a torch::nn module built in C++, a
/// TorchScript file, or an AOTInductor package (.pt2).
enum class ModelFormat { kModule, kTorchScript, kAOTInductor };
/// "module", "torchscript", "aotinductor".
std::string to_string(ModelFormat format);

struct InferenceSessionOptions {
  /// Applied to the freshly constructed model BEFORE the checkpoint's state is
  /// loaded, so a checkpoint saved from a transformed model (quantized,
  /// pruned into another structure) fits. Empty: none. Default none.
  TORCH_ARG(std::function<void(torch::nn::Module&)>, transform) = nullptr;
  /// Checkpoint section holding the model's parameters and buffers. Default
  /// "model", where the Trainer (and its Checkpointer) puts them.
  TORCH_ARG(std::string, section) = "model";
  /// Device the model runs on; run() moves its input there and returns the
  /// output there. nullopt: where the model's parameters are (CPU for a model
  /// without any); for a TorchScript file, where its tensors were saved; for an
  /// AOTInductor package, the device it was compiled for (cuda: device 0). An
  /// AOTInductor package runs only on the device type it was compiled for.
  /// Default nullopt.
  TORCH_ARG(std::optional<torch::Device>, device) = std::nullopt;
  /// Intra-op threads for LibTorch (torch::set_num_threads, process-wide), set
  /// by the constructor, >= 0; 0 leaves the current setting. Default 0.
  TORCH_ARG(int, num_threads) = 0;
  /// Shape of the input the warm-up passes run on (batch dimension included),
  /// filled with zeros; empty: no warm-up. Default empty.
  TORCH_ARG(std::vector<int64_t>, warmup_shape) = {};
  /// Dtype of the warm-up input. Default float32.
  TORCH_ARG(torch::Dtype, warmup_dtype) = torch::kFloat32;
  /// Forward passes the constructor runs on the warm-up input (first-call
  /// allocations, kernel selection, lazy initialisation; TorchScript's
  /// profiling executor optimizes its graph after the first two), >= 0.
  /// Default 3.
  TORCH_ARG(int64_t, warmup_iterations) = 3;
  /// AOTInductor packages only: model instances in the package's container,
  /// >= 1. That many run() calls compute at once; further ones wait for an
  /// instance to come free (the container's own queue). Give a DynamicBatcher
  /// with num_workers N at least N. Default 1.
  TORCH_ARG(int64_t, aoti_runners) = 1;
};

/// A model ready to serve. Thread safety: run() (and the function batch_fn()
/// returns) may be called from several threads at once, e.g. by the workers
/// of a DynamicBatcher with num_workers > 1: the session keeps no per-call
/// state and runs the model under InferenceMode, which is safe for any model
/// whose forward does not modify the module (all torch::nn layers in eval
/// mode). Do not train or modify the model while a session serves it.
/// TorchScript: the interpreter keeps each call's state apart and locks its
/// graph executor while it (re)optimizes, so concurrent calls are safe as
/// they are. AOTInductor: calls go through the package container's
/// thread-safe run, which gives each call one of aoti_runners model instances
/// (never its unsynchronized run_single_threaded).
class InferenceSession {
 public:
  using Forward = std::function<torch::Tensor(const torch::Tensor&)>;

  /// `module` is the model (transformed, loaded, moved in place); `forward`
  /// evaluates it. `checkpoint` is a checkpoint directory written by
  /// wick::Checkpoint (e.g. by the Trainer), or "" to serve the module's
  /// current weights. Throws c10::Error naming the path when the checkpoint is
  /// missing or corrupt, and naming the parameter when its state does not fit
  /// the (transformed) model.
  InferenceSession(std::shared_ptr<torch::nn::Module> module, Forward forward,
                   const std::string& checkpoint, InferenceSessionOptions options = {});

  /// Any module holder with `forward(Tensor) -> Tensor`: torch::nn::Sequential,
  /// torch::nn::Linear, a TORCH_MODULE of your own.
  template <class ModuleHolder>
  InferenceSession(ModuleHolder model, const std::string& checkpoint,
                   InferenceSessionOptions options = {})
      : InferenceSession(model.ptr(), forward_of(model.ptr()), checkpoint, std::move(options)) {}

  /// Serves `model` as it is (no checkpoint).
  template <class ModuleHolder>
  explicit InferenceSession(ModuleHolder model, InferenceSessionOptions options = {})
      : InferenceSession(std::move(model), std::string(), std::move(options)) {}

  /// A model exported from Python: a TorchScript file (torch.jit.save) or an
  /// AOTInductor package (.pt2 from torch._inductor.aoti_compile_and_package),
  /// told apart by the archive's contents, not its name. The model must take
  /// one tensor and return one tensor. Throws c10::Error naming the path when
  /// the file is missing or unreadable, is neither kind (a torch.save archive,
  /// a torch.export archive without AOTInductor code, not a zip at all), when
  /// the TorchScript forward does not return a Tensor, when the package was
  /// compiled for another device type than options.device(), or when CUDA is
  /// requested but absent. options.transform and options.section apply to
  /// modules only and must be left at their defaults.
  static InferenceSession load(const std::string& path, InferenceSessionOptions options = {});

  /// The model's output for `input` (a batch), computed in eval mode under
  /// c10::InferenceMode on the session's device. Thread-safe.
  torch::Tensor run(const torch::Tensor& input) const;

  /// A DynamicBatcher batch function that stacks equal-shape requests, runs
  /// them and answers each with its row (stack_batches(run)). It shares the
  /// model with the session, so it stays valid after the session is gone.
  TensorBatcher::BatchFn batch_fn() const;

  /// The served model (after transform and loading); null for a model loaded
  /// from a file (load()).
  const std::shared_ptr<torch::nn::Module>& module() const { return state_->module; }
  torch::Device device() const { return state_->device; }
  ModelFormat format() const { return state_->format; }
  /// The checkpoint loaded ("" when none).
  const std::string& checkpoint_path() const { return checkpoint_; }
  /// The exported model's file (load()); "" for a module.
  const std::string& model_path() const { return model_path_; }
  const InferenceSessionOptions& options() const { return options_; }

 private:
  template <class Impl>
  static Forward forward_of(std::shared_ptr<Impl> impl) {
    return [impl = std::move(impl)](const torch::Tensor& x) -> torch::Tensor {
      return impl->forward(x);
    };
  }

  struct State {
    std::shared_ptr<torch::nn::Module> module;  // null for an exported model
    Forward forward;
    torch::Device device = torch::kCPU;
    ModelFormat format = ModelFormat::kModule;
  };
  // load(): the exported model's state, ready but not warmed up.
  InferenceSession(std::shared_ptr<const State> state, std::string model_path,
                   InferenceSessionOptions options);
  static void check_options(const InferenceSessionOptions& options);
  void warm_up() const;
  static torch::Tensor run_on(const State& state, const torch::Tensor& input);

  std::shared_ptr<const State> state_;
  std::string checkpoint_;
  std::string model_path_;
  InferenceSessionOptions options_;
};

}  // namespace wick
