#include <wick/amp.h>

#include <ATen/autocast_mode.h>

#include <cmath>
#include <cstring>
#include <sstream>
#include <vector>

#include "amp_baseline.h"
#include "support.h"

namespace {

namespace base = wick::amp_baseline;
using wick::AmpScaler;
using wick::AmpScalerOptions;
using wick::AutocastGuard;
using wick::Precision;
using wick::testing::SeededTest;

// Same formula as grad_value() in tests/gen/amp_baseline.py.
float grad_value(int step, int param, int index) {
  return static_cast<float>(((3 * step + 5 * index + 7 * param) % 9) - 4) / 8.0f;
}

// Bitwise equality of floats, where any NaN equals any NaN.
bool same_float(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return std::memcmp(&a, &b, sizeof(float)) == 0;
}

::testing::AssertionResult same_values(const torch::Tensor& t, const float* expected, int n) {
  auto c = t.detach().to(torch::kCPU, torch::kFloat32).contiguous();
  if (c.numel() != n) return ::testing::AssertionFailure() << "numel " << c.numel() << " vs " << n;
  const float* p = c.data_ptr<float>();
  for (int i = 0; i < n; ++i) {
    if (!same_float(p[i], expected[i])) {
      return ::testing::AssertionFailure()
             << "element " << i << ": " << p[i] << " vs expected " << expected[i];
    }
  }
  return ::testing::AssertionSuccess();
}

torch::nn::Linear make_model(const torch::Device& device) {
  torch::nn::Linear model(base::kInFeatures, base::kOutFeatures);
  torch::NoGradGuard no_grad;
  model->weight.copy_(torch::from_blob(const_cast<float*>(base::kInitialWeight),
                                       {base::kOutFeatures, base::kInFeatures}));
  model->bias.copy_(torch::from_blob(const_cast<float*>(base::kInitialBias), {base::kOutFeatures}));
  model->to(device);
  return model;
}

// The script's set_grads(): true gradients times the current scale, then anomalies.
void set_grads(torch::nn::Linear& model, int step, double scale, const base::Anomaly* anomalies,
               int num_anomalies, bool bias_none) {
  auto fill = [&](torch::Tensor& p, int param) {
    std::vector<float> g(p.numel());
    for (int i = 0; i < p.numel(); ++i) g[i] = grad_value(step, param, i);
    p.mutable_grad() = (torch::tensor(g).reshape(p.sizes()) * scale).to(p.device());
  };
  fill(model->weight, 0);
  if (bias_none) {
    model->bias.mutable_grad() = torch::Tensor();
  } else {
    fill(model->bias, 1);
  }
  for (int a = 0; a < num_anomalies; ++a) {
    auto& p = anomalies[a].param == 0 ? model->weight : model->bias;
    p.mutable_grad().view({-1})[anomalies[a].index].fill_(anomalies[a].value);
  }
}

// Replays steps [begin, end) of the script's "interval3" sequence and compares
// every recorded value exactly.
void replay_interval3(AmpScaler& scaler, torch::nn::Linear& model, torch::optim::SGD& optimizer,
                      int begin, int end) {
  const auto device = model->weight.device();
  for (int s = begin; s < end; ++s) {
    SCOPED_TRACE("interval3 step " + std::to_string(s));
    const auto& spec = base::kInterval3Spec[s];
    const auto& want = base::kInterval3Expected[s];
    optimizer.zero_grad();
    auto loss = scaler.scale(torch::tensor(base::kLossValue, torch::device(device)));
    EXPECT_EQ(loss.device(), device);
    const double scale_before = scaler.get_scale();
    EXPECT_TRUE(same_float(static_cast<float>(scale_before), want.scale_before));
    EXPECT_TRUE(same_float(loss.item<float>(), want.scaled_loss));
    set_grads(model, s, scale_before, spec.anomalies, spec.num_anomalies, spec.bias_grad_none);
    if (spec.explicit_unscale) scaler.unscale_(optimizer);
    EXPECT_EQ(scaler.step(optimizer), want.stepped);
    if (spec.new_scale > 0) {
      scaler.update(spec.new_scale);
    } else {
      scaler.update();
    }
    EXPECT_EQ(scaler.last_step_skipped(), !want.stepped);
    EXPECT_TRUE(same_float(static_cast<float>(scaler.get_scale()), want.scale_after));
    EXPECT_EQ(scaler.growth_tracker(), want.growth_tracker_after);
    EXPECT_TRUE(same_values(model->weight, want.weight, 6));
    EXPECT_TRUE(same_values(model->bias, want.bias, 2));
    EXPECT_TRUE(same_values(model->weight.grad(), want.weight_grad, 6));
    if (spec.bias_grad_none) {
      EXPECT_FALSE(model->bias.grad().defined());
    } else {
      EXPECT_TRUE(same_values(model->bias.grad(), want.bias_grad, 2));
    }
  }
}

AmpScalerOptions interval3_options() {
  return AmpScalerOptions()
      .init_scale(base::kInterval3InitScale)
      .growth_interval(base::kInterval3GrowthInterval);
}

torch::optim::SGD interval3_optimizer(torch::nn::Linear& model) {
  return torch::optim::SGD(
      model->parameters(),
      torch::optim::SGDOptions(base::kInterval3Lr).momentum(base::kInterval3Momentum));
}

std::pair<int64_t, int64_t> expected_counts(int begin, int end) {
  int64_t taken = 0, skipped = 0;
  for (int s = begin; s < end; ++s) ++(base::kInterval3Expected[s].stepped ? taken : skipped);
  return {skipped, taken};
}

// ------------------------------------------------------------ AmpScalerTest

class AmpScalerTest : public SeededTest {};

TEST_F(AmpScalerTest, MatchesPythonGradScalerWithGrowthInterval3) {
  auto model = make_model(torch::kCPU);
  auto optimizer = interval3_optimizer(model);
  AmpScaler scaler(interval3_options());
  replay_interval3(scaler, model, optimizer, 0, base::kInterval3Steps);
  auto [skipped, taken] = expected_counts(0, base::kInterval3Steps);
  EXPECT_EQ(scaler.skipped_steps(), skipped);
  EXPECT_EQ(scaler.taken_steps(), taken);
  EXPECT_GT(skipped, 3);
}

TEST_F(AmpScalerTest, MatchesPythonGradScalerOnCudaTensors) {
  if (!wick::testing::cuda_available()) GTEST_SKIP() << "no CUDA device";
  auto model = make_model(torch::kCUDA);
  auto optimizer = interval3_optimizer(model);
  AmpScaler scaler(interval3_options());
  replay_interval3(scaler, model, optimizer, 0, base::kInterval3Steps);
  auto [skipped, taken] = expected_counts(0, base::kInterval3Steps);
  EXPECT_EQ(scaler.skipped_steps(), skipped);
  EXPECT_EQ(scaler.taken_steps(), taken);
}

TEST_F(AmpScalerTest, MatchesPythonGradScalerWithDefaultOptions) {
  auto model = make_model(torch::kCPU);
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(base::kDefaultsLr));
  AmpScaler scaler;
  EXPECT_EQ(scaler.get_scale(), 65536.0);
  int64_t skipped = 0;
  for (int s = 0; s < base::kDefaultsSteps; ++s) {
    optimizer.zero_grad();
    scaler.scale(torch::tensor(base::kLossValue));
    int n = 0;
    const base::Anomaly* anomaly = nullptr;
    for (int a = 0; a < base::kDefaultsNumAnomalies; ++a) {
      if (base::kDefaultsAnomalyStep[a] == s) {
        anomaly = &base::kDefaultsAnomaly[a];
        n = 1;
      }
    }
    set_grads(model, s, scaler.get_scale(), anomaly, n, false);
    const bool stepped = scaler.step(optimizer);
    scaler.update();
    skipped += stepped ? 0 : 1;
    ASSERT_EQ(stepped, base::kDefaultsStepped[s]) << "step " << s;
    ASSERT_TRUE(same_float(static_cast<float>(scaler.get_scale()), base::kDefaultsScaleAfter[s]))
        << "step " << s << ": " << scaler.get_scale() << " vs " << base::kDefaultsScaleAfter[s];
    ASSERT_EQ(scaler.growth_tracker(), base::kDefaultsTrackerAfter[s]) << "step " << s;
  }
  EXPECT_TRUE(same_values(model->weight, base::kDefaultsFinalWeight, 6));
  EXPECT_TRUE(same_values(model->bias, base::kDefaultsFinalBias, 2));
  EXPECT_EQ(scaler.skipped_steps(), skipped);
  EXPECT_EQ(scaler.taken_steps(), base::kDefaultsSteps - skipped);
  // Two back-offs and one growth happened in the sequence.
  EXPECT_EQ(scaler.get_scale(), 32768.0);
}

