// wick-bench pipeline: the pipeline's bubble against the theory, GPipe
// against 1F1B, and what activation checkpointing saves in memory.
//
// Bubble: p stages whose work is simulated (each stage's forward sleeps
// --forward-ms and its backward twice that, so stages run in parallel
// whatever the cores), m micro-batches from 1 to 16. The measured bubble is
// 1 - (mean busy time of a stage) / (step time); the theory for equal stages
// is (p - 1) / (m + p - 1).
//
// Memory: an MLP of --width wide layers in p stages (real compute, on the
// CPU), one step per schedule and checkpointing mode; the peak is the highest
// heap use (glibc's mallinfo2: arena plus mmapped bytes) seen by a thread
// sampling every 200 us, above the heap in use before the step.

#include "bench_common.h"

#include <wick/pipeline.h>

#include <malloc.h>
#include <torch/torch.h>
#include <CLI/CLI.hpp>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace wick_bench {

namespace {

struct PipelineBenchOptions {
  int64_t stages = 4;
  std::vector<int64_t> micro_batches{1, 2, 4, 8, 16};
  double forward_ms = 2.0;
  int repeats = 3;
  int64_t width = 256;
  int64_t layers_per_stage = 2;
  int64_t batch = 4096;
  int64_t chunks = 8;
  int threads = 1;
};

// Forward sleeps, backward sleeps twice as long; y = x * w so a gradient
// flows even into the first stage.
struct Delay : torch::autograd::Function<Delay> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& w, double ms) {
    std::this_thread::sleep_for(std::chrono::microseconds(static_cast<int64_t>(ms * 1000)));
    ctx->save_for_backward({x, w});
    ctx->saved_data["ms"] = ms;
    return x * w;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad) {
    const double ms = ctx->saved_data["ms"].toDouble();
    std::this_thread::sleep_for(std::chrono::microseconds(static_cast<int64_t>(2 * ms * 1000)));
    auto saved = ctx->get_saved_variables();
    return {grad[0] * saved[1], (grad[0] * saved[0]).sum().reshape(saved[1].sizes()),
            torch::Tensor()};
  }
};

struct DelayModuleImpl : torch::nn::Module {
  explicit DelayModuleImpl(double ms) : ms(ms) { w = register_parameter("w", torch::ones({1})); }
  torch::Tensor forward(const torch::Tensor& x) { return Delay::apply(x, w, ms); }
  torch::Tensor w;
  double ms;
};
TORCH_MODULE(DelayModule);

int64_t heap_bytes() {
  struct mallinfo2 mi = mallinfo2();
  return static_cast<int64_t>(mi.uordblks + mi.hblkhd);
}

