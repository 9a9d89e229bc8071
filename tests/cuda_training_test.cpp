// Training on a GPU, each path against an independent reference: the Trainer
// in fp16 with its AmpScaler and in bf16 against Python's torch.amp.GradScaler
// and torch.autocast, FusedAdam against Python's Adam(fused=True) bit for bit
// (both computed on the test's GPU, tests/py/reference.py), resume on
// CUDA bit for bit, the Profiler's CUPTI kernels, and NVML while training.
// The CUDA cases skip on a machine without a GPU; docs/cuda.md lists them
// with their results on the H200.

#include <wick/wick.h>

#include "python_reference.h"
#include "support.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <fstream>
#include <limits>
#include <map>
#include <string>
#include <vector>

namespace {

using nlohmann::json;
using wick::testing::from_json;
using wick::testing::python_reference;
using wick::testing::TempDir;
using wick::testing::tensors_close;
using wick::testing::tensors_equal;
using wick::testing::to_json;

class CudaTrainingTest : public wick::testing::SeededTest {
 protected:
  void SetUp() override {
    SeededTest::SetUp();
    if (!wick::testing::cuda_available()) GTEST_SKIP() << "no CUDA device";
  }
};

torch::nn::Sequential make_mlp(int64_t in, int64_t hidden, int64_t out, double dropout = 0.0,
                               const torch::Device& device = torch::kCUDA) {
  torch::manual_seed(7);
  torch::nn::Sequential m(torch::nn::Linear(in, hidden), torch::nn::Tanh());
  if (dropout > 0) m->push_back(torch::nn::Dropout(dropout));
  m->push_back(torch::nn::Linear(hidden, out));
  m->to(device);
  return m;
}

// The model, data and options of a Trainer run, as reference.py's trainer_amp reads them.
json trainer_input(const torch::nn::Sequential& model, const torch::Tensor& x,
                   const torch::Tensor& y, int64_t batch_size) {
  json in;
  in["sizes"] = {x.size(1), model->parameters()[0].size(0), y.size(1)};
  for (const auto& p : model->parameters()) {
    in["params"].push_back(to_json(p));
    in["param_shapes"].push_back(p.sizes().vec());
  }
  in["x"] = to_json(x);
  in["x_shape"] = x.sizes().vec();
  in["y"] = to_json(y);
  in["y_shape"] = y.sizes().vec();
  in["batch_size"] = batch_size;
  return in;
}

// Per step: the scale after update() and whether the step was skipped.
struct ScaleRecorder : wick::Callback {
  std::vector<double> scales;
  std::vector<bool> skipped;
  std::string name() const override { return "ScaleRecorder"; }
  void on_step_end(wick::Trainer& t) override {
    scales.push_back(t.scaler() != nullptr ? t.scaler()->get_scale() : 1.0);
    skipped.push_back(t.last_step_skipped());
  }
};

double parse_number(const json& v) {
  return v.is_string() ? std::stod(v.get<std::string>()) : v.get<double>();
}

// Trains the MLP with the Trainer on `device` in `precision`, multiplying step
// s's loss by factors[s] ("inf" / "nan" make that step's gradients
// non-finite), and checks everything against Python doing the same with its
// own classes on the same device.
void expect_trainer_matches_python(const torch::Device& device, wick::Precision precision,
                                   const std::vector<std::string>& factors,
                                   const wick::AmpScalerOptions& scaler_options) {
  const int64_t batch = 16, steps = static_cast<int64_t>(factors.size());
  auto gen = at::detail::createCPUGenerator(123);
  const auto x = torch::randn({batch * steps, 8}, gen);
  const auto y = torch::randn({batch * steps, 4}, gen);
  auto model = make_mlp(8, 32, 4, 0.0, device);
  json in = trainer_input(model, x, y, batch);
  in["device"] = device.str();
  in["precision"] = wick::to_string(precision);
  in["lr"] = 0.05;
  in["momentum"] = 0.9;
  in["loss_factors"] = factors;
  in["scaler"] = {{"init_scale", scaler_options.init_scale()},
                  {"growth_factor", scaler_options.growth_factor()},
                  {"backoff_factor", scaler_options.backoff_factor()},
                  {"growth_interval", scaler_options.growth_interval()}};

  std::vector<double> losses;
  std::vector<c10::ScalarType> out_dtypes;
  wick::SupervisedTask task(model, [&](const torch::Tensor& out, const torch::Tensor& target) {
    out_dtypes.push_back(out.scalar_type());
    const double factor = std::stod(factors.at(losses.size()));
    auto loss = torch::mse_loss(out, target) * factor;
    losses.push_back(loss.item<double>());
    return loss;
  });
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  wick::TensorBatchSource source(x, y, wick::TensorBatchSourceOptions(batch).shuffle(false));
  auto recorder = std::make_shared<ScaleRecorder>();
  wick::Trainer trainer(wick::TrainerOptions()
                            .precision(precision)
                            .scaler(scaler_options)
                            .device(device)
                            .log_every_n_steps(1000000));
  trainer.add_callback(recorder);
  const auto result = trainer.fit(task, opt, source);
  ASSERT_EQ(result.state.step, steps);

  const json ref = python_reference("reference.py", "trainer_amp", in);
  const auto want_dtype = precision == wick::Precision::kFP16 ? "torch.float16" : "torch.bfloat16";
  EXPECT_EQ(ref["out_dtype"], want_dtype);
  for (auto dtype : out_dtypes) EXPECT_EQ(dtype, wick::autocast_dtype(precision));
  ASSERT_EQ(ref["scales"].size(), static_cast<size_t>(steps));
  for (int64_t s = 0; s < steps; ++s) {
    EXPECT_EQ(recorder->scales[s], ref["scales"][s].get<double>()) << "scale after step " << s;
    EXPECT_EQ(recorder->skipped[s], ref["skipped"][s].get<bool>()) << "step " << s;
    const double want = parse_number(ref["losses"][s]);
    if (std::isfinite(want)) {
      EXPECT_NEAR(losses[s], want, 1e-6 * std::abs(want)) << "loss of step " << s;
    } else {
      EXPECT_FALSE(std::isfinite(losses[s])) << "loss of step " << s;
    }
  }
  // The same kernels on the same inputs: equal to float32 rounding at most.
  const auto params = model->parameters();
  bool bitwise = true;
  for (size_t i = 0; i < params.size(); ++i) {
    const auto theirs = from_json(ref["params"][i], params[i]);
    EXPECT_TRUE(tensors_close(params[i], theirs, 1e-5, 1e-6)) << "parameter " << i;
    bitwise = bitwise && torch::equal(params[i], theirs);
  }
  std::cout << "[ info     ] " << wick::to_string(precision) << " Trainer vs Python on "
            << ref["device"].get<std::string>() << ": parameters "
            << (bitwise ? "bit-identical" : "within tolerance") << "\n";
}

// Growth every 3 finite steps; an inf at step 4 and a NaN at step 9 back off.
const std::vector<std::string> kScriptedFactors = {"1", "1", "1",   "1", "inf", "1", "1",
                                                   "1", "1", "nan", "1", "1",   "1", "1"};
wick::AmpScalerOptions scripted_scaler() {
  return wick::AmpScalerOptions().init_scale(1024).growth_interval(3).backoff_factor(0.25);
}

void expect_fused_adam_matches_python(const torch::Device& device);

TEST_F(CudaTrainingTest, TrainerFp16ScalerMatchesPythonGradScaler) {
  expect_trainer_matches_python(torch::kCUDA, wick::Precision::kFP16, kScriptedFactors,
                                scripted_scaler());
}

TEST_F(CudaTrainingTest, TrainerBf16AutocastMatchesPython) {
  expect_trainer_matches_python(torch::kCUDA, wick::Precision::kBF16,
                                std::vector<std::string>(10, "1"), wick::AmpScalerOptions());
}

// wick's FusedAdam and Python's Adam(fused=True) call the same fused kernel:
// equal bits in parameters and state, step by step under a changing lr.
TEST_F(CudaTrainingTest, FusedAdamMatchesPythonFusedAdamBitForBit) {
  expect_fused_adam_matches_python(torch::kCUDA);
}

// The same comparisons on the CPU, Python computing them with this machine's kernels.
class CpuReferenceTest : public wick::testing::SeededTest {};

TEST_F(CpuReferenceTest, TrainerFp16ScalerMatchesPythonGradScaler) {
  expect_trainer_matches_python(torch::kCPU, wick::Precision::kFP16, kScriptedFactors,
                                scripted_scaler());
}

TEST_F(CpuReferenceTest, TrainerBf16AutocastMatchesPython) {
  expect_trainer_matches_python(torch::kCPU, wick::Precision::kBF16,
                                std::vector<std::string>(6, "1"), wick::AmpScalerOptions());
}

TEST_F(CpuReferenceTest, FusedAdamMatchesPythonFusedAdamBitForBit) {
  expect_fused_adam_matches_python(torch::kCPU);
}

void expect_fused_adam_matches_python(const torch::Device& device) {
  struct Case {
    const char* name;
    wick::FusedAdamOptions options;
  };
  const std::vector<Case> cases = {
      {"adam+weight_decay", wick::FusedAdamOptions(1e-2).weight_decay(0.01)},
      {"adamw+amsgrad", wick::FusedAdamOptions(3e-3)
                            .weight_decay(0.1)
                            .decoupled_weight_decay(true)
                            .amsgrad(true)
                            .betas({0.8, 0.95})},
      {"adamw+tensor_lr", wick::FusedAdamOptions(1e-3)
                              .weight_decay(0.05)
                              .decoupled_weight_decay(true)
                              .tensor_lr(true)
                              .eps(1e-6)},
      {"adam+maximize", wick::FusedAdamOptions(2e-3).maximize(true)},
  };
  const std::vector<std::vector<int64_t>> shapes = {{33, 17}, {17}, {5, 3, 7}, {64}};
  const std::vector<torch::Dtype> dtypes = {torch::kFloat32, torch::kFloat32, torch::kBFloat16,
                                            torch::kFloat32};
  const std::vector<double> lrs = {1.0, 1.0, 0.5, 0.5, 0.25, 1.0, 2.0};  // times the case's lr
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    auto gen = at::detail::createCPUGenerator(5);
    std::vector<torch::Tensor> params;
    json in;
    in["device"] = device.str();
    for (size_t i = 0; i < shapes.size(); ++i) {
      auto p = torch::randn(shapes[i], gen).to(device, dtypes[i]);
      in["params"].push_back(to_json(p));
      in["param_shapes"].push_back(shapes[i]);
      in["param_dtypes"].push_back(dtypes[i] == torch::kBFloat16 ? "bfloat16" : "float32");
      params.push_back(p.requires_grad_());
    }
    const auto& o = c.options;
    in["options"] = to_json(o);
    in["options"]["lr"] = json::array();  // one per step
    wick::FusedAdam opt(params, o);
    for (size_t s = 0; s < lrs.size(); ++s) {
      const double lr = o.lr() * lrs[s];
      in["options"]["lr"].push_back(lr);
      opt.param_groups()[0].options().set_lr(lr);
      json grads;
      for (auto& p : params) {
        p.mutable_grad() = torch::randn(p.sizes(), gen).to(p.options());
        grads.push_back(to_json(p.grad()));
      }
      in["grads"].push_back(grads);
      opt.step();
    }
    const json ref = python_reference("reference.py", "fused_adam", in);
    for (size_t i = 0; i < params.size(); ++i) {
      const auto& s = static_cast<const wick::FusedAdamParamState&>(
          *opt.state().at(params[i].unsafeGetTensorImpl()));
      EXPECT_TRUE(tensors_equal(params[i].detach(), from_json(ref["params"][i], params[i])))
          << "parameter " << i;
      EXPECT_TRUE(tensors_equal(s.exp_avg(), from_json(ref["exp_avg"][i], s.exp_avg())))
          << "exp_avg " << i;
      EXPECT_TRUE(tensors_equal(s.exp_avg_sq(), from_json(ref["exp_avg_sq"][i], s.exp_avg_sq())))
          << "exp_avg_sq " << i;
      if (o.amsgrad()) {
        EXPECT_TRUE(tensors_equal(s.max_exp_avg_sq(),
                                  from_json(ref["max_exp_avg_sq"][i], s.max_exp_avg_sq())))
            << "max_exp_avg_sq " << i;
      }
      EXPECT_EQ(s.step().item<double>(), ref["step"][i].get<double>());
    }
  }
}

