#pragma once
// Mixed precision: autocast scopes and dynamic loss scaling.
//
//   wick::AmpScaler scaler;                                   // fp16 only; bf16 needs none
//   for (auto& batch : loader) {
//     optimizer.zero_grad();
//     torch::Tensor loss;
//     {
//       wick::AutocastGuard autocast(torch::kCUDA, torch::kHalf);
//       loss = loss_fn(model->forward(batch.data), batch.target);
//     }
//     scaler.scale(loss).backward();
//     scaler.unscale_(optimizer);                             // optional: before clipping
//     torch::nn::utils::clip_grad_norm_(model->parameters(), 1.0);
//     scaler.step(optimizer);                                 // skipped when a gradient is inf/NaN
//     scaler.update();
//   }

#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace wick {

class ProcessGroup;

/// The arithmetic a training step runs in.
enum class Precision {
  kFP32,  ///< no autocast
  kBF16,  ///< autocast to bfloat16; no loss scaling needed
  kFP16,  ///< autocast to float16 with dynamic loss scaling (AmpScaler)
};

/// "fp32", "bf16", "fp16".
std::string to_string(Precision precision);
/// Parses "fp32" / "bf16" / "fp16" (also "32", "bf16-mixed", "16"...); throws naming the value
/// otherwise.
Precision parse_precision(const std::string& text);
/// The autocast dtype of a precision: kBFloat16, kHalf; kFloat for kFP32.
c10::ScalarType autocast_dtype(Precision precision);

/// RAII autocast scope, the C++ counterpart of `torch.autocast(device_type, dtype)`.
/// Nests: the destructor restores the enabled flag and dtype it found, and
/// clears the autocast weight cache when the outermost scope closes.
class AutocastGuard {
 public:
  /// Enables (or, with enabled=false, disables) autocast for `device_type` in `dtype`.
  /// Throws for a device type other than kCPU / kCUDA, or a dtype other than
  /// kHalf / kBFloat16. The state is per thread, like LibTorch's autocast state.
  AutocastGuard(c10::DeviceType device_type, c10::ScalarType dtype, bool enabled = true);
  /// Autocast for `precision` on `device`'s type; kFP32 disables autocast in the scope.
  AutocastGuard(const torch::Device& device, Precision precision);
  ~AutocastGuard();

  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  c10::DeviceType device_type_;
  bool prev_enabled_;
  c10::ScalarType prev_dtype_;
};

/// Options of AmpScaler; defaults are those of Python's torch.amp.GradScaler.
struct AmpScalerOptions {
  /// Loss scale before the first step.
  TORCH_ARG(double, init_scale) = 65536.0;
  /// Scale multiplier after `growth_interval` consecutive steps without inf/NaN.
  TORCH_ARG(double, growth_factor) = 2.0;
  /// Scale multiplier on a step whose gradients have an inf/NaN; in (0, 1).
  TORCH_ARG(double, backoff_factor) = 0.5;
  /// Consecutive finite steps before the scale grows; >= 1.
  TORCH_ARG(int64_t, growth_interval) = 2000;
  /// false: scale() returns the loss as is, step() just steps, update() does nothing.
  TORCH_ARG(bool, enabled) = true;
};

/// Dynamic loss scaling for fp16 training, with the semantics of Python's
/// torch.amp.GradScaler: scale(loss), unscale_(optimizer), step(optimizer),
/// update(). The inf/NaN check and the unscale are one fused ATen kernel
/// (_amp_foreach_non_finite_check_and_unscale_), the scale update another
/// (_amp_update_scale_); both run on CPU and CUDA.
class AmpScaler {
 public:
  explicit AmpScaler(AmpScalerOptions options = {});

  /// loss * scale. The scale tensor lives on the loss's device (created there on first use).
  torch::Tensor scale(const torch::Tensor& loss);

