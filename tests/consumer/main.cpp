// A user's program, built against the *installed* wick (scripts/test does
// this); the training part of main() is the README's example.
#include <wick/wick.h>

#include <dlfcn.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>

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

namespace fs = std::filesystem;

// The torch wheel's libtorch.so exports its own std::filesystem functions
// (pytorch/pytorch#133437); bound to those, remove_all on a non-empty tree
// crashed. wick::wick's link puts libstdc++ first, so these calls must bind to
// libstdc++'s definitions and work on non-empty trees.
bool filesystem_works() {
  using RemoveAll = std::uintmax_t (*)(const fs::path&);
  Dl_info info{};
  const auto* remove_all = reinterpret_cast<void*>(static_cast<RemoveAll>(&fs::remove_all));
  if (dladdr(remove_all, &info) == 0 || info.dli_fname == nullptr ||
      std::string(info.dli_fname).find("libstdc++") == std::string::npos) {
    std::cerr << "std::filesystem::remove_all binds to "
              << (info.dli_fname ? info.dli_fname : "(unknown)") << ", not libstdc++\n";
    return false;
  }
  const char* tmp = std::getenv("TMPDIR");
  const fs::path root =
      fs::path(tmp ? tmp : "/tmp") / ("wick-consumer-fs-" + std::to_string(::getpid()));
  fs::remove_all(root);
  fs::create_directories(root / "a" / "b" / "c");
  std::ofstream(root / "a" / "one.txt") << "1";
  std::ofstream(root / "a" / "b" / "two.txt") << "22";
  std::ofstream(root / "a" / "b" / "c" / "three.txt") << "333";
  fs::copy(root / "a", root / "copy", fs::copy_options::recursive);
  fs::rename(root / "copy", root / "renamed");
  const bool copied = fs::file_size(root / "renamed" / "b" / "c" / "three.txt") == 3 &&
                      fs::exists(root / "renamed" / "one.txt") && !fs::exists(root / "copy");
  const std::uintmax_t removed = fs::remove_all(root);  // root + 2 x (3 directories, 3 files)
  if (!copied || removed != 13 || fs::exists(root)) {
    std::cerr << "std::filesystem: copied " << copied << ", removed " << removed << " of 13\n";
    return false;
  }
  return true;
}

std::string program_fmt(double x);  // fmt_user.cpp

// The program's fmt and wick's (HParamValue::to_string formats with it) side by side.
bool fmt_works() {
  const std::string mine = program_fmt(3.14159), wicks = wick::HParamValue(0.1).to_string();
  if (mine != "   3.142|ff" || wicks != "0.1") {
    std::cerr << "fmt: the program's gave '" << mine << "', wick's '" << wicks << "'\n";
    return false;
  }
  return true;
}

int main() {
  if (!filesystem_works() || !fmt_works()) return 1;
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