TEST_F(AmpScalerTest, SaveLoadRoundTripResumesTheScaleSequence) {
  const int split = 9;  // after a growth and two back-offs, tracker 0 < split
  auto model = make_model(torch::kCPU);
  auto optimizer = interval3_optimizer(model);
  // A torch archive in memory: the bytes a file would hold. (tests/support.h's
  // TempDir crashes here: its std::filesystem::remove_all binds to libtorch.so's
  // copy, which segfaults on a non-empty directory.)
  std::stringstream bytes;
  {
    AmpScaler first(interval3_options());
    replay_interval3(first, model, optimizer, 0, split - 1);
    torch::serialize::OutputArchive out;
    first.save(out);
    out.save_to(bytes);
  }
  // Options different from the saved ones: load() replaces them, as Python's
  // load_state_dict() does, and the scale sequence continues where it stopped.
  AmpScaler second(AmpScalerOptions().growth_factor(4.0).backoff_factor(0.25));
  torch::serialize::InputArchive in;
  in.load_from(bytes);
  second.load(in);
  EXPECT_EQ(second.options().growth_interval(), base::kInterval3GrowthInterval);
  EXPECT_EQ(second.options().growth_factor(), 2.0);
  EXPECT_EQ(second.options().backoff_factor(), 0.5);
  EXPECT_EQ(second.get_scale(), base::kInterval3Expected[split - 2].scale_after);
  EXPECT_EQ(second.growth_tracker(), base::kInterval3Expected[split - 2].growth_tracker_after);
  auto [skipped_before, taken_before] = expected_counts(0, split - 1);
  EXPECT_EQ(second.skipped_steps(), skipped_before);
  EXPECT_EQ(second.taken_steps(), taken_before);
  replay_interval3(second, model, optimizer, split - 1, base::kInterval3Steps);
  auto [skipped, taken] = expected_counts(0, base::kInterval3Steps);
  EXPECT_EQ(second.skipped_steps(), skipped);
  EXPECT_EQ(second.taken_steps(), taken);
}

