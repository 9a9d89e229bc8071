#pragma once
// Pruner: magnitude, structured and 2:4 pruning of a module's parameters,
// with masks that stay applied while the model is fine-tuned.
//
//   auto model = torch::nn::Sequential(torch::nn::Linear(64, 32), torch::nn::ReLU(),
//                                      torch::nn::Linear(32, 10));
//   auto pruner = std::make_shared<wick::Pruner>(*model);
//   pruner->global_unstructured({"0.weight", "2.weight"}, 0.5);   // 50% over both
//   // or, pruned gradually while training (Zhu & Gupta 2017):
//   trainer.add_callback(std::make_shared<wick::PrunerCallback>(pruner,
//       wick::PrunerCallbackOptions({"0.weight", "2.weight"})
//           .schedule(wick::CubicScheduleOptions(0.8).begin_step(0).frequency(10).num_prunings(20))));
//   trainer.fit(task, optimizer, train);
//   pruner->make_permanent();                                     // drop masks, zeros stay
//   std::cout << pruner->format_report();
//
// Masks are applied in place: a pruned weight is set to exactly zero, and
// apply_masks() zeroes it again after every optimizer step (the callback does
// this), since momentum or weight decay move it away from zero. There is no
// weight_orig: the module keeps its ordinary parameters, so forward, state
// dicts and checkpoints are untouched.
//
// Pruning again is cumulative: an entry pruned once stays pruned. `amount` is
// always the target fraction of the whole tensor (already-pruned entries
// count); torch.nn.utils.prune instead takes a fraction of what remains.

#include <torch/torch.h>

#include <wick/callbacks.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace wick {

/// One row of Pruner::report(): a parameter's size and how many of its entries are zero.
struct SparsityRow {
  std::string name;
  int64_t numel = 0;
  int64_t zeros = 0;
  double sparsity = 0.0;  // zeros / numel
};

class Pruner {
 public:
  /// Parameters are found by their names in `module.named_parameters()`
  /// ("0.weight", "encoder.fc1.bias"). The module must outlive the Pruner.
  explicit Pruner(torch::nn::Module& module);

  /// Zeros the round(amount * numel) entries of `name` with the smallest |w|. amount in [0, 1].
  void l1_unstructured(const std::string& name, double amount);
  /// One threshold over all `names`: zeros the round(amount * total) entries
  /// with the smallest |w| among them. amount in [0, 1].
  void global_unstructured(const std::vector<std::string>& names, double amount);
  /// Zeros whole slices along `dim` (dim 0: rows of a Linear weight, output
  /// channels of a Conv): the round(amount * size(dim)) slices with the
  /// smallest Ln norm (n > 0, or infinity). amount in [0, 1].
  void ln_structured(const std::string& name, double amount, double n = 2.0, int64_t dim = 0);
  /// 2:4 semi-structured: of every 4 consecutive entries along the input
  /// dimension (dim 1 of a 2-D weight, whose size(1) is a multiple of 4),
  /// keeps the 2 with the largest |w|.
  void semi_structured_24(const std::string& name);

  /// Sets every pruned entry to exactly zero (call after each optimizer step).
  void apply_masks();
  /// Applies the masks and drops them: the weights keep their zeros but are
  /// no longer held at zero by later apply_masks().
  void make_permanent();

  /// Whether `name` has a mask.
  bool has_mask(const std::string& name) const { return masks_.count(name) != 0; }
  /// The mask of `name` (bool, true = kept); an error if it has none.
  const torch::Tensor& mask(const std::string& name) const;
  const std::map<std::string, torch::Tensor>& masks() const { return masks_; }
  /// Replaces the masks (e.g. restored from a checkpoint) and applies them.
  void set_masks(std::map<std::string, torch::Tensor> masks);

  /// Per masked parameter (by name): numel, zeros of the weight, sparsity.
  std::vector<SparsityRow> report() const;
  /// The report as an aligned text table with a total line.
  std::string format_report() const;
  /// Zeros over numel across the masked parameters (0 with no masks).
  double sparsity() const;

  /// The parameter called `name`; an error naming the available ones if none is.
  torch::Tensor& parameter(const std::string& name);

 private:
  void check_amount(double amount, const char* method) const;
  void set_mask(const std::string& name, torch::Tensor keep);
  // Zeros the round(amount * total) smallest |w| among `names` (one threshold).
  void prune_smallest(const std::vector<std::string>& names, double amount);
  torch::Tensor importance(const std::string& name);  // |w| with pruned entries at 0
  torch::OrderedDict<std::string, torch::Tensor> params_;
  std::map<std::string, torch::Tensor> masks_;
};

// ---------------------------------------------------------------------------

/// The cubic sparsity schedule of Zhu & Gupta 2017 ("To prune, or not to prune"):
///   s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3
/// applied at t = t0, t0 + dt, ..., t0 + n * dt.
struct CubicScheduleOptions {
  /* implicit */ CubicScheduleOptions(double final_sparsity) : final_sparsity_(final_sparsity) {}
  /// s_f, the sparsity reached at t0 + n * dt; in [0, 1].
  TORCH_ARG(double, final_sparsity);
  /// s_i, the sparsity of the first pruning (at t0); in [0, final_sparsity]. Default 0.
  TORCH_ARG(double, initial_sparsity) = 0.0;
  /// t0, the optimizer step of the first pruning; >= 0. Default 0.
  TORCH_ARG(int64_t, begin_step) = 0;
  /// dt, optimizer steps between prunings; >= 1. Default 100.
  TORCH_ARG(int64_t, frequency) = 100;
  /// n, the number of pruning intervals (n + 1 prunings); >= 1. Default 10.
  TORCH_ARG(int64_t, num_prunings) = 10;
};

