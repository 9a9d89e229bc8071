#pragma once
// The Trainer: owns the training loop and composes wick's components
// (GradAccumulator, AutocastGuard/AmpScaler, checkpoints, callbacks).
//
//   auto model = torch::nn::Sequential(torch::nn::Flatten(), torch::nn::Linear(784, 10));
//   wick::SupervisedTask task(model);                              // cross-entropy, accuracy
//   torch::optim::Adam optimizer(model->parameters(), 1e-3);
//   wick::TensorBatchSource train(x_train, y_train, 64), val(x_val, y_val, 256);
//   wick::Trainer trainer(wick::TrainerOptions()
//                             .max_epochs(2)
//                             .precision(wick::Precision::kBF16)
//                             .grad_accum_steps(2)
//                             .checkpoint_dir("runs/a/checkpoints"));
//   trainer.add_callback(std::make_shared<wick::ProgressBar>());
//   auto result = trainer.fit(task, optimizer, train, &val);
//
// One training step (one optimizer step) is grad_accum_steps micro-batches:
// each runs task.training_step under autocast, its loss is weighted by the
// GradAccumulator, scaled by the AmpScaler (fp16 only) and back-propagated; at
// the group's end the gradients are unscaled, clipped, and the optimizer steps
// (skipped by the scaler on inf/NaN). Callbacks see the events in between.

#include <wick/amp.h>
#include <wick/async_checkpoint.h>
#include <wick/callbacks.h>
#include <wick/checkpoint.h>
#include <wick/data.h>
#include <wick/ddp.h>
#include <wick/distributed.h>
#include <wick/grad_accumulator.h>
#include <wick/meters.h>
#include <wick/shard.h>

#include <torch/torch.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace wick {

/// What training_step returns: the micro-batch's mean-reduced loss, plus any
/// scalars to log (kept as tensors so the step needs no device sync; they are
/// read only on logging steps). Implicit from a Tensor: `return loss;`.
struct StepOutput {
  /* implicit */ StepOutput(torch::Tensor loss) : loss(std::move(loss)) {}
  StepOutput(torch::Tensor loss, std::map<std::string, torch::Tensor> scalars)
      : loss(std::move(loss)), scalars(std::move(scalars)) {}
  torch::Tensor loss;
  std::map<std::string, torch::Tensor> scalars;
};

/// What a Trainer trains: the module, its training loss and its validation metrics.
class Task {
 public:
  virtual ~Task() = default;
  /// The module whose parameters are trained, checkpointed and restored.
  virtual torch::nn::Module& module() = 0;
  /// The mean-reduced loss of one micro-batch (and scalars to log).
  virtual StepOutput training_step(const Batch& batch) = 0;
  /// Metrics of one validation batch, each the mean over the batch's samples;
  /// the Trainer averages them over the validation set weighted by batch size.
  virtual std::map<std::string, torch::Tensor> validation_step(const Batch& batch) = 0;
  /// Samples in `batch` (default: batch.data.size(0)); weights accumulation and metrics.
  virtual int64_t batch_size(const Batch& batch) const { return batch.data.size(0); }
};

/// The common case: `loss_fn(model(batch.data), batch.target)`. Validation
/// reports "loss" and, when the output is [N, C] and targets are class
/// indices, "accuracy".
class SupervisedTask : public Task {
 public:
  using LossFn =
      std::function<torch::Tensor(const torch::Tensor& output, const torch::Tensor& target)>;
  using ForwardFn = std::function<torch::Tensor(const torch::Tensor& input)>;

  /// `model`: a module holder (torch::nn::Sequential, torch::nn::Linear, ...)
  /// or a std::shared_ptr to a module, whose forward takes one tensor.
  /// `loss_fn` defaults to cross-entropy (mean).
  template <typename ModuleType>
  explicit SupervisedTask(ModuleType model, LossFn loss_fn = {})
      : SupervisedTask(
            module_ptr(model),
            [model](const torch::Tensor& input) mutable -> torch::Tensor {
              return model->forward(input);
            },
            std::move(loss_fn)) {}
  /// Any module, with the function that runs its forward.
  SupervisedTask(std::shared_ptr<torch::nn::Module> module, ForwardFn forward, LossFn loss_fn);

