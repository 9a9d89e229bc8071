// wick::Pruner against torch.nn.utils.prune's masks (tests/pruner_baseline.h,
// from tests/gen/pruner_baseline.py), the 2:4 pattern checked by brute force,
// and masks that survive SGD with momentum inside a Trainer.
#include <wick/pruner.h>
#include <wick/trainer.h>

#include <gtest/gtest.h>

#include <cmath>
#include <functional>

#include "pruner_baseline.h"
#include "support.h"

#include <wick/hash.h>

namespace {

using wick::testing::SeededTest;

torch::Tensor from(const std::vector<float>& values, const std::vector<int64_t>& shape) {
  return torch::tensor(values).reshape(shape).clone();
}

torch::Tensor expected_mask(const std::vector<int>& mask, const std::vector<int64_t>& shape) {
  return torch::tensor(std::vector<int64_t>(mask.begin(), mask.end()))
      .reshape(shape)
      .to(torch::kBool);
}

/// A module holding the baseline tensors a, b, c as parameters.
struct Baseline : torch::nn::Module {
  Baseline() {
    namespace pb = pruner_baseline;
    a = register_parameter("a", from(pb::a_values, pb::a_shape));
    b = register_parameter("b", from(pb::b_values, pb::b_shape));
    c = register_parameter("c", from(pb::c_values, pb::c_shape));
  }
  torch::Tensor a, b, c;
};

class PrunerTest : public SeededTest {};

void expect_mask(const wick::Pruner& pruner, const std::string& name,
                 const std::vector<int>& expected, const torch::Tensor& param) {
  auto want = expected_mask(expected, param.sizes().vec());
  ASSERT_TRUE(pruner.has_mask(name));
  EXPECT_TRUE(torch::equal(pruner.mask(name), want))
      << name << ": mask differs from torch.nn.utils.prune";
  // The weight itself: zero exactly where the mask prunes, untouched elsewhere.
  EXPECT_EQ(param.eq(0).logical_and(want.logical_not()).sum().item<int64_t>(),
            want.logical_not().sum().item<int64_t>());
  EXPECT_EQ(param.ne(0).sum().item<int64_t>(), want.sum().item<int64_t>());
}

TEST_F(PrunerTest, L1UnstructuredMatchesTorchPrune) {
  namespace pb = pruner_baseline;
  Baseline m;
  wick::Pruner pruner(m);
  pruner.l1_unstructured("a", 0.3);
  pruner.l1_unstructured("b", 0.5);
  pruner.l1_unstructured("c", 0.25);  // round(2.5) = 2, as Python rounds
  expect_mask(pruner, "a", pb::l1_a_030, m.a);
  expect_mask(pruner, "b", pb::l1_b_050, m.b);
  expect_mask(pruner, "c", pb::l1_c_025, m.c);
  EXPECT_EQ(m.c.eq(0).sum().item<int64_t>(), 2);
}

TEST_F(PrunerTest, GlobalUnstructuredMatchesTorchPrune) {
  namespace pb = pruner_baseline;
  Baseline m;
  wick::Pruner pruner(m);
  pruner.global_unstructured({"a", "b", "c"}, 0.6);
  expect_mask(pruner, "a", pb::global_060_a, m.a);
  expect_mask(pruner, "b", pb::global_060_b, m.b);
  expect_mask(pruner, "c", pb::global_060_c, m.c);
  EXPECT_NEAR(pruner.sparsity(), 71.0 / 118.0, 1e-12);  // round(0.6 * 118)
}

TEST_F(PrunerTest, LnStructuredMatchesTorchPrune) {
  namespace pb = pruner_baseline;
  {
    Baseline m;
    wick::Pruner pruner(m);
    pruner.ln_structured("a", 0.5, 2.0, 0);
    pruner.ln_structured("b", 0.4, 2.0, 0);
    expect_mask(pruner, "a", pb::ln2_a_050_dim0, m.a);
    expect_mask(pruner, "b", pb::ln2_b_040_dim0, m.b);
  }
  {
    Baseline m;
    wick::Pruner pruner(m);
    pruner.ln_structured("b", 0.5, 1.0, -2);  // dim 1, given from the end
    expect_mask(pruner, "b", pb::ln1_b_050_dim1, m.b);
  }
}

TEST_F(PrunerTest, SemiStructured24KeepsTheTwoLargestOfEveryFour) {
  auto lin = torch::nn::Linear(32, 12);
  auto original = lin->weight.detach().clone();
  wick::Pruner pruner(*lin);
  pruner.semi_structured_24("weight");
  auto w = lin->weight.detach();
  for (int64_t r = 0; r < w.size(0); ++r) {
    for (int64_t g = 0; g < w.size(1); g += 4) {
      int nonzeros = 0;
      for (int64_t i = g; i < g + 4; ++i) {
        if (w[r][i].item<float>() == 0.0f) continue;
        ++nonzeros;
        EXPECT_EQ(w[r][i].item<float>(), original[r][i].item<float>());
        // Brute force: a kept entry is beaten in |w| by at most one other of its group.
        int larger = 0;
        for (int64_t j = g; j < g + 4; ++j)
          if (std::abs(original[r][j].item<float>()) > std::abs(original[r][i].item<float>()))
            ++larger;
        EXPECT_LE(larger, 1) << "row " << r << " col " << i;
      }
      EXPECT_EQ(nonzeros, 2) << "row " << r << " group " << g / 4;
    }
  }
  EXPECT_DOUBLE_EQ(pruner.sparsity(), 0.5);
}

TEST_F(PrunerTest, RepeatedPruningIsCumulativeAndTargetsTheWholeTensor) {
  auto lin = torch::nn::Linear(10, 10);
  wick::Pruner pruner(*lin);
  pruner.l1_unstructured("weight", 0.3);
  auto first = pruner.mask("weight").clone();
  pruner.l1_unstructured("weight", 0.6);
  EXPECT_EQ(lin->weight.eq(0).sum().item<int64_t>(), 60);
  EXPECT_TRUE(first.logical_and(pruner.mask("weight").logical_not()).sum().item<int64_t>() == 30 &&
              pruner.mask("weight").logical_and(first.logical_not()).sum().item<int64_t>() == 0);
  pruner.l1_unstructured("weight", 0.2);  // lower than the current sparsity: nothing comes back
  EXPECT_EQ(lin->weight.eq(0).sum().item<int64_t>(), 60);
}

TEST_F(PrunerTest, ReportAndMakePermanent) {
  auto model = torch::nn::Sequential(torch::nn::Linear(8, 4), torch::nn::Linear(4, 2));
  wick::Pruner pruner(*model);
  pruner.l1_unstructured("0.weight", 0.25);
  pruner.ln_structured("1.weight", 0.5);
  auto rows = pruner.report();
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[0].name, "0.weight");
  EXPECT_EQ(rows[0].numel, 32);
  EXPECT_EQ(rows[0].zeros, 8);
  EXPECT_DOUBLE_EQ(rows[0].sparsity, 0.25);
  EXPECT_EQ(rows[1].name, "1.weight");
  EXPECT_EQ(rows[1].zeros, 4);
  auto text = pruner.format_report();
  EXPECT_NE(text.find("0.weight"), std::string::npos);
  EXPECT_NE(text.find("25.00%"), std::string::npos);
  EXPECT_NE(text.find("total"), std::string::npos);

