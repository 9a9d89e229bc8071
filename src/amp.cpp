#include <wick/amp.h>
#include <wick/distributed.h>

#include <ATen/autocast_mode.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <limits>

#include <wick/detail/compat.h>

namespace wick {

// ---------------------------------------------------------------- Precision

std::string to_string(Precision precision) {
  switch (precision) {
    case Precision::kFP32:
      return "fp32";
    case Precision::kBF16:
      return "bf16";
    case Precision::kFP16:
      return "fp16";
  }
  TORCH_CHECK(false, "to_string: unknown Precision value ", static_cast<int>(precision));
}

Precision parse_precision(const std::string& text) {
  std::string t;
  t.reserve(text.size());
  for (char c : text) {
    if (!std::isspace(static_cast<unsigned char>(c))) {
      t.push_back(static_cast<char>(std::tolower(static_cast<unsigned char>(c))));
    }
  }
  // The spellings of Python's ecosystems (Lightning's "16-mixed", "bf16-mixed",
  // "32-true"; torch's dtype names) map to the three modes wick has.
  if (t == "fp32" || t == "32" || t == "32-true" || t == "float32" || t == "float" || t == "f32") {
    return Precision::kFP32;
  }
  if (t == "bf16" || t == "bf16-mixed" || t == "bfloat16") return Precision::kBF16;
  if (t == "fp16" || t == "16" || t == "16-mixed" || t == "float16" || t == "half" || t == "f16") {
    return Precision::kFP16;
  }
  TORCH_CHECK(false, "parse_precision: precision must be one of fp32, bf16, fp16 (or 32, 32-true, ",
              "float32, bf16-mixed, bfloat16, 16, 16-mixed, float16, half), got '", text, "'");
}

c10::ScalarType autocast_dtype(Precision precision) {
  switch (precision) {
    case Precision::kFP32:
      return c10::kFloat;
    case Precision::kBF16:
      return c10::kBFloat16;
    case Precision::kFP16:
      return c10::kHalf;
  }
  TORCH_CHECK(false, "autocast_dtype: unknown Precision value ", static_cast<int>(precision));
}

// ------------------------------------------------------------ AutocastGuard

namespace {

c10::DeviceType checked_autocast_device(c10::DeviceType device_type) {
  TORCH_CHECK(device_type == c10::kCPU || device_type == c10::kCUDA,
              "AutocastGuard: device_type must be CPU or CUDA, got ", device_type);
  return device_type;
}

c10::ScalarType checked_autocast_dtype(c10::ScalarType dtype) {
  TORCH_CHECK(dtype == c10::kHalf || dtype == c10::kBFloat16,
              "AutocastGuard: dtype must be Half (fp16) or BFloat16 (bf16), got ", dtype);
  return dtype;
}

// kFP32 keeps the device's current autocast dtype and only turns autocast off,
// so an enclosing scope's dtype survives untouched.
c10::ScalarType guard_dtype(const torch::Device& device, Precision precision) {
  auto type = checked_autocast_device(device.type());
  return precision == Precision::kFP32 ? at::autocast::get_autocast_dtype(type)
                                       : autocast_dtype(precision);
}

}  // namespace

AutocastGuard::AutocastGuard(c10::DeviceType device_type, c10::ScalarType dtype, bool enabled)
    : device_type_(checked_autocast_device(device_type)),
      prev_enabled_(at::autocast::is_autocast_enabled(device_type_)),
      prev_dtype_(at::autocast::get_autocast_dtype(device_type_)) {
  checked_autocast_dtype(dtype);
  // The order of Python's torch.autocast.__enter__.
  at::autocast::set_autocast_enabled(device_type_, enabled);
  at::autocast::set_autocast_dtype(device_type_, dtype);
  at::autocast::increment_nesting();
}

AutocastGuard::AutocastGuard(const torch::Device& device, Precision precision)
    : AutocastGuard(device.type(), guard_dtype(device, precision), precision != Precision::kFP32) {}

AutocastGuard::~AutocastGuard() {
  // As torch.autocast.__exit__: the cast-weight cache lives until the
  // outermost autocast scope of the thread closes.
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  at::autocast::set_autocast_enabled(device_type_, prev_enabled_);
  at::autocast::set_autocast_dtype(device_type_, prev_dtype_);
}

// ---------------------------------------------------------------- AmpScaler

namespace {

void validate_options(const AmpScalerOptions& o, const char* where) {
  TORCH_CHECK(std::isfinite(static_cast<float>(o.init_scale())) && o.init_scale() > 0.0, where,
              ": init_scale must be > 0 and finite in float32, got ", o.init_scale());
  TORCH_CHECK(std::isfinite(o.growth_factor()) && o.growth_factor() > 1.0, where,
              ": growth_factor must be > 1 and finite, got ", o.growth_factor());
  TORCH_CHECK(o.backoff_factor() > 0.0 && o.backoff_factor() < 1.0, where,
              ": backoff_factor must be in (0, 1), got ", o.backoff_factor());
  TORCH_CHECK(
      o.growth_interval() >= 1 && o.growth_interval() <= std::numeric_limits<int32_t>::max(), where,
      ": growth_interval must be in [1, 2^31 - 1], got ", o.growth_interval());
}

}  // namespace

AmpScaler::AmpScaler(AmpScalerOptions options) : options_(std::move(options)) {
  validate_options(options_, "AmpScaler");
}

void AmpScaler::lazy_init(const torch::Device& device) {
  TORCH_INTERNAL_ASSERT(!growth_tracker_.defined(),
                        "AmpScaler: growth tracker created before scale");
  scale_ = torch::full({}, options_.init_scale(), torch::dtype(torch::kFloat32).device(device));
  growth_tracker_ =
      torch::full({}, init_growth_tracker_, torch::dtype(torch::kInt32).device(device));
}

void AmpScaler::check_initialized(const char* method) const {
  TORCH_CHECK(
      scale_.defined() && growth_tracker_.defined(), "AmpScaler: ", method,
      "() called before the scale exists; call scaler.scale(loss) earlier in the iteration");
}

AmpScaler::PerOptimizer& AmpScaler::state_of(const torch::optim::Optimizer& optimizer) {
  return per_optimizer_[&optimizer];
}

torch::Tensor AmpScaler::scale(const torch::Tensor& loss) {
  if (!options_.enabled()) return loss;
  TORCH_CHECK(loss.defined(), "AmpScaler: scale() needs a defined loss tensor");
  if (!scale_.defined()) lazy_init(loss.device());
  return loss * scale_.to(loss.device(), /*non_blocking=*/true);
}

std::vector<std::pair<torch::Device, torch::Tensor>> AmpScaler::unscale_grads(
    torch::optim::Optimizer& optimizer, const torch::Tensor& inv_scale) {
  // One fused kernel call per (device, dtype) group, as Python's _unscale_grads_.
  struct Group {
    torch::Device device;
    std::vector<std::pair<c10::ScalarType, std::vector<torch::Tensor>>> by_dtype;
  };
  std::vector<Group> groups;
  torch::NoGradGuard no_grad;
  for (auto& group : optimizer.param_groups()) {
    for (auto& param : group.params()) {
      if (!param.grad().defined()) continue;
      const auto& grad = param.grad();
      TORCH_CHECK(grad.scalar_type() != torch::kHalf,
                  "AmpScaler: unscale_() found an fp16 gradient (shape ", grad.sizes(),
                  "); parameters must stay fp32 under autocast, only activations are fp16 "
                  "(Python: 'Attempting to unscale FP16 gradients.')");
      torch::Tensor to_unscale = grad.is_sparse() ? grad._values() : grad;
      auto g = std::find_if(groups.begin(), groups.end(),
                            [&](const Group& x) { return x.device == to_unscale.device(); });
      if (g == groups.end()) {
        groups.push_back(Group{to_unscale.device(), {}});
        g = groups.end() - 1;
      }
      auto d = std::find_if(g->by_dtype.begin(), g->by_dtype.end(),
                            [&](const auto& x) { return x.first == to_unscale.scalar_type(); });
      if (d == g->by_dtype.end()) {
        g->by_dtype.emplace_back(to_unscale.scalar_type(), std::vector<torch::Tensor>{});
        d = g->by_dtype.end() - 1;
      }
      d->second.push_back(to_unscale);
    }
  }

  std::vector<std::pair<torch::Device, torch::Tensor>> found_inf_per_device;
  for (auto& g : groups) {
    auto found_inf = torch::zeros({}, torch::dtype(torch::kFloat32).device(g.device));
    auto inv = inv_scale.to(g.device, /*non_blocking=*/true);
    for (auto& [dtype, grads] : g.by_dtype) {
      at::_amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv);
    }
    found_inf_per_device.emplace_back(g.device, found_inf);
  }
  return found_inf_per_device;
}

