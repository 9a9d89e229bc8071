#include <wick/wick.h>

#include "support.h"

#include <ATen/autocast_mode.h>

#include <cmath>
#include <fstream>
#include <iostream>

namespace {

using wick::testing::TempDir;
using wick::testing::tensors_close;
using wick::testing::tensors_equal;

struct Data {
  torch::Tensor x, y;
};

Data make_data(int64_t n, torch::Dtype dtype = torch::kFloat64) {
  auto gen = at::detail::createCPUGenerator(123);
  auto x = torch::randn({n, 6}, gen, torch::TensorOptions().dtype(dtype));
  auto y = torch::randint(0, 3, {n}, gen, torch::TensorOptions().dtype(torch::kLong));
  return {x, y};
}

torch::nn::Sequential make_model(torch::Dtype dtype = torch::kFloat64, double dropout = 0.0) {
  torch::manual_seed(7);
  torch::nn::Sequential m(torch::nn::Linear(6, 16), torch::nn::Tanh(), torch::nn::Dropout(dropout),
                          torch::nn::Linear(16, 3));
  m->to(dtype);
  return m;
}

using wick::testing::clone_parameters;

wick::TrainerOptions quiet() { return wick::TrainerOptions().log_every_n_steps(1000000); }

class TrainerTest : public wick::testing::SeededTest {};

// Reference: the loop a user writes by hand with LibTorch alone.
TEST_F(TrainerTest, MatchesHandWrittenLoop) {
  auto data = make_data(64);
  auto reference = make_model();
  {
    torch::optim::SGD opt(reference->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
    for (int epoch = 0; epoch < 2; ++epoch) {
      for (int64_t i = 0; i < 64; i += 16) {
        opt.zero_grad();
        auto loss = torch::nn::functional::cross_entropy(
            reference->forward(data.x.narrow(0, i, 16)), data.y.narrow(0, i, 16));
        loss.backward();
        opt.step();
      }
    }
  }
  auto model = make_model();
  wick::SupervisedTask task(model);
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  wick::TensorBatchSource source(data.x, data.y, wick::TensorBatchSourceOptions(16).shuffle(false));
  wick::Trainer trainer(quiet().max_epochs(2));
  auto result = trainer.fit(task, opt, source);
  EXPECT_EQ(result.state.step, 8);
  EXPECT_EQ(result.state.epoch, 2);
  EXPECT_EQ(result.stop_reason, "max_epochs");
  auto a = clone_parameters(*model), b = clone_parameters(*reference);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(tensors_close(a[i], b[i], 1e-12, 1e-14));
}

// k micro-batches of b through the Trainer equal one batch of k*b by hand,
// including the epoch's last, partial group (100 = 3*32 + 4).
TEST_F(TrainerTest, AccumulationMatchesLargeBatches) {
  auto data = make_data(100);
  auto reference = make_model();
  {
    torch::optim::SGD opt(reference->parameters(), 0.5);
    for (int64_t i = 0; i < 100; i += 32) {
      const int64_t n = std::min<int64_t>(32, 100 - i);
      opt.zero_grad();
      torch::nn::functional::cross_entropy(reference->forward(data.x.narrow(0, i, n)),
                                           data.y.narrow(0, i, n))
          .backward();
      opt.step();
    }
  }
  auto model = make_model();
  wick::SupervisedTask task(model);
  torch::optim::SGD opt(model->parameters(), 0.5);
  wick::TensorBatchSource source(data.x, data.y, wick::TensorBatchSourceOptions(8).shuffle(false));
  wick::Trainer trainer(quiet().grad_accum_steps(4));
  auto result = trainer.fit(task, opt, source);
  EXPECT_EQ(result.state.step, 4);  // 13 micro-batches: groups of 4, 4, 4, 1
  auto a = clone_parameters(*model), b = clone_parameters(*reference);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(tensors_close(a[i], b[i], 1e-6));
}

// N steps straight equal N/2 steps + resume + N/2 steps, bit for bit: with
// dropout (RNG state), shuffling, Adam state, an LR schedule and accumulation.
TEST_F(TrainerTest, ResumeIsBitIdentical) {
  auto data = make_data(100, torch::kFloat32);
  auto run = [&](const std::string& dir, int64_t max_steps, const std::string& resume) {
    auto model = make_model(torch::kFloat32, 0.2);
    wick::SupervisedTask task(model);
    torch::optim::Adam opt(model->parameters(), 1e-2);
    wick::TensorBatchSource source(data.x, data.y,
                                   wick::TensorBatchSourceOptions(10).shuffle(true).seed(3));
    wick::Trainer trainer(quiet()
                              .max_epochs(3)
                              .max_steps(max_steps)
                              .grad_accum_steps(2)
                              .seed(11)
                              .checkpoint_dir(dir)
                              .resume(resume));
    trainer.add_callback(std::make_shared<wick::LRSchedulerCallback>(
        std::make_shared<wick::CosineWarmupLR>(opt, 3, 15)));
    auto result = trainer.fit(task, opt, source);
    return std::make_pair(result, wick::parameters_sha256(*model));
  };
  TempDir straight, split;
  auto [full, full_hash] = run(straight.str(), -1, "");
  EXPECT_EQ(full.state.step, 15);

  auto [first, first_hash] = run(split.str(), 7, "");  // stops inside epoch 1
  EXPECT_EQ(first.state.step, 7);
  EXPECT_EQ(first.stop_reason, "max_steps");
  EXPECT_NE(first_hash, full_hash);
  auto [second, second_hash] = run(split.str(), -1, "latest");
  EXPECT_EQ(second.state.step, 15);
  EXPECT_EQ(second.state.epoch, 3);
  EXPECT_EQ(second_hash, full_hash);
}

TEST_F(TrainerTest, ResumeWithOtherOptionsNamesTheDifference) {
  auto data = make_data(40, torch::kFloat32);
  TempDir dir;
  auto run = [&](int64_t accum, const std::string& resume) {
    auto model = make_model(torch::kFloat32);
    wick::SupervisedTask task(model);
    torch::optim::SGD opt(model->parameters(), 0.1);
    wick::TensorBatchSource source(data.x, data.y, 10);
    wick::Trainer trainer(quiet().grad_accum_steps(accum).checkpoint_dir(dir.str()).resume(resume));
    trainer.fit(task, opt, source);
  };
  run(1, "");
  EXPECT_THROWS_WITH(run(2, "latest"), "grad_accum_steps: 1 in the checkpoint, 2 now");
}

TEST_F(TrainerTest, ResumeLatestWithoutCheckpointIsAnError) {
  auto data = make_data(20, torch::kFloat32);
  TempDir dir;
  auto model = make_model(torch::kFloat32);
  wick::SupervisedTask task(model);
  torch::optim::SGD opt(model->parameters(), 0.1);
  wick::TensorBatchSource source(data.x, data.y, 10);
  wick::Trainer trainer(quiet().checkpoint_dir(dir.str()).resume("latest"));
  EXPECT_THROWS_WITH(trainer.fit(task, opt, source), "holds no complete checkpoint");
}

// Validation metrics are sample-weighted means over uneven batches (4, 4, 2).
TEST_F(TrainerTest, ValidationWeightsBySampleCount) {
  auto data = make_data(10);
  auto model = make_model();
  wick::SupervisedTask task(model);
  wick::TensorBatchSource val(data.x, data.y, wick::TensorBatchSourceOptions(4).shuffle(false));
  wick::Trainer trainer;
  auto metrics = trainer.validate(task, val);
  torch::NoGradGuard no_grad;
  model->eval();
  auto out = model->forward(data.x);
  double loss = torch::nn::functional::cross_entropy(out, data.y).item<double>();
  double acc = out.argmax(1).eq(data.y).to(torch::kFloat64).mean().item<double>();
  EXPECT_NEAR(metrics.at("val/loss"), loss, 1e-12);
  EXPECT_NEAR(metrics.at("val/accuracy"), acc, 1e-12);
}

// fp16: a step whose gradients overflow is skipped and counted; the others run.
TEST_F(TrainerTest, Fp16SkipsStepsWithNonFiniteGradients) {
  auto data = make_data(40, torch::kFloat32);
  auto model = make_model(torch::kFloat32);
  int64_t calls = 0;
  wick::SupervisedTask task(model, [&](const torch::Tensor& out, const torch::Tensor& target) {
    auto loss = torch::nn::functional::cross_entropy(out, target);
    return ++calls == 2 ? loss * std::numeric_limits<float>::infinity() : loss;
  });
  torch::optim::SGD opt(model->parameters(), 0.1);
  wick::TensorBatchSource source(data.x, data.y, wick::TensorBatchSourceOptions(10).shuffle(false));
  struct Recorder : wick::Callback {
    std::vector<bool> skipped;
    std::string name() const override { return "Recorder"; }
    void on_step_end(wick::Trainer& t) override { skipped.push_back(t.last_step_skipped()); }
  };
  auto recorder = std::make_shared<Recorder>();
  wick::Trainer trainer(quiet().precision(wick::Precision::kFP16));
  trainer.add_callback(recorder);
  trainer.fit(task, opt, source);
  EXPECT_EQ(recorder->skipped, (std::vector<bool>{false, true, false, false}));
  ASSERT_NE(trainer.scaler(), nullptr);
  EXPECT_EQ(trainer.scaler()->skipped_steps(), 1);
  EXPECT_EQ(trainer.scaler()->get_scale(), 32768.0);  // backed off once from 2^16
  for (const auto& p : model->parameters()) EXPECT_TRUE(torch::isfinite(p).all().item<bool>());
}

// The forward runs under autocast: a Linear's output is bf16 inside training_step.
TEST_F(TrainerTest, Bf16RunsTheForwardUnderAutocast) {
  auto data = make_data(20, torch::kFloat32);
  auto model = make_model(torch::kFloat32);
  std::vector<c10::ScalarType> seen;
  wick::SupervisedTask task(model, [&](const torch::Tensor& out, const torch::Tensor& target) {
    seen.push_back(out.scalar_type());
    return torch::nn::functional::cross_entropy(out, target);
  });
  torch::optim::SGD opt(model->parameters(), 0.1);
  wick::TensorBatchSource source(data.x, data.y, 10);
  wick::Trainer trainer(quiet().precision(wick::Precision::kBF16));
  trainer.fit(task, opt, source);
  ASSERT_EQ(seen.size(), 2u);
  EXPECT_EQ(seen[0], torch::kBFloat16);
  EXPECT_FALSE(at::autocast::is_autocast_enabled(torch::kCPU));  // restored after the step
  for (const auto& p : model->parameters()) EXPECT_EQ(p.scalar_type(), torch::kFloat32);
}

// LibTorch's own data loader (Stack<>) feeds the Trainer directly.
TEST_F(TrainerTest, TrainsFromLibTorchDataLoader) {
  auto data = make_data(50, torch::kFloat32);
  struct Pairs : torch::data::datasets::Dataset<Pairs> {
    torch::Tensor x, y;
    Pairs(torch::Tensor x, torch::Tensor y) : x(x), y(y) {}
    torch::data::Example<> get(size_t i) override { return {x[i], y[i]}; }
    torch::optional<size_t> size() const override { return x.size(0); }
  };
  auto loader = torch::data::make_data_loader<torch::data::samplers::SequentialSampler>(
      Pairs(data.x, data.y).map(torch::data::transforms::Stack<>()), 16);
  auto model = make_model(torch::kFloat32);
  wick::SupervisedTask task(model);
  torch::optim::SGD opt(model->parameters(), 0.1);
  wick::Trainer trainer(quiet().max_epochs(2));
  auto before = clone_parameters(*model);
  auto result = trainer.fit(task, opt, *loader);
  EXPECT_EQ(result.state.step, 8);  // 16, 16, 16, 2 per epoch
  EXPECT_EQ(result.state.samples_seen, 100);
  EXPECT_FALSE(tensors_equal(clone_parameters(*model)[0], before[0]));
  // Reference: the same batches, in the same order, by hand.
  auto reference = make_model(torch::kFloat32);
  torch::optim::SGD ref_opt(reference->parameters(), 0.1);
  for (int epoch = 0; epoch < 2; ++epoch) {
    for (int64_t i = 0; i < 50; i += 16) {
      const int64_t n = std::min<int64_t>(16, 50 - i);
      ref_opt.zero_grad();
      torch::nn::functional::cross_entropy(reference->forward(data.x.narrow(0, i, n)),
                                           data.y.narrow(0, i, n))
          .backward();
      ref_opt.step();
    }
  }
  auto a = clone_parameters(*model), b = clone_parameters(*reference);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(tensors_close(a[i], b[i], 1e-6, 1e-7));
}

TEST_F(TrainerTest, MaxStepsStopsInsideAnEpoch) {
  auto data = make_data(100, torch::kFloat32);
  auto model = make_model(torch::kFloat32);
  wick::SupervisedTask task(model);
  torch::optim::SGD opt(model->parameters(), 0.1);
  wick::TensorBatchSource source(data.x, data.y, 10);
  wick::Trainer trainer(quiet().max_epochs(5).max_steps(13));
  auto result = trainer.fit(task, opt, source);
  EXPECT_EQ(result.state.step, 13);
  EXPECT_EQ(result.state.epoch, 1);
  EXPECT_EQ(result.state.batch_in_epoch, 3);
  EXPECT_EQ(result.stop_reason, "max_steps");
}

TEST_F(TrainerTest, UnlimitedEpochsTrainUntilMaxSteps) {
  auto data = make_data(100, torch::kFloat32);
  const auto run = [&](int64_t max_epochs) {
    auto model = make_model(torch::kFloat32);
    wick::SupervisedTask task(model);
    torch::optim::SGD opt(model->parameters(), 0.1);
    wick::TensorBatchSource source(data.x, data.y, 10);
    wick::Trainer trainer(quiet().max_epochs(max_epochs).max_steps(25));
    auto result = trainer.fit(task, opt, source);
    return std::make_pair(result, clone_parameters(*model));
  };
  const auto [unlimited, params] = run(-1);
  EXPECT_EQ(unlimited.state.step, 25);
  EXPECT_EQ(unlimited.state.epoch, 2);
  EXPECT_EQ(unlimited.state.batch_in_epoch, 5);
  EXPECT_EQ(unlimited.stop_reason, "max_steps");
  // Reference: the same run with an epoch limit that max_steps reaches first.
  const auto [limited, reference] = run(3);
  EXPECT_EQ(limited.state.step, 25);
  for (size_t i = 0; i < params.size(); ++i) EXPECT_TRUE(tensors_equal(params[i], reference[i]));
}

// A checkpoint written at the step that consumed an epoch's last batch
// (before the epoch's end) resumes into an epoch with no batch left: that
// is the resume, not an empty source (it once stopped fit with that error).
TEST_F(TrainerTest, UnlimitedEpochsResumeAfterAnEpochsLastBatch) {
  auto data = make_data(100, torch::kFloat32);
  TempDir dir;
  const auto run = [&](int64_t max_steps, const std::string& resume) {
    auto model = make_model(torch::kFloat32);
    wick::SupervisedTask task(model);
    torch::optim::SGD opt(model->parameters(), 0.1);
    wick::TensorBatchSource source(data.x, data.y, 10);
    wick::Trainer trainer(quiet()
                              .max_epochs(-1)
                              .max_steps(max_steps)
                              .checkpoint_dir(dir.str())
                              .checkpoint_every_n_steps(1)
                              .resume(resume));
    return trainer.fit(task, opt, source).state;
  };
  const auto first = run(10, "");  // the 10 batches of epoch 0
  EXPECT_EQ(first.step, 10);
  const auto second = run(15, dir.str() + "/" + wick::checkpoint_name(10));
  EXPECT_EQ(second.step, 15);
  EXPECT_EQ(second.epoch, 1);
  EXPECT_EQ(second.batch_in_epoch, 5);
}

TEST_F(TrainerTest, UnlimitedEpochsOfAnEmptySourceAreAnError) {
  struct Empty : wick::BatchSource {
    void reset(int64_t) override {}
    std::optional<wick::Batch> next() override { return std::nullopt; }
  } empty;
  auto model = make_model();
  wick::SupervisedTask task(model);
  torch::optim::SGD opt(model->parameters(), 0.1);
  wick::Trainer trainer(quiet().max_epochs(-1).max_steps(5));
  EXPECT_THROWS_WITH(trainer.fit(task, opt, empty),
                     "Trainer: max_epochs=-1 (no epoch limit), but the training source yielded no "
                     "batches in epoch 0; max_steps=5 cannot be reached");
}

// Reference: the validation set's loss and accuracy computed by hand.
std::map<std::string, double> val_by_hand(torch::nn::Sequential& model, const Data& val) {
  torch::NoGradGuard no_grad;
  auto out = model->forward(val.x);
  return {{"val/loss", torch::nn::functional::cross_entropy(out, val.y).item<double>()},
          {"val/accuracy", out.argmax(1).eq(val.y).to(torch::kFloat64).mean().item<double>()}};
}

TEST_F(TrainerTest, ValidatesAtFitEndWhenStoppedInsideAnEpoch) {
  auto data = make_data(100), val = make_data(40);
  struct Count : wick::Callback {
    std::string name() const override { return "Count"; }
    void on_validation_end(wick::Trainer& t, const wick::Metrics&) override {
      steps.push_back(t.state().step);
    }
    std::vector<int64_t> steps;
  };
  const auto run = [&](int64_t max_steps, bool at_end) {
    auto model = make_model();
    wick::SupervisedTask task(model);
    torch::optim::SGD opt(model->parameters(), 0.1);
    wick::TensorBatchSource source(data.x, data.y, 10);
    wick::TensorBatchSource val_source(val.x, val.y, 16);
    auto count = std::make_shared<Count>();
    wick::Trainer trainer(quiet().max_epochs(-1).max_steps(max_steps).val_at_fit_end(at_end));
    trainer.add_callback(count);
    auto result = trainer.fit(task, opt, source, &val_source);
    return std::make_tuple(result, count->steps, val_by_hand(model, val));
  };
  {  // stops at step 13, inside epoch 1: validated at 10 (epoch 0's end) and at 13
    const auto [result, steps, expected] = run(13, true);
    EXPECT_EQ(steps, (std::vector<int64_t>{10, 13}));
    for (const auto& [name, value] : expected)
      EXPECT_NEAR(result.last_val_metrics.at(name), value, 1e-12) << name;
  }
  {  // turned off: the metrics stay those of step 10
    const auto [result, steps, expected] = run(13, false);
    EXPECT_EQ(steps, (std::vector<int64_t>{10}));
    EXPECT_NE(result.last_val_metrics.at("val/loss"), expected.at("val/loss"));
  }
  {  // stops at an epoch's end: its validation saw the final weights, no second one
    const auto [result, steps, expected] = run(20, true);
    EXPECT_EQ(steps, (std::vector<int64_t>{10, 20}));
    EXPECT_NEAR(result.last_val_metrics.at("val/loss"), expected.at("val/loss"), 1e-12);
  }
}

TEST_F(TrainerTest, SeedEverythingMakesRunsStartFromTheSameWeights) {
  const auto build = [](uint64_t seed) {
    wick::seed_everything(seed);
    torch::nn::Sequential m(torch::nn::Linear(6, 16), torch::nn::Tanh(), torch::nn::Linear(16, 3));
    auto params = clone_parameters(*m);
    params.push_back(torch::tensor(static_cast<int64_t>(std::rand())));  // C's rand() too
    return params;
  };
  // Reference: the draws of a run after other draws moved the generators on.
  const auto first = build(11);
  torch::randn({1000});
  std::rand();
  const auto again = build(11), other = build(12);
  ASSERT_EQ(first.size(), again.size());
  for (size_t i = 0; i < first.size(); ++i) EXPECT_TRUE(tensors_equal(first[i], again[i]));
  EXPECT_FALSE(torch::equal(first[0], other[0]));
  EXPECT_EQ(wick::seed_everything(3), 3u);
  if (torch::cuda::is_available()) {
    wick::seed_everything(5);
    auto a = torch::randn({64}, torch::kCUDA).cpu();
    torch::randn({64}, torch::kCUDA);
    wick::seed_everything(5);
    EXPECT_TRUE(tensors_equal(a, torch::randn({64}, torch::kCUDA).cpu()));
  }
}

TEST_F(TrainerTest, LogsAreSampleWeightedMeans) {
  auto data = make_data(30);
  auto model = make_model();
  wick::SupervisedTask task(model);
  torch::optim::SGD opt(model->parameters(), 0.0);  // lr 0: the loss is the same at every step
  wick::TensorBatchSource source(data.x, data.y, wick::TensorBatchSourceOptions(20).shuffle(false));
  wick::Trainer trainer(wick::TrainerOptions().log_every_n_steps(2));
  auto result = trainer.fit(task, opt, source);
  torch::NoGradGuard no_grad;
  double expected =
      torch::nn::functional::cross_entropy(model->forward(data.x), data.y).item<double>();
  EXPECT_NEAR(result.last_logs.at("train/loss"), expected, 1e-12);  // batches of 20 and 10
  EXPECT_EQ(result.last_logs.at("step"), 2.0);
}

TEST_F(TrainerTest, RejectsBadOptions) {
  EXPECT_THROWS_WITH(wick::Trainer(wick::TrainerOptions().grad_accum_steps(0)),
                     "grad_accum_steps must be >= 1, got 0");
  EXPECT_THROWS_WITH(wick::Trainer(wick::TrainerOptions().max_epochs(0)),
                     "max_epochs must be >= 1, or -1 (no epoch limit) with max_steps set, got 0");
  EXPECT_THROWS_WITH(wick::Trainer(wick::TrainerOptions().max_epochs(-2).max_steps(5)),
                     "max_epochs must be >= 1, or -1 (no epoch limit) with max_steps set, got -2");
  EXPECT_THROWS_WITH(wick::Trainer(wick::TrainerOptions().max_epochs(-1)),
                     "Trainer: max_epochs=-1 (no epoch limit) needs max_steps >= 1, got "
                     "max_steps=-1");
  EXPECT_THROWS_WITH(wick::Trainer(wick::TrainerOptions().grad_clip_norm(-1)),
                     "grad_clip_norm must be >= 0");
  EXPECT_THROWS_WITH(wick::Trainer(wick::TrainerOptions().resume("latest")),
                     "needs checkpoint_dir");
}

TEST_F(TrainerTest, RejectsNonScalarLoss) {
  auto data = make_data(10, torch::kFloat32);
  auto model = make_model(torch::kFloat32);
  wick::SupervisedTask task(model,
                            [](const torch::Tensor& out, const torch::Tensor&) { return out; });
  torch::optim::SGD opt(model->parameters(), 0.1);
  wick::TensorBatchSource source(data.x, data.y, 10);
  wick::Trainer trainer(quiet());
  EXPECT_THROWS_WITH(trainer.fit(task, opt, source), "training_step must return a scalar loss");
}

}  // namespace

namespace {

// On CUDA the batches are copied on a side stream one step ahead (BatchMover);
// the result must equal the CPU run's (float64, so to rounding).
TEST_F(TrainerTest, CudaTrainingMatchesCpu) {
  if (!wick::testing::cuda_available()) GTEST_SKIP() << "no CUDA device";
  auto data = make_data(96);
  auto run = [&](torch::Device device, bool pinned) {
    auto model = make_model();
    wick::SupervisedTask task(model);
    model->to(device);
    torch::optim::Adam opt(model->parameters(), 1e-2);
    auto x = pinned ? data.x.pin_memory() : data.x;
    auto y = pinned ? data.y.pin_memory() : data.y;
    wick::TensorBatchSource source(x, y, wick::TensorBatchSourceOptions(16).shuffle(true).seed(5));
    wick::Trainer trainer(quiet().max_epochs(3).grad_accum_steps(2));  // device: the model's
    trainer.fit(task, opt, source);
    model->to(torch::kCPU);
    return clone_parameters(*model);
  };
  auto cpu = run(torch::kCPU, false);
  auto cuda = run(torch::Device(torch::kCUDA, 0), true);
  for (size_t i = 0; i < cpu.size(); ++i) EXPECT_TRUE(tensors_close(cuda[i], cpu[i], 1e-9, 1e-12));
}

}  // namespace

namespace {

// docs/getting-started.md, "Your first program" (300 steps of a linear model).
TEST(TrainerDocTest, GettingStartedFirstProgram) {
  if (wick::FashionMNIST::default_root().empty() ||
      !std::ifstream(wick::FashionMNIST::default_root() + "/train-images-idx3-ubyte.gz")) {
    GTEST_SKIP() << "Fashion-MNIST not installed";
  }
  torch::manual_seed(0);
  // --- begin docs/getting-started.md
  auto model = torch::nn::Sequential(torch::nn::Flatten(), torch::nn::Linear(784, 10));
  wick::SupervisedTask task(model);  // cross-entropy; reports accuracy
  torch::optim::Adam optimizer(model->parameters(), 1e-3);
  wick::FashionMNIST data(wick::FashionMNIST::default_root(), wick::FashionMNIST::Split::kTrain);
  wick::TensorBatchSource train(data.images(), data.targets(), 64);
  wick::Trainer trainer(wick::TrainerOptions().max_epochs(1).max_steps(300));
  trainer.add_callback(std::make_shared<wick::ProgressBar>());
  auto result = trainer.fit(task, optimizer, train);
  std::cout << "loss " << result.last_logs.at("train/loss") << "\n";
  // --- end
  EXPECT_EQ(result.state.step, 300);
  EXPECT_LT(result.last_logs.at("train/loss"), 0.9);  // ln(10) = 2.30 at the start
}

}  // namespace

// ---------------------------------------------------------------------------
// Data-parallel: the Trainer on two real ranks (Gloo) equals one process.

#include "multiprocess.h"

namespace {

using wick::testing::child_dir;
using wick::testing::is_rank_child;
using wick::testing::run_ranks;

// Per-rank batches of 4 with accumulation 2 on 2 ranks read, without
// shuffling, samples {0,2,4,6} and {1,3,5,7} at the first step: the one
// process reference reads batches of 8 in order, with the same accumulation.
TEST(TrainerDdpTest, TwoRanksEqualOneProcessWithTheWholeBatch) {
  auto data = make_data(64);
  auto val = make_data(20);
  auto train = [&](const wick::TrainerOptions& options, int64_t batch, int64_t rank, int64_t world,
                   const std::string& dir) {
    auto model = make_model();
    wick::SupervisedTask task(model);
    torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.2).momentum(0.9));
    wick::TensorBatchSource source(
        data.x, data.y,
        wick::TensorBatchSourceOptions(batch).shuffle(false).rank(rank).world_size(world));
    wick::TensorBatchSource val_source(
        val.x, val.y,
        wick::TensorBatchSourceOptions(3).shuffle(false).rank(rank).world_size(world));
    wick::Trainer trainer(options);
    trainer.add_callback(std::make_shared<wick::MetricLogger>(wick::MetricLoggerOptions(dir)));
    auto result = trainer.fit(task, opt, source, &val_source);
    return std::make_pair(result, clone_parameters(*model));
  };
  auto options = quiet().max_epochs(2).grad_accum_steps(2).log_every_n_steps(2);