  pruner.make_permanent();
  EXPECT_TRUE(pruner.masks().empty());
  {
    torch::NoGradGuard no_grad;
    model[0]->as<torch::nn::Linear>()->weight.fill_(1.0);
  }
  pruner.apply_masks();  // no masks any more: the weights are free
  EXPECT_EQ(model[0]->as<torch::nn::Linear>()->weight.eq(0).sum().item<int64_t>(), 0);
  EXPECT_EQ(model[1]->as<torch::nn::Linear>()->weight.eq(0).sum().item<int64_t>(), 4);
}

TEST_F(PrunerTest, RejectsBadAmountsAndUnknownNames) {
  auto model = torch::nn::Sequential(torch::nn::Linear(8, 4));
  wick::Pruner pruner(*model);
  EXPECT_THROWS_WITH(pruner.l1_unstructured("0.weight", 1.5),
                     "Pruner: l1_unstructured amount must be in [0, 1], got 1.5");
  EXPECT_THROWS_WITH(pruner.global_unstructured({"0.weight"}, -0.1),
                     "Pruner: global_unstructured amount must be in [0, 1], got -0.1");
  EXPECT_THROWS_WITH(pruner.ln_structured("0.weight", 2.0),
                     "ln_structured amount must be in [0, 1], got 2");
  EXPECT_THROWS_WITH(pruner.l1_unstructured("fc.weight", 0.5),
                     "Pruner: no parameter named 'fc.weight' (available: 0.weight, 0.bias)");
  EXPECT_THROWS_WITH(pruner.global_unstructured({"0.weight", "nope"}, 0.5),
                     "no parameter named 'nope'");
  EXPECT_THROWS_WITH(pruner.global_unstructured({"0.weight", "0.weight"}, 0.5),
                     "global_unstructured names must be distinct, '0.weight' appears twice");
  EXPECT_THROWS_WITH(pruner.semi_structured_24("0.bias"),
                     "semi_structured_24 needs a 2-D parameter");
  EXPECT_THROWS_WITH(pruner.ln_structured("0.weight", 0.5, 2.0, 2),
                     "ln_structured dim must be in [-2, 1]");
  EXPECT_THROWS_WITH(pruner.mask("0.weight"), "Pruner: parameter '0.weight' has no mask");
  EXPECT_TRUE(pruner.masks().empty());  // failed calls left nothing behind
  EXPECT_THROWS_WITH(wick::CubicSchedule(wick::CubicScheduleOptions(1.2)),
                     "CubicSchedule: final_sparsity must be in [0, 1], got 1.2");
  EXPECT_THROWS_WITH(wick::CubicSchedule(wick::CubicScheduleOptions(0.5).frequency(0)),
                     "CubicSchedule: frequency must be >= 1, got 0");
  EXPECT_THROWS_WITH(wick::PrunerCallback(std::make_shared<wick::Pruner>(*model),
                                          wick::PrunerCallbackOptions({"x"}).schedule(
                                              wick::CubicScheduleOptions(0.5))),
                     "Pruner: no parameter named 'x'");
}

