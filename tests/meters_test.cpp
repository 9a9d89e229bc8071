// Meters: throughput smoothing, step-time percentiles (numpy's), host memory
// from /proc, CUDA allocator stats, NVML absent -> unavailable, MFU.
#include <wick/meters.h>

#include "support.h"

#include <cmath>
#include <cstring>
#include <memory>

namespace {

class MetersTest : public wick::testing::SeededTest {};

TEST_F(MetersTest, ThroughputSmoothsAsABiasCorrectedAverage) {
  wick::ThroughputMeter m(0.5);
  EXPECT_EQ(m.samples_per_s(), 0.0);
  // Rates 100, 200, 400 samples/s (64 samples each); tokens 10x.
  const double rates[] = {100, 200, 400};
  for (double r : rates) m.update(64, 64 / r, 640);
  // sum_i (1-b) b^(n-1-i) x_i / (1 - b^n) with b = 0.5: (0.125*100 + 0.25*200 + 0.5*400) / 0.875.
  const double expected = (0.125 * 100 + 0.25 * 200 + 0.5 * 400) / 0.875;
  EXPECT_NEAR(m.samples_per_s(), expected, 1e-9);
  EXPECT_NEAR(m.tokens_per_s(), 10 * expected, 1e-8);
  // Overall: 192 samples in 0.64 + 0.32 + 0.16 s.
  EXPECT_NEAR(m.overall_samples_per_s(), 192 / 1.12, 1e-9);
  EXPECT_NEAR(m.overall_tokens_per_s(), 1920 / 1.12, 1e-8);
  EXPECT_EQ(m.total_samples(), 192);
  // A constant rate is reported exactly from the first update on.
  wick::ThroughputMeter c(0.9);
  c.update(32, 0.5);
  EXPECT_NEAR(c.samples_per_s(), 64.0, 1e-9);
  EXPECT_THROWS_WITH(wick::ThroughputMeter(1.0),
                     "ThroughputMeter: smoothing must be in [0, 1), got 1");
  EXPECT_THROWS_WITH(c.update(1, 0.0), "ThroughputMeter: seconds must be > 0, got 0");
}

TEST_F(MetersTest, StepTimePercentilesMatchNumpy) {
  wick::StepTimeMeter m;
  for (double t : {0.031, 0.012, 0.018, 0.050, 0.011, 0.013, 0.027, 0.015, 0.019, 0.022}) m.add(t);
  // numpy.percentile(v, p) for p = 0, 10, 50, 90, 99, 100.
  EXPECT_NEAR(m.percentile(0), 0.011, 1e-12);
  EXPECT_NEAR(m.percentile(10), 0.0119, 1e-12);
  EXPECT_NEAR(m.percentile(50), 0.0185, 1e-12);
  EXPECT_NEAR(m.percentile(90), 0.03289999999999999, 1e-12);
  EXPECT_NEAR(m.percentile(99), 0.048290000000000007, 1e-12);
  EXPECT_NEAR(m.percentile(100), 0.05, 1e-12);
  EXPECT_NEAR(m.mean(), 0.0218, 1e-12);
  EXPECT_EQ(m.max(), 0.050);
  // The window keeps the newest steps only.
  wick::StepTimeMeter w(3);
  for (double t : {9.0, 1.0, 2.0, 3.0}) w.add(t);
  EXPECT_EQ(w.size(), 3);
  EXPECT_EQ(w.max(), 3.0);
  EXPECT_THROWS_WITH(m.percentile(101), "StepTimeMeter: percentile must be in [0, 100], got 101");
  EXPECT_THROWS_WITH(wick::StepTimeMeter(0), "StepTimeMeter: window must be >= 1, got 0");
}

TEST_F(MetersTest, HostMemorySeesATouchedAllocation) {
  const auto before = wick::host_memory();
  ASSERT_TRUE(before.available);
  EXPECT_GT(before.rss_bytes, 0);
  EXPECT_GE(before.peak_rss_bytes, before.rss_bytes);
  const size_t n = 128u << 20;
  std::unique_ptr<char[]> block(new char[n]);
  std::memset(block.get(), 1, n);
  // The block escapes to an opaque use, so the allocation and its writes stay
  // (clang elides a new[] whose contents it can see through otherwise).
  asm volatile("" : : "r"(block.get()) : "memory");
  const auto after = wick::host_memory();
  EXPECT_GE(after.rss_bytes - before.rss_bytes, static_cast<int64_t>(n) * 9 / 10);
  EXPECT_GE(after.peak_rss_bytes, after.rss_bytes);
  EXPECT_EQ(block[n - 1], 1);
}

TEST_F(MetersTest, NvmlMissingIsUnavailableNotACrash) {
  wick::Nvml nvml("libnvidia-ml-does-not-exist.so.1");
  EXPECT_FALSE(nvml.available());
  EXPECT_NE(nvml.reason().find("libnvidia-ml-does-not-exist.so.1 could not be loaded"),
            std::string::npos)
      << nvml.reason();
  EXPECT_EQ(nvml.device_count(), 0);
  const auto s = nvml.query(0);
  EXPECT_FALSE(s.available);
  EXPECT_EQ(s.reason, nvml.reason());
  // The real library: present on a GPU machine, absent here; either way no crash.
  const auto g = wick::gpu_stats(0);
  if (g.available) {
    EXPECT_GT(g.memory_total_bytes, 0);
    EXPECT_GE(g.utilization_pct, 0);
    EXPECT_LE(g.utilization_pct, 100);
    EXPECT_FALSE(g.name.empty());
    EXPECT_FALSE(wick::gpu_stats(1000).available);
  } else {
    EXPECT_FALSE(g.reason.empty());
  }
}

TEST_F(MetersTest, CudaAllocatorStatsFollowAnAllocation) {
  if (!torch::cuda::is_available()) {
    EXPECT_FALSE(wick::cuda_memory(0).available);
    GTEST_SKIP() << "no CUDA device";
  }
  wick::reset_cuda_peak_memory(0);
  const auto before = wick::cuda_memory(0);
  ASSERT_TRUE(before.available);
  auto t =
      torch::empty({1 << 20}, torch::TensorOptions().device(torch::kCUDA).dtype(torch::kFloat32));
  const auto during = wick::cuda_memory(0);
  EXPECT_EQ(during.allocated_bytes - before.allocated_bytes, 4 << 20);
  EXPECT_GE(during.reserved_bytes, during.allocated_bytes);
  t.reset();
  const auto after = wick::cuda_memory(0);
  EXPECT_EQ(after.allocated_bytes, before.allocated_bytes);
  EXPECT_GE(after.peak_allocated_bytes, before.allocated_bytes + (4 << 20));
}

TEST_F(MetersTest, MfuFromFlopsPerSample) {
  // MLP 784-512-256-10: 6 * (784*512 + 512*256 + 256*10) FLOPs per trained sample.
  const double flops = wick::linear_stack_train_flops({784, 512, 256, 10});
  EXPECT_EQ(flops, 6.0 * (784 * 512 + 512 * 256 + 256 * 10));
  // 10000 samples/s on a 1 TFLOP/s machine.
  EXPECT_NEAR(wick::mfu(10000, flops, 1e12), 10000 * flops / 1e12, 1e-15);
  EXPECT_THROWS_WITH(wick::mfu(1, 0, 1e12), "mfu: flops_per_sample must be > 0, got 0");
  EXPECT_THROWS_WITH(wick::mfu(1, 1, -1), "mfu: peak_flops must be > 0, got -1");
}

}  // namespace