  /// Divides the optimizer's gradients by the scale in place and records
  /// whether any was inf/NaN. At most once per optimizer between update()s
  /// (throws otherwise); step() calls it when the user did not.
  void unscale_(torch::optim::Optimizer& optimizer);

  /// Unscales (if not yet done) and runs optimizer.step() unless a gradient
  /// was inf/NaN. Returns whether the optimizer stepped. Throws if called
  /// twice for one optimizer before update().
  bool step(torch::optim::Optimizer& optimizer);

  /// Adjusts the scale from the steps since the last update (back off on
  /// inf/NaN, grow after growth_interval clean steps) and resets per-step state.
  void update();
  /// Sets the scale to `new_scale` (> 0) and resets per-step state.
  void update(double new_scale);

  /// The current scale (1.0 when disabled); synchronizes with the device.
  double get_scale() const;
  /// Consecutive clean steps since the last growth or back-off.
  int64_t growth_tracker() const;
  /// Steps that step() skipped because of inf/NaN gradients, since construction (or load).
  int64_t skipped_steps() const { return skipped_steps_; }
  /// Steps that step() ran.
  int64_t taken_steps() const { return taken_steps_; }
  bool is_enabled() const { return options_.enabled(); }
  const AmpScalerOptions& options() const { return options_; }

  /// Agree across `pg`'s ranks on whether a gradient was inf/NaN: each
  /// unscale_() sums the ranks' findings (one small allreduce), so that
  /// every rank skips or takes a step together. Needed when the ranks hold
  /// different gradients, as with ShardedDataParallel's shards (DDP's are
  /// equal after the allreduce); nullptr turns it off. Every rank must then
  /// call unscale_() (or step()) for every step.
  void set_process_group(std::shared_ptr<ProcessGroup> pg) { pg_ = std::move(pg); }

  /// Whether the last update() saw an inf/NaN (the step was skipped).
  bool last_step_skipped() const { return last_step_skipped_; }

  /// Serializes scale, growth tracker, counters and options (growth_factor,
  /// backoff_factor, growth_interval, enabled). Call it after update(), as
  /// with Python's state_dict().
  void save(torch::serialize::OutputArchive& archive) const;
  /// Restores what save() wrote; throws naming a missing or malformed key.
  /// Like Python's load_state_dict(): the saved scale, tracker and options
  /// replace the current ones; a disabled scaler only restores the counters,
  /// and an enabled one refuses a state saved by a disabled one.
  void load(torch::serialize::InputArchive& archive);

 private:
  enum class Stage { kReady, kUnscaled, kStepped };
  struct PerOptimizer {
    Stage stage = Stage::kReady;
    // One float scalar per device that holds gradients: 1 where an inf/NaN was seen.
    std::vector<std::pair<torch::Device, torch::Tensor>> found_inf_per_device;
    // Set by step(), which has to look at found_inf anyway: saves update() a sync.
    c10::optional<bool> found_inf;
  };

  void lazy_init(const torch::Device& device);
  void check_initialized(const char* method) const;
  PerOptimizer& state_of(const torch::optim::Optimizer& optimizer);
  std::vector<std::pair<torch::Device, torch::Tensor>> unscale_grads(
      torch::optim::Optimizer& optimizer, const torch::Tensor& inv_scale);
  bool any_found_inf();

  AmpScalerOptions options_;
  torch::Tensor scale_;              // float32 scalar; undefined until the first scale()
  torch::Tensor growth_tracker_;     // int32 scalar; created with scale_
  int64_t init_growth_tracker_ = 0;  // growth tracker to start from (load() sets it)
  std::unordered_map<const torch::optim::Optimizer*, PerOptimizer> per_optimizer_;
  std::shared_ptr<ProcessGroup> pg_;  // set_process_group; nullptr: this rank alone
  int64_t skipped_steps_ = 0;
  int64_t taken_steps_ = 0;
  bool last_step_skipped_ = false;
};

}  // namespace wick
