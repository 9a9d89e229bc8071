// wick/cuda.h (TF32 switch), FusedAdam's tensor-lr path, clip_grad_norm_tensor
// and wick::CudaGraphStep. The CUDA cases (graph replay against eager steps,
// the LR schedule through the graph, static shapes) skip without a GPU.

#include <wick/cuda.h>
#include <wick/cuda_graph.h>
#include <wick/optim.h>

#include "support.h"

#include <ATen/Context.h>

#include <vector>

namespace {

using wick::testing::tensors_close;

torch::nn::Sequential make_mlp(const torch::Device& device = torch::kCPU) {
  torch::manual_seed(7);
  torch::nn::Sequential m(torch::nn::Linear(12, 32), torch::nn::Tanh(), torch::nn::Linear(32, 4));
  m->to(device);
  return m;
}

std::vector<torch::Tensor> batch_x(int64_t n, int64_t i) {
  auto gen = at::detail::createCPUGenerator(100 + i);
  return {torch::randn({n, 12}, gen), torch::randint(0, 4, {n}, gen, torch::kLong)};
}

torch::Tensor loss_of(torch::nn::Sequential& m, const torch::Tensor& x, const torch::Tensor& y) {
  return torch::nn::functional::cross_entropy(m->forward(x), y);
}

// A schedule with lrs that float32 holds exactly, so that the tensor path's
// rounding of the lr to float32 changes nothing.
double lr_at(int64_t step) {
  return step < 3 ? 0.0625 : 0.015625 * static_cast<double>(1 + step % 3);
}

class CudaTest : public wick::testing::SeededTest {};

TEST_F(CudaTest, TF32SettingRoundTripsAndMatchesTheLegacyGetter) {
  const bool before = wick::tf32_enabled();
  wick::set_tf32(true);
  EXPECT_TRUE(wick::tf32_enabled());
  // The legacy getters read the same setting (and do not throw for a mix of APIs).
  EXPECT_TRUE(at::globalContext().allowTF32CuBLAS());
  EXPECT_TRUE(at::globalContext().allowTF32CuDNN(at::Float32Op::CONV));
  EXPECT_EQ(at::globalContext().float32MatmulPrecision(), at::Float32MatmulPrecision::HIGH);
  {
    wick::TF32Guard off(false);
    EXPECT_FALSE(wick::tf32_enabled());
    EXPECT_FALSE(at::globalContext().allowTF32CuBLAS());
    EXPECT_FALSE(at::globalContext().allowTF32CuDNN(at::Float32Op::CONV));
  }
  EXPECT_TRUE(wick::tf32_enabled());
  wick::set_tf32(false);
  EXPECT_FALSE(wick::tf32_enabled());
  EXPECT_FALSE(at::globalContext().allowTF32CuBLAS());
  EXPECT_EQ(at::globalContext().float32MatmulPrecision(), at::Float32MatmulPrecision::HIGHEST);
  wick::set_tf32(before);
}

// The tensor-lr path against LibTorch's own (unfused, per-op) AdamW and Adam
// under the same lr schedule, set through set_lr per group as a scheduler does.
TEST_F(CudaTest, FusedAdamTensorLrFollowsTheScheduleLikeTorchAdam) {
  for (const bool decoupled : {true, false}) {
    for (const bool amsgrad : {false, true}) {
      auto fused_model = make_mlp();
      auto ref_model = make_mlp();
      wick::FusedAdam fused(fused_model->parameters(), wick::FusedAdamOptions(lr_at(0))
                                                           .weight_decay(0.1)
                                                           .amsgrad(amsgrad)
                                                           .decoupled_weight_decay(decoupled)
                                                           .tensor_lr(true));
      std::unique_ptr<torch::optim::Optimizer> ref;
      if (decoupled) {
        ref = std::make_unique<torch::optim::AdamW>(
            ref_model->parameters(),
            torch::optim::AdamWOptions(lr_at(0)).weight_decay(0.1).amsgrad(amsgrad));
      } else {
        ref = std::make_unique<torch::optim::Adam>(
            ref_model->parameters(),
            torch::optim::AdamOptions(lr_at(0)).weight_decay(0.1).amsgrad(amsgrad));
      }
      for (int64_t i = 0; i < 7; ++i) {
        for (auto& g : fused.param_groups()) g.options().set_lr(lr_at(i));
        for (auto& g : ref->param_groups()) g.options().set_lr(lr_at(i));
        const auto b = batch_x(16, i);
        fused.zero_grad();
        loss_of(fused_model, b[0], b[1]).backward();
        fused.step();
        ref->zero_grad();
        loss_of(ref_model, b[0], b[1]).backward();
        ref->step();
      }
      const auto p = fused_model->parameters(), q = ref_model->parameters();
      for (size_t k = 0; k < p.size(); ++k) {
        EXPECT_TRUE(tensors_close(p[k], q[k], 1e-5, 1e-6))
            << "parameter " << k << " decoupled " << decoupled << " amsgrad " << amsgrad;
      }
    }
  }
}

TEST_F(CudaTest, FusedAdamTensorLrEqualsTheDoubleLrPath) {
  auto a_model = make_mlp(), b_model = make_mlp();
  const auto opts = wick::FusedAdamOptions(lr_at(0))
                        .betas(std::make_tuple(0.9, 0.95))
                        .weight_decay(0.1)
                        .decoupled_weight_decay(true);
  wick::FusedAdam a(a_model->parameters(), opts);
  wick::FusedAdam b(b_model->parameters(), wick::FusedAdamOptions(opts).tensor_lr(true));
  for (int64_t i = 0; i < 6; ++i) {
    a.param_groups()[0].options().set_lr(lr_at(i));
    b.param_groups()[0].options().set_lr(lr_at(i));
    const auto batch = batch_x(8, i);
    for (auto* o : {&a, &b}) o->zero_grad();
    loss_of(a_model, batch[0], batch[1]).backward();
    loss_of(b_model, batch[0], batch[1]).backward();
    a.step();
    b.step();
  }
  const auto p = a_model->parameters(), q = b_model->parameters();
  for (size_t k = 0; k < p.size(); ++k)
    EXPECT_TRUE(tensors_close(p[k], q[k], 1e-6, 1e-8)) << "parameter " << k;
  // The option survives a save / load (and an older archive without it loads as false).
  std::stringstream ss;
  {
    torch::serialize::OutputArchive out;
    b.save(out);
    out.save_to(ss);
  }
  auto c_model = make_mlp();
  wick::FusedAdam c(c_model->parameters(), wick::FusedAdamOptions(1.0));
  torch::serialize::InputArchive in;
  in.load_from(ss);
  c.load(in);
  EXPECT_TRUE(
      static_cast<const wick::FusedAdamOptions&>(c.param_groups()[0].options()).tensor_lr());
}

TEST_F(CudaTest, ClipGradNormTensorMatchesTorchClipGradNorm) {
  for (const double max_norm : {0.05, 100.0}) {  // clips, and leaves alone
    auto a = make_mlp(), b = make_mlp();
    const auto batch = batch_x(16, 0);
    loss_of(a, batch[0], batch[1]).backward();
    loss_of(b, batch[0], batch[1]).backward();
    const auto norm = wick::clip_grad_norm_tensor(a->parameters(), max_norm);
    const double ref = torch::nn::utils::clip_grad_norm_(b->parameters(), max_norm);
    EXPECT_NEAR(norm.item<double>(), ref, 1e-6 * ref);
    const auto p = a->parameters(), q = b->parameters();
    for (size_t k = 0; k < p.size(); ++k)
      EXPECT_TRUE(tensors_close(p[k].grad(), q[k].grad(), 1e-5, 1e-9));
  }
  EXPECT_THROWS_WITH(wick::clip_grad_norm_tensor(make_mlp()->parameters(), 0.0),
                     "max_norm must be > 0");
}

TEST_F(CudaTest, CudaGraphStepRefusesWhatCannotBeCaptured) {
  auto m = make_mlp();
  auto loss = [&](const torch::Tensor& x, const torch::Tensor& y) { return loss_of(m, x, y); };
  wick::FusedAdam tensor_lr(m->parameters(), wick::FusedAdamOptions(0.01).tensor_lr(true));
  wick::FusedAdam host_lr(m->parameters(), wick::FusedAdamOptions(0.01));
  EXPECT_THROWS_WITH(wick::CudaGraphStep(m->parameters(), tensor_lr, loss),
                     "parameters must be on a CUDA device");
  EXPECT_THROWS_WITH(wick::CudaGraphStep(m->parameters(), host_lr, loss), "tensor_lr false");
  EXPECT_THROWS_WITH(
      wick::CudaGraphStep(m->parameters(), tensor_lr, loss,
                          wick::CudaGraphStepOptions().precision(wick::Precision::kFP16)),
      "precision fp16 cannot be captured");
  EXPECT_THROWS_WITH(wick::CudaGraphStep(m->parameters(), tensor_lr, loss,
                                         wick::CudaGraphStepOptions().warmup_steps(0)),
                     "warmup_steps must be >= 1, got 0");
  EXPECT_THROWS_WITH(wick::CudaGraphStep(m->parameters(), tensor_lr, loss,
                                         wick::CudaGraphStepOptions().grad_clip_norm(-1)),
                     "grad_clip_norm must be >= 0");
}

// ---- CUDA only ----

// Graph replays against the same steps run eagerly (FusedAdam with a host lr,
// LibTorch's clip_grad_norm_), fp32 with TF32 off, an lr schedule changing
// every step: warm-up, capture and replays all give the eager numbers.
TEST_F(CudaTest, GraphReplayEqualsEagerStepsAndFollowsTheSchedule) {
  if (!wick::testing::cuda_available()) GTEST_SKIP() << "no CUDA device";
  wick::TF32Guard no_tf32(false);
  const torch::Device cuda(torch::kCUDA);
  auto g_model = make_mlp(cuda), e_model = make_mlp(cuda);
  const auto opts = wick::FusedAdamOptions(lr_at(0)).weight_decay(0.1).decoupled_weight_decay(true);
  wick::FusedAdam g_opt(g_model->parameters(), wick::FusedAdamOptions(opts).tensor_lr(true));
  wick::FusedAdam e_opt(e_model->parameters(), opts);
  wick::CudaGraphStep step(
      g_model->parameters(), g_opt,
      [&](const torch::Tensor& x, const torch::Tensor& y) { return loss_of(g_model, x, y); },
      wick::CudaGraphStepOptions()
          .warmup_steps(2)
          .precision(wick::Precision::kFP32)
          .grad_clip_norm(0.5));
  for (int64_t i = 0; i < 8; ++i) {
    g_opt.param_groups()[0].options().set_lr(lr_at(i));
    e_opt.param_groups()[0].options().set_lr(lr_at(i));
    const auto b = batch_x(32, i);
    const double g_loss = step.step(b[0], b[1]).item<double>();
    e_opt.zero_grad();
    auto e_loss = loss_of(e_model, b[0].to(cuda), b[1].to(cuda));
    e_loss.backward();
    const double e_norm = torch::nn::utils::clip_grad_norm_(e_model->parameters(), 0.5);
    e_opt.step();
    EXPECT_NEAR(g_loss, e_loss.item<double>(), 1e-5) << "step " << i;
    EXPECT_NEAR(step.grad_norm().item<double>(), e_norm, 1e-4 * e_norm) << "step " << i;
    EXPECT_EQ(step.captured(), i >= 2) << "step " << i;
  }
  EXPECT_EQ(step.steps(), 8);
  const auto p = g_model->parameters(), q = e_model->parameters();
  for (size_t k = 0; k < p.size(); ++k)
    EXPECT_TRUE(tensors_close(p[k], q[k], 1e-4, 1e-6)) << "parameter " << k;
}

TEST_F(CudaTest, GraphShapesAreStatic) {
  if (!wick::testing::cuda_available()) GTEST_SKIP() << "no CUDA device";
  const torch::Device cuda(torch::kCUDA);
  auto m = make_mlp(cuda);
  wick::FusedAdam opt(m->parameters(), wick::FusedAdamOptions(0.01).tensor_lr(true));
  wick::CudaGraphStep step(
      m->parameters(), opt,
      [&](const torch::Tensor& x, const torch::Tensor& y) { return loss_of(m, x, y); },
      wick::CudaGraphStepOptions().warmup_steps(1));
  for (int64_t i = 0; i < 3; ++i) {
    const auto b = batch_x(16, i);
    step.step(b[0], b[1]);
  }
  EXPECT_TRUE(step.captured());
  const auto b = batch_x(8, 0);
  EXPECT_THROWS_WITH(step.step(b[0], b[1]), "input must be [16, 12]");
  EXPECT_THROWS_WITH(step.step(b[0], b[1]), "got [8, 12]");
}

}  // namespace
