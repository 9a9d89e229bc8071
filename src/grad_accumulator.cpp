#include "wick/grad_accumulator.h"

#include <c10/util/Exception.h>

namespace wick {

GradAccumulator::GradAccumulator(int64_t steps) : steps_(steps) {
  TORCH_CHECK(steps >= 1, "GradAccumulator: steps must be >= 1, got ", steps);
}

double GradAccumulator::begin(int64_t batch_size, bool ends_data) {
  TORCH_CHECK(!in_micro_batch_, "GradAccumulator: begin() called twice without end(): micro-batch ",
              count_, " of the current group is still open; call end() after its backward first");
  TORCH_CHECK(batch_size > 0, "GradAccumulator: batch_size must be > 0, got ", batch_size);
  if (count_ == 0) {
    first_size_ = batch_size;
    samples_ = 0;
  }
  ++count_;
  samples_ += batch_size;
  in_micro_batch_ = true;
  closes_group_ = ends_data || count_ == steps_;
  // The group is assumed to hold `steps` micro-batches the size of its first;
  // end() corrects the gradients when it turns out otherwise.
  return static_cast<double>(batch_size) / (static_cast<double>(steps_) * first_size_);
}

bool GradAccumulator::sync_gradients() const { return closes_group_; }

bool GradAccumulator::end(const std::vector<torch::Tensor>& params) {
  TORCH_CHECK(in_micro_batch_, "GradAccumulator: end() called without a matching begin()");
  in_micro_batch_ = false;
  if (!closes_group_) return false;

  const int64_t expected = steps_ * first_size_;
  if (samples_ != expected) {
    // Gradients so far are sum_over_samples(grad) / expected; make them / samples_.
    const double scale = static_cast<double>(expected) / static_cast<double>(samples_);
    torch::NoGradGuard no_grad;
    for (const auto& p : params) {
      const auto& g = p.grad();  // in-place ops are const on a Tensor handle
      if (g.defined()) g.mul_(scale);
    }
  }
  ++groups_;
  count_ = 0;
  samples_ = 0;
  first_size_ = 0;
  return true;
}

void GradAccumulator::reset() {
  count_ = 0;
  samples_ = 0;
  first_size_ = 0;
  in_micro_batch_ = false;
  closes_group_ = false;
}

}  // namespace wick
