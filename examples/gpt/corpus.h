#pragma once
// The training text: Debian's fortunes (/usr/share/games/fortunes), byte-level.

#include <wick/trainer.h>

#include <torch/torch.h>

#include <cstdint>
#include <string>

namespace gpt {

struct Corpus {
  torch::Tensor train, val;  ///< int64 byte values
  int64_t train_fortunes = 0, val_fortunes = 0;
  int64_t files = 0;
};

/// Reads every fortune file of `dir` (regular files, not the .dat indexes), in
/// name order, splits them into fortunes at the "%" lines and sends every
/// `val_every`-th fortune to validation: the same split on every machine.
Corpus load_fortunes(const std::string& dir, int64_t val_every = 20);

/// Windows of `length` tokens starting every `stride` tokens: [N, length].
torch::Tensor make_windows(const torch::Tensor& tokens, int64_t length, int64_t stride);

/// Next-byte prediction: a batch's rows are windows of context + 1 bytes; the
/// model reads the first context bytes and is scored on the last context.
class LanguageModelTask : public wick::Task {
 public:
  LanguageModelTask(std::shared_ptr<torch::nn::Module> module,
                    std::function<torch::Tensor(const torch::Tensor&)> forward,
                    std::function<torch::Tensor()> aux_loss, double aux_weight);
  torch::nn::Module& module() override { return *module_; }
  wick::StepOutput training_step(const wick::Batch& batch) override;
  std::map<std::string, torch::Tensor> validation_step(const wick::Batch& batch) override;

 private:
  torch::Tensor cross_entropy(const torch::Tensor& windows);
  std::shared_ptr<torch::nn::Module> module_;
  std::function<torch::Tensor(const torch::Tensor&)> forward_;
  std::function<torch::Tensor()> aux_loss_;
  double aux_weight_;
};

}  // namespace gpt
