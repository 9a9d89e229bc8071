#pragma once
// wick-fmnist's --quantize and --prune: an int8 copy of the trained model
// evaluated beside the fp32 one, and global magnitude pruning with a
// fine-tuning epoch.

#include <wick/callbacks.h>

#include <torch/torch.h>

#include <functional>
#include <memory>
#include <string>

namespace fmnist {

struct Int8Comparison {
  double fp32_accuracy = 0, int8_accuracy = 0;
  double fp32_seconds = 0, int8_seconds = 0;  // one pass over the test set, batches of eval_batch
  double fp32_latency_ms = 0, int8_latency_ms = 0;  // one image (batch 1), median
  int64_t fp32_linear_bytes = 0, int8_linear_bytes = 0;
  int64_t fp32_model_bytes = 0, int8_model_bytes = 0;
  std::string report;                         // QuantizeReport::format()
  torch::nn::Sequential int8_model{nullptr};  // the quantized copy, on CPU
};

/// Copies `model` to the CPU, quantizes the copy (wick::quantize_dynamic, int8)
/// and evaluates both on `images`/`targets`: accuracy, time over the set,
/// latency of one image. `model` itself is left as it was.
Int8Comparison compare_int8(const torch::nn::Sequential& model, const torch::Tensor& images,
                            const torch::Tensor& targets, int64_t eval_batch = 1000);

/// Accuracy of `model` (eval mode, CPU or its device) on images/targets.
double accuracy(torch::nn::Sequential& model, const torch::Tensor& images,
                const torch::Tensor& targets, int64_t eval_batch = 1000);

struct PruneResult {
  double sparsity = 0;  // zeros / entries of the pruned weights, after fine-tuning
  std::string report;   // Pruner::format_report()
};

/// Prunes the weights of every Linear and Conv2d of `model` to `amount` with
/// one global |w| threshold, then calls `finetune` with the callback that keeps
/// the masks applied after every optimizer step, and makes the pruning permanent.
PruneResult prune_and_finetune(
    torch::nn::Sequential& model, double amount,
    const std::function<void(std::shared_ptr<wick::Callback>)>& finetune);

}  // namespace fmnist