// ---------------------------------------------------------------------------
// Fine-tuning inside a Trainer.

struct Fixture {
  Fixture()
      : model(torch::nn::Sequential(torch::nn::Linear(16, 32), torch::nn::ReLU(),
                                    torch::nn::Linear(32, 4))),
        x(torch::randn({64, 16})),
        y(torch::randint(0, 4, {64})),
        train(x, y, wick::TensorBatchSourceOptions(8).seed(3)) {}
  torch::nn::Sequential model;
  torch::Tensor x, y;
  wick::TensorBatchSource train;
};

/// Runs `check` after every optimizer step (added after the PrunerCallback, so it sees its work).
struct StepProbe : wick::Callback {
  explicit StepProbe(std::function<void(int64_t)> check) : check_(std::move(check)) {}
  std::string name() const override { return "StepProbe"; }
  void on_step_end(wick::Trainer& trainer) override { check_(trainer.state().step); }
  std::function<void(int64_t)> check_;
};

int64_t zeros(const torch::Tensor& t) { return t.eq(0).sum().item<int64_t>(); }

TEST_F(PrunerTest, MasksSurviveSgdWithMomentumInATrainer) {
  const std::vector<std::string> names = {"0.weight", "2.weight"};
  for (bool with_callback : {true, false}) {
    Fixture f;
    wick::SupervisedTask task(f.model);
    auto pruner = std::make_shared<wick::Pruner>(*f.model);
    pruner->global_unstructured(names, 0.5);
    auto masks = pruner->masks();
    auto before0 = f.model[0]->as<torch::nn::Linear>()->weight.detach().clone();
    torch::optim::SGD opt(f.model->parameters(),
                          torch::optim::SGDOptions(0.1).momentum(0.9).weight_decay(1e-3));
    wick::Trainer trainer(wick::TrainerOptions().max_epochs(2).log_every_n_steps(1000));
    int64_t leaks = 0;
    if (with_callback) trainer.add_callback(std::make_shared<wick::PrunerCallback>(pruner));
    trainer.add_callback(std::make_shared<StepProbe>([&](int64_t) {
      for (const auto& [name, keep] : masks)
        leaks += f.model->named_parameters()[name]
                     .ne(0)
                     .logical_and(keep.logical_not())
                     .sum()
                     .item<int64_t>();
    }));
    trainer.fit(task, opt, f.train);
    auto w0 = f.model[0]->as<torch::nn::Linear>()->weight.detach();
    if (with_callback) {
      EXPECT_EQ(leaks, 0) << "a pruned weight was nonzero after an optimizer step";
      // Training did happen: every kept weight moved.
      EXPECT_EQ(w0.ne(before0).logical_and(masks["0.weight"]).sum().item<int64_t>(),
                masks["0.weight"].sum().item<int64_t>());
      EXPECT_EQ(zeros(w0), masks["0.weight"].logical_not().sum().item<int64_t>());
    } else {
      // Control: without re-applying, momentum and weight decay move pruned weights off zero.
      EXPECT_GT(leaks, 0);
    }
  }
}