  if (!is_rank_child()) {
    TempDir dir;
    ASSERT_TRUE(run_ranks(2, dir.str()));
    TempDir single_dir;
    auto [expected, params] = train(options, 8, 0, 1, single_dir.str());
    torch::serialize::InputArchive archive;
    archive.load_from(dir.str() + "/rank0.pt");
    for (size_t i = 0; i < params.size(); ++i) {
      torch::Tensor got;
      archive.read("p" + std::to_string(i), got);
      EXPECT_TRUE(tensors_close(got, params[i], 1e-10, 1e-12)) << "parameter " << i;
    }
    torch::Tensor val_loss;
    archive.read("val_loss", val_loss);
    EXPECT_NEAR(val_loss.item<double>(), expected.last_val_metrics.at("val/loss"), 1e-10);
    // Only rank 0 logged: as many lines as the single process wrote.
    auto lines = [](const std::string& path) {
      std::ifstream in(path);
      int64_t n = 0;
      for (std::string line; std::getline(in, line);) ++n;
      return n;
    };
    EXPECT_EQ(lines(dir.str() + "/logs/metrics.jsonl"), lines(single_dir.str() + "/metrics.jsonl"));
    return;
  }
  torch::set_num_threads(1);
  auto pg = wick::init_process_group(wick::ProcessGroupOptions().timeout(std::chrono::seconds(60)));
  auto [result, params] =
      train(options.process_group(pg), 4, pg->rank(), pg->world_size(), child_dir() + "/logs");
  ASSERT_EQ(result.state.step, 8);  // 64 samples / 2 ranks / 4 per batch / 2 per step, 2 epochs
  // Replicas stay bitwise equal; rank 1 checks against rank 0's file after a barrier.
  torch::serialize::OutputArchive archive;
  for (size_t i = 0; i < params.size(); ++i) archive.write("p" + std::to_string(i), params[i]);
  archive.write("val_loss", torch::tensor(result.last_val_metrics.at("val/loss"), torch::kFloat64));
  if (pg->rank() == 0) archive.save_to(child_dir() + "/rank0.pt");
  pg->barrier();
  if (pg->rank() == 1) {
    torch::serialize::InputArchive in;
    in.load_from(child_dir() + "/rank0.pt");
    for (size_t i = 0; i < params.size(); ++i) {
      torch::Tensor other;
      in.read("p" + std::to_string(i), other);
      EXPECT_TRUE(tensors_equal(params[i], other)) << "parameter " << i << " differs between ranks";
    }
  }
}

}  // namespace