  torch::nn::Module& module() override { return *module_; }
  StepOutput training_step(const Batch& batch) override;
  std::map<std::string, torch::Tensor> validation_step(const Batch& batch) override;
  /// The model's output for `input`.
  torch::Tensor forward(const torch::Tensor& input) { return forward_(input); }

 private:
  template <typename M>
  static std::shared_ptr<torch::nn::Module> module_ptr(const torch::nn::ModuleHolder<M>& holder) {
    return holder.ptr();
  }
  template <typename M>
  static std::shared_ptr<torch::nn::Module> module_ptr(const std::shared_ptr<M>& module) {
    return module;
  }

  std::shared_ptr<torch::nn::Module> module_;
  ForwardFn forward_;
  LossFn loss_fn_;
};

/// Options of a Trainer. Every field is also part of the run's fingerprint
/// where it changes the numbers (resuming with different ones is an error).
struct TrainerOptions {
  /// Epochs to train; >= 1, or -1 for no epoch limit, which needs max_steps
  /// (training by steps: fit ends after max_steps, and the ProgressBar shows
  /// "step s/max_steps" instead of epochs).
  TORCH_ARG(int64_t, max_epochs) = 1;
  /// Stop after this many optimizer steps (-1: no limit).
  TORCH_ARG(int64_t, max_steps) = -1;
  /// Micro-batches per optimizer step (gradient accumulation); >= 1.
  TORCH_ARG(int64_t, grad_accum_steps) = 1;
  /// Arithmetic of the forward pass: fp32, bf16 autocast, or fp16 autocast with loss scaling.
  TORCH_ARG(Precision, precision) = Precision::kFP32;
  /// Loss-scaling options for fp16 (ignored otherwise).
  TORCH_ARG(AmpScalerOptions, scaler) = {};
  /// Device to train on: the model is moved there at fit start and every batch
  /// is copied there. Unset: the device of the model's first parameter (CPU
  /// for a model without parameters).
  TORCH_ARG(std::optional<torch::Device>, device) = std::nullopt;
  /// Stop fit with an error naming the step after this many consecutive
  /// micro-batches whose loss is NaN or infinite (0: off). On, it reads every
  /// loss on the host (one device sync per micro-batch). Independent of the
  /// fp16 scaler, which skips steps whose gradients overflow and counts them
  /// ("amp/skipped_steps" in the logs) without stopping.
  TORCH_ARG(int64_t, max_nonfinite_losses) = 0;
  /// Clip the global gradient 2-norm to this value before each step (<= 0: off).
  TORCH_ARG(double, grad_clip_norm) = 0.0;
  /// Emit training logs (on_log) every this many optimizer steps; >= 1.
  TORCH_ARG(int64_t, log_every_n_steps) = 50;
  /// Validate every this many epochs (0: never; only when a validation source is given).
  TORCH_ARG(int64_t, val_every_n_epochs) = 1;
  /// When fit stops inside an epoch (max_steps, a callback's request_stop),
  /// validate once more at the end, so FitResult::last_val_metrics describe
  /// the final weights rather than an earlier epoch's (with callbacks, as any
  /// validation). Only with a validation source and val_every_n_epochs > 0.
  TORCH_ARG(bool, val_at_fit_end) = true;
  /// Data-parallel training over this group (init_process_group()): each rank
  /// reads its shard, gradients are averaged across ranks, validation metrics
  /// are reduced, and only rank 0 runs main_rank_only callbacks (logs,
  /// progress, checkpoints). nullptr or a world of one: one process.
  TORCH_ARG(std::shared_ptr<ProcessGroup>, process_group) = nullptr;
  /// How the module is wrapped for data-parallel training (bucket size, buffers, unused
  /// parameters).
  TORCH_ARG(DistributedDataParallelOptions, ddp) = {};
  /// Shard the model across the process group's ranks instead of
  /// replicating it (ZeRO-1, ZeRO-2 or full sharding; docs/sharding.md). The
  /// optimizer passed to fit() is rewired to this rank's shards for the fit
  /// (its type, options and LR schedules kept); gradient clipping takes the
  /// global norm across ranks, and the fp16 scaler agrees on overflows across
  /// ranks. Validation gathers the model whole for its duration. Unset, or
  /// a world of one: DDP as before.
  TORCH_ARG(std::optional<ShardingOptions>, sharding) = std::nullopt;
  /// Seed of torch's generators at the start of a fresh run (fit start: after
  /// the model is built, so it does not decide the initial weights; call
  /// wick::seed_everything before building the model for that).
  TORCH_ARG(uint64_t, seed) = 0;
  /// Deterministic algorithms only (at::Context::setDeterministicAlgorithms).
  /// On CUDA it also sets CUBLAS_WORKSPACE_CONFIG=:4096:8 when unset (cuBLAS
  /// needs a fixed workspace to be deterministic; LibTorch refuses matmuls without it).
  TORCH_ARG(bool, deterministic) = false;
  /// Where checkpoints go ("" = none). A Checkpointer is added for it.
  TORCH_ARG(std::string, checkpoint_dir) = "";
  /// Checkpoint every this many optimizer steps (0: only at the end of each epoch and of fit).
  TORCH_ARG(int64_t, checkpoint_every_n_steps) = 0;
  /// Keep only the newest this many periodic checkpoints (<= 0: keep all).
  TORCH_ARG(int64_t, keep_last_k) = 3;
  /// Write checkpoints in the background (AsyncCheckpointWriter): the loop
  /// blocks only while the state is copied to host memory (and, when a
  /// checkpoint is due before the previous one is written, until it is);
  /// serialization, the atomic write and then pruning run on another thread.
  /// A failed background write is raised at the next optimizer step or at the
  /// end of fit, and fit returns only once the last checkpoint is on disk.
  /// Costs one host copy of the model and optimizer state during fit. Under a
  /// process group only rank 0 writes, as with synchronous checkpoints. With
  /// sharding(), every rank copies and writes its own shards in the background
  /// and rank 0 commits them (ShardedDataParallel::save_checkpoint_async); a
  /// failed write is then raised on every rank at the next checkpoint or at
  /// the end of fit (not at the next step: the ranks must raise it together),
  /// and each rank holds a host copy of its shards only.
  /// Default false.
  TORCH_ARG(bool, async_checkpoint) = false;
  /// "" starts fresh; "latest" resumes from the newest checkpoint in
  /// checkpoint_dir (an error when there is none); anything else is the path
  /// of a checkpoint to resume from.
  TORCH_ARG(std::string, resume) = "";
  /// Add meters to every training log: step-time percentiles over the log
  /// window ("train/step_time_ms_p50", _p90, _p99), host memory ("sys/rss_mb",
  /// "sys/peak_rss_mb"), on CUDA the caching allocator ("cuda/allocated_mb",
  /// "cuda/reserved_mb", "cuda/peak_allocated_mb") and, where NVML loads, the
  /// GPU ("gpu/utilization_pct", "gpu/memory_used_mb", "gpu/power_w", "gpu/temperature_c").
  TORCH_ARG(bool, log_system_metrics) = true;
  /// FLOPs of one training sample (forward + backward); with peak_flops, logs "train/mfu" (0: off).
  TORCH_ARG(double, flops_per_sample) = 0.0;
  /// The hardware's peak FLOP/s for MFU (0: off).
  TORCH_ARG(double, peak_flops) = 0.0;
};