void AmpScaler::unscale_(torch::optim::Optimizer& optimizer) {
  if (!options_.enabled()) return;
  check_initialized("unscale_");
  auto& state = state_of(optimizer);
  TORCH_CHECK(state.stage != Stage::kUnscaled,
              "AmpScaler: unscale_() has already been called on this optimizer since the last "
              "update()");
  TORCH_CHECK(state.stage != Stage::kStepped,
              "AmpScaler: unscale_() is being called after step(); call update() first");
  // The reciprocal in float64, as Python does: float32 division can be inexact.
  auto inv_scale = scale_.to(torch::kFloat64).reciprocal().to(torch::kFloat32);
  state.found_inf_per_device = unscale_grads(optimizer, inv_scale);
  if (pg_ != nullptr && pg_->world_size() > 1) {
    // One flag for all ranks: a rank whose shard overflowed makes every rank skip.
    auto any = torch::zeros({}, torch::dtype(torch::kFloat32).device(pg_->device()));
    for (const auto& [device, found_inf] : state.found_inf_per_device) {
      any.add_(found_inf.to(pg_->device()));
    }
    pg_->allreduce_sum({any});
    any = any.gt(0).to(torch::kFloat32);
    if (state.found_inf_per_device.empty()) {
      state.found_inf_per_device.emplace_back(pg_->device(), any);
    } else {
      for (auto& [device, found_inf] : state.found_inf_per_device) found_inf.copy_(any);
    }
  }
  state.stage = Stage::kUnscaled;
}