namespace {

// Under DDP, a run stopped and resumed from rank 0's checkpoint ends with the
// same parameters, bit for bit, as one that ran straight through. With
// `async`, rank 0 alone writes them, in the background.
void ddp_resume_is_bit_identical(bool async) {
  if (!is_rank_child()) {
    TempDir dir;
    ASSERT_TRUE(run_ranks(2, dir.str()));
    return;
  }
  torch::set_num_threads(1);
  auto pg = wick::init_process_group(wick::ProcessGroupOptions().timeout(std::chrono::seconds(60)));
  auto data = make_data(80, torch::kFloat32);
  auto run = [&](const std::string& ckpt_dir, int64_t max_steps, const std::string& resume) {
    auto model = make_model(torch::kFloat32, 0.2);
    wick::SupervisedTask task(model);
    wick::FusedAdam opt(model->parameters(), wick::FusedAdamOptions(1e-2));
    wick::TensorBatchSource source(
        data.x, data.y,
        wick::TensorBatchSourceOptions(5).seed(2).rank(pg->rank()).world_size(pg->world_size()));
    wick::Trainer trainer(quiet()
                              .max_epochs(3)
                              .max_steps(max_steps)
                              .grad_accum_steps(2)
                              .checkpoint_dir(ckpt_dir)
                              .resume(resume)
                              .process_group(pg)
                              .async_checkpoint(async));
    auto result = trainer.fit(task, opt, source);
    const int64_t saves = trainer.async_checkpoint_stats().saves_completed;
    EXPECT_EQ(saves > 0, async && pg->rank() == 0) << "rank " << pg->rank() << ": " << saves;
    pg->barrier();  // rank 0's checkpoint is on disk before anyone resumes from it
    return std::make_pair(result.state.step, wick::parameters_sha256(*model));
  };
  const std::string root = child_dir();
  auto [full_steps, full] = run(root + "/straight", -1, "");
  EXPECT_EQ(full_steps, 12);  // 80 / 2 ranks / 5 per batch / 2 per step = 4 a epoch
  auto [first_steps, first] = run(root + "/split", 5, "");
  EXPECT_EQ(first_steps, 5);
  EXPECT_NE(first, full);
  auto [second_steps, second] = run(root + "/split", -1, "latest");
  EXPECT_EQ(second_steps, 12);
  EXPECT_EQ(second, full);
}

TEST(TrainerDdpTest, ResumeIsBitIdentical) { ddp_resume_is_bit_identical(/*async=*/false); }

TEST(TrainerDdpTest, ResumeFromAsyncCheckpointsIsBitIdentical) {
  ddp_resume_is_bit_identical(/*async=*/true);
}

}  // namespace