/// Seeds every generator wick and LibTorch draw from: torch's CPU generator
/// and the default generator of every CUDA device (at::manual_seed), and C's
/// rand() for user code. Call it before building the model, so two runs
/// with the same seed start from the same weights (Lightning's
/// seed_everything); TrainerOptions::seed then seeds fit's own draws.
/// wick's data sources shuffle with their own seeds (TensorBatchSourceOptions::seed,
/// DistributedSampler) and are not affected. Returns `seed`.
uint64_t seed_everything(uint64_t seed);

/// What fit() returns.
struct FitResult {
  TrainState state;                                ///< where training ended
  std::map<std::string, double> last_logs;         ///< the last training logs
  std::map<std::string, double> last_val_metrics;  ///< the last validation metrics (empty if none)
  std::string stop_reason;  ///< "max_epochs", "max_steps", or a callback's reason
  double seconds = 0.0;     ///< wall time of fit
};

class Trainer {
 public:
  explicit Trainer(TrainerOptions options = {});
  ~Trainer();

  /// Adds a callback; they run in the order added.
  Trainer& add_callback(std::shared_ptr<Callback> callback);

  /// Trains `task` with `optimizer` on `train`, validating on `val` (optional)
  /// every val_every_n_epochs. Resumes first when options().resume() says so.
  FitResult fit(Task& task, torch::optim::Optimizer& optimizer, BatchSource& train,
                BatchSource* val = nullptr);