// N steps straight equal N/2 steps + resume + N/2 steps, bit for bit, on the
// GPU: dropout draws from the CUDA generator (its state is in the checkpoint),
// deterministic algorithms on (the Trainer sets cuBLAS's workspace config).
// With `async`, the checkpoints are host copies (pinned memory) written in
// the background, their tensors on the CPU in the files: the resume puts the
// model's and AdamW's state back on the GPU.
void resume_on_cuda_is_bit_identical(bool async) {
  auto gen = at::detail::createCPUGenerator(123);
  const auto x = torch::randn({100, 6}, gen);
  const auto y = torch::randint(0, 3, {100}, gen, torch::kLong);
  auto run = [&](const std::string& dir, int64_t max_steps, const std::string& resume) {
    auto model = make_mlp(6, 64, 3, /*dropout=*/0.3);
    wick::SupervisedTask task(model);
    torch::optim::AdamW opt(model->parameters(), torch::optim::AdamWOptions(1e-2));
    wick::TensorBatchSource source(x, y, wick::TensorBatchSourceOptions(10).shuffle(true).seed(3));
    wick::Trainer trainer(wick::TrainerOptions()
                              .max_epochs(3)
                              .max_steps(max_steps)
                              .grad_accum_steps(2)
                              .seed(11)
                              .deterministic(true)
                              .device(torch::Device(torch::kCUDA))
                              .log_every_n_steps(1000000)
                              .checkpoint_dir(dir)
                              .checkpoint_every_n_steps(async ? 1 : 0)
                              .resume(resume)
                              .async_checkpoint(async));
    trainer.add_callback(std::make_shared<wick::LRSchedulerCallback>(
        std::make_shared<wick::CosineWarmupLR>(opt, 3, 15)));
    auto result = trainer.fit(task, opt, source);
    EXPECT_TRUE(model->parameters()[0].is_cuda());
    for (const auto& item : opt.state()) {
      EXPECT_TRUE(
          static_cast<const torch::optim::AdamWParamState&>(*item.second).exp_avg().is_cuda());
    }
    return std::make_pair(result.state.step, wick::parameters_sha256(*model));
  };
  TempDir straight, split;
  const auto [full_steps, full_hash] = run(straight.str(), -1, "");
  EXPECT_EQ(full_steps, 15);
  const auto [first_steps, first_hash] = run(split.str(), 7, "");
  EXPECT_EQ(first_steps, 7);
  EXPECT_NE(first_hash, full_hash);
  // make_mlp reseeds every generator: only the checkpoint's CUDA RNG state
  // gives the resumed run the dropout masks the straight run drew.
  const auto [second_steps, second_hash] = run(split.str(), -1, "latest");
  EXPECT_EQ(second_steps, 15);
  EXPECT_EQ(second_hash, full_hash);
  EXPECT_TRUE(at::globalContext().deterministicAlgorithms());
  at::globalContext().setDeterministicAlgorithms(false, false);
}