TEST_F(AmpScalerTest, LoadIntoAScalerInUseOverwritesItsScale) {
  auto model = make_model(torch::kCPU);
  auto optimizer = interval3_optimizer(model);
  AmpScaler reference(interval3_options());
  replay_interval3(reference, model, optimizer, 0, 6);
  torch::serialize::OutputArchive out;
  reference.save(out);
  std::ostringstream bytes;
  out.save_to(bytes);

  AmpScaler used;  // scale 65536 already created on CPU
  used.scale(torch::tensor(1.0f));
  torch::serialize::InputArchive in;
  std::istringstream stream(bytes.str());
  in.load_from(stream);
  used.load(in);
  EXPECT_EQ(used.get_scale(), base::kInterval3Expected[5].scale_after);
  EXPECT_EQ(used.growth_tracker(), base::kInterval3Expected[5].growth_tracker_after);
  replay_interval3(used, model, optimizer, 6, base::kInterval3Steps);
}

TEST_F(AmpScalerTest, LoadNamesAMissingOrMalformedKey) {
  AmpScaler saved;
  saved.scale(torch::tensor(1.0f));
  auto load_into_fresh = [](torch::serialize::OutputArchive& out) {
    std::ostringstream bytes;
    out.save_to(bytes);
    std::istringstream stream(bytes.str());
    torch::serialize::InputArchive in;
    in.load_from(stream);
    AmpScaler scaler;
    scaler.load(in);
  };
  {
    torch::serialize::OutputArchive out;
    out.write("enabled", c10::IValue(true));
    out.write("skipped_steps", c10::IValue(int64_t{0}));
    out.write("taken_steps", c10::IValue(int64_t{0}));
    EXPECT_THROWS_WITH(load_into_fresh(out), "key 'scale' is missing");
  }
  {
    torch::serialize::OutputArchive out;
    out.write("enabled", c10::IValue(true));
    out.write("skipped_steps", c10::IValue(int64_t{0}));
    out.write("taken_steps", c10::IValue(int64_t{0}));
    out.write("scale", c10::IValue(std::string("big")));
    EXPECT_THROWS_WITH(load_into_fresh(out), "key 'scale' must hold a float");
  }
  {
    torch::serialize::OutputArchive out;
    saved.save(out);
    out.write("growth_interval", c10::IValue(int64_t{0}));  // overwrites the saved one
    EXPECT_THROWS_WITH(load_into_fresh(out), "growth_interval must be in [1");
  }
  {
    AmpScaler disabled(AmpScalerOptions().enabled(false));
    torch::serialize::OutputArchive out;
    disabled.save(out);
    EXPECT_THROWS_WITH(load_into_fresh(out), "saved by a disabled AmpScaler");
  }
}

TEST_F(AmpScalerTest, UnscaleTwiceThrows) {
  auto model = make_model(torch::kCPU);
  auto optimizer = interval3_optimizer(model);
  AmpScaler scaler;
  scaler.scale(torch::tensor(1.0f));
  set_grads(model, 0, scaler.get_scale(), nullptr, 0, false);
  scaler.unscale_(optimizer);
  EXPECT_THROWS_WITH(scaler.unscale_(optimizer), "unscale_() has already been called");
  // The gradients were unscaled exactly once.
  EXPECT_EQ(model->weight.grad().view({-1})[0].item<float>(), grad_value(0, 0, 0));
  EXPECT_TRUE(scaler.step(optimizer));
  EXPECT_THROWS_WITH(scaler.unscale_(optimizer), "unscale_() is being called after step()");
  EXPECT_THROWS_WITH(scaler.step(optimizer), "step() has already been called");
  scaler.update();
  // A new iteration may unscale again.
  set_grads(model, 1, scaler.get_scale(), nullptr, 0, false);
  scaler.unscale_(optimizer);
  EXPECT_EQ(model->weight.grad().view({-1})[1].item<float>(), grad_value(1, 0, 1));
}