  /// fit() over LibTorch data loaders (make_data_loader with Stack<>).
  template <typename TrainLoader,
            typename = std::enable_if_t<!std::is_base_of_v<BatchSource, TrainLoader>>>
  FitResult fit(Task& task, torch::optim::Optimizer& optimizer, TrainLoader& train) {
    DataLoaderSource<TrainLoader> source(train);
    return fit(task, optimizer, source, nullptr);
  }
  template <typename TrainLoader, typename ValLoader,
            typename = std::enable_if_t<!std::is_base_of_v<BatchSource, TrainLoader> &&
                                        !std::is_base_of_v<BatchSource, ValLoader>>>
  FitResult fit(Task& task, torch::optim::Optimizer& optimizer, TrainLoader& train,
                ValLoader& val) {
    DataLoaderSource<TrainLoader> train_source(train);
    DataLoaderSource<ValLoader> val_source(val);
    return fit(task, optimizer, train_source, &val_source);
  }

  /// Runs validation_step over `val` (eval mode, no grad, autocast as in
  /// training) and returns the sample-weighted means, keys prefixed "val/".
  /// Callable outside fit (a test set after training: on the device the
  /// model is on, callbacks not called, the module's train/eval mode kept)
  /// and from callbacks during fit (callbacks see on_validation_start/end).
  /// Under a process group every rank must call it; the means cover all
  /// ranks' samples.
  std::map<std::string, double> validate(Task& task, BatchSource& val);

  /// Writes the whole training state (model, optimizer, scaler, callbacks'
  /// state, RNG, train state, fingerprint) to checkpoint directory `path`,
  /// atomically, then calls `after_write` (e.g. pruning older checkpoints).
  /// With options().async_checkpoint(), only the state's host copy is made
  /// here; the write and then `after_write` run in the background (see
  /// TrainerOptions::async_checkpoint). Only during fit (callbacks call it).
  void save_checkpoint(const std::string& path, const std::map<std::string, std::string>& meta = {},
                       const std::function<void()>& after_write = {});
  /// Restores everything save_checkpoint wrote into the running fit's task,
  /// optimizer, scaler and callbacks. Throws naming the checkpoint when the
  /// fingerprint or a parameter does not match.
  void load_checkpoint(const std::string& path);

  /// Asks the loop to stop after the current step (EarlyStopping, a signal handler).
  void request_stop(const std::string& reason);
  bool stop_requested() const { return !stop_reason_.empty(); }

  const TrainerOptions& options() const { return options_; }
  const TrainState& state() const { return state_; }
  /// The run's fingerprint: options that change the numbers, plus the model's parameter shapes.
  std::string fingerprint() const;