TEST_F(CudaTrainingTest, ResumeOnCudaIsBitIdentical) {
  resume_on_cuda_is_bit_identical(/*async=*/false);
}

TEST_F(CudaTrainingTest, ResumeFromAsyncCheckpointsOnCudaIsBitIdentical) {
  resume_on_cuda_is_bit_identical(/*async=*/true);
}

// Kineto with CUPTI: the trace holds the GPU's kernels by name, linked to the
// CPU ops that launched them, and the op table reports their CUDA time.
TEST_F(CudaTrainingTest, ProfilerRecordsCudaKernelsFromCupti) {
  auto model = make_mlp(256, 1024, 10);
  torch::optim::SGD opt(model->parameters(), 0.01);
  const auto x = torch::randn({512, 256}, torch::kCUDA);
  const auto y =
      torch::randint(0, 10, {512}, torch::TensorOptions(torch::kCUDA).dtype(torch::kLong));
  auto train_step = [&] {
    opt.zero_grad();
    torch::nn::functional::cross_entropy(model->forward(x), y).backward();
    opt.step();
  };
  train_step();  // warm-up: cuBLAS handles, the caching allocator
  torch::cuda::synchronize();
  wick::Profiler profiler(wick::ProfilerOptions().activities(
      {wick::ProfilerActivity::kCPU, wick::ProfilerActivity::kCUDA}));
  {
    auto scope = profiler.scope();
    for (int i = 0; i < 3; ++i) train_step();
    torch::cuda::synchronize();
  }
  int64_t kernels = 0, kernel_ns = 0;
  for (const auto& ev : profiler.events()) {
    if (!ev.on_device) continue;
    ++kernels;
    kernel_ns += ev.duration_ns;
    EXPECT_FALSE(ev.name.empty());
  }
  EXPECT_GT(kernels, 3 * 6) << "kernels recorded from CUPTI";
  EXPECT_GT(kernel_ns, 0);

  const auto table = profiler.key_averages();
  const auto* addmm = table.find("aten::addmm");
  ASSERT_NE(addmm, nullptr) << table.table();
  EXPECT_EQ(addmm->count, 3 * 2);
  EXPECT_GT(addmm->cuda_total_ns, 0) << table.table();
  EXPECT_GT(table.self_cuda_total_ns(), 0);
  EXPECT_NE(table.table("cuda_time_total", 10).find("CUDA total"), std::string::npos);

  TempDir dir;
  const auto path = dir.str() + "/trace.json";
  profiler.export_chrome_trace(path);
  std::ifstream file(path);
  const auto trace = json::parse(file);
  int64_t trace_kernels = 0;
  bool gemm = false;
  for (const auto& ev : trace["traceEvents"]) {
    if (ev.value("cat", "") != "kernel") continue;
    ++trace_kernels;
    const auto name = ev.value("name", "");
    EXPECT_FALSE(name.empty());
    gemm = gemm || name.find("gemm") != std::string::npos || name.find("Gemm") != std::string::npos;
    EXPECT_GT(ev.value("dur", 0.0), 0.0) << name;
  }
  EXPECT_GT(trace_kernels, 3 * 6);
  EXPECT_TRUE(gemm) << "no cuBLAS GEMM kernel among " << trace_kernels << " kernels";
}

