// wick-bench profiler: what wick::Profiler costs a training step.
//
// The work: one step of the MLP 784-512-256-10 (ReLU), cross-entropy,
// torch::optim::Adam(lr 1e-3), batch 64, on random data read in order (the
// trainer bench's loop, without the Trainer). Cases, alternating each round
// (order flipped every round), figures the median over rounds:
//   off     no profiler object at all;
//   wait    a started Profiler whose schedule stays in its wait phase
//           (profiler.step() after every step, a record_scope around each):
//           what a run pays between profiled windows; goal < 2%;
//   active  recording every step (for reference: the cost while it profiles).

#include "bench_common.h"

#include <wick/profiler.h>

#include <torch/torch.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace wick_bench {

namespace {

struct ProfilerBenchOptions {
  int threads = 1;
  int64_t steps = 300;
  int64_t warmup = 20;
  int repeats = 7;
  int64_t batch = 64;
  bool no_active = false;
};

constexpr double kWaitGoal = 0.02;  // (wait - off) / off, at most

enum class Case { kOff, kWait, kActive };
const char* case_name(Case c) {
  return c == Case::kOff ? "off" : c == Case::kWait ? "wait" : "active";
}

struct Run {
  double wall_s = 0, cpu_s = 0;
  int64_t recorded_ops = 0;
};

Run run_case(Case c, const ProfilerBenchOptions& o, const torch::Tensor& x,
             const torch::Tensor& y) {
  torch::manual_seed(0);
  torch::nn::Linear fc1(784, 512);
  torch::nn::Linear fc2(512, 256);
  torch::nn::Linear fc3(256, 10);
  torch::nn::Sequential model(fc1, torch::nn::ReLU(), fc2, torch::nn::ReLU(), fc3);
  torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(1e-3));
  const int64_t n_batches = x.size(0) / o.batch;
  auto step = [&](int64_t i) {
    const int64_t b = (i % n_batches) * o.batch;
    optimizer.zero_grad();
    auto loss = torch::nn::functional::cross_entropy(model->forward(x.narrow(0, b, o.batch)),
                                                     y.narrow(0, b, o.batch));
    loss.backward();
    optimizer.step();
  };
  std::unique_ptr<wick::Profiler> profiler;
  if (c == Case::kWait) {
    // A window far beyond the run: every step is in the wait phase.
    profiler = std::make_unique<wick::Profiler>(
        wick::ProfilerOptions().schedule(wick::ProfilerSchedule().wait(1'000'000'000).active(1)));
  } else if (c == Case::kActive) {
    profiler = std::make_unique<wick::Profiler>(wick::ProfilerOptions());
  }
  for (int64_t i = 0; i < o.warmup; ++i) step(i);
  if (profiler) profiler->start();
  Stopwatch sw;
  for (int64_t i = 0; i < o.steps; ++i) {
    if (profiler) {
      auto scope = wick::record_scope("train_step");
      step(o.warmup + i);
      profiler->step();
    } else {
      step(o.warmup + i);
    }
  }
  Run r{sw.wall_s(), sw.cpu_s(), 0};
  if (profiler) {
    profiler->stop();
    if (profiler->has_trace()) {
      const auto table = profiler->key_averages();  // rows() refers into it
      for (const auto& row : table.rows()) r.recorded_ops += row.count;
    }
  }
  return r;
}

void run_profiler_bench(const ProfilerBenchOptions& o, const GlobalOptions& global) {
  const double load_start = load_average_1m();
  const int threads = set_torch_threads(o.threads);
  JsonOut out(global.jsonl);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1);
  const int64_t samples = std::min<int64_t>(o.steps + o.warmup, 200) * o.batch;
  const auto x = torch::randn({samples, 784}, gen);
  const auto y = torch::randint(0, 10, {samples}, gen, torch::kLong);

  std::vector<Case> cases = {Case::kOff, Case::kWait};
  if (!o.no_active) cases.push_back(Case::kActive);
  std::vector<std::vector<double>> wall(cases.size()), cpu(cases.size());
  std::vector<int64_t> ops(cases.size(), 0);
  for (int round = 0; round < o.repeats; ++round) {
    std::vector<size_t> order(cases.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    if (round % 2) std::reverse(order.begin(), order.end());
    for (size_t i : order) {
      const Run r = run_case(cases[i], o, x, y);
      wall[i].push_back(r.wall_s / static_cast<double>(o.steps) * 1e3);
      cpu[i].push_back(r.cpu_s / static_cast<double>(o.steps) * 1e3);
      ops[i] = r.recorded_ops;
    }
  }
  std::vector<double> med(cases.size());
  for (size_t i = 0; i < cases.size(); ++i) {
    med[i] = median(wall[i]);
    Json line;
    line["bench"] = "profiler";
    line["case"] = case_name(cases[i]);
    line["ms_per_step"] = med[i];
    line["cpu_ms_per_step"] = median(cpu[i]);
    line["runs_ms_per_step"] = wall[i];
    line["recorded_ops_last_run"] = ops[i];
    line["steps"] = o.steps;
    line["batch"] = o.batch;
    line["threads"] = threads;
    out.emit(line);
  }
  Json s;
  s["bench"] = "profiler";
  s["summary"] = true;
  s["off_ms_per_step"] = med[0];
  s["wait_ms_per_step"] = med[1];
  s["wait_overhead"] = med[1] / med[0] - 1.0;
  s["wait_overhead_goal"] = kWaitGoal;
  s["wait_goal_met"] = med[1] / med[0] - 1.0 < kWaitGoal;
  if (!o.no_active) {
    s["active_ms_per_step"] = med[2];
    s["active_overhead"] = med[2] / med[0] - 1.0;
  }
  s["repeats"] = o.repeats;
  s["threads"] = threads;
  add_run_environment(s, load_start);
  out.emit(s);
}

}  // namespace

void add_profiler_command(CLI::App& app, std::shared_ptr<GlobalOptions> global) {
  auto o = std::make_shared<ProfilerBenchOptions>();
  CLI::App* sub = app.add_subcommand(
      "profiler",
      "wick::Profiler's cost on an MLP training step: off vs schedule wait phase vs recording");
  sub->add_option("--threads", o->threads, "intra-op threads")->capture_default_str();
  sub->add_option("--steps", o->steps, "timed steps per run")->capture_default_str();
  sub->add_option("--warmup", o->warmup, "untimed steps before each run's timed ones")
      ->capture_default_str();
  sub->add_option("--repeats", o->repeats,
                  "rounds (each runs every case once); figures are medians")
      ->capture_default_str();
  sub->add_option("--batch", o->batch, "samples per batch")->capture_default_str();
  sub->add_flag("--no-active", o->no_active, "skip the recording case");
  sub->callback([o, global] { run_profiler_bench(*o, *global); });
}

}  // namespace wick_bench
