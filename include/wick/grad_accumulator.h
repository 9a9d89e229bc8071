#pragma once
// Gradient accumulation: one optimizer step per group of `steps` micro-batches,
// with exactly the gradients of one batch made of the group's samples.
//
//   wick::GradAccumulator accum(4);                        // 4 micro-batches per step
//   for (size_t i = 0; i < batches.size(); ++i) {
//     auto& b = batches[i];
//     bool last = i + 1 == batches.size();
//     double w = accum.begin(b.data.size(0), /*ends_data=*/last);
//     (loss_fn(model->forward(b.data), b.target) * w).backward();
//     if (accum.end(model->parameters())) {                // group complete
//       optimizer.step();
//       optimizer.zero_grad();
//     }
//   }
//
// The rule: every micro-batch's mean-reduced loss is weighted by
// batch_size / (steps * first_batch_size_of_group). When a group closes with
// another total than steps * first_batch_size (the last, partial group of an
// epoch, or a short last batch), end() rescales the accumulated gradients by
// expected / actual samples, so the group's gradient is the mean over its real
// samples: the same as one batch holding them.

#include <torch/torch.h>

#include <cstdint>
#include <vector>

namespace wick {

class GradAccumulator {
 public:
  /// `steps`: micro-batches per optimizer step, >= 1 (1 = no accumulation).
  explicit GradAccumulator(int64_t steps);

  /// Starts the next micro-batch of `batch_size` (> 0) samples and returns the
  /// weight to multiply its mean-reduced loss by before backward.
  /// `ends_data`: no micro-batch follows (end of epoch or of the data), so this
  /// one closes its group early. Throws if the previous micro-batch was not end()ed.
  double begin(int64_t batch_size, bool ends_data = false);

  /// Whether the micro-batch begun last closes its group: gradients must be
  /// synchronized (DDP) on this one and may stay local on the others.
  bool sync_gradients() const;

  /// Ends the micro-batch begun last, after its backward. When it closes the
  /// group, fixes the weighting of `params`' gradients if the group's real size
  /// differs from the assumed one, starts a new group and returns true: step
  /// the optimizer now. Returns false otherwise.
  bool end(const std::vector<torch::Tensor>& params);

  /// Drops a partly accumulated group (e.g. on a skipped step); the next begin() starts a group.
  void reset();

  int64_t steps() const { return steps_; }
  /// Micro-batches begun in the current group (0 between groups).
  int64_t micro_batches_in_group() const { return count_; }
  /// Samples begun in the current group.
  int64_t samples_in_group() const { return samples_; }
  /// Completed groups (optimizer steps) since construction.
  int64_t groups_completed() const { return groups_; }

 private:
  int64_t steps_;
  int64_t count_ = 0;       // micro-batches begun in the current group
  int64_t samples_ = 0;     // samples begun in the current group
  int64_t first_size_ = 0;  // first micro-batch's size in the current group
  int64_t groups_ = 0;
  bool in_micro_batch_ = false;
  bool closes_group_ = false;
};

}  // namespace wick