  // During fit (callbacks):
  Task& task();
  torch::optim::Optimizer& optimizer();
  /// The loss scaler (fp16), or nullptr.
  AmpScaler* scaler() { return scaler_.get(); }
  /// This process's rank and the number of ranks (0 and 1 without a process group).
  int64_t rank() const { return options_.process_group() ? options_.process_group()->rank() : 0; }
  int64_t world_size() const {
    return options_.process_group() ? options_.process_group()->world_size() : 1;
  }
  /// Whether this is rank 0, the one that writes logs and checkpoints.
  bool is_main() const { return rank() == 0; }
  /// The device training runs on (options().device(), or the model's).
  const torch::Device& device() const { return device_; }
  /// Batches per epoch when the source knows it.
  std::optional<int64_t> batches_per_epoch() const { return batches_per_epoch_; }
  /// The last training logs emitted (on_log) and validation metrics.
  const std::map<std::string, double>& last_logs() const { return last_logs_; }
  const std::map<std::string, double>& last_val_metrics() const { return last_val_metrics_; }
  /// The data-parallel wrapper of the task's module during a multi-rank fit, else nullptr.
  DistributedDataParallel* ddp() { return ddp_.get(); }
  /// The sharded wrapper during a multi-rank fit with options().sharding(), else nullptr.
  ShardedDataParallel* sharded() { return sdp_.get(); }
  /// The background checkpoint writer's figures (async_checkpoint): live
  /// during fit, the last fit's afterwards; all zero without async checkpoints.
  AsyncCheckpointStats async_checkpoint_stats() const;
  /// Whether the last optimizer step was skipped (inf/NaN gradients under fp16).
  bool last_step_skipped() const { return last_step_skipped_; }
  const std::vector<std::shared_ptr<Callback>>& callbacks() const { return callbacks_; }

 private:
  FitResult run_fit(Task& task, torch::optim::Optimizer& optimizer, BatchSource& train,
                    BatchSource* val);
  void close_checkpoint_writer(c10::Error* failing);
  void run_epoch(BatchSource& train, BatchSource* val);
  std::map<std::string, double> run_validation(Task& task, BatchSource& val, bool with_callbacks);
  void optimizer_step();
  void emit_logs();
  void reset_log_window();
  void add_system_metrics(Metrics& logs) const;
  torch::Device resolve_device(Task& task) const;
  template <typename F>
  void each_callback(F&& f);

  TrainerOptions options_;
  std::vector<std::shared_ptr<Callback>> callbacks_;
  TrainState state_;
  std::unique_ptr<AmpScaler> scaler_;
  std::unique_ptr<GradAccumulator> accumulator_;
  std::unique_ptr<DistributedDataParallel> ddp_;
  std::unique_ptr<ShardedDataParallel> sdp_;
  std::unique_ptr<AsyncCheckpointWriter> checkpoint_writer_;  // async_checkpoint, during fit
  AsyncCheckpointStats checkpoint_stats_;                     // the last fit's writer's
  Task* task_ = nullptr;
  torch::optim::Optimizer* optimizer_ = nullptr;
  std::vector<torch::Tensor> params_;  // the optimizer's parameters
  torch::Device device_ = torch::kCPU;
  std::optional<int64_t> batches_per_epoch_;
  std::string stop_reason_;
  bool epoch_done_ = false;  // between an epoch's validation and its on_epoch_end
  bool last_step_skipped_ = false;
  int64_t nonfinite_losses_ =
      0;  // consecutive non-finite micro-batch losses (max_nonfinite_losses)
  std::map<std::string, double> last_logs_;
  std::map<std::string, double> last_val_metrics_;
  int64_t last_val_step_ = -1;  // state_.step at the last validation with callbacks (-1: none)

  // Sums since the last log, kept on the device to avoid a sync per step.
  torch::Tensor loss_sum_;
  std::map<std::string, torch::Tensor> scalar_sums_;
  int64_t samples_since_log_ = 0;
  int64_t steps_since_log_ = 0;
  std::chrono::steady_clock::time_point log_window_start_;
  double last_grad_norm_ = -1.0;
  // Optimizer-step times in the log window (log_system_metrics).
  StepTimeMeter step_times_;
  std::chrono::steady_clock::time_point last_step_end_;
};

}  // namespace wick