#include <wick/trainer.h>

namespace {

// The Trainer's logs carry the meters (and MFU when FLOPs are given); off, they do not.
TEST_F(MetersTest, TrainerLogsCarryMeters) {
  namespace nn = torch::nn;
  auto x = torch::randn({256, 784}), y = torch::randint(0, 10, {256});
  auto run = [&](wick::TrainerOptions options) {
    torch::manual_seed(0);
    auto model = nn::Sequential(nn::Linear(784, 512), nn::ReLU(), nn::Linear(512, 256), nn::ReLU(),
                                nn::Linear(256, 10));
    wick::SupervisedTask task(model);
    torch::optim::SGD optimizer(model->parameters(), 0.01);
    wick::TensorBatchSource train(x, y, 32);
    wick::Trainer trainer(options.max_epochs(1).log_every_n_steps(4));
    const auto t0 = std::chrono::steady_clock::now();
    auto result = trainer.fit(task, optimizer, train);
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return std::make_pair(result.last_logs, seconds);
  };
  const double flops = wick::linear_stack_train_flops({784, 512, 256, 10});
  const auto [logs, seconds] = run(wick::TrainerOptions().flops_per_sample(flops).peak_flops(1e12));
  ASSERT_TRUE(logs.count("train/step_time_ms_p50") && logs.count("train/step_time_ms_p99"));
  EXPECT_GT(logs.at("train/step_time_ms_p50"), 0.0);
  EXPECT_LE(logs.at("train/step_time_ms_p50"), logs.at("train/step_time_ms_p90"));
  EXPECT_LE(logs.at("train/step_time_ms_p90"), logs.at("train/step_time_ms_p99"));
  EXPECT_LT(logs.at("train/step_time_ms_p99"), 1e3 * seconds);
  // Four steps of 32 samples in the window: the median step time is near 32 / samples_per_s.
  EXPECT_NEAR(logs.at("train/step_time_ms_p50"), 1e3 * 32 / logs.at("train/samples_per_s"),
              0.75 * 1e3 * 32 / logs.at("train/samples_per_s"));
  const auto host = wick::host_memory();
  EXPECT_GT(logs.at("sys/rss_mb"), 10.0);
  // The kernel syncs its RSS counters lazily: equal to a few percent.
  const double peak_now = static_cast<double>(host.peak_rss_bytes) / (1 << 20);
  EXPECT_NEAR(logs.at("sys/peak_rss_mb"), peak_now, 0.05 * peak_now);
  EXPECT_LE(logs.at("sys/rss_mb"), logs.at("sys/peak_rss_mb") * 1.05);
  EXPECT_DOUBLE_EQ(logs.at("train/mfu"), logs.at("train/samples_per_s") * flops / 1e12);
  EXPECT_EQ(logs.count("cuda/allocated_mb"), 0u);  // a CPU run
  const auto off = run(wick::TrainerOptions().log_system_metrics(false)).first;
  EXPECT_EQ(off.count("train/step_time_ms_p50"), 0u);
  EXPECT_EQ(off.count("sys/rss_mb"), 0u);
  EXPECT_EQ(off.count("train/mfu"), 0u);
  EXPECT_TRUE(off.count("train/loss"));
}

}  // namespace
