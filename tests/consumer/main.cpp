// A user's program, built against the *installed* wick (scripts/test does
// this); the same code is the README's example.
#include <wick/wick.h>

#include <iostream>

struct Regression : wick::Task {
  torch::nn::Linear net{4, 1};
  torch::nn::Module& module() override { return *net; }
  wick::StepOutput training_step(const wick::Batch& b) override {
    return torch::mse_loss(net(b.data), b.target);
  }
  std::map<std::string, torch::Tensor> validation_step(const wick::Batch& b) override {
    return {{"mse", torch::mse_loss(net(b.data), b.target)}};
  }
};

int main() {
  torch::manual_seed(0);
  auto x = torch::randn({1024, 4});
  auto y = x.matmul(torch::tensor({1.0f, -2.0f, 3.0f, 0.5f})).unsqueeze(1) + 0.7f;
  Regression task;
  torch::optim::Adam optimizer(task.net->parameters(), 5e-2);
  wick::TensorBatchSource train(x, y, 64);
  wick::Trainer trainer(wick::TrainerOptions().max_epochs(30).grad_accum_steps(2));
  trainer.add_callback(
      std::make_shared<wick::ProgressBar>(wick::ProgressBarOptions().force_lines(true)));
  auto result = trainer.fit(task, optimizer, train, &train);
  const double mse = result.last_val_metrics.at("val/mse");
  std::cout << "wick " << wick::version() << ": val mse " << mse << " after " << result.state.step
            << " steps\n";
  return mse < 1e-3 ? 0 : 1;  // the data is exactly linear: training must fit it
}