TEST_F(AmpScalerTest, StepWithoutGradientsThrowsLikePython) {
  auto model = make_model(torch::kCPU);
  auto optimizer = interval3_optimizer(model);
  AmpScaler scaler;
  scaler.scale(torch::tensor(1.0f));
  EXPECT_THROWS_WITH(scaler.step(optimizer), "no inf checks were recorded for this optimizer");
  EXPECT_THROWS_WITH(scaler.update(), "no inf checks were recorded prior to update()");
  EXPECT_EQ(scaler.get_scale(), 65536.0);
  EXPECT_EQ(scaler.taken_steps(), 0);
  EXPECT_EQ(scaler.skipped_steps(), 0);
}

TEST_F(AmpScalerTest, MethodsBeforeScaleThrow) {
  auto model = make_model(torch::kCPU);
  auto optimizer = interval3_optimizer(model);
  AmpScaler scaler;
  set_grads(model, 0, 1.0, nullptr, 0, false);
  EXPECT_THROWS_WITH(scaler.unscale_(optimizer), "call scaler.scale(loss)");
  EXPECT_THROWS_WITH(scaler.step(optimizer), "step() called before the scale exists");
  EXPECT_THROWS_WITH(scaler.update(), "update() called before the scale exists");
  EXPECT_THROWS_WITH(scaler.update(8.0), "update() called before the scale exists");
  EXPECT_THROWS_WITH(scaler.scale(torch::Tensor()), "needs a defined loss");
  // Before the first scale() the scale is the initial one.
  EXPECT_EQ(scaler.get_scale(), 65536.0);
  EXPECT_EQ(scaler.growth_tracker(), 0);
}

TEST_F(AmpScalerTest, RejectsFp16Gradients) {
  auto w = torch::zeros({4}, torch::dtype(torch::kHalf).requires_grad(true));
  w.mutable_grad() = torch::ones({4}, torch::kHalf);
  torch::optim::SGD optimizer({w}, torch::optim::SGDOptions(0.1));
  AmpScaler scaler;
  scaler.scale(torch::tensor(1.0f));
  EXPECT_THROWS_WITH(scaler.unscale_(optimizer), "found an fp16 gradient");
}

TEST_F(AmpScalerTest, ValidatesOptions) {
  EXPECT_THROWS_WITH(AmpScaler(AmpScalerOptions().growth_factor(1.0)),
                     "AmpScaler: growth_factor must be > 1 and finite, got 1");
  EXPECT_THROWS_WITH(AmpScaler(AmpScalerOptions().backoff_factor(1.0)),
                     "AmpScaler: backoff_factor must be in (0, 1), got 1");
  EXPECT_THROWS_WITH(AmpScaler(AmpScalerOptions().backoff_factor(0.0)),
                     "backoff_factor must be in (0, 1), got 0");
  EXPECT_THROWS_WITH(AmpScaler(AmpScalerOptions().growth_interval(0)),
                     "AmpScaler: growth_interval must be in [1, 2^31 - 1], got 0");
  EXPECT_THROWS_WITH(AmpScaler(AmpScalerOptions().init_scale(0.0)),
                     "AmpScaler: init_scale must be > 0");
  EXPECT_THROWS_WITH(AmpScaler(AmpScalerOptions().init_scale(1e39)), "init_scale must be > 0");
  EXPECT_THROWS_WITH(AmpScaler(AmpScalerOptions().init_scale(-1.0)), "got -1");
  AmpScaler scaler;
  scaler.scale(torch::tensor(1.0f));
  EXPECT_THROWS_WITH(scaler.update(0.0), "new_scale must be > 0");
  EXPECT_THROWS_WITH(scaler.update(std::nan("")), "new_scale must be > 0");
  scaler.update(3.0);
  EXPECT_EQ(scaler.get_scale(), 3.0);
}

TEST_F(AmpScalerTest, DisabledScalerPassesThrough) {
  auto model = make_model(torch::kCPU);
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(1.0));
  AmpScaler scaler(AmpScalerOptions().enabled(false));
  EXPECT_FALSE(scaler.is_enabled());
  auto loss = torch::tensor(2.5f);
  EXPECT_TRUE(scaler.scale(loss).is_same(loss));
  set_grads(model, 0, 1.0, nullptr, 0, false);
  scaler.unscale_(optimizer);  // no-op: gradients keep their values
  EXPECT_EQ(model->weight.grad().view({-1})[0].item<float>(), grad_value(0, 0, 0));
  auto w_before = model->weight.detach().clone();
  EXPECT_TRUE(scaler.step(optimizer));
  EXPECT_TRUE(torch::equal(model->weight.detach(), w_before - model->weight.grad()));
  scaler.update();
  scaler.update(7.0);
  EXPECT_EQ(scaler.get_scale(), 1.0);
  EXPECT_EQ(scaler.growth_tracker(), 0);
  EXPECT_EQ(scaler.taken_steps(), 1);
  EXPECT_EQ(scaler.skipped_steps(), 0);
}