bool AmpScaler::step(torch::optim::Optimizer& optimizer) {
  if (!options_.enabled()) {
    optimizer.step();
    ++taken_steps_;
    return true;
  }
  check_initialized("step");
  auto& state = state_of(optimizer);
  TORCH_CHECK(
      state.stage != Stage::kStepped,
      "AmpScaler: step() has already been called on this optimizer since the last update()");
  if (state.stage == Stage::kReady) unscale_(optimizer);
  TORCH_CHECK(!state.found_inf_per_device.empty(),
              "AmpScaler: step(): no inf checks were recorded for this optimizer: none of its "
              "parameters has a gradient (Python: 'No inf checks were recorded for this "
              "optimizer.')");
  double found = 0.0;
  for (const auto& [device, found_inf] : state.found_inf_per_device) {
    found += found_inf.item<double>();
  }
  const bool skip = found != 0.0;
  if (!skip) optimizer.step();
  state.stage = Stage::kStepped;
  state.found_inf = skip;
  ++(skip ? skipped_steps_ : taken_steps_);
  return !skip;
}

bool AmpScaler::any_found_inf() {
  // Known without a sync when every optimizer went through step(); an
  // optimizer that was only unscaled costs one .item().
  bool any = false;
  for (auto& [opt, state] : per_optimizer_) {
    if (state.found_inf.has_value()) {
      any = any || *state.found_inf;
    } else {
      for (const auto& [device, found_inf] : state.found_inf_per_device) {
        any = any || found_inf.item<double>() != 0.0;
      }
    }
  }
  return any;
}

void AmpScaler::update() {
  if (!options_.enabled()) return;
  check_initialized("update");
  std::vector<torch::Tensor> found_infs;
  for (auto& [opt, state] : per_optimizer_) {
    for (auto& [device, found_inf] : state.found_inf_per_device) {
      found_infs.push_back(found_inf.to(scale_.device(), /*non_blocking=*/true));
    }
  }
  TORCH_CHECK(!found_infs.empty(),
              "AmpScaler: update(): no inf checks were recorded prior to update(); call "
              "step(optimizer) (or unscale_) on an optimizer with gradients first");
  auto combined = found_infs[0].clone();
  for (size_t i = 1; i < found_infs.size(); ++i) combined.add_(found_infs[i]);
  at::_amp_update_scale_(scale_, growth_tracker_, combined, options_.growth_factor(),
                         options_.backoff_factor(), options_.growth_interval());
  last_step_skipped_ = any_found_inf();
  per_optimizer_.clear();
}

