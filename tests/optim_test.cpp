#include <wick/wick.h>

#include "python_reference.h"
#include "support.h"

#include <functional>
#include <sstream>
#include <string>
#include <vector>

namespace {

using wick::testing::from_json;
using wick::testing::TempDir;
using wick::testing::tensors_close;
using wick::testing::tensors_equal;
using wick::testing::to_json;

struct Data {
  torch::Tensor x, y;
};

Data make_data(int64_t n, torch::Dtype dtype = torch::kFloat64) {
  auto gen = at::detail::createCPUGenerator(321);
  auto x = torch::randn({n, 12}, gen, torch::TensorOptions().dtype(dtype));
  auto y = torch::randint(0, 4, {n}, gen, torch::TensorOptions().dtype(torch::kLong));
  return {x, y};
}

torch::nn::Sequential make_mlp(torch::Dtype dtype = torch::kFloat64) {
  torch::manual_seed(5);
  torch::nn::Linear fc1(12, 32);
  torch::nn::Linear fc2(32, 16);
  torch::nn::Linear fc3(16, 4);
  torch::nn::Sequential m(fc1, torch::nn::ReLU(), fc2, torch::nn::Tanh(), fc3);
  m->to(dtype);
  return m;
}

using wick::testing::clone_parameters;

// `steps` steps of cross-entropy on consecutive batches of 8 (sign -1: maximize the loss's
// negative).
void train(torch::nn::Sequential& model, torch::optim::Optimizer& opt, const Data& d, int64_t steps,
           int64_t first = 0, double sign = 1.0) {
  const int64_t batches = d.x.size(0) / 8;
  for (int64_t s = first; s < first + steps; ++s) {
    const int64_t i = (s % batches) * 8;
    opt.zero_grad();
    auto loss = torch::nn::functional::cross_entropy(model->forward(d.x.narrow(0, i, 8)),
                                                     d.y.narrow(0, i, 8));
    (sign * loss).backward();
    opt.step();
  }
}

class FusedAdamTest : public wick::testing::SeededTest {};

void expect_models_close(const torch::nn::Module& a, const torch::nn::Module& b, double rtol,
                         double atol) {
  auto pa = clone_parameters(a), pb = clone_parameters(b);
  ASSERT_EQ(pa.size(), pb.size());
  for (size_t i = 0; i < pa.size(); ++i)
    EXPECT_TRUE(tensors_close(pa[i], pb[i], rtol, atol)) << "parameter " << i;
}

// (1) float64 against torch::optim::Adam / AdamW: the same function to rounding.
TEST_F(FusedAdamTest, MatchesTorchAdamInFloat64) {
  auto data = make_data(80);
  struct Case {
    const char* name;
    wick::FusedAdamOptions fused;
    torch::optim::AdamOptions ref;
  };
  const std::vector<Case> cases = {
      {"default", wick::FusedAdamOptions(1e-2), torch::optim::AdamOptions(1e-2)},
      {"weight_decay", wick::FusedAdamOptions(1e-2).weight_decay(0.05).betas({0.8, 0.99}).eps(1e-6),
       torch::optim::AdamOptions(1e-2).weight_decay(0.05).betas({0.8, 0.99}).eps(1e-6)},
      {"amsgrad", wick::FusedAdamOptions(1e-2).amsgrad(true).weight_decay(0.01),
       torch::optim::AdamOptions(1e-2).amsgrad(true).weight_decay(0.01)},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    auto model = make_mlp(), reference = make_mlp();
    wick::FusedAdam opt(model->parameters(), c.fused);
    torch::optim::Adam ref(reference->parameters(), c.ref);
    train(model, opt, data, 20);
    train(reference, ref, data, 20);
    expect_models_close(*model, *reference, 1e-10, 1e-14);
    EXPECT_FALSE(tensors_close(clone_parameters(*model)[0], make_mlp()->parameters()[0], 1e-3))
        << "did not train";
  }
}

TEST_F(FusedAdamTest, DecoupledWeightDecayMatchesTorchAdamW) {
  auto data = make_data(80);
  for (bool amsgrad : {false, true}) {
    SCOPED_TRACE(amsgrad ? "amsgrad" : "plain");
    auto model = make_mlp(), reference = make_mlp();
    wick::FusedAdam opt(
        model->parameters(),
        wick::FusedAdamOptions(1e-2).weight_decay(0.1).decoupled_weight_decay(true).amsgrad(
            amsgrad));
    torch::optim::AdamW ref(reference->parameters(),
                            torch::optim::AdamWOptions(1e-2).weight_decay(0.1).amsgrad(amsgrad));
    train(model, opt, data, 20);
    train(reference, ref, data, 20);
    expect_models_close(*model, *reference, 1e-10, 1e-14);
  }
}

// maximize(f) takes the steps minimize(-f) takes, weight decay included.
TEST_F(FusedAdamTest, MaximizeMatchesTorchAdamOnNegatedLoss) {
  auto data = make_data(80);
  auto model = make_mlp(), reference = make_mlp();
  wick::FusedAdam opt(model->parameters(),
                      wick::FusedAdamOptions(1e-2).maximize(true).weight_decay(0.02));
  torch::optim::Adam ref(reference->parameters(),
                         torch::optim::AdamOptions(1e-2).weight_decay(0.02));
  train(model, opt, data, 20, 0, -1.0);
  train(reference, ref, data, 20, 0, 1.0);
  expect_models_close(*model, *reference, 1e-10, 1e-14);
}

// Per-group options; a group mixing float32 and float64 parameters (one fused call per dtype);
// a parameter without a gradient is left alone and gets no state.
TEST_F(FusedAdamTest, ParamGroupsMixedDtypesAndMissingGradsMatchTorchAdam) {
  auto make = [] {
    torch::manual_seed(9);
    return std::vector<torch::Tensor>{torch::randn({5, 3}, torch::kFloat64).requires_grad_(),
                                      torch::randn({4}, torch::kFloat32).requires_grad_(),
                                      torch::randn({3}, torch::kFloat64).requires_grad_(),
                                      torch::randn({2}, torch::kFloat64).requires_grad_()};
  };
  auto a = make(), b = make();
  auto groups = [](std::vector<torch::Tensor>& p, auto options_a, auto options_b) {
    return std::vector<torch::optim::OptimizerParamGroup>{
        torch::optim::OptimizerParamGroup({p[0], p[1], p[3]},
                                          std::make_unique<decltype(options_a)>(options_a)),
        torch::optim::OptimizerParamGroup({p[2]},
                                          std::make_unique<decltype(options_b)>(options_b))};
  };
  wick::FusedAdam opt(
      groups(a, wick::FusedAdamOptions(0.05), wick::FusedAdamOptions(0.2).weight_decay(0.1)),
      wick::FusedAdamOptions(1.0));
  torch::optim::Adam ref(
      groups(b, torch::optim::AdamOptions(0.05), torch::optim::AdamOptions(0.2).weight_decay(0.1)),
      torch::optim::AdamOptions(1.0));
  auto loss = [](const std::vector<torch::Tensor>& p) {
    return p[0].pow(2).sum() + p[1].sin().sum() +
           (p[2] * p[2].cos()).sum();  // p[3] unused: no grad
  };
  for (int s = 0; s < 15; ++s) {
    opt.zero_grad();
    ref.zero_grad();
    loss(a).backward();
    loss(b).backward();
    opt.step();
    ref.step();
  }
  EXPECT_TRUE(tensors_close(a[0], b[0], 1e-10, 1e-14));
  EXPECT_TRUE(tensors_close(a[1], b[1], 1e-6, 1e-7));  // float32: each rounds its own way
  EXPECT_TRUE(tensors_close(a[2], b[2], 1e-10, 1e-14));
  EXPECT_TRUE(tensors_equal(a[3], make()[3]));
  EXPECT_EQ(opt.state().count(a[3].unsafeGetTensorImpl()), 0u);
  const auto& s0 =
      static_cast<const wick::FusedAdamParamState&>(*opt.state().at(a[0].unsafeGetTensorImpl()));
  EXPECT_EQ(s0.step().scalar_type(), torch::kFloat32);
  EXPECT_EQ(s0.step().item<float>(), 15.0f);
}

// (2) float32 against Python's torch.optim.Adam(fused=True) / AdamW(fused=True)
// on this machine (tests/py/reference.py): the same fused kernel, the same
// forward and backward kernels, so the same bits. (The expected values depend
// on the CPU's kernels, AVX-512 or AMX: they are computed where the test runs.)
TEST_F(FusedAdamTest, MatchesPythonFusedAdamInFloat32) {
  const auto x = torch::randn({4, 5});
  const auto y = torch::randn({4, 3});
  torch::nn::Sequential init(torch::nn::Linear(5, 7), torch::nn::Tanh(), torch::nn::Linear(7, 3));
  const std::vector<std::pair<const char*, wick::FusedAdamOptions>> cases = {
      {"Adam", wick::FusedAdamOptions(1e-2)},
      {"AdamWeightDecay",
       wick::FusedAdamOptions(1e-2).weight_decay(0.05).betas({0.8, 0.99}).eps(1e-6)},
      {"AdamW", wick::FusedAdamOptions(1e-2).weight_decay(0.1).decoupled_weight_decay(true)},
      {"AdamAmsgrad", wick::FusedAdamOptions(1e-2).amsgrad(true).weight_decay(0.01)},
      {"AdamWAmsgradMaximize", wick::FusedAdamOptions(5e-3)
                                   .amsgrad(true)
                                   .maximize(true)
                                   .weight_decay(0.02)
                                   .decoupled_weight_decay(true)},
  };
  const int64_t steps = 10;
  nlohmann::json in = {{"device", "cpu"}, {"steps", steps},
                       {"x", to_json(x)}, {"x_shape", x.sizes().vec()},
                       {"y", to_json(y)}, {"y_shape", y.sizes().vec()}};
  for (const auto& p : init->parameters()) in["params"].push_back(to_json(p));
  for (const auto& c : cases) in["cases"].push_back(to_json(c.second));
  const auto ref = wick::testing::python_reference("reference.py", "mlp_fused_adam", in);

  for (size_t k = 0; k < cases.size(); ++k) {
    SCOPED_TRACE(cases[k].first);
    torch::nn::Sequential model(torch::nn::Linear(5, 7), torch::nn::Tanh(),
                                torch::nn::Linear(7, 3));
    auto params = model->parameters();
    {
      torch::NoGradGuard no_grad;
      for (size_t i = 0; i < params.size(); ++i) params[i].copy_(init->parameters()[i]);
    }
    wick::FusedAdam opt(params, cases[k].second);
    for (int64_t s = 0; s < steps; ++s) {
      opt.zero_grad();
      torch::nn::functional::mse_loss(model->forward(x), y).backward();
      opt.step();
    }
    for (size_t i = 0; i < params.size(); ++i) {
      EXPECT_TRUE(tensors_equal(params[i], from_json(ref["params"][k][i], params[i])))
          << "parameter " << i;
    }
  }
}

// (3) save mid-run, load into a fresh optimizer over a fresh model: the rest
// of the run is bit-identical to the run that never stopped.
TEST_F(FusedAdamTest, SaveLoadMidRunContinuesBitIdentically) {
  auto data = make_data(80, torch::kFloat32);
  for (bool amsgrad : {false, true}) {
    SCOPED_TRACE(amsgrad ? "amsgrad" : "plain");
    const auto options = wick::FusedAdamOptions(1e-2).amsgrad(amsgrad).weight_decay(0.01);
    auto straight = make_mlp(torch::kFloat32);
    wick::FusedAdam straight_opt(straight->parameters(), options);
    train(straight, straight_opt, data, 12);

    auto first = make_mlp(torch::kFloat32);
    std::stringstream model_bytes, opt_bytes;
    {
      wick::FusedAdam opt(first->parameters(), options);
      train(first, opt, data, 6);
      torch::save(first, model_bytes);
      torch::save(opt, opt_bytes);
    }
    auto second = make_mlp(torch::kFloat32);
    torch::load(second, model_bytes);
    wick::FusedAdam opt(second->parameters(),
                        wick::FusedAdamOptions(123.0));  // options come from the archive
    torch::load(opt, opt_bytes);
    EXPECT_TRUE(static_cast<const wick::FusedAdamOptions&>(opt.param_groups()[0].options()) ==
                options);
    train(second, opt, data, 6, /*first=*/6);
    auto a = clone_parameters(*second), b = clone_parameters(*straight);
    for (size_t i = 0; i < a.size(); ++i)
      EXPECT_TRUE(tensors_equal(a[i], b[i])) << "parameter " << i;
  }
}

// torch::optim::Adam's saved state (int64 steps) loads, so a run can switch to FusedAdam.
TEST_F(FusedAdamTest, ContinuesFromTorchAdamState) {
  auto data = make_data(80);
  auto reference = make_mlp();
  torch::optim::Adam ref(reference->parameters(),
                         torch::optim::AdamOptions(1e-2).weight_decay(0.01));
  train(reference, ref, data, 16);

  auto model = make_mlp();
  std::stringstream bytes;
  {
    torch::optim::Adam adam(model->parameters(),
                            torch::optim::AdamOptions(1e-2).weight_decay(0.01));
    train(model, adam, data, 8);
    torch::save(adam, bytes);
  }
  wick::FusedAdam opt(model->parameters());
  torch::load(opt, bytes);
  EXPECT_DOUBLE_EQ(
      static_cast<const wick::FusedAdamOptions&>(opt.param_groups()[0].options()).weight_decay(),
      0.01);
  train(model, opt, data, 8, /*first=*/8);
  expect_models_close(*model, *reference, 1e-10, 1e-14);
}

// (4) In the Trainer with CosineWarmupLR (as the LRSchedulerCallback steps it):
// the hand loop with torch::optim::Adam and the same schedule is the reference.
// docs/optim.md's example is this test's Trainer part.
TEST_F(FusedAdamTest, TrainsInTrainerWithCosineWarmupLR) {
  auto data = make_data(96);
  auto reference = make_mlp();
  {
    torch::optim::Adam ref(reference->parameters(),
                           torch::optim::AdamOptions(3e-2).weight_decay(1e-3));
    wick::CosineWarmupLR sched(ref, /*warmup_steps=*/3, /*total_steps=*/24);
    for (int epoch = 0; epoch < 2; ++epoch) {
      for (int64_t i = 0; i < 96; i += 8) {
        ref.zero_grad();
        torch::nn::functional::cross_entropy(reference->forward(data.x.narrow(0, i, 8)),
                                             data.y.narrow(0, i, 8))
            .backward();
        ref.step();
        sched.step();
      }
    }
  }

  auto model = make_mlp();
  wick::SupervisedTask task(model);
  wick::FusedAdam optimizer(model->parameters(), wick::FusedAdamOptions(3e-2).weight_decay(1e-3));
  auto schedule =
      std::make_shared<wick::CosineWarmupLR>(optimizer, /*warmup_steps=*/3, /*total_steps=*/24);
  wick::TensorBatchSource source(data.x, data.y, wick::TensorBatchSourceOptions(8).shuffle(false));
  wick::Trainer trainer(wick::TrainerOptions().max_epochs(2).log_every_n_steps(1000000));
  trainer.add_callback(std::make_shared<wick::LRSchedulerCallback>(schedule));
  auto result = trainer.fit(task, optimizer, source);

  EXPECT_EQ(result.state.step, 24);
  EXPECT_EQ(optimizer.param_groups()[0].options().get_lr(), 0.0);  // cosine reached min_lr_ratio 0
  expect_models_close(*model, *reference, 1e-10, 1e-14);
}

// Trainer resume goes through wick::Checkpoint (put_optimizer / restore_optimizer).
TEST_F(FusedAdamTest, TrainerResumeIsBitIdentical) {
  auto data = make_data(100, torch::kFloat32);
  auto run = [&](const std::string& dir, int64_t max_steps, const std::string& resume) {
    auto model = make_mlp(torch::kFloat32);
    wick::SupervisedTask task(model);
    wick::FusedAdam opt(
        model->parameters(),
        wick::FusedAdamOptions(1e-2).decoupled_weight_decay(true).weight_decay(0.05).amsgrad(true));
    wick::TensorBatchSource source(data.x, data.y,
                                   wick::TensorBatchSourceOptions(10).shuffle(true).seed(3));
    wick::Trainer trainer(wick::TrainerOptions()
                              .log_every_n_steps(1000000)
                              .max_epochs(2)
                              .max_steps(max_steps)
                              .seed(11)
                              .checkpoint_dir(dir)
                              .resume(resume));
    trainer.add_callback(std::make_shared<wick::LRSchedulerCallback>(
        std::make_shared<wick::CosineWarmupLR>(opt, 3, 20)));
    auto result = trainer.fit(task, opt, source);
    return std::make_pair(result.state.step, wick::parameters_sha256(*model));
  };
  TempDir straight, split;
  auto [full_steps, full_hash] = run(straight.str(), -1, "");
  EXPECT_EQ(full_steps, 20);
  auto [first_steps, first_hash] = run(split.str(), 7, "");
  EXPECT_EQ(first_steps, 7);
  EXPECT_NE(first_hash, full_hash);
  auto [second_steps, second_hash] = run(split.str(), -1, "latest");
  EXPECT_EQ(second_steps, 20);
  EXPECT_EQ(second_hash, full_hash);
}

// (5) CUDA: the kernel on the GPU against torch::optim::Adam in float64 on the
// CPU; and one group spread over CPU and GPU (one fused call per device).
TEST_F(FusedAdamTest, CudaMatchesCpuReference) {
  if (!wick::testing::cuda_available()) GTEST_SKIP() << "no CUDA device";
  auto data = make_data(80);
  auto reference = make_mlp();
  torch::optim::Adam ref(reference->parameters(),
                         torch::optim::AdamOptions(1e-2).weight_decay(0.01));
  train(reference, ref, data, 20);

  auto model = make_mlp(torch::kFloat32);
  model->to(torch::kCUDA);
  wick::FusedAdam opt(model->parameters(), wick::FusedAdamOptions(1e-2).weight_decay(0.01));
  Data gpu{data.x.to(torch::kCUDA, torch::kFloat32), data.y.to(torch::kCUDA)};
  train(model, opt, gpu, 20);
  auto a = clone_parameters(*model), b = clone_parameters(*reference);
  for (size_t i = 0; i < a.size(); ++i)
    EXPECT_TRUE(tensors_close(a[i], b[i], 1e-3, 1e-4)) << "parameter " << i;
  const auto& s = static_cast<const wick::FusedAdamParamState&>(*opt.state().begin()->second);
  EXPECT_TRUE(s.step().is_cuda());

  torch::manual_seed(2);
  auto cpu = torch::randn({6}, torch::kFloat64).requires_grad_();
  auto cuda = torch::randn({6}, torch::kFloat64).to(torch::kCUDA).requires_grad_();
  auto cpu_ref = cpu.detach().clone().requires_grad_(),
       cuda_ref = cuda.detach().cpu().requires_grad_();
  wick::FusedAdam mixed({cpu, cuda}, wick::FusedAdamOptions(0.1));
  torch::optim::Adam mixed_ref({cpu_ref, cuda_ref}, torch::optim::AdamOptions(0.1));
  for (int k = 0; k < 5; ++k) {
    mixed.zero_grad();
    mixed_ref.zero_grad();
    (cpu.pow(2).sum() + cuda.sin().sum()).backward();
    (cpu_ref.pow(2).sum() + cuda_ref.sin().sum()).backward();
    mixed.step();
    mixed_ref.step();
  }
  EXPECT_TRUE(tensors_close(cpu, cpu_ref, 1e-10, 1e-14));
  EXPECT_TRUE(tensors_close(cuda, cuda_ref, 1e-10, 1e-14));
}

// (6) Bad options and bad parameters.
TEST_F(FusedAdamTest, RejectsBadOptions) {
  auto p = torch::zeros({2}, torch::requires_grad());
  EXPECT_THROWS_WITH(wick::FusedAdam({p}, wick::FusedAdamOptions(-1e-3)),
                     "FusedAdam: lr must be >= 0, got -0.001");
  EXPECT_THROWS_WITH(wick::FusedAdam({p}, wick::FusedAdamOptions().betas({1.0, 0.999})),
                     "FusedAdam: betas[0] must be in [0, 1), got 1");
  EXPECT_THROWS_WITH(wick::FusedAdam({p}, wick::FusedAdamOptions().betas({0.9, -0.5})),
                     "FusedAdam: betas[1] must be in [0, 1), got -0.5");
  EXPECT_THROWS_WITH(wick::FusedAdam({p}, wick::FusedAdamOptions().eps(-1)),
                     "FusedAdam: eps must be >= 0, got -1");
  EXPECT_THROWS_WITH(wick::FusedAdam({p}, wick::FusedAdamOptions().weight_decay(-0.1)),
                     "FusedAdam: weight_decay must be >= 0, got -0.1");
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<torch::Tensor>{p},
                      std::make_unique<wick::FusedAdamOptions>(wick::FusedAdamOptions().eps(-2)));
  EXPECT_THROWS_WITH(wick::FusedAdam bad(groups), "eps must be >= 0, got -2 (parameter group 0)");
  EXPECT_THROWS_WITH(wick::FusedAdam({torch::zeros({2}, torch::kLong)}),
                     "parameters must be floating point");
}

TEST_F(FusedAdamTest, RejectsSparseGradients) {
  auto emb = torch::nn::Embedding(torch::nn::EmbeddingOptions(10, 3).sparse(true));
  wick::FusedAdam opt(emb->parameters());
  emb->forward(torch::tensor({1, 2}, torch::kLong)).sum().backward();
  EXPECT_THROWS_WITH(opt.step(), "FusedAdam: sparse gradients are not supported");
}

}  // namespace
