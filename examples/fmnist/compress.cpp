#include "compress.h"

#include <wick/pruner.h>
#include <wick/quantizer.h>

#include <algorithm>
#include <chrono>
#include <vector>

namespace fmnist {
namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Seconds for one pass over `images` in batches.
double pass_seconds(torch::nn::Sequential& model, const torch::Tensor& images, int64_t eval_batch) {
  c10::InferenceMode guard;
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < images.size(0); i += eval_batch) {
    model->forward(images.narrow(0, i, std::min(eval_batch, images.size(0) - i)));
  }
  return seconds_since(t0);
}

// Median milliseconds of one image through the model.
double latency_ms(torch::nn::Sequential& model, const torch::Tensor& images,
                  int64_t samples = 300) {
  c10::InferenceMode guard;
  std::vector<double> ms;
  for (int64_t i = 0; i < samples + 20; ++i) {
    auto x = images.narrow(0, i % images.size(0), 1);
    const auto t0 = std::chrono::steady_clock::now();
    model->forward(x);
    if (i >= 20) ms.push_back(1e3 * seconds_since(t0));  // the first 20 warm up
  }
  std::nth_element(ms.begin(), ms.begin() + static_cast<std::ptrdiff_t>(ms.size() / 2), ms.end());
  return ms[ms.size() / 2];
}

}  // namespace

double accuracy(torch::nn::Sequential& model, const torch::Tensor& images,
                const torch::Tensor& targets, int64_t eval_batch) {
  model->eval();
  c10::InferenceMode guard;
  const auto device =
      model->parameters().empty() ? torch::Device(torch::kCPU) : model->parameters()[0].device();
  int64_t correct = 0;
  for (int64_t i = 0; i < images.size(0); i += eval_batch) {
    const int64_t n = std::min(eval_batch, images.size(0) - i);
    auto logits = model->forward(images.narrow(0, i, n).to(device));
    correct += logits.argmax(1).cpu().eq(targets.narrow(0, i, n)).sum().item<int64_t>();
  }
  return static_cast<double>(correct) / static_cast<double>(images.size(0));
}

Int8Comparison compare_int8(const torch::nn::Sequential& model, const torch::Tensor& images,
                            const torch::Tensor& targets, int64_t eval_batch) {
  Int8Comparison c;
  auto fp32 = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(
      model->clone(torch::Device(torch::kCPU)));
  auto int8 = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(
      model->clone(torch::Device(torch::kCPU)));
  TORCH_CHECK(fp32 && int8, "compare_int8: cloning the model did not give a Sequential");
  torch::nn::Sequential f(fp32), q(int8);
  f->eval();
  q->eval();
  const auto report = wick::quantize_dynamic(*q);
  c.report = report.format();
  c.fp32_linear_bytes = report.linear_bytes_before;
  c.int8_linear_bytes = report.linear_bytes_after;
  c.fp32_model_bytes = report.model_bytes_before;
  c.int8_model_bytes = report.model_bytes_after;

  c.fp32_accuracy = accuracy(f, images, targets, eval_batch);
  c.int8_accuracy = accuracy(q, images, targets, eval_batch);
  // Timed twice each, alternating, keeping the faster pass: the first touches cold memory.
  c.fp32_seconds = pass_seconds(f, images, eval_batch);
  c.int8_seconds = pass_seconds(q, images, eval_batch);
  c.fp32_seconds = std::min(c.fp32_seconds, pass_seconds(f, images, eval_batch));
  c.int8_seconds = std::min(c.int8_seconds, pass_seconds(q, images, eval_batch));
  c.fp32_latency_ms = latency_ms(f, images);
  c.int8_latency_ms = latency_ms(q, images);
  c.int8_model = q;
  return c;
}

PruneResult prune_and_finetune(
    torch::nn::Sequential& model, double amount,
    const std::function<void(std::shared_ptr<wick::Callback>)>& finetune) {
  std::vector<std::string> names;
  for (const auto& item : model->named_modules("", /*include_self=*/false)) {
    if (item.value()->as<torch::nn::LinearImpl>() || item.value()->as<torch::nn::Conv2dImpl>()) {
      names.push_back(item.key() + ".weight");
    }
  }
  auto pruner = std::make_shared<wick::Pruner>(*model);
  pruner->global_unstructured(names, amount);
  finetune(std::make_shared<wick::PrunerCallback>(pruner));
  PruneResult r;
  r.report = pruner->format_report();
  r.sparsity = pruner->sparsity();
  pruner->make_permanent();
  return r;
}

}  // namespace fmnist
