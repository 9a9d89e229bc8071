#pragma once
// Learning-rate schedules whose state is serializable (for exact resume):
// StepLR, CosineWarmupLR, ReduceLROnPlateau. They set the lr of every
// parameter group of a torch::optim optimizer.
//
//   torch::optim::AdamW opt(model->parameters(), 3e-4);
//   wick::CosineWarmupLR sched(opt, /*warmup_steps=*/100, /*total_steps=*/5000);
//   for (...) { ...; opt.step(); sched.step(); }

#include <torch/torch.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace wick {

/// Base of the closed-form schedules: lr of group g after n step() calls is
/// compute_lr(base_lr[g], n). Python's semantics: construction sets step 0's lr.
class LRScheduler {
 public:
  explicit LRScheduler(torch::optim::Optimizer& optimizer);
  virtual ~LRScheduler() = default;
  /// The schedule's name ("StepLR", ...): tags its saved state, so loading
  /// another schedule's state is an error rather than a silent jump.
  virtual std::string name() const { return "LRScheduler"; }
  /// Advances one step and sets every group's lr.
  void step();
  int64_t step_count() const { return step_count_; }
  /// The lrs set last, one per parameter group.
  std::vector<double> get_last_lr() const;
  const std::vector<double>& base_lrs() const { return base_lrs_; }
  virtual void save(torch::serialize::OutputArchive& archive) const;
  /// Restores the step count and base lrs and re-applies the lr. The
  /// schedule's parameters (step_size, total_steps, ...) come from the
  /// constructor, not from the archive.
  virtual void load(torch::serialize::InputArchive& archive);

 protected:
  virtual double compute_lr(double base_lr, int64_t step) const = 0;
  void apply();
  torch::optim::Optimizer& optimizer_;
  std::vector<double> base_lrs_;
  int64_t step_count_ = 0;
};

/// lr = base * gamma^floor(step / step_size) (Python's StepLR).
class StepLR : public LRScheduler {
 public:
  /// step_size >= 1; gamma > 0.
  StepLR(torch::optim::Optimizer& optimizer, int64_t step_size, double gamma = 0.1);
  std::string name() const override { return "StepLR"; }

 protected:
  double compute_lr(double base_lr, int64_t step) const override;

 private:
  int64_t step_size_;
  double gamma_;
};

/// Linear warm-up from base*warmup_start_factor to base over warmup_steps,
/// then cosine decay to base*min_lr_ratio at total_steps (constant after):
///   n < warmup:          base * (s + (1 - s) * n / warmup)       (s = warmup_start_factor)
///   warmup <= n < total: base * (m + (1 - m) * (1 + cos(pi * (n - warmup) / (total - warmup))) /
///   2) n >= total:          base * m                                 (m = min_lr_ratio)
class CosineWarmupLR : public LRScheduler {
 public:
  /// 0 <= warmup_steps <= total_steps, total_steps >= 1; min_lr_ratio and
  /// warmup_start_factor in [0, 1].
  CosineWarmupLR(torch::optim::Optimizer& optimizer, int64_t warmup_steps, int64_t total_steps,
                 double min_lr_ratio = 0.0, double warmup_start_factor = 0.0);
  std::string name() const override { return "CosineWarmupLR"; }

 protected:
  double compute_lr(double base_lr, int64_t step) const override;

 private:
  int64_t warmup_steps_, total_steps_;
  double min_lr_ratio_, warmup_start_factor_;
};

struct ReduceLROnPlateauOptions {
  TORCH_ARG(bool, maximize) = false;
  /// lr *= factor on a plateau; in (0, 1).
  TORCH_ARG(double, factor) = 0.1;
  /// Evaluations without improvement before reducing; >= 0.
  TORCH_ARG(int64_t, patience) = 10;
  /// Relative improvement threshold (Python's threshold_mode="rel").
  TORCH_ARG(double, threshold) = 1e-4;
  /// Evaluations to wait after a reduction before counting again.
  TORCH_ARG(int64_t, cooldown) = 0;
  TORCH_ARG(double, min_lr) = 0.0;
  /// Reductions smaller than eps are ignored.
  TORCH_ARG(double, eps) = 1e-8;
};

/// Python's ReduceLROnPlateau (threshold_mode "rel"), with serializable state.
class ReduceLROnPlateau {
 public:
  ReduceLROnPlateau(torch::optim::Optimizer& optimizer, ReduceLROnPlateauOptions options = {});
  /// Feeds one evaluation's metric; may reduce the lrs (each group's lr
  /// becomes max(lr * factor, min_lr), unless that changes it by <= eps).
  void step(double metric);
  /// The optimizer's current lrs, one per parameter group.
  std::vector<double> get_last_lr() const;
  /// Best metric so far (nullopt before the first step).
  std::optional<double> best() const { return best_; }
  /// Evaluations since the last improvement (reset by a reduction and during cooldown).
  int64_t num_bad_evaluations() const { return num_bad_; }
  /// Saves best, counters and the current lrs; load() restores them into the optimizer.
  void save(torch::serialize::OutputArchive& archive) const;
  void load(torch::serialize::InputArchive& archive);

 private:
  torch::optim::Optimizer& optimizer_;
  ReduceLROnPlateauOptions options_;
  std::optional<double> best_;
  int64_t num_bad_ = 0;
  int64_t cooldown_counter_ = 0;
  int64_t last_epoch_ = 0;
};

/// Sets the lr of every parameter group (works for all torch::optim optimizers).
void set_lr(torch::optim::Optimizer& optimizer, double lr);
/// The lr of each parameter group.
std::vector<double> get_lrs(torch::optim::Optimizer& optimizer);

}  // namespace wick