// The fused kernel's unscale against grads / scale computed in float64.
TEST_F(AmpScalerTest, FusedUnscaleMatchesFloat64Reference) {
  std::vector<torch::Tensor> params = {
      torch::zeros({7, 5}, torch::requires_grad()),
      torch::zeros({5}, torch::requires_grad()),
      torch::zeros({3, 3}, torch::dtype(torch::kFloat64).requires_grad(true)),
  };
  torch::optim::SGD optimizer(params, torch::optim::SGDOptions(0.0));
  for (double scale : {65536.0, 1000.0, 3.0}) {
    SCOPED_TRACE("scale " + std::to_string(scale));
    AmpScaler scaler(AmpScalerOptions().init_scale(scale));
    scaler.scale(torch::tensor(1.0f));
    std::vector<torch::Tensor> reference;
    for (auto& p : params) {
      // Magnitudes from 1e-6 to 1e4 times the scale.
      auto g = torch::randn(p.sizes(), torch::kFloat64) *
               torch::pow(10.0, torch::randint(-6, 5, p.sizes(), torch::kFloat64)) * scale;
      p.mutable_grad() = g.to(p.scalar_type());
      reference.push_back(p.grad().to(torch::kFloat64) / scale);
    }
    scaler.unscale_(optimizer);
    for (size_t i = 0; i < params.size(); ++i) {
      const auto& grad = params[i].grad();
      if (scale == 65536.0) {
        // A power of two: the unscale is exact.
        EXPECT_TRUE(torch::equal(grad.to(torch::kFloat64), reference[i]));
      } else if (grad.scalar_type() == torch::kFloat32) {
        // float32(1/scale) then one float32 multiply: within two float32 roundings.
        WICK_EXPECT_CLOSE(grad, reference[i], 2.5e-7, 0.0);
      } else {
        // float64 gradients are multiplied by the float32 inverse scale.
        WICK_EXPECT_CLOSE(grad, reference[i], 1.2e-7, 0.0);
      }
    }
    EXPECT_TRUE(scaler.step(optimizer));
    scaler.update();
    EXPECT_FALSE(scaler.last_step_skipped());
  }
}

TEST_F(AmpScalerTest, FusedCheckFindsInfInAnyDtypeGroup) {
  auto a = torch::zeros({4}, torch::requires_grad());
  auto b = torch::zeros({4}, torch::dtype(torch::kFloat64).requires_grad(true));
  torch::optim::SGD optimizer({a, b}, torch::optim::SGDOptions(1.0));
  AmpScaler scaler(AmpScalerOptions().init_scale(8.0));
  scaler.scale(torch::tensor(1.0f));
  a.mutable_grad() = torch::full({4}, 16.0f);
  b.mutable_grad() = torch::tensor({8.0, 8.0, std::nan(""), 8.0}, torch::kFloat64);
  EXPECT_FALSE(scaler.step(optimizer));
  // Skipped, yet the gradients were unscaled (as in Python).
  EXPECT_TRUE(torch::equal(a.grad(), torch::full({4}, 2.0f)));
  EXPECT_EQ(b.grad()[0].item<double>(), 1.0);
  EXPECT_TRUE(torch::equal(a.detach(), torch::zeros({4})));
  scaler.update();
  EXPECT_TRUE(scaler.last_step_skipped());
  EXPECT_EQ(scaler.get_scale(), 4.0);
  EXPECT_EQ(scaler.skipped_steps(), 1);
}

// Sparse gradients (an Embedding with sparse=true): their values are unscaled
// and checked, as Python does through grad._values().
TEST_F(AmpScalerTest, UnscalesSparseGradients) {
  torch::nn::Embedding embedding(torch::nn::EmbeddingOptions(6, 2).sparse(true));
  torch::optim::SGD optimizer(embedding->parameters(), torch::optim::SGDOptions(1.0));
  AmpScaler scaler(AmpScalerOptions().init_scale(1024.0));
  auto ids = torch::tensor({1, 4, 4}, torch::kLong);
  auto loss = embedding->forward(ids).sum() * 0.5;
  scaler.scale(loss).backward();
  ASSERT_TRUE(embedding->weight.grad().is_sparse());
  scaler.unscale_(optimizer);
  // d loss / d row = 0.5 per lookup: rows 1 (once) and 4 (twice).
  auto expected = torch::zeros({6, 2});
  expected[1].fill_(0.5);
  expected[4].fill_(1.0);
  EXPECT_TRUE(torch::equal(embedding->weight.grad().to_dense(), expected));
  auto before = embedding->weight.detach().clone();
  EXPECT_TRUE(scaler.step(optimizer));
  EXPECT_TRUE(torch::equal(embedding->weight.detach(), before - expected));
  scaler.update();

  // An inf among the sparse values skips the step.
  optimizer.zero_grad();
  scaler.scale(embedding->forward(ids).sum()).backward();
  embedding->weight.mutable_grad()._values()[0][0].fill_(std::numeric_limits<float>::infinity());
  before = embedding->weight.detach().clone();
  EXPECT_FALSE(scaler.step(optimizer));
  EXPECT_TRUE(torch::equal(embedding->weight.detach(), before));
  scaler.update();
  EXPECT_EQ(scaler.get_scale(), 512.0);
}

