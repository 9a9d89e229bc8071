#include <wick/lr_scheduler.h>

#include <cmath>
#include <limits>
#include <string>
#include <utility>

namespace wick {

namespace {

constexpr double kPi = 3.14159265358979323846;

c10::IValue to_ivalue(const std::vector<double>& values) {
  c10::List<double> list;
  for (double v : values) list.push_back(v);
  return c10::IValue(list);
}

c10::IValue read_value(torch::serialize::InputArchive& archive, const std::string& owner,
                       const std::string& key) {
  c10::IValue value;
  TORCH_CHECK(archive.try_read(key, value), owner, ": saved state has no '", key,
              "' (not written by ", owner, "::save?)");
  return value;
}

}  // namespace

void set_lr(torch::optim::Optimizer& optimizer, double lr) {
  for (auto& group : optimizer.param_groups()) group.options().set_lr(lr);
}

std::vector<double> get_lrs(torch::optim::Optimizer& optimizer) {
  std::vector<double> lrs;
  lrs.reserve(optimizer.param_groups().size());
  for (auto& group : optimizer.param_groups()) lrs.push_back(group.options().get_lr());
  return lrs;
}

// ---------------------------------------------------------------------------

LRScheduler::LRScheduler(torch::optim::Optimizer& optimizer)
    : optimizer_(optimizer), base_lrs_(get_lrs(optimizer)) {}

void LRScheduler::step() {
  ++step_count_;
  apply();
}

std::vector<double> LRScheduler::get_last_lr() const {
  std::vector<double> lrs;
  lrs.reserve(base_lrs_.size());
  for (double base : base_lrs_) lrs.push_back(compute_lr(base, step_count_));
  return lrs;
}

void LRScheduler::apply() {
  auto& groups = optimizer_.param_groups();
  TORCH_CHECK(groups.size() == base_lrs_.size(), name(), ": the optimizer has ", groups.size(),
              " parameter groups but the scheduler was built for ", base_lrs_.size(),
              " (groups added after the scheduler?)");
  for (size_t g = 0; g < groups.size(); ++g) {
    groups[g].options().set_lr(compute_lr(base_lrs_[g], step_count_));
  }
}

void LRScheduler::save(torch::serialize::OutputArchive& archive) const {
  archive.write("kind", c10::IValue(name()));
  archive.write("step_count", c10::IValue(step_count_));
  archive.write("base_lrs", to_ivalue(base_lrs_));
}

void LRScheduler::load(torch::serialize::InputArchive& archive) {
  const std::string kind = read_value(archive, name(), "kind").toStringRef();
  TORCH_CHECK(kind == name(), name(), ": saved state belongs to a ", kind, ", not a ", name());
  const int64_t step_count = read_value(archive, name(), "step_count").toInt();
  TORCH_CHECK(step_count >= 0, name(), ": saved step_count must be >= 0, got ", step_count);
  std::vector<double> base_lrs = read_value(archive, name(), "base_lrs").to<std::vector<double>>();
  TORCH_CHECK(base_lrs.size() == optimizer_.param_groups().size(), name(), ": saved state has ",
              base_lrs.size(), " base lrs but the optimizer has ", optimizer_.param_groups().size(),
              " parameter groups");
  step_count_ = step_count;
  base_lrs_ = std::move(base_lrs);
  apply();
}

// ---------------------------------------------------------------------------

StepLR::StepLR(torch::optim::Optimizer& optimizer, int64_t step_size, double gamma)
    : LRScheduler(optimizer), step_size_(step_size), gamma_(gamma) {
  TORCH_CHECK(step_size >= 1, "StepLR: step_size must be >= 1, got ", step_size);
  TORCH_CHECK(std::isfinite(gamma) && gamma > 0.0, "StepLR: gamma must be finite and > 0, got ",
              gamma);
  apply();
}

double StepLR::compute_lr(double base_lr, int64_t step) const {
  // NOLINTNEXTLINE(bugprone-integer-division): StepLR decays once per whole step_size
  return base_lr * std::pow(gamma_, static_cast<double>(step / step_size_));
}

// ---------------------------------------------------------------------------

CosineWarmupLR::CosineWarmupLR(torch::optim::Optimizer& optimizer, int64_t warmup_steps,
                               int64_t total_steps, double min_lr_ratio, double warmup_start_factor)
    : LRScheduler(optimizer),
      warmup_steps_(warmup_steps),
      total_steps_(total_steps),
      min_lr_ratio_(min_lr_ratio),
      warmup_start_factor_(warmup_start_factor) {
  TORCH_CHECK(total_steps >= 1, "CosineWarmupLR: total_steps must be >= 1, got ", total_steps);
  TORCH_CHECK(warmup_steps >= 0 && warmup_steps <= total_steps,
              "CosineWarmupLR: warmup_steps must be in [0, total_steps=", total_steps, "], got ",
              warmup_steps);
  TORCH_CHECK(min_lr_ratio >= 0.0 && min_lr_ratio <= 1.0,
              "CosineWarmupLR: min_lr_ratio must be in [0, 1], got ", min_lr_ratio);
  TORCH_CHECK(warmup_start_factor >= 0.0 && warmup_start_factor <= 1.0,
              "CosineWarmupLR: warmup_start_factor must be in [0, 1], got ", warmup_start_factor);
  apply();
}

double CosineWarmupLR::compute_lr(double base_lr, int64_t step) const {
  if (step < warmup_steps_) {
    const double t = static_cast<double>(step) / static_cast<double>(warmup_steps_);
    return base_lr * (warmup_start_factor_ + (1.0 - warmup_start_factor_) * t);
  }
  if (step >= total_steps_) return base_lr * min_lr_ratio_;
  const double progress =
      static_cast<double>(step - warmup_steps_) / static_cast<double>(total_steps_ - warmup_steps_);
  return base_lr * (min_lr_ratio_ + (1.0 - min_lr_ratio_) * 0.5 * (1.0 + std::cos(kPi * progress)));
}

// ---------------------------------------------------------------------------

ReduceLROnPlateau::ReduceLROnPlateau(torch::optim::Optimizer& optimizer,
                                     ReduceLROnPlateauOptions options)
    : optimizer_(optimizer), options_(options) {
  const auto& o = options_;
  TORCH_CHECK(o.factor() > 0.0 && o.factor() < 1.0,
              "ReduceLROnPlateau: factor must be in (0, 1), got ", o.factor());
  TORCH_CHECK(o.patience() >= 0, "ReduceLROnPlateau: patience must be >= 0, got ", o.patience());
  TORCH_CHECK(std::isfinite(o.threshold()) && o.threshold() >= 0.0,
              "ReduceLROnPlateau: threshold must be finite and >= 0, got ", o.threshold());
  TORCH_CHECK(o.cooldown() >= 0, "ReduceLROnPlateau: cooldown must be >= 0, got ", o.cooldown());
  TORCH_CHECK(std::isfinite(o.min_lr()) && o.min_lr() >= 0.0,
              "ReduceLROnPlateau: min_lr must be finite and >= 0, got ", o.min_lr());
  TORCH_CHECK(std::isfinite(o.eps()) && o.eps() >= 0.0,
              "ReduceLROnPlateau: eps must be finite and >= 0, got ", o.eps());
}

void ReduceLROnPlateau::step(double metric) {
  const auto& o = options_;
  ++last_epoch_;
  const double inf = std::numeric_limits<double>::infinity();
  const double best = best_.value_or(o.maximize() ? -inf : inf);
  // Python's threshold_mode="rel"; a NaN metric is never an improvement.
  const bool better =
      o.maximize() ? metric > best * (1.0 + o.threshold()) : metric < best * (1.0 - o.threshold());
  if (better) {
    best_ = metric;
    num_bad_ = 0;
  } else {
    ++num_bad_;
  }
  if (cooldown_counter_ > 0) {
    --cooldown_counter_;
    num_bad_ = 0;  // bad evaluations during cooldown do not count
  }
  if (num_bad_ > o.patience()) {
    for (auto& group : optimizer_.param_groups()) {
      const double old_lr = group.options().get_lr();
      const double new_lr = std::max(old_lr * o.factor(), o.min_lr());
      if (old_lr - new_lr > o.eps()) group.options().set_lr(new_lr);
    }
    cooldown_counter_ = o.cooldown();
    num_bad_ = 0;
  }
}

std::vector<double> ReduceLROnPlateau::get_last_lr() const { return get_lrs(optimizer_); }

void ReduceLROnPlateau::save(torch::serialize::OutputArchive& archive) const {
  archive.write("kind", c10::IValue(std::string("ReduceLROnPlateau")));
  archive.write("has_best", c10::IValue(best_.has_value()));
  archive.write("best", c10::IValue(best_.value_or(0.0)));
  archive.write("num_bad", c10::IValue(num_bad_));
  archive.write("cooldown_counter", c10::IValue(cooldown_counter_));
  archive.write("last_epoch", c10::IValue(last_epoch_));
  // The reduced lrs are the schedule's state: keep them with it, so a resume
  // is exact even when the optimizer is restored from elsewhere.
  archive.write("lrs", to_ivalue(get_lrs(optimizer_)));
}

void ReduceLROnPlateau::load(torch::serialize::InputArchive& archive) {
  const char* owner = "ReduceLROnPlateau";
  const std::string kind = read_value(archive, owner, "kind").toStringRef();
  TORCH_CHECK(kind == owner, owner, ": saved state belongs to a ", kind, ", not a ", owner);
  const bool has_best = read_value(archive, owner, "has_best").toBool();
  const double best = read_value(archive, owner, "best").to<double>();
  const int64_t num_bad = read_value(archive, owner, "num_bad").toInt();
  const int64_t cooldown_counter = read_value(archive, owner, "cooldown_counter").toInt();
  const int64_t last_epoch = read_value(archive, owner, "last_epoch").toInt();
  const std::vector<double> lrs = read_value(archive, owner, "lrs").to<std::vector<double>>();
  auto& groups = optimizer_.param_groups();
  TORCH_CHECK(lrs.size() == groups.size(), owner, ": saved state has ", lrs.size(),
              " lrs but the optimizer has ", groups.size(), " parameter groups");
  best_ = has_best ? std::optional<double>(best) : std::nullopt;
  num_bad_ = num_bad;
  cooldown_counter_ = cooldown_counter;
  last_epoch_ = last_epoch;
  for (size_t g = 0; g < groups.size(); ++g) groups[g].options().set_lr(lrs[g]);
}

}  // namespace wick
