#pragma once
// The Fashion-MNIST models of wick-fmnist --model, shared with wick-bench
// export (and spelled the same way in Python by export_fmnist.py, so that
// parameter names match: "1.weight", ...).

#include <torch/torch.h>

#include <string>

namespace fmnist {

/// "mlp": 784-512-256-10 with ReLU; "cnn": conv32-conv64 (3x3, max-pooled)
/// then fc128-fc10. Throws for another name.
inline torch::nn::Sequential make_model(const std::string& name) {
  namespace nn = torch::nn;
  if (name == "mlp") {
    return nn::Sequential(nn::Flatten(), nn::Linear(784, 512), nn::ReLU(), nn::Linear(512, 256),
                          nn::ReLU(), nn::Linear(256, 10));
  }
  TORCH_CHECK(name == "cnn", "the model must be mlp or cnn, got '", name, "'");
  return nn::Sequential(nn::Conv2d(nn::Conv2dOptions(1, 32, 3).padding(1)), nn::ReLU(),
                        nn::MaxPool2d(2),  // 32x14x14
                        nn::Conv2d(nn::Conv2dOptions(32, 64, 3).padding(1)), nn::ReLU(),
                        nn::MaxPool2d(2),  // 64x7x7
                        nn::Flatten(), nn::Linear(64 * 7 * 7, 128), nn::ReLU(),
                        nn::Linear(128, 10));
}

}  // namespace fmnist