// NVML through the Trainer's system metrics while a model keeps the GPU busy:
// utilization, memory in use and power are read from the driver, non-zero.
TEST_F(CudaTrainingTest, NvmlReportsUtilizationMemoryAndPowerWhileTraining) {
  const auto direct = wick::gpu_stats(0);
  ASSERT_TRUE(direct.available) << direct.reason;
  EXPECT_FALSE(direct.name.empty());
  EXPECT_GT(direct.memory_total_bytes, 0);

  torch::manual_seed(0);
  auto model = torch::nn::Sequential(torch::nn::Linear(2048, 4096), torch::nn::ReLU(),
                                     torch::nn::Linear(4096, 4096), torch::nn::ReLU(),
                                     torch::nn::Linear(4096, 10));
  model->to(torch::kCUDA);
  wick::SupervisedTask task(model);
  torch::optim::SGD opt(model->parameters(), 1e-3);
  const auto x = torch::randn({8192, 2048});
  const auto y = torch::randint(0, 10, {8192}, torch::kLong);
  wick::TensorBatchSource source(x, y, wick::TensorBatchSourceOptions(1024).shuffle(false));
  struct Logs : wick::Callback {
    std::vector<std::map<std::string, double>> logs;
    std::string name() const override { return "Logs"; }
    void on_log(wick::Trainer&, const wick::Metrics& m) override { logs.push_back(m); }
  };
  auto logs = std::make_shared<Logs>();
  // NVML's utilization is the busy share of its last sample period (1/6 s to
  // 1 s): train for a few seconds, logging every 8 steps.
  wick::Trainer trainer(wick::TrainerOptions().max_epochs(40).log_every_n_steps(8));
  trainer.add_callback(logs);
  trainer.fit(task, opt, source);
  ASSERT_GE(logs->logs.size(), 10U);
  double utilization = 0, memory = 0, power = 0, allocated = 0;
  for (const auto& m : logs->logs) {
    ASSERT_TRUE(m.count("gpu/utilization_pct")) << "no NVML metrics in the Trainer's logs";
    utilization = std::max(utilization, m.at("gpu/utilization_pct"));
    memory = std::max(memory, m.at("gpu/memory_used_mb"));
    power = std::max(power, m.at("gpu/power_w"));
    allocated = std::max(allocated, m.at("cuda/allocated_mb"));
  }
  EXPECT_GT(utilization, 0.0);
  EXPECT_LE(utilization, 100.0);
  EXPECT_GT(memory, allocated) << "NVML's used memory includes the caching allocator's";
  EXPECT_GT(power, 0.0);
  EXPECT_GT(allocated, 0.0);
  std::cout << "[ info     ] NVML while training: utilization " << utilization << " %, memory "
            << memory << " MiB, power " << power << " W\n";
}

// On any machine: a failing reference script is reported with Python's own error.
TEST(PythonReferenceTest, ReportsTheScriptsError) {
  EXPECT_THROWS_WITH(
      wick::testing::python_reference("reference.py", "no_such_case", json{{"device", "cpu"}}),
      "KeyError: 'no_such_case'");
}

}  // namespace