// Two optimizers in one iteration: each steps on its own found_inf, and
// update() backs off if either saw an inf (Python's semantics).
TEST_F(AmpScalerTest, TwoOptimizersShareOneUpdate) {
  auto a = torch::zeros({2}, torch::requires_grad());
  auto b = torch::zeros({2}, torch::requires_grad());
  torch::optim::SGD opt_a({a}, torch::optim::SGDOptions(1.0));
  torch::optim::SGD opt_b({b}, torch::optim::SGDOptions(1.0));
  AmpScaler scaler(AmpScalerOptions().init_scale(4.0).growth_interval(1));
  scaler.scale(torch::tensor(1.0f));
  a.mutable_grad() = torch::full({2}, 4.0f);
  b.mutable_grad() = torch::tensor({4.0f, std::numeric_limits<float>::infinity()});
  EXPECT_TRUE(scaler.step(opt_a));
  EXPECT_FALSE(scaler.step(opt_b));
  scaler.update();
  EXPECT_TRUE(torch::equal(a.detach(), torch::full({2}, -1.0f)));
  EXPECT_TRUE(torch::equal(b.detach(), torch::zeros({2})));
  EXPECT_EQ(scaler.get_scale(), 2.0);  // backed off, although opt_a stepped
  EXPECT_EQ(scaler.taken_steps(), 1);
  EXPECT_EQ(scaler.skipped_steps(), 1);
  // Next iteration both clean: growth_interval 1 grows at once.
  a.mutable_grad() = torch::full({2}, 2.0f);
  b.mutable_grad() = torch::full({2}, 2.0f);
  EXPECT_TRUE(scaler.step(opt_a));
  EXPECT_TRUE(scaler.step(opt_b));
  scaler.update();
  EXPECT_FALSE(scaler.last_step_skipped());
  EXPECT_EQ(scaler.get_scale(), 4.0);
  EXPECT_TRUE(torch::equal(b.detach(), torch::full({2}, -1.0f)));
}

// ------------------------------------------------------------ AutocastGuardTest

class AutocastGuardTest : public SeededTest {
 protected:
  void SetUp() override {
    SeededTest::SetUp();
    ASSERT_FALSE(at::autocast::is_autocast_enabled(torch::kCPU));
    ASSERT_EQ(at::autocast::get_autocast_dtype(torch::kCPU), torch::kBFloat16);
  }
  void TearDown() override {
    // Every guard must have put the thread's state back.
    EXPECT_FALSE(at::autocast::is_autocast_enabled(torch::kCPU));
    EXPECT_EQ(at::autocast::get_autocast_dtype(torch::kCPU), torch::kBFloat16);
    EXPECT_EQ(at::autocast::increment_nesting(), 1);
    at::autocast::decrement_nesting();
  }
};

TEST_F(AutocastGuardTest, Bf16OnCpuCastsMatmulAndRestores) {
  auto a = torch::randn({8, 16});
  auto b = torch::randn({16, 4});
  auto reference = a.to(torch::kFloat64).matmul(b.to(torch::kFloat64));
  {
    AutocastGuard autocast(torch::kCPU, torch::kBFloat16);
    EXPECT_TRUE(at::autocast::is_autocast_enabled(torch::kCPU));
    auto c = a.matmul(b);
    EXPECT_EQ(c.scalar_type(), torch::kBFloat16);
    // bf16 inputs (8 bits of mantissa): a few 2^-8 relative errors per term.
    WICK_EXPECT_CLOSE(c, reference, 0.05, 0.15);
  }
  EXPECT_FALSE(at::autocast::is_autocast_enabled(torch::kCPU));
  EXPECT_EQ(a.matmul(b).scalar_type(), torch::kFloat32);
}

