// wick::Pipeline against the unsplit model: outputs, losses and gradients in
// float64 for both schedules and every checkpointing mode, under the Trainer
// with gradient accumulation and autocast, and errors that name the stage.
#include <wick/pipeline.h>

#include <gtest/gtest.h>

#include "support.h"

namespace {

using wick::testing::SeededTest;

class PipelineTest : public SeededTest {};

torch::nn::Sequential make_mlp() {
  torch::nn::Sequential m;
  m->push_back(torch::nn::Linear(6, 16));
  m->push_back(torch::nn::Tanh());
  m->push_back(torch::nn::Linear(16, 16));
  m->push_back(torch::nn::ReLU());
  m->push_back(torch::nn::Linear(16, 12));
  m->push_back(torch::nn::Tanh());
  m->push_back(torch::nn::Linear(12, 3));
  return m;
}

torch::nn::Sequential clone_of(const torch::nn::Sequential& m) {
  return torch::nn::Sequential(std::dynamic_pointer_cast<torch::nn::SequentialImpl>(m->clone()));
}

torch::Tensor loss_fn(const torch::Tensor& out, const torch::Tensor& target) {
  return torch::nn::functional::cross_entropy(out, target);
}

std::vector<wick::PipelineStage> stages_of(const std::vector<torch::nn::Sequential>& parts) {
  std::vector<wick::PipelineStage> stages;
  for (const auto& p : parts) stages.emplace_back(p, torch::kCPU);
  return stages;
}

TEST_F(PipelineTest, SplitsBySizesAndByParameterCount) {
  auto model = make_mlp();
  auto parts = wick::split_sequential(model, std::vector<int64_t>{2, 3, 2});
  ASSERT_EQ(parts.size(), 3u);
  EXPECT_EQ(parts[0]->size(), 2u);
  EXPECT_EQ(parts[1]->size(), 3u);
  EXPECT_EQ(parts[1]->ptr(0), model->ptr(2));                      // shared, not copied
  EXPECT_TRUE(parts[2]->named_parameters().contains("6.weight"));  // names kept

  // Parameters: 112, 0, 272, 0, 204, 0, 39 -> two parts of about 313 each.
  auto halves = wick::split_sequential(model, int64_t{2});
  ASSERT_EQ(halves.size(), 2u);
  EXPECT_EQ(halves[0]->size(), 3u);  // 112 + 272 = 384 >= 313.5
  EXPECT_EQ(halves[1]->size(), 4u);
  auto each = wick::split_sequential(model, int64_t{7});
  for (const auto& part : each) EXPECT_EQ(part->size(), 1u);

  EXPECT_THROWS_WITH(wick::split_sequential(model, std::vector<int64_t>{2, 2}),
                     "sizes sum to 4 but the Sequential has 7");
  EXPECT_THROWS_WITH(wick::split_sequential(model, std::vector<int64_t>{7, 0}), "part 1 has 0");
  EXPECT_THROWS_WITH(wick::split_sequential(model, int64_t{8}), "parts must be in [1, 7]");
}

TEST_F(PipelineTest, ForwardEqualsTheUnsplitModel) {
  auto model = make_mlp();
  auto reference = clone_of(model);
  wick::Pipeline pipe(stages_of(wick::split_sequential(model, std::vector<int64_t>{3, 4})),
                      wick::PipelineOptions().chunks(3));
  auto x = torch::randn({10, 6});
  EXPECT_TRUE(torch::allclose(pipe(x), reference->forward(x), 1e-6, 1e-6));
}

struct Case {
  wick::PipelineSchedule schedule;
  wick::ActivationCheckpointing checkpointing;
  int64_t chunks;
};

TEST_F(PipelineTest, GradientsEqualTheUnsplitModelsInFloat64) {
  using S = wick::PipelineSchedule;
  using C = wick::ActivationCheckpointing;
  std::vector<Case> cases;
  for (auto s : {S::kGPipe, S::k1F1B}) {
    for (auto c : {C::kNever, C::kExceptLast, C::kAlways}) {
      for (int64_t chunks : {1, 3, 4}) cases.push_back({s, c, chunks});
    }
  }
  auto x = torch::randn({10, 6}, torch::kDouble);  // 10 rows: chunks of 4,3,3 / 3,3,2,2
  auto y = torch::randint(0, 3, {10});
  for (const auto& c : cases) {
    SCOPED_TRACE(c10::str("schedule ", static_cast<int>(c.schedule), " checkpointing ",
                          static_cast<int>(c.checkpointing), " chunks ", c.chunks));
    torch::manual_seed(1);
    auto model = make_mlp();
    model->to(torch::kDouble);
    auto reference = clone_of(model);
    auto ref_loss = loss_fn(reference->forward(x), y);
    ref_loss.backward();

    wick::Pipeline pipe(stages_of(wick::split_sequential(model, std::vector<int64_t>{2, 2, 3})),
                        wick::PipelineOptions()
                            .chunks(c.chunks)
                            .schedule(c.schedule)
                            .checkpointing(c.checkpointing));
    auto loss = pipe->train_step(x, y, loss_fn);
    EXPECT_NEAR(loss.item<double>(), ref_loss.item<double>(), 1e-12);
    auto mine = model->named_parameters();
    auto theirs = reference->named_parameters();
    for (const auto& p : mine) {
      ASSERT_TRUE(p.value().grad().defined()) << p.key();
      WICK_EXPECT_CLOSE(p.value().grad(), theirs[p.key()].grad(), 1e-6, 1e-12);
    }
    EXPECT_EQ(pipe->last_stats().micro_batches, c.chunks);
    EXPECT_NEAR(pipe->last_stats().ideal_bubble_fraction, 2.0 / (c.chunks + 2), 1e-12);
  }
}

TEST_F(PipelineTest, AccumulatesIntoExistingGradientsAndScales) {
  auto model = make_mlp();
  model->to(torch::kDouble);
  auto reference = clone_of(model);
  auto x = torch::randn({8, 6}, torch::kDouble);
  auto y = torch::randint(0, 3, {8});
  wick::Pipeline pipe(stages_of(wick::split_sequential(model, int64_t{2})),
                      wick::PipelineOptions().chunks(4));
  pipe->train_step(x, y, loss_fn);
  pipe->train_step(x, y, loss_fn, /*grad_scale=*/0.5);
  (loss_fn(reference->forward(x), y) * 1.5).backward();
  auto theirs = reference->named_parameters();
  for (const auto& p : model->named_parameters())
    WICK_EXPECT_CLOSE(p.value().grad(), theirs[p.key()].grad(), 1e-6, 1e-12);
}

TEST_F(PipelineTest, ErrorsNameTheStageAndTheMicroBatch) {
  torch::nn::Sequential a(torch::nn::Linear(6, 8));
  torch::nn::Sequential b(torch::nn::Linear(5, 3));  // does not take stage 0's 8 features
  wick::Pipeline pipe(std::vector<wick::PipelineStage>{{a, torch::kCPU}, {b, torch::kCPU}},
                      wick::PipelineOptions().chunks(2));
  EXPECT_THROWS_WITH(pipe->train_step(torch::randn({4, 6}), torch::randint(0, 3, {4}), loss_fn),
                     "Pipeline: stage 1 (cpu), forward of micro-batch 0 failed");
  EXPECT_THROWS_WITH(pipe(torch::randn({4, 6})),
                     "Pipeline: stage 1 (cpu) failed on its input of shape [2, 8]");
  EXPECT_THROWS_WITH(wick::Pipeline(std::vector<wick::PipelineStage>{}), "Pipeline: no stages");
  EXPECT_THROWS_WITH(
      wick::Pipeline(std::vector<wick::PipelineStage>{{torch::nn::Sequential(), torch::kCPU}}),
      "stage 0 has no modules");
  EXPECT_THROWS_WITH(wick::Pipeline(std::vector<wick::PipelineStage>{{a, torch::kCPU}},
                                    wick::PipelineOptions().chunks(0)),
                     "chunks must be >= 1, got 0");
  wick::Pipeline ok(std::vector<wick::PipelineStage>{{a, torch::kCPU}});
  ok->to(torch::kCPU);  // already there: fine
  EXPECT_THROWS_WITH(ok->to(torch::Device(torch::kMeta)),
                     "cannot move the pipeline to meta: stage 0 (cpu) has its own device");
  EXPECT_THROWS_WITH(ok->train_step(torch::randn({4, 6}), torch::randint(0, 3, {3}), loss_fn),
                     "target must have the input's batch size 4");
  {
    torch::NoGradGuard g;
    EXPECT_THROWS_WITH(ok->train_step(torch::randn({4, 6}), torch::randint(0, 8, {4}), loss_fn),
                       "needs gradients");
  }
}

// Under the Trainer: PipelineTask with gradient accumulation gives the
// parameters SupervisedTask gives the unsplit model; with bf16 autocast too,
// within bf16's rounding.
TEST_F(PipelineTest, TrainsUnderTheTrainerLikeTheUnsplitModel) {
  auto x = torch::randn({48, 6});
  auto y = torch::randint(0, 3, {48});
  for (auto precision : {wick::Precision::kFP32, wick::Precision::kBF16}) {
    SCOPED_TRACE(wick::to_string(precision));
    torch::manual_seed(3);
    auto model = make_mlp();
    auto reference = clone_of(model);
    auto options =
        wick::TrainerOptions().max_epochs(2).grad_accum_steps(2).precision(precision).seed(5);

    wick::Pipeline pipe(stages_of(wick::split_sequential(model, std::vector<int64_t>{3, 4})),
                        wick::PipelineOptions().chunks(3).checkpointing(
                            wick::ActivationCheckpointing::kExceptLast));
    wick::PipelineTask task(pipe, loss_fn);
    torch::optim::SGD opt(pipe->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
    wick::TensorBatchSource source(x, y, wick::TensorBatchSourceOptions(8).shuffle(true).seed(5));
    wick::Trainer(options).fit(task, opt, source);

    wick::SupervisedTask ref_task(reference, loss_fn);
    torch::optim::SGD ref_opt(reference->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
    wick::TensorBatchSource ref_source(x, y,
                                       wick::TensorBatchSourceOptions(8).shuffle(true).seed(5));
    wick::Trainer(options).fit(ref_task, ref_opt, ref_source);

    auto theirs = reference->named_parameters();
    const double tol = precision == wick::Precision::kFP32 ? 1e-5 : 3e-2;
    for (const auto& p : model->named_parameters())
      WICK_EXPECT_CLOSE(p.value(), theirs[p.key()], tol, tol);
  }
}

// fp16 with the Trainer's loss scaler: the pipeline's backward runs at the
// scaler's scale (set_grad_scale_source), the Trainer unscales and steps.
TEST_F(PipelineTest, TrainsInFp16WithTheTrainersLossScale) {
  auto x = torch::randn({48, 6});
  auto y = torch::randint(0, 3, {48});
  torch::manual_seed(4);
  auto model = make_mlp();
  auto reference = clone_of(model);
  auto initial = clone_of(model);
  auto options = wick::TrainerOptions()
                     .max_epochs(2)
                     .grad_accum_steps(2)
                     .precision(wick::Precision::kFP16)
                     .seed(5);

  wick::Pipeline pipe(stages_of(wick::split_sequential(model, std::vector<int64_t>{3, 4})),
                      wick::PipelineOptions().chunks(2));
  wick::PipelineTask task(pipe, loss_fn);
  wick::Trainer trainer(options);
  std::vector<double> scales_seen;
  task.set_grad_scale_source([&trainer, &scales_seen] {
    scales_seen.push_back(trainer.scaler()->get_scale());
    return scales_seen.back();
  });
  torch::optim::SGD opt(pipe->parameters(), torch::optim::SGDOptions(0.1));
  wick::TensorBatchSource source(x, y, wick::TensorBatchSourceOptions(8).shuffle(true).seed(5));
  trainer.fit(task, opt, source);

  wick::SupervisedTask ref_task(reference, loss_fn);
  torch::optim::SGD ref_opt(reference->parameters(), torch::optim::SGDOptions(0.1));
  wick::TensorBatchSource ref_source(x, y, wick::TensorBatchSourceOptions(8).shuffle(true).seed(5));
  wick::Trainer(options).fit(ref_task, ref_opt, ref_source);

  ASSERT_EQ(scales_seen.size(), 12u);  // 6 batches x 2 epochs
  EXPECT_EQ(scales_seen.front(), 65536.0);
  auto theirs = reference->named_parameters();
  auto start = initial->named_parameters();
  double moved = 0, apart = 0;
  for (const auto& p : model->named_parameters()) {
    moved = std::max(moved, (p.value() - start[p.key()]).abs().max().item<double>());
    apart = std::max(apart, (p.value() - theirs[p.key()]).abs().max().item<double>());
  }
  EXPECT_LT(apart, 0.05 * moved) << "training moved the weights by " << moved
                                 << ", the two runs differ by " << apart;
}

// The examples of docs/model_parallel.md.
TEST_F(PipelineTest, DocsExampleTwoDevices) {
  torch::Device encoder_device(torch::kCPU),
      decoder_device(torch::kCPU);  // "cuda:0", "cuda:1" with two GPUs
  auto encoder = torch::nn::Sequential(torch::nn::Linear(32, 64), torch::nn::ReLU());
  auto decoder = torch::nn::Sequential(torch::nn::Linear(64, 10));
  wick::Pipeline model(
      std::vector<wick::PipelineStage>{{encoder, encoder_device}, {decoder, decoder_device}});

  auto x = torch::randn({16, 32});
  auto y = torch::randint(0, 10, {16});
  torch::optim::SGD optimizer(model->parameters(), 0.1);
  auto loss = torch::nn::functional::cross_entropy(model(x), y.to(decoder_device));
  loss.backward();  // autograd crosses the devices
  optimizer.step();
  EXPECT_TRUE(encoder[0]->as<torch::nn::Linear>()->weight.grad().defined());
}

TEST_F(PipelineTest, DocsExamplePipelineInTheTrainer) {
  auto model =
      torch::nn::Sequential(torch::nn::Linear(32, 64), torch::nn::ReLU(), torch::nn::Linear(64, 64),
                            torch::nn::ReLU(), torch::nn::Linear(64, 10));
  auto parts = wick::split_sequential(model, int64_t{2});  // by parameter count
  wick::Pipeline pipe(
      std::vector<wick::PipelineStage>{{parts[0], torch::kCPU}, {parts[1], torch::kCPU}},
      wick::PipelineOptions()
          .chunks(4)
          .schedule(wick::PipelineSchedule::k1F1B)
          .checkpointing(wick::ActivationCheckpointing::kExceptLast));
  wick::PipelineTask task(pipe, [](const torch::Tensor& out, const torch::Tensor& target) {
    return torch::nn::functional::cross_entropy(out, target);
  });
  torch::optim::Adam optimizer(pipe->parameters(), torch::optim::AdamOptions(1e-3));
  wick::TensorBatchSource train(torch::randn({256, 32}), torch::randint(0, 10, {256}), 64);
  wick::Trainer trainer(wick::TrainerOptions().max_epochs(2).grad_accum_steps(2));
  auto result = trainer.fit(task, optimizer, train);

  EXPECT_EQ(result.state.step, 4);
  EXPECT_EQ(pipe->last_stats().micro_batches, 4);
}

TEST_F(PipelineTest, CudaStagesOnTheirOwnStreamsMatchTheUnsplitModel) {
  if (!wick::testing::cuda_available()) GTEST_SKIP() << "no CUDA device";
  auto model = make_mlp();
  model->to(torch::kCUDA, torch::kDouble);
  auto reference = clone_of(model);
  auto x = torch::randn({12, 6}, torch::TensorOptions(torch::kCUDA).dtype(torch::kDouble));
  auto y = torch::randint(0, 3, {12}, torch::TensorOptions(torch::kCUDA).dtype(torch::kLong));
  loss_fn(reference->forward(x), y).backward();
  // Three stages on the one GPU (separate streams), the input coming from the CPU.
  auto parts = wick::split_sequential(model, std::vector<int64_t>{2, 2, 3});
  wick::Pipeline pipe(
      std::vector<wick::PipelineStage>{
          {parts[0], torch::kCUDA}, {parts[1], torch::kCUDA}, {parts[2], torch::kCUDA}},
      wick::PipelineOptions().chunks(4));
  pipe->train_step(x.cpu(), y, loss_fn);
  auto theirs = reference->named_parameters();
  for (const auto& p : model->named_parameters())
    WICK_EXPECT_CLOSE(p.value().grad(), theirs[p.key()].grad(), 1e-6, 1e-12);
}

}  // namespace