void AmpScaler::update(double new_scale) {
  if (!options_.enabled()) return;
  check_initialized("update");
  TORCH_CHECK(std::isfinite(static_cast<float>(new_scale)) && new_scale > 0.0,
              "AmpScaler: update(new_scale): new_scale must be > 0 and finite in float32, got ",
              new_scale);
  // As Python's update(new_scale): the growth tracker is left as it is.
  scale_.fill_(new_scale);
  last_step_skipped_ = any_found_inf();
  per_optimizer_.clear();
}

double AmpScaler::get_scale() const {
  if (!options_.enabled()) return 1.0;
  return scale_.defined() ? scale_.item<double>() : options_.init_scale();
}

int64_t AmpScaler::growth_tracker() const {
  if (!options_.enabled()) return 0;
  return growth_tracker_.defined() ? growth_tracker_.item<int64_t>() : init_growth_tracker_;
}

// ------------------------------------------------------------ serialization

namespace {

c10::IValue read_key(torch::serialize::InputArchive& archive, const std::string& key) {
  c10::IValue value;
  TORCH_CHECK(archive.try_read(key, value), "AmpScaler: load(): key '", key,
              "' is missing from the archive");
  return value;
}

double read_double(torch::serialize::InputArchive& archive, const std::string& key) {
  auto v = read_key(archive, key);
  TORCH_CHECK(v.isDouble(), "AmpScaler: load(): key '", key, "' must hold a float, got ",
              v.tagKind());
  return v.to<double>();
}

int64_t read_int(torch::serialize::InputArchive& archive, const std::string& key) {
  auto v = read_key(archive, key);
  TORCH_CHECK(v.isInt(), "AmpScaler: load(): key '", key, "' must hold an int, got ", v.tagKind());
  return v.toInt();
}

bool read_bool(torch::serialize::InputArchive& archive, const std::string& key) {
  auto v = read_key(archive, key);
  TORCH_CHECK(v.isBool(), "AmpScaler: load(): key '", key, "' must hold a bool, got ", v.tagKind());
  return v.toBool();
}

}  // namespace

void AmpScaler::save(torch::serialize::OutputArchive& archive) const {
  archive.write("enabled", c10::IValue(options_.enabled()));
  archive.write("skipped_steps", c10::IValue(skipped_steps_));
  archive.write("taken_steps", c10::IValue(taken_steps_));
  // A disabled scaler has no scale state, like Python's empty state_dict().
  if (!options_.enabled()) return;
  archive.write("scale", c10::IValue(get_scale()));
  archive.write("growth_tracker", c10::IValue(growth_tracker()));
  archive.write("growth_factor", c10::IValue(options_.growth_factor()));
  archive.write("backoff_factor", c10::IValue(options_.backoff_factor()));
  archive.write("growth_interval", c10::IValue(options_.growth_interval()));
}

void AmpScaler::load(torch::serialize::InputArchive& archive) {
  const bool saved_enabled = read_bool(archive, "enabled");
  const int64_t skipped = read_int(archive, "skipped_steps");
  const int64_t taken = read_int(archive, "taken_steps");
  TORCH_CHECK(skipped >= 0 && taken >= 0, "AmpScaler: load(): skipped_steps and taken_steps must ",
              "be >= 0, got ", skipped, " and ", taken);
  if (!options_.enabled()) {
    skipped_steps_ = skipped;
    taken_steps_ = taken;
    return;
  }
  TORCH_CHECK(saved_enabled,
              "AmpScaler: load(): the archive was saved by a disabled AmpScaler and holds no "
              "scale; cannot load it into an enabled one");
  AmpScalerOptions loaded = options_;
  loaded.init_scale(read_double(archive, "scale"))
      .growth_factor(read_double(archive, "growth_factor"))
      .backoff_factor(read_double(archive, "backoff_factor"))
      .growth_interval(read_int(archive, "growth_interval"));
  validate_options(loaded, "AmpScaler: load()");
  const int64_t tracker = read_int(archive, "growth_tracker");
  TORCH_CHECK(tracker >= 0 && tracker < loaded.growth_interval(),
              "AmpScaler: load(): growth_tracker must be in [0, growth_interval), got ", tracker,
              " with growth_interval ", loaded.growth_interval());

  // Everything read and checked: only now change the scaler.
  options_ = loaded;
  init_growth_tracker_ = tracker;
  if (scale_.defined()) {
    scale_.fill_(options_.init_scale());
    growth_tracker_.fill_(tracker);
  }
  skipped_steps_ = skipped;
  taken_steps_ = taken;
  last_step_skipped_ = false;
}

}  // namespace wick