TEST_F(AutocastGuardTest, Fp16OnCpuCastsMatmul) {
  // LibTorch 2.11's CPU autocast accepts float16 (Python: torch.autocast("cpu", torch.float16)).
  auto a = torch::randn({8, 16});
  auto b = torch::randn({16, 4});
  {
    AutocastGuard autocast(torch::Device(torch::kCPU), Precision::kFP16);
    EXPECT_EQ(at::autocast::get_autocast_dtype(torch::kCPU), torch::kHalf);
    auto c = a.matmul(b);
    EXPECT_EQ(c.scalar_type(), torch::kHalf);
    WICK_EXPECT_CLOSE(c, a.to(torch::kFloat64).matmul(b.to(torch::kFloat64)), 0.01, 0.02);
  }
  EXPECT_EQ(a.matmul(b).scalar_type(), torch::kFloat32);
}

TEST_F(AutocastGuardTest, NestedScopesRestoreEnabledFlagAndDtype) {
  auto a = torch::randn({4, 4});
  {
    AutocastGuard outer(torch::kCPU, torch::kHalf);
    EXPECT_EQ(a.matmul(a).scalar_type(), torch::kHalf);
    {
      AutocastGuard inner(torch::kCPU, torch::kBFloat16, /*enabled=*/false);
      EXPECT_FALSE(at::autocast::is_autocast_enabled(torch::kCPU));
      EXPECT_EQ(at::autocast::get_autocast_dtype(torch::kCPU), torch::kBFloat16);
      EXPECT_EQ(a.matmul(a).scalar_type(), torch::kFloat32);
      {
        AutocastGuard innermost(torch::kCPU, torch::kBFloat16);
        EXPECT_EQ(a.matmul(a).scalar_type(), torch::kBFloat16);
      }
      EXPECT_FALSE(at::autocast::is_autocast_enabled(torch::kCPU));
      EXPECT_EQ(a.matmul(a).scalar_type(), torch::kFloat32);
    }
    EXPECT_TRUE(at::autocast::is_autocast_enabled(torch::kCPU));
    EXPECT_EQ(at::autocast::get_autocast_dtype(torch::kCPU), torch::kHalf);
    EXPECT_EQ(a.matmul(a).scalar_type(), torch::kHalf);
  }
}

TEST_F(AutocastGuardTest, Fp32PrecisionDisablesAutocastAndKeepsTheDtype) {
  auto a = torch::randn({4, 4});
  AutocastGuard outer(torch::Device(torch::kCPU), Precision::kFP16);
  {
    AutocastGuard fp32(torch::Device(torch::kCPU), Precision::kFP32);
    EXPECT_FALSE(at::autocast::is_autocast_enabled(torch::kCPU));
    EXPECT_EQ(at::autocast::get_autocast_dtype(torch::kCPU), torch::kHalf);
    EXPECT_EQ(a.matmul(a).scalar_type(), torch::kFloat32);
  }
  EXPECT_EQ(a.matmul(a).scalar_type(), torch::kHalf);
}

TEST_F(AutocastGuardTest, RestoresAStateSetOutsideAnyGuard) {
  at::autocast::set_autocast_dtype(torch::kCPU, torch::kHalf);
  at::autocast::set_autocast_enabled(torch::kCPU, true);
  {
    AutocastGuard guard(torch::kCPU, torch::kBFloat16, false);
    EXPECT_FALSE(at::autocast::is_autocast_enabled(torch::kCPU));
  }
  EXPECT_TRUE(at::autocast::is_autocast_enabled(torch::kCPU));
  EXPECT_EQ(at::autocast::get_autocast_dtype(torch::kCPU), torch::kHalf);
  at::autocast::set_autocast_enabled(torch::kCPU, false);
  at::autocast::set_autocast_dtype(torch::kCPU, torch::kBFloat16);
}

// The cast-weight cache survives an inner scope and is dropped when the
// outermost one closes: a weight changed in between shows up only then.
TEST_F(AutocastGuardTest, ClearsTheWeightCacheWhenTheOutermostScopeCloses) {
  auto w = torch::ones({2, 2}, torch::requires_grad());
  auto x = torch::ones({2, 2});
  {
    AutocastGuard outer(torch::kCPU, torch::kBFloat16);
    {
      AutocastGuard inner(torch::kCPU, torch::kBFloat16);
      EXPECT_EQ(w.matmul(x)[0][0].item<float>(), 2.0f);
    }
    {
      torch::NoGradGuard no_grad;
      w.mul_(2);
    }
    EXPECT_EQ(w.matmul(x)[0][0].item<float>(), 2.0f);  // cached bf16 copy of the old w
  }
  AutocastGuard again(torch::kCPU, torch::kBFloat16);
  EXPECT_EQ(w.matmul(x)[0][0].item<float>(), 4.0f);
}

