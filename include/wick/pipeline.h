#pragma once
// Pipeline model parallelism: a model cut into stages, each on its device,
// trained on micro-batches that flow through the stages concurrently.
//
//   auto model = torch::nn::Sequential(...);                 // the whole model
//   auto parts = wick::split_sequential(*model, {3, 2});     // 3 modules, then 2
//   wick::Pipeline pipe(std::vector<wick::PipelineStage>{{parts[0], torch::Device("cuda:0")},
//                                                        {parts[1], torch::Device("cuda:1")}},
//                       wick::PipelineOptions().chunks(8).schedule(wick::PipelineSchedule::k1F1B));
//   torch::Tensor loss = pipe->train_step(x, y, loss_fn);    // forward and backward, grads
//   accumulated optimizer.step();
//
// The seed's two-stage model parallelism (an encoder on one device, a decoder
// on another, no micro-batches) is the same component with chunks = 1.
//
// train_step runs each stage on a thread of its own: stage s takes micro-batch
// m's activation from stage s-1, runs its modules, hands the output to stage
// s+1; the last stage computes the loss and starts the backward pass, whose
// input gradients travel back the same way. GPipe runs every forward, then
// every backward; 1F1B, after p - s - 1 warm-up forwards, alternates one
// forward and one backward, so a stage holds at most p - s micro-batches'
// activations instead of m. Activation checkpointing keeps only each stage's
// input during the forward and recomputes the stage in its backward.
//
// Gradients are those of the unsplit model on the whole batch (the loss is
// the mean over the batch: each micro-batch's mean loss weighted by its share
// of the rows), accumulated into the parameters' .grad as loss.backward() would.
//
// In a wick::Trainer, use PipelineTask: its training step runs train_step and
// hands the Trainer a loss whose backward() adds the gradients computed, scaled
// as the Trainer asks (gradient accumulation, loss scaling).

#include <wick/trainer.h>

#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace wick {

enum class PipelineSchedule {
  kGPipe,  ///< all forwards, then all backwards
  k1F1B,   ///< warm-up forwards, then one forward and one backward in turn (PipeDream-Flush)
};

enum class ActivationCheckpointing {
  kNever,       ///< keep every stage's activations until its backward
  kExceptLast,  ///< recompute every stage but the last (whose backward follows its forward soonest)
  kAlways,      ///< recompute every stage
};

struct PipelineOptions {
  /// Micro-batches per batch; >= 1. A batch of fewer rows makes fewer micro-batches. Default 1.
  TORCH_ARG(int64_t, chunks) = 1;
  /// Order of forwards and backwards on each stage. Default k1F1B.
  TORCH_ARG(PipelineSchedule, schedule) = PipelineSchedule::k1F1B;
  /// Which stages recompute their forward in the backward pass. Default kNever.
  TORCH_ARG(ActivationCheckpointing, checkpointing) = ActivationCheckpointing::kNever;
};

/// One stage: modules applied in order, on one device (parameters moved there).
struct PipelineStage {
  /* implicit */ PipelineStage(torch::nn::Sequential module, torch::Device device = torch::kCPU)
      : module(std::move(module)), device(device) {}
  torch::nn::Sequential module;
  torch::Device device;
};

/// What the last train_step measured.
struct PipelineStats {
  int64_t stages = 0;
  int64_t micro_batches = 0;
  double step_seconds = 0;           ///< wall time of the step
  std::vector<double> busy_seconds;  ///< per stage: time spent in forwards and backwards
  /// 1 - mean(busy) / step: the share of the stages' time spent waiting.
  double bubble_fraction = 0;
  /// (p - 1) / (m + p - 1): the bubble of a pipeline whose stages take equal time.
  double ideal_bubble_fraction = 0;
};

using PipelineLossFn =
    std::function<torch::Tensor(const torch::Tensor& output, const torch::Tensor& target)>;

/// Cuts a Sequential into consecutive parts of `sizes` modules each (summing
/// to its length). The parts share the modules (and parameters) with `model`.
std::vector<torch::nn::Sequential> split_sequential(const torch::nn::Sequential& model,
                                                    const std::vector<int64_t>& sizes);
/// Cuts a Sequential into `parts` consecutive parts of about equal parameter
/// counts (each part at least one module).
std::vector<torch::nn::Sequential> split_sequential(const torch::nn::Sequential& model,
                                                    int64_t parts);

class PipelineImpl : public torch::nn::Module {
 public:
  /// Moves each stage's module to its device. Throws for no stages, an empty
  /// stage, or bad options.
  PipelineImpl(std::vector<PipelineStage> stages, PipelineOptions options = {});

  /// The model's output for `input` (on the first stage's device or any; the
  /// output is on the last stage's device): micro-batches through the stages
  /// one after the other, differentiable as the unsplit model (loss.backward()
  /// then runs GPipe's order). For the schedules and checkpointing use train_step.
  torch::Tensor forward(const torch::Tensor& input);

  /// One training step by the schedule: splits input and target into chunks,
  /// runs forward and backward of every micro-batch, adds the gradients of
  /// `grad_scale` x mean loss to the parameters' .grad. Returns the mean loss
  /// (detached, on the last stage's device). A stage that throws stops the
  /// step; the error names the stage and the micro-batch.
  torch::Tensor train_step(const torch::Tensor& input, const torch::Tensor& target,
                           const PipelineLossFn& loss_fn, double grad_scale = 1.0);

  /// The stages keep their devices: moving the pipeline to a device is an
  /// error unless every stage is already there. A dtype applies to every stage.
  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Device device, bool non_blocking = false) override;

  const PipelineStats& last_stats() const { return stats_; }
  const std::vector<PipelineStage>& stages() const { return stages_; }
  const PipelineOptions& options() const { return options_; }

 private:
  std::vector<PipelineStage> stages_;
  PipelineOptions options_;
  PipelineStats stats_;
};
TORCH_MODULE(Pipeline);

/// A Task for the Trainer: trains a Pipeline with `loss_fn` (mean over the
/// batch); validation reports "loss" and, for [N, C] outputs and class-index
/// targets, "accuracy", like SupervisedTask.
class PipelineTask : public Task {
 public:
  PipelineTask(Pipeline pipeline, PipelineLossFn loss_fn);
  /// With fp16 and a loss scaler, say where the scale comes from, e.g.
  /// `[&trainer] { return trainer.scaler() ? trainer.scaler()->get_scale() : 1.0; }`:
  /// the pipeline's own backward then runs at that scale, so fp16 gradients do
  /// not underflow. Without it, the backward runs at scale 1 and the Trainer's
  /// scale is applied afterwards (exact in fp32 and bf16).
  void set_grad_scale_source(std::function<double()> source) {
    grad_scale_source_ = std::move(source);
  }

  torch::nn::Module& module() override { return *pipeline_; }
  StepOutput training_step(const Batch& batch) override;
  std::map<std::string, torch::Tensor> validation_step(const Batch& batch) override;

 private:
  Pipeline pipeline_;
  PipelineLossFn loss_fn_;
  SupervisedTask validation_;  // the pipeline's forward, for validation
  std::function<double()> grad_scale_source_;
  torch::Tensor
      anchor_;  // a leaf the returned loss hangs from, so that backward() reaches the pipeline
};

}  // namespace wick