class CubicSchedule {
 public:
  /// Throws for options outside their ranges.
  explicit CubicSchedule(CubicScheduleOptions options);
  /// Whether the schedule prunes at optimizer step `step`.
  bool is_pruning_step(int64_t step) const;
  /// The target sparsity in force after step `step`: 0 before t0, s_t of the
  /// latest pruning step <= step, s_f after the last.
  double sparsity_at(int64_t step) const;
  /// t0 + n * dt, the step of the last pruning.
  int64_t end_step() const;
  const CubicScheduleOptions& options() const { return options_; }

 private:
  CubicScheduleOptions options_;
};

enum class PruneMethod { kL1Unstructured, kGlobalUnstructured, kLnStructured };

struct PrunerCallbackOptions {
  /* implicit */ PrunerCallbackOptions(std::vector<std::string> names = {})
      : names_(std::move(names)) {}
  /// Parameters the schedule prunes (unused without a schedule).
  TORCH_ARG(std::vector<std::string>, names);
  /// How the schedule prunes: kGlobalUnstructured (one threshold over
  /// `names`), kL1Unstructured or kLnStructured (each name to the target). Default global.
  TORCH_ARG(PruneMethod, method) = PruneMethod::kGlobalUnstructured;
  /// kLnStructured's norm and dimension. Defaults 2 and 0.
  TORCH_ARG(double, n) = 2.0;
  TORCH_ARG(int64_t, dim) = 0;
  /// Iterative pruning; none: the callback only keeps the existing masks applied.
  TORCH_ARG(std::optional<CubicScheduleOptions>, schedule) = std::nullopt;
};

/// Keeps a Pruner's masks applied during training: apply_masks() at fit start
/// and after every optimizer step, pruning first on the schedule's steps
/// (trainer.state().step after the step, so t0 = 0 prunes at fit start).
/// Its state (the masks and the last pruned step) travels in checkpoints, so
/// a resumed fit keeps pruning where it stopped.
class PrunerCallback : public Callback {
 public:
  /// Throws for a null pruner, a schedule without names, or bad schedule options.
  explicit PrunerCallback(std::shared_ptr<Pruner> pruner, PrunerCallbackOptions options = {});
  std::string name() const override { return "Pruner"; }
  void on_fit_start(Trainer& trainer) override;
  void on_step_end(Trainer& trainer) override;
  bool has_state() const override { return true; }
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

  /// Prunes if `step` is a schedule step not yet pruned, then applies the masks.
  void step(int64_t step);
  const std::optional<CubicSchedule>& schedule() const { return schedule_; }
  int64_t last_pruned_step() const { return last_pruned_step_; }

 private:
  std::shared_ptr<Pruner> pruner_;
  PrunerCallbackOptions options_;
  std::optional<CubicSchedule> schedule_;
  int64_t last_pruned_step_ = -1;
};

// ---------------------------------------------------------------------------

/// A Linear whose weight follows the 2:4 pattern, stored compressed for the
/// semi-structured sparse tensor cores of NVIDIA GPUs (sm_80 and newer) and
/// multiplied by cuSPARSELt (at::_cslt_sparse_mm): half the weight's values
/// plus metadata, and up to twice the matmul throughput on large layers.
class SemiStructuredLinearImpl : public torch::nn::Cloneable<SemiStructuredLinearImpl> {
 public:
  /// `linear`'s weight must be on CUDA, float16 or bfloat16, both dimensions
  /// multiples of 16, and keep at most 2 of every 4 entries along dim 1
  /// (Pruner::semi_structured_24 does that).
  explicit SemiStructuredLinearImpl(const torch::nn::LinearImpl& linear);
  SemiStructuredLinearImpl(const SemiStructuredLinearImpl& other) = default;
  SemiStructuredLinearImpl& operator=(const SemiStructuredLinearImpl& other) = default;

  void reset() override;
  void pretty_print(std::ostream& stream) const override;
  /// input [..., in_features] in the weight's dtype, on its device.
  torch::Tensor forward(const torch::Tensor& input);

  int64_t in_features() const { return in_features_; }
  int64_t out_features() const { return out_features_; }

  /// The compressed weight (values and metadata, cuSPARSELt's layout).
  torch::Tensor packed;
  /// [out_features] in the weight's dtype, or undefined.
  torch::Tensor bias;

 private:
  int64_t in_features_ = 0;
  int64_t out_features_ = 0;
  int64_t packed_numel_ = 0;
  bool with_bias_ = false;
  torch::Dtype dtype_ = torch::kHalf;
  torch::Device device_ = torch::kCUDA;
};
TORCH_MODULE(SemiStructuredLinear);

/// Whether `weight` (2-D) keeps at most 2 of every 4 consecutive entries along dim 1.
bool follows_24_pattern(const torch::Tensor& weight);

/// Replaces, in place, every torch::nn::Linear of `module`'s tree whose weight
/// follows the 2:4 pattern with a SemiStructuredLinear (in containers' lists
/// too, and redirecting custom modules' members, as quantize_dynamic does).
/// Returns their paths. Throws, before changing anything, when no Linear
/// follows the pattern or one that does is not on CUDA in float16/bfloat16
/// with dimensions that are multiples of 16.
std::vector<std::string> to_semi_structured(torch::nn::Module& module);

}  // namespace wick