TEST_F(PrunerTest, CubicScheduleSparsityFollowsTheFormulaEveryStep) {
  // Independent copy of Zhu & Gupta's formula: s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3.
  const double si = 0.1, sf = 0.8;
  const int64_t t0 = 2, dt = 3, n = 5;
  auto formula = [&](int64_t step) {
    if (step < t0) return 0.0;
    int64_t t = std::min(t0 + (step - t0) / dt * dt, t0 + n * dt);
    double r = 1.0 - double(t - t0) / double(n * dt);
    return sf + (si - sf) * r * r * r;
  };
  wick::CubicSchedule schedule(
      wick::CubicScheduleOptions(sf).initial_sparsity(si).begin_step(t0).frequency(dt).num_prunings(
          n));
  EXPECT_EQ(schedule.end_step(), 17);
  for (int64_t s = 0; s < 25; ++s) {
    EXPECT_NEAR(schedule.sparsity_at(s), formula(s), 1e-15) << "step " << s;
    EXPECT_EQ(schedule.is_pruning_step(s), s >= 2 && s <= 17 && (s - 2) % 3 == 0) << "step " << s;
  }

  Fixture f;
  wick::SupervisedTask task(f.model);
  auto pruner = std::make_shared<wick::Pruner>(*f.model);
  const std::vector<std::string> names = {"0.weight", "2.weight"};
  auto cb = std::make_shared<wick::PrunerCallback>(
      pruner, wick::PrunerCallbackOptions(names).schedule(wick::CubicScheduleOptions(sf)
                                                              .initial_sparsity(si)
                                                              .begin_step(t0)
                                                              .frequency(dt)
                                                              .num_prunings(n)));
  torch::optim::SGD opt(f.model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  wick::Trainer trainer(wick::TrainerOptions().max_epochs(3).log_every_n_steps(1000));  // 24 steps
  trainer.add_callback(cb);
  const int64_t total = 16 * 32 + 32 * 4;
  int64_t checked = 0;
  trainer.add_callback(std::make_shared<StepProbe>([&](int64_t step) {
    int64_t z = zeros(f.model[0]->as<torch::nn::Linear>()->weight) +
                zeros(f.model[2]->as<torch::nn::Linear>()->weight);
    EXPECT_EQ(z, std::llround(formula(step) * total)) << "step " << step;
    ++checked;
  }));
  trainer.fit(task, opt, f.train);
  EXPECT_EQ(checked, 24);
  EXPECT_EQ(cb->last_pruned_step(), 17);
  EXPECT_NEAR(pruner->sparsity(), std::llround(sf * total) / double(total), 1e-12);
}

TEST_F(PrunerTest, CallbackStateSavesAndLoads) {
  wick::testing::TempDir dir;
  const std::string path = dir.str() + "/pruner.pt";
  auto model = torch::nn::Sequential(torch::nn::Linear(8, 8), torch::nn::Linear(8, 4));
  auto pruner = std::make_shared<wick::Pruner>(*model);
  wick::PrunerCallback cb(
      pruner, wick::PrunerCallbackOptions({"0.weight", "1.weight"})
                  .schedule(wick::CubicScheduleOptions(0.5).frequency(2).num_prunings(4)));
  cb.step(0);
  cb.step(1);
  cb.step(2);
  pruner->semi_structured_24("0.weight");
  EXPECT_EQ(cb.last_pruned_step(), 2);
  {
    torch::serialize::OutputArchive archive;
    cb.save(archive);
    archive.save_to(path);
  }
  // A fresh model (other weights) and callback: the loaded masks are the saved ones, and applied.
  auto model2 = torch::nn::Sequential(torch::nn::Linear(8, 8), torch::nn::Linear(8, 4));
  auto pruner2 = std::make_shared<wick::Pruner>(*model2);
  wick::PrunerCallback cb2(
      pruner2, wick::PrunerCallbackOptions({"0.weight", "1.weight"})
                   .schedule(wick::CubicScheduleOptions(0.5).frequency(2).num_prunings(4)));
  {
    torch::serialize::InputArchive archive;
    archive.load_from(path);
    cb2.load(archive);
  }
  EXPECT_EQ(cb2.last_pruned_step(), 2);
  ASSERT_EQ(pruner2->masks().size(), 2u);
  for (const auto& [name, keep] : pruner->masks()) {
    EXPECT_TRUE(torch::equal(pruner2->mask(name), keep)) << name;
    EXPECT_EQ(zeros(model2->named_parameters()[name]), keep.logical_not().sum().item<int64_t>())
        << name;
  }
  cb2.step(2);  // already pruned at step 2 before the save: not again
  for (const auto& [name, keep] : pruner->masks())
    EXPECT_TRUE(torch::equal(pruner2->mask(name), keep));
}

// A scheduled run stopped between two prunings and resumed from its checkpoint
// ends bit for bit where the uninterrupted run does: the masks and the last
// pruned step come back with the callback's state.
TEST_F(PrunerTest, ScheduledRunResumesBitIdentical) {
  torch::manual_seed(5);
  auto x = torch::randn({64, 16});
  auto y = torch::randint(0, 4, {64});
  const std::vector<std::string> names = {"0.weight", "2.weight"};
  auto run = [&](const std::string& dir, int64_t max_steps, const std::string& resume) {
    torch::manual_seed(9);
    auto model = torch::nn::Sequential(torch::nn::Linear(16, 32), torch::nn::ReLU(),
                                       torch::nn::Linear(32, 4));
    wick::SupervisedTask task(model);
    torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
    wick::TensorBatchSource source(x, y, wick::TensorBatchSourceOptions(8).seed(3));
    auto pruner = std::make_shared<wick::Pruner>(*model);
    wick::Trainer trainer(wick::TrainerOptions()
                              .max_epochs(3)
                              .max_steps(max_steps)
                              .log_every_n_steps(1000)
                              .checkpoint_dir(dir)
                              .checkpoint_every_n_steps(3)
                              .resume(resume));
    trainer.add_callback(std::make_shared<wick::PrunerCallback>(
        pruner, wick::PrunerCallbackOptions(names).schedule(
                    wick::CubicScheduleOptions(0.7).begin_step(2).frequency(3).num_prunings(5))));
    trainer.fit(task, opt, source);
    return std::make_pair(wick::parameters_sha256(*model), pruner->masks());
  };
  wick::testing::TempDir straight, split;
  auto [full_hash, full_masks] = run(straight.str(), -1, "");
  auto [first_hash, first_masks] = run(split.str(), 9, "");  // pruned at 8, next at 11
  EXPECT_NE(first_hash, full_hash);
  auto [second_hash, second_masks] = run(split.str(), -1, "latest");
  EXPECT_EQ(second_hash, full_hash);
  ASSERT_EQ(second_masks.size(), full_masks.size());
  for (const auto& [name, keep] : full_masks)
    EXPECT_TRUE(torch::equal(second_masks.at(name), keep)) << name;
}

// On a GPU the masks are the ones the CPU computes (the same baseline tensors),
// and SGD with momentum leaves pruned weights at zero.
TEST_F(PrunerTest, CudaMasksMatchCpu) {
  if (!wick::testing::cuda_available()) GTEST_SKIP() << "no CUDA device";
  namespace pb = pruner_baseline;
  Baseline m;
  m.to(torch::kCUDA);
  wick::Pruner pruner(m);
  pruner.global_unstructured({"a", "b", "c"}, 0.6);
  pruner.ln_structured("a", 0.5);
  Baseline cpu;
  wick::Pruner cpu_pruner(cpu);
  cpu_pruner.global_unstructured({"a", "b", "c"}, 0.6);
  cpu_pruner.ln_structured("a", 0.5);
  for (const auto& [name, keep] : cpu_pruner.masks()) {
    EXPECT_TRUE(pruner.mask(name).is_cuda()) << name;
    EXPECT_TRUE(torch::equal(pruner.mask(name).cpu(), keep)) << name;
  }
  auto lin = torch::nn::Linear(32, 8);
  lin->to(torch::kCUDA);
  wick::Pruner p24(*lin);
  p24.semi_structured_24("weight");
  torch::optim::SGD opt(lin->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  auto keep = p24.mask("weight").clone();
  for (int i = 0; i < 5; ++i) {
    opt.zero_grad();
    lin->forward(torch::randn({4, 32}, torch::kCUDA)).pow(2).sum().backward();
    opt.step();
    p24.apply_masks();
    EXPECT_EQ(lin->weight.ne(0).logical_and(keep.logical_not()).sum().item<int64_t>(), 0);
  }
  EXPECT_EQ(lin->weight.ne(0).sum().item<int64_t>(), 32 * 8 / 2);
}

// The example of docs/pruning.md.
TEST_F(PrunerTest, DocsExample) {
  auto model =
      torch::nn::Sequential(torch::nn::Linear(16, 32), torch::nn::ReLU(), torch::nn::Linear(32, 4));
  wick::SupervisedTask task(model);
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  wick::TensorBatchSource train(torch::randn({64, 16}), torch::randint(0, 4, {64}), 8);

  auto pruner = std::make_shared<wick::Pruner>(*model);
  wick::Trainer trainer(wick::TrainerOptions().max_epochs(3));
  trainer.add_callback(std::make_shared<wick::PrunerCallback>(
      pruner,
      wick::PrunerCallbackOptions({"0.weight", "2.weight"})
          .schedule(wick::CubicScheduleOptions(0.75).begin_step(0).frequency(2).num_prunings(8))));
  trainer.fit(task, optimizer, train);
  pruner->make_permanent();
  std::string report = pruner->format_report();  // name, numel, zeros, sparsity per layer

  EXPECT_NEAR(pruner->sparsity(), 0.0, 0.0);  // no masks after make_permanent
  auto w = model[0]->as<torch::nn::Linear>()->weight;
  auto w2 = model[2]->as<torch::nn::Linear>()->weight;
  EXPECT_EQ(zeros(w) + zeros(w2), std::llround(0.75 * (16 * 32 + 32 * 4)));
}

}  // namespace

namespace {

class SemiStructuredTest : public SeededTest {};

TEST_F(SemiStructuredTest, FollowsPatternAfterSemiStructuredPruning) {
  auto model = torch::nn::Sequential(torch::nn::Linear(32, 16));
  EXPECT_FALSE(wick::follows_24_pattern(model->ptr<torch::nn::LinearImpl>(0)->weight));
  wick::Pruner pruner(*model);
  pruner.semi_structured_24("0.weight");
  EXPECT_TRUE(wick::follows_24_pattern(model->ptr<torch::nn::LinearImpl>(0)->weight));
  auto three_of_four = torch::tensor({{1.0f, 2.0f, 3.0f, 0.0f}});
  EXPECT_FALSE(wick::follows_24_pattern(three_of_four));
  EXPECT_TRUE(wick::follows_24_pattern(torch::tensor({{0.0f, 2.0f, 3.0f, 0.0f}})));
  EXPECT_FALSE(wick::follows_24_pattern(torch::zeros({2, 6})));  // no whole groups of 4
}

TEST_F(SemiStructuredTest, RefusesDenseModelsAndCpuLayersLeavingThemUnchanged) {
  auto model = torch::nn::Sequential(torch::nn::Linear(32, 16), torch::nn::ReLU(),
                                     torch::nn::Linear(16, 16));
  EXPECT_THROWS_WITH(wick::to_semi_structured(*model),
                     "no torch::nn::Linear weight follows the 2:4 pattern");
  wick::Pruner pruner(*model);
  pruner.semi_structured_24("2.weight");
  EXPECT_THROWS_WITH(wick::to_semi_structured(*model),
                     "'2' follows the 2:4 pattern but its weight is on cpu; semi-structured sparse "
                     "kernels need CUDA");
  EXPECT_NE(model->ptr<torch::nn::LinearImpl>(2), nullptr);
  EXPECT_EQ(model->ptr<torch::nn::LinearImpl>(2)->weight.numel(), 16 * 16);
}

TEST_F(SemiStructuredTest, CudaSparseLayersMatchTheMaskedDenseOnes) {
  if (!wick::testing::cuda_available()) GTEST_SKIP() << "no CUDA device";
  auto model = torch::nn::Sequential(torch::nn::Linear(128, 256), torch::nn::ReLU(),
                                     torch::nn::Linear(256, 64));
  model->to(torch::kCUDA, torch::kHalf);
  wick::Pruner pruner(*model);
  pruner.semi_structured_24("0.weight");
  pruner.semi_structured_24("2.weight");
  auto x = torch::randn(
      {37, 128}, torch::TensorOptions(torch::kCUDA).dtype(torch::kHalf));  // rows padded to 40
  torch::Tensor dense;
  {
    c10::InferenceMode g;
    dense = model->forward(x).to(torch::kFloat);
  }
  EXPECT_EQ(wick::to_semi_structured(*model), (std::vector<std::string>{"0", "2"}));
  EXPECT_NE(model->ptr<wick::SemiStructuredLinearImpl>(0), nullptr);
  c10::InferenceMode g;
  auto sparse = model->forward(x).to(torch::kFloat);
  WICK_EXPECT_CLOSE(sparse, dense, 1e-2, 1e-2);
}

}  // namespace
