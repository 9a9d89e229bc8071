#include <wick/pruner.h>

#include "format.h"

#include <iterator>

#include <wick/trainer.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>

namespace wick {

namespace {

/// round(x) as Python rounds (half to even), which torch.nn.utils.prune uses
/// for the number of entries to prune.
int64_t round_half_even(double x) { return static_cast<int64_t>(std::nearbyint(x)); }

std::string join_keys(const std::vector<std::string>& keys) {
  std::string out;
  for (const auto& k : keys) out += (out.empty() ? "" : ", ") + k;
  return out.empty() ? std::string("none") : out;
}

}  // namespace

Pruner::Pruner(torch::nn::Module& module) : params_(module.named_parameters(/*recurse=*/true)) {}

torch::Tensor& Pruner::parameter(const std::string& name) {
  auto* found = params_.find(name);
  TORCH_CHECK(found != nullptr, "Pruner: no parameter named '", name,
              "' (available: ", join_keys(params_.keys()), ")");
  return *found;
}

void Pruner::check_amount(double amount, const char* method) const {
  TORCH_CHECK(amount >= 0.0 && amount <= 1.0, "Pruner: ", method, " amount must be in [0, 1], got ",
              amount);
}

const torch::Tensor& Pruner::mask(const std::string& name) const {
  auto it = masks_.find(name);
  TORCH_CHECK(it != masks_.end(), "Pruner: parameter '", name, "' has no mask");
  return it->second;
}

torch::Tensor Pruner::importance(const std::string& name) {
  torch::NoGradGuard no_grad;
  auto w = parameter(name).detach().abs();
  auto it = masks_.find(name);
  if (it != masks_.end()) w = w.masked_fill(it->second.logical_not(), 0);
  return w;
}

void Pruner::set_mask(const std::string& name, torch::Tensor keep) {
  auto it = masks_.find(name);
  if (it != masks_.end()) keep = keep.logical_and(it->second);  // pruned entries stay pruned
  masks_[name] = keep;
  torch::NoGradGuard no_grad;
  parameter(name).masked_fill_(keep.logical_not(), 0);
}

void Pruner::l1_unstructured(const std::string& name, double amount) {
  check_amount(amount, "l1_unstructured");
  prune_smallest({name}, amount);
}

void Pruner::global_unstructured(const std::vector<std::string>& names, double amount) {
  check_amount(amount, "global_unstructured");
  TORCH_CHECK(!names.empty(), "Pruner: global_unstructured needs at least one parameter name");
  for (size_t i = 0; i < names.size(); ++i)
    for (size_t j = 0; j < i; ++j)
      TORCH_CHECK(names[i] != names[j], "Pruner: global_unstructured names must be distinct, '",
                  names[i], "' appears twice");
  prune_smallest(names, amount);
}

void Pruner::prune_smallest(const std::vector<std::string>& names, double amount) {
  std::vector<torch::Tensor> scores;
  scores.reserve(names.size());
  for (const auto& name : names)
    scores.push_back(importance(name).reshape({-1}).to(torch::kFloat64));
  auto all = torch::cat(scores);
  const int64_t k = round_half_even(amount * static_cast<double>(all.numel()));
  auto keep =
      torch::ones({all.numel()}, torch::TensorOptions().dtype(torch::kBool).device(all.device()));
  if (k > 0) keep.index_fill_(0, std::get<1>(all.topk(k, /*dim=*/0, /*largest=*/false)), false);
  int64_t offset = 0;
  for (size_t i = 0; i < names.size(); ++i) {
    const auto& p = parameter(names[i]);
    set_mask(names[i], keep.narrow(0, offset, p.numel()).reshape(p.sizes()).clone());
    offset += p.numel();
  }
}

void Pruner::ln_structured(const std::string& name, double amount, double n, int64_t dim) {
  check_amount(amount, "ln_structured");
  TORCH_CHECK(n > 0.0, "Pruner: ln_structured n must be > 0, got ", n);
  const auto& p = parameter(name);
  TORCH_CHECK(p.dim() >= 1, "Pruner: ln_structured needs a parameter with at least 1 dimension, '",
              name, "' has 0");
  TORCH_CHECK(dim >= -p.dim() && dim < p.dim(), "Pruner: ln_structured dim must be in [", -p.dim(),
              ", ", p.dim() - 1, "] for '", name, "' of shape ", p.sizes(), ", got ", dim);
  if (dim < 0) dim += p.dim();
  auto w = importance(name).to(torch::kFloat64);
  std::vector<int64_t> other;
  for (int64_t d = 0; d < w.dim(); ++d)
    if (d != dim) other.push_back(d);
  auto norms = other.empty() ? w.abs().pow(n)  // 1-D: each slice is one entry
                             : torch::linalg_vector_norm(w, n, other, /*keepdim=*/false);
  const int64_t slices = p.size(dim);
  const int64_t k = round_half_even(amount * static_cast<double>(slices));
  auto keep_slice =
      torch::ones({slices}, torch::TensorOptions().dtype(torch::kBool).device(w.device()));
  if (k > 0) keep_slice.index_fill_(0, std::get<1>(norms.topk(k, 0, /*largest=*/false)), false);
  std::vector<int64_t> shape(p.dim(), 1);
  shape[dim] = slices;
  set_mask(name, keep_slice.reshape(shape).expand(p.sizes()).clone());
}

void Pruner::semi_structured_24(const std::string& name) {
  const auto& p = parameter(name);
  TORCH_CHECK(
      p.dim() == 2 && p.size(1) % 4 == 0,
      "Pruner: semi_structured_24 needs a 2-D parameter whose size(1) is a multiple of 4, '", name,
      "' has shape ", p.sizes());
  auto groups = importance(name).reshape({p.size(0), p.size(1) / 4, 4});
  auto top2 = std::get<1>(groups.topk(2, /*dim=*/-1, /*largest=*/true));
  auto keep =
      torch::zeros(groups.sizes(), torch::TensorOptions().dtype(torch::kBool).device(p.device()));
  keep.scatter_(-1, top2, true);
  set_mask(name, keep.reshape(p.sizes()));
}

void Pruner::apply_masks() {
  torch::NoGradGuard no_grad;
  for (auto& [name, keep] : masks_) {
    auto& p = parameter(name);
    if (keep.device() != p.device()) keep = keep.to(p.device());
    p.masked_fill_(keep.logical_not(), 0);
  }
}

void Pruner::make_permanent() {
  apply_masks();
  masks_.clear();
}

void Pruner::set_masks(std::map<std::string, torch::Tensor> masks) {
  for (auto& [name, keep] : masks) {
    const auto& p = parameter(name);
    TORCH_CHECK(keep.sizes() == p.sizes(), "Pruner: mask of '", name, "' has shape ", keep.sizes(),
                ", the parameter ", p.sizes());
    keep = keep.to(p.device(), torch::kBool);
  }
  masks_ = std::move(masks);
  apply_masks();
}

std::vector<SparsityRow> Pruner::report() const {
  std::vector<SparsityRow> rows;
  for (const auto& [name, keep] : masks_) {
    const auto& p = *params_.find(name);
    SparsityRow row;
    row.name = name;
    row.numel = p.numel();
    row.zeros = row.numel - p.count_nonzero().item<int64_t>();
    row.sparsity =
        row.numel ? static_cast<double>(row.zeros) / static_cast<double>(row.numel) : 0.0;
    rows.push_back(row);
  }
  return rows;
}

double Pruner::sparsity() const {
  int64_t numel = 0, zeros = 0;
  for (const auto& row : report()) {
    numel += row.numel;
    zeros += row.zeros;
  }
  return numel ? static_cast<double>(zeros) / static_cast<double>(numel) : 0.0;
}

std::string Pruner::format_report() const {
  auto rows = report();
  size_t width = 5;  // "total"
  for (const auto& r : rows) width = std::max(width, r.name.size());
  std::string out;
  auto put = [&](const std::string& name, const std::string& a, const std::string& b,
                 const std::string& c) {
    fmt::format_to(std::back_inserter(out), "{:<{}} {:>12} {:>12} {:>9}\n", name, width, a, b, c);
  };
  auto pct = [](double s) { return fmt::format("{:.2f}%", 100.0 * s); };
  put("name", "numel", "zeros", "sparsity");
  int64_t numel = 0, zeros = 0;
  for (const auto& r : rows) {
    put(r.name, std::to_string(r.numel), std::to_string(r.zeros), pct(r.sparsity));
    numel += r.numel;
    zeros += r.zeros;
  }
  put("total", std::to_string(numel), std::to_string(zeros),
      pct(numel ? static_cast<double>(zeros) / static_cast<double>(numel) : 0.0));
  return out;
}

// ---------------------------------------------------------------------------
// CubicSchedule

CubicSchedule::CubicSchedule(CubicScheduleOptions options) : options_(std::move(options)) {
  const auto& o = options_;
  TORCH_CHECK(o.final_sparsity() >= 0.0 && o.final_sparsity() <= 1.0,
              "CubicSchedule: final_sparsity must be in [0, 1], got ", o.final_sparsity());
  TORCH_CHECK(o.initial_sparsity() >= 0.0 && o.initial_sparsity() <= o.final_sparsity(),
              "CubicSchedule: initial_sparsity must be in [0, final_sparsity = ",
              o.final_sparsity(), "], got ", o.initial_sparsity());
  TORCH_CHECK(o.begin_step() >= 0, "CubicSchedule: begin_step must be >= 0, got ", o.begin_step());
  TORCH_CHECK(o.frequency() >= 1, "CubicSchedule: frequency must be >= 1, got ", o.frequency());
  TORCH_CHECK(o.num_prunings() >= 1, "CubicSchedule: num_prunings must be >= 1, got ",
              o.num_prunings());
}

int64_t CubicSchedule::end_step() const {
  return options_.begin_step() + options_.num_prunings() * options_.frequency();
}

bool CubicSchedule::is_pruning_step(int64_t step) const {
  return step >= options_.begin_step() && step <= end_step() &&
         (step - options_.begin_step()) % options_.frequency() == 0;
}

double CubicSchedule::sparsity_at(int64_t step) const {
  const auto& o = options_;
  if (step < o.begin_step()) return 0.0;
  if (step >= end_step()) return o.final_sparsity();
  const int64_t t = o.begin_step() + (step - o.begin_step()) / o.frequency() * o.frequency();
  const double progress = static_cast<double>(t - o.begin_step()) /
                          static_cast<double>(o.num_prunings() * o.frequency());
  const double r = 1.0 - progress;
  return o.final_sparsity() + (o.initial_sparsity() - o.final_sparsity()) * r * r * r;
}

// ---------------------------------------------------------------------------
// PrunerCallback

PrunerCallback::PrunerCallback(std::shared_ptr<Pruner> pruner, PrunerCallbackOptions options)
    : pruner_(std::move(pruner)), options_(std::move(options)) {
  TORCH_CHECK(pruner_ != nullptr, "PrunerCallback: pruner must not be null");
  if (options_.schedule()) {
    TORCH_CHECK(!options_.names().empty(),
                "PrunerCallback: a schedule needs the names of the parameters to prune");
    for (const auto& name : options_.names()) pruner_->parameter(name);  // unknown names fail now
    schedule_.emplace(*options_.schedule());
  }
}

void PrunerCallback::step(int64_t step) {
  if (schedule_ && schedule_->is_pruning_step(step) && step > last_pruned_step_) {
    const double target = schedule_->sparsity_at(step);
    switch (options_.method()) {
      case PruneMethod::kGlobalUnstructured:
        pruner_->global_unstructured(options_.names(), target);
        break;
      case PruneMethod::kL1Unstructured:
        for (const auto& name : options_.names()) pruner_->l1_unstructured(name, target);
        break;
      case PruneMethod::kLnStructured:
        for (const auto& name : options_.names())
          pruner_->ln_structured(name, target, options_.n(), options_.dim());
        break;
    }
    last_pruned_step_ = step;
  }
  pruner_->apply_masks();
}

void PrunerCallback::on_fit_start(Trainer& trainer) { step(trainer.state().step); }

void PrunerCallback::on_step_end(Trainer& trainer) { step(trainer.state().step); }

void PrunerCallback::save(torch::serialize::OutputArchive& archive) const {
  archive.write("last_pruned_step", c10::IValue(last_pruned_step_));
  archive.write("count", c10::IValue(static_cast<int64_t>(pruner_->masks().size())));
  int64_t i = 0;
  for (const auto& [name, keep] : pruner_->masks()) {
    archive.write("name_" + std::to_string(i), c10::IValue(name));
    archive.write("mask_" + std::to_string(i), keep.cpu(), /*is_buffer=*/true);
    ++i;
  }
}

void PrunerCallback::load(torch::serialize::InputArchive& archive) {
  auto read = [&](const std::string& key) {
    c10::IValue value;
    TORCH_CHECK(archive.try_read(key, value), "PrunerCallback: saved state has no '", key, "'");
    return value;
  };
  last_pruned_step_ = read("last_pruned_step").toInt();
  const int64_t count = read("count").toInt();
  std::map<std::string, torch::Tensor> masks;
  for (int64_t i = 0; i < count; ++i) {
    const std::string name = read("name_" + std::to_string(i)).toStringRef();
    torch::Tensor keep;
    archive.read("mask_" + std::to_string(i), keep, /*is_buffer=*/true);
    masks[name] = keep;
  }
  pruner_->set_masks(std::move(masks));
}

}  // namespace wick