// The highest heap use while `fn` runs, above the use at its start.
template <class F>
int64_t peak_heap_during(F&& fn) {
  malloc_trim(0);
  const int64_t base = heap_bytes();
  std::atomic<bool> done{false};
  std::atomic<int64_t> peak{base};
  std::thread sampler([&] {
    while (!done.load()) {
      const int64_t now = heap_bytes();
      if (now > peak.load()) peak = now;
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  });
  fn();
  done = true;
  sampler.join();
  return peak.load() - base;
}

const char* schedule_name(wick::PipelineSchedule s) {
  return s == wick::PipelineSchedule::kGPipe ? "gpipe" : "1f1b";
}
const char* checkpoint_name(wick::ActivationCheckpointing c) {
  switch (c) {
    case wick::ActivationCheckpointing::kNever:
      return "never";
    case wick::ActivationCheckpointing::kExceptLast:
      return "except_last";
    case wick::ActivationCheckpointing::kAlways:
      return "always";
  }
  return "?";
}

torch::Tensor mse(const torch::Tensor& out, const torch::Tensor& target) {
  return torch::mse_loss(out, target);
}

void run_pipeline_bench(const PipelineBenchOptions& o, const GlobalOptions& global) {
  TORCH_CHECK(o.stages >= 1, "wick-bench pipeline: --stages must be >= 1, got ", o.stages);
  TORCH_CHECK(o.repeats >= 1, "wick-bench pipeline: --repeats must be >= 1, got ", o.repeats);
  const int threads = set_torch_threads(o.threads);
  JsonOut out(global.jsonl);
  const double load_start = load_average_1m();
  Json s;
  s["bench"] = "pipeline";
  s["summary"] = true;

  // Bubble, simulated stages.
  double worst_gap = 0;
  std::vector<double> gpipe_ms, f1b_ms;
  for (auto schedule : {wick::PipelineSchedule::kGPipe, wick::PipelineSchedule::k1F1B}) {
    for (int64_t m : o.micro_batches) {
      std::vector<wick::PipelineStage> stages;
      for (int64_t i = 0; i < o.stages; ++i)
        stages.emplace_back(torch::nn::Sequential(DelayModule(o.forward_ms)));
      wick::Pipeline pipe(stages, wick::PipelineOptions().chunks(m).schedule(schedule));
      auto x = torch::randn({m, 4});
      std::vector<double> bubble, step;
      for (int r = 0; r < o.repeats; ++r) {
        pipe->train_step(x, torch::zeros({m, 4}), mse);
        bubble.push_back(pipe->last_stats().bubble_fraction);
        step.push_back(1e3 * pipe->last_stats().step_seconds);
      }
      const double ideal = pipe->last_stats().ideal_bubble_fraction;
      Json line;
      line["bench"] = "pipeline";
      line["case"] = "bubble";
      line["schedule"] = schedule_name(schedule);
      line["stages"] = o.stages;
      line["micro_batches"] = m;
      line["bubble_fraction"] = median(bubble);
      line["ideal_bubble_fraction"] = ideal;
      line["step_ms"] = median(step);
      line["ideal_step_ms"] = 3 * o.forward_ms * static_cast<double>(m + o.stages - 1);
      out.emit(line);
      std::fprintf(stderr,
                   "bubble  %-6s stages %lld  micro-batches %3lld  measured %.3f  ideal %.3f  step "
                   "%7.1f ms\n",
                   schedule_name(schedule), static_cast<long long>(o.stages),
                   static_cast<long long>(m), median(bubble), ideal, median(step));
      worst_gap = std::max(worst_gap, std::abs(median(bubble) - ideal));
      (schedule == wick::PipelineSchedule::kGPipe ? gpipe_ms : f1b_ms).push_back(median(step));
    }
  }
  s["max_bubble_gap"] = worst_gap;  // |measured - theory|, over every case
  s["step_ms_gpipe_by_m"] = gpipe_ms;
  s["step_ms_1f1b_by_m"] = f1b_ms;

  // Memory and time, real stages.
  auto make_mlp = [&] {
    torch::manual_seed(0);
    torch::nn::Sequential mlp;
    for (int64_t i = 0; i < o.stages * o.layers_per_stage; ++i) {
      mlp->push_back(torch::nn::Linear(o.width, o.width));
      mlp->push_back(torch::nn::ReLU());
    }
    return mlp;
  };
  auto x = torch::randn({o.batch, o.width});
  auto y = torch::randn({o.batch, o.width});
  Json mem = Json::object();
  for (auto schedule : {wick::PipelineSchedule::kGPipe, wick::PipelineSchedule::k1F1B}) {
    for (auto ckpt :
         {wick::ActivationCheckpointing::kNever, wick::ActivationCheckpointing::kExceptLast,
          wick::ActivationCheckpointing::kAlways}) {
      auto mlp = make_mlp();
      std::vector<wick::PipelineStage> stages;
      for (const auto& part : wick::split_sequential(mlp, o.stages)) stages.emplace_back(part);
      wick::Pipeline pipe(
          stages, wick::PipelineOptions().chunks(o.chunks).schedule(schedule).checkpointing(ckpt));
      pipe->train_step(x, y, mse);  // warm-up: gradients allocated
      std::vector<double> step;
      std::vector<double> peak;
      for (int r = 0; r < o.repeats; ++r) {
        peak.push_back(static_cast<double>(peak_heap_during([&] { pipe->train_step(x, y, mse); })));
        step.push_back(1e3 * pipe->last_stats().step_seconds);
      }
      Json line;
      line["bench"] = "pipeline";
      line["case"] = "mlp";
      line["schedule"] = schedule_name(schedule);
      line["checkpointing"] = checkpoint_name(ckpt);
      line["stages"] = o.stages;
      line["micro_batches"] = o.chunks;
      line["width"] = o.width;
      line["batch"] = o.batch;
      line["step_ms"] = median(step);
      line["peak_bytes"] = median(peak);
      line["bubble_fraction"] = pipe->last_stats().bubble_fraction;
      out.emit(line);
      std::fprintf(stderr, "memory  %-6s checkpointing %-11s  peak %7.1f MB  step %7.1f ms\n",
                   schedule_name(schedule), checkpoint_name(ckpt), median(peak) / 1e6,
                   median(step));
      mem[std::string(schedule_name(schedule)) + "_" + checkpoint_name(ckpt) + "_peak_bytes"] =
          median(peak);
      mem[std::string(schedule_name(schedule)) + "_" + checkpoint_name(ckpt) + "_step_ms"] =
          median(step);
    }
  }
  s["mlp"] = mem;
  s["threads"] = threads;
  s["stages"] = o.stages;
  s["forward_ms"] = o.forward_ms;
  s["repeats"] = o.repeats;
  add_run_environment(s, load_start);
  out.emit(s);
}

}  // namespace

void add_pipeline_command(CLI::App& app, std::shared_ptr<GlobalOptions> global) {
  auto o = std::make_shared<PipelineBenchOptions>();
  CLI::App* sub = app.add_subcommand("pipeline",
                                     "wick::Pipeline: bubble vs (p-1)/(m+p-1), GPipe vs 1F1B, peak "
                                     "memory with activation checkpointing");
  sub->add_option("--stages", o->stages, "pipeline stages")->capture_default_str();
  sub->add_option("--micro-batches", o->micro_batches, "micro-batch counts of the bubble cases")
      ->delimiter(',')
      ->capture_default_str();
  sub->add_option("--forward-ms", o->forward_ms,
                  "simulated forward time of a stage (backward: twice)")
      ->capture_default_str();
  sub->add_option("--repeats", o->repeats, "steps per case; figures are medians")
      ->capture_default_str();
  sub->add_option("--width", o->width, "MLP width (memory cases)")->capture_default_str();
  sub->add_option("--layers-per-stage", o->layers_per_stage, "Linear+ReLU per stage (memory cases)")
      ->capture_default_str();
  sub->add_option("--batch", o->batch, "rows per batch (memory cases)")->capture_default_str();
  sub->add_option("--chunks", o->chunks, "micro-batches (memory cases)")->capture_default_str();
  sub->add_option("--threads", o->threads, "intra-op threads")->capture_default_str();
  sub->callback([o, global] { run_pipeline_bench(*o, *global); });
}

}  // namespace wick_bench