TEST_F(AutocastGuardTest, RejectsBadDeviceTypeAndDtype) {
  EXPECT_THROWS_WITH(AutocastGuard(torch::kMeta, torch::kHalf),
                     "AutocastGuard: device_type must be CPU or CUDA, got meta");
  EXPECT_THROWS_WITH(AutocastGuard(torch::kCPU, torch::kFloat),
                     "AutocastGuard: dtype must be Half (fp16) or BFloat16 (bf16), got Float");
  EXPECT_THROWS_WITH(AutocastGuard(torch::kCPU, torch::kFloat64, false), "got Double");
  EXPECT_THROWS_WITH(AutocastGuard(torch::Device(torch::kMeta), Precision::kFP32),
                     "device_type must be CPU or CUDA");
}

TEST_F(AutocastGuardTest, CudaFp16AndBf16) {
  if (!wick::testing::cuda_available()) GTEST_SKIP() << "no CUDA device";
  auto a = torch::randn({8, 8}, torch::kCUDA);
  for (auto precision : {Precision::kFP16, Precision::kBF16}) {
    {
      AutocastGuard autocast(torch::Device(torch::kCUDA), precision);
      EXPECT_EQ(a.matmul(a).scalar_type(), wick::autocast_dtype(precision));
      // CPU autocast untouched by a CUDA scope.
      EXPECT_FALSE(at::autocast::is_autocast_enabled(torch::kCPU));
    }
    EXPECT_EQ(a.matmul(a).scalar_type(), torch::kFloat32);
    EXPECT_FALSE(at::autocast::is_autocast_enabled(torch::kCUDA));
    EXPECT_EQ(at::autocast::get_autocast_dtype(torch::kCUDA), torch::kHalf);
  }
}

// ------------------------------------------------------------ Precision

TEST(PrecisionTest, ParsesAndPrints) {
  for (auto p : {Precision::kFP32, Precision::kBF16, Precision::kFP16}) {
    EXPECT_EQ(wick::parse_precision(wick::to_string(p)), p);
  }
  EXPECT_EQ(wick::to_string(Precision::kBF16), "bf16");
  EXPECT_EQ(wick::parse_precision("32"), Precision::kFP32);
  EXPECT_EQ(wick::parse_precision("32-true"), Precision::kFP32);
  EXPECT_EQ(wick::parse_precision("BF16-mixed"), Precision::kBF16);
  EXPECT_EQ(wick::parse_precision("16"), Precision::kFP16);
  EXPECT_EQ(wick::parse_precision("16-mixed"), Precision::kFP16);
  EXPECT_EQ(wick::parse_precision(" half "), Precision::kFP16);
  EXPECT_THROWS_WITH(wick::parse_precision("fp8"), "got 'fp8'");
  EXPECT_THROWS_WITH(wick::parse_precision(""), "parse_precision: precision must be one of");
  EXPECT_EQ(wick::autocast_dtype(Precision::kFP32), torch::kFloat);
  EXPECT_EQ(wick::autocast_dtype(Precision::kBF16), torch::kBFloat16);
  EXPECT_EQ(wick::autocast_dtype(Precision::kFP16), torch::kHalf);
}

// ------------------------------------------------------------ docs/amp.md

// The example loop of docs/amp.md, verbatim between the markers.
TEST(AmpDocExample, TrainsWithFp16AutocastAndLossScaling) {
  torch::manual_seed(0);
  // --- docs/amp.md example begin
  torch::Device device = torch::cuda::is_available() ? torch::kCUDA : torch::kCPU;
  auto x = torch::randn({256, 8}, device);
  auto y = x.matmul(torch::randn({8, 1}, device)) + 0.01 * torch::randn({256, 1}, device);

  torch::nn::Sequential model(torch::nn::Linear(8, 32), torch::nn::ReLU(),
                              torch::nn::Linear(32, 1));
  model->to(device);
  torch::optim::AdamW optimizer(model->parameters(), torch::optim::AdamWOptions(1e-2));
  wick::AmpScaler scaler;  // fp16 needs loss scaling; bf16 does not

  float first_loss = 0, last_loss = 0;
  for (int step = 0; step < 300; ++step) {
    optimizer.zero_grad();
    torch::Tensor loss;
    {
      wick::AutocastGuard autocast(device, wick::Precision::kFP16);
      auto prediction = model->forward(x);                      // fp16 matmuls
      loss = torch::mse_loss(prediction.to(torch::kFloat), y);  // reduce in fp32
    }
    scaler.scale(loss).backward();
    scaler.unscale_(optimizer);  // clip the true gradients, not the scaled ones
    torch::nn::utils::clip_grad_norm_(model->parameters(), 1.0);
    scaler.step(optimizer);  // skipped when a gradient is inf/NaN
    scaler.update();
    if (step == 0) first_loss = loss.item<float>();
    last_loss = loss.item<float>();
  }
  // --- docs/amp.md example end
  EXPECT_LT(last_loss, 0.02f * first_loss) << first_loss << " -> " << last_loss;
  EXPECT_EQ(scaler.taken_steps() + scaler.skipped_steps(), 300);
  EXPECT_GT(scaler.taken_steps(), 250);
}

}  // namespace
