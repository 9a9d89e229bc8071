// wick-bench gpt: wick-gpt's training step and greedy generation against the
// same model in Python PyTorch (bench/peers/gpt_peer.py), eager and
// torch.compile, in one invocation with the same thread count.
//
// Training step: bf16 autocast (wick::AutocastGuard), forward, cross-entropy,
// zero_grad, backward, clip_grad_norm_(1.0), AdamW (wick::FusedAdam: one fused
// kernel; the peer: torch.optim.AdamW(fused=True)), on random byte windows
// from a generator seeded seed+1. The model is built after
// torch::manual_seed(seed) in the peer's order, so both start from the same
// weights (check_loss, the first step's loss, agrees).
// Generation: a 16-byte prompt, then greedy decoding with the KV cache, batch 1.

#include "bench_common.h"

#include <wick/amp.h>
#include <wick/optim.h>

#include "model.h"

#include <CLI/CLI.hpp>
#include <torch/torch.h>

#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace wick_bench {

namespace {

struct GptBenchOptions {
  int threads = 1;
  int64_t steps = 20;
  int64_t warmup = 3;
  int repeats = 3;
  int64_t batch = 32;
  int64_t new_tokens = 100;
  uint64_t seed = 0;
  bool no_python = false;
  bool compile = false;
  gpt::GPTConfig config;
};

constexpr double kEagerGoal = 1.1;    // python eager ms / wick ms, at least
constexpr double kCompileGoal = 1.0;  // python compile ms / wick ms, at least

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

struct TrainRun {
  double ms_per_step;
  double first_loss;
};

TrainRun run_train(const GptBenchOptions& o, const torch::Tensor& data) {
  torch::manual_seed(o.seed);
  gpt::GPT model(o.config);
  std::vector<torch::Tensor> decay, no_decay;
  for (const auto& p : model->parameters()) (p.dim() >= 2 ? decay : no_decay).push_back(p);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  auto adamw = [](double wd) {
    return std::make_unique<wick::FusedAdamOptions>(
        wick::FusedAdamOptions(3e-3).betas(std::make_tuple(0.9, 0.95)).weight_decay(wd).decoupled_weight_decay(true));
  };
  groups.emplace_back(decay, adamw(0.1));
  groups.emplace_back(no_decay, adamw(0.0));
  wick::FusedAdam optimizer(groups, wick::FusedAdamOptions(3e-3));
  const int64_t T = o.config.context;
  auto step = [&](int64_t i) {
    auto batch = data[i];
    torch::Tensor logits;
    {
      wick::AutocastGuard autocast(c10::DeviceType::CPU, torch::kBFloat16);
      logits = model->forward(batch.narrow(1, 0, T));
    }
    auto loss = torch::nn::functional::cross_entropy(logits.reshape({-1, 256}).to(torch::kFloat),
                                                     batch.narrow(1, 1, T).reshape({-1}));
    optimizer.zero_grad();
    loss.backward();
    torch::nn::utils::clip_grad_norm_(model->parameters(), 1.0);
    optimizer.step();
    return loss.item<double>();
  };
  TrainRun r{};
  for (int64_t i = 0; i < o.warmup; ++i) {
    const double loss = step(i);
    if (i == 0) r.first_loss = loss;
  }
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < o.steps; ++i) step(o.warmup + i);
  r.ms_per_step = 1e3 * seconds_since(t0) / static_cast<double>(o.steps);
  return r;
}

double run_generate(const GptBenchOptions& o, const torch::Tensor& data) {
  torch::manual_seed(o.seed);
  gpt::GPT model(o.config);
  std::string prompt;
  for (int64_t i = 0; i < 16; ++i) prompt.push_back(static_cast<char>(data[0][0][i].item<int64_t>()));
  gpt::SampleOptions so;
  so.temperature = 0;
  so.max_new_tokens = o.new_tokens;
  gpt::generate(model, prompt, so);  // warm-up
  const auto t0 = std::chrono::steady_clock::now();
  const auto out = gpt::generate(model, prompt, so);
  return 1e3 * seconds_since(t0) / static_cast<double>(out.size());
}

// The peer's lines by case name ("python_train", "python_generate", ...).
std::map<std::string, Json> run_gpt_peer(const GlobalOptions& global, const GptBenchOptions& o, bool compile,
                                         const std::string& cases, std::string& error, bool fp32_attention = false) {
  std::vector<std::string> args{"--threads", std::to_string(o.threads), "--steps", std::to_string(o.steps),
                                "--warmup", std::to_string(o.warmup), "--repeats", std::to_string(o.repeats),
                                "--batch", std::to_string(o.batch), "--new-tokens", std::to_string(o.new_tokens),
                                "--seed", std::to_string(o.seed), "--layers", std::to_string(o.config.layers),
                                "--width", std::to_string(o.config.width), "--heads", std::to_string(o.config.heads),
                                "--ffn-hidden", std::to_string(o.config.ffn_hidden), "--context",
                                std::to_string(o.config.context), "--cases", cases};
  if (compile) args.push_back("--compile");
  if (fp32_attention) args.push_back("--fp32-attention");
  std::map<std::string, Json> lines;
  auto peer = run_peer(global, "gpt_peer.py", args);
  if (!peer.ok()) {
    error = peer.error.empty() ? "the peer printed nothing" : peer.error;
    return lines;
  }
  for (auto line : peer.lines) {
    line["bench"] = "gpt";
    lines[line.value("case", "")] = line;
  }
  return lines;
}

void run_gpt_bench(const GptBenchOptions& o, const GlobalOptions& global) {
  TORCH_CHECK(o.steps >= 1 && o.repeats >= 1 && o.warmup >= 1, "wick-bench gpt: --steps, --repeats and --warmup must be >= 1");
  o.config.check();
  const int threads = set_torch_threads(o.threads);
  JsonOut out(global.jsonl);
  const double load_start = load_average_1m();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(o.seed + 1);
  const auto data = torch::randint(0, 256, {o.steps + o.warmup, o.batch, o.config.context + 1}, gen, torch::kLong);

  std::vector<double> train_ms, gen_ms;
  double check_loss = 0;
  for (int r = 0; r < o.repeats; ++r) {
    const auto run = run_train(o, data);
    train_ms.push_back(run.ms_per_step);
    check_loss = run.first_loss;
  }
  for (int r = 0; r < o.repeats; ++r) gen_ms.push_back(run_generate(o, data));
  const double wick_train = median(train_ms), wick_gen = median(gen_ms);
  const double tokens = static_cast<double>(o.batch * o.config.context);
  out.emit({{"bench", "gpt"}, {"case", "wick_train"}, {"ms_per_step", wick_train}, {"runs_ms", train_ms},
            {"tokens_per_s", tokens / (wick_train / 1e3)}, {"check_loss", check_loss}, {"threads", threads}});
  out.emit({{"bench", "gpt"}, {"case", "wick_generate"}, {"ms_per_token", wick_gen}, {"runs_ms", gen_ms},
            {"threads", threads}});

  Json s;
  s["bench"] = "gpt";
  s["summary"] = true;
  s["wick_train_ms"] = wick_train;
  s["wick_check_loss"] = check_loss;
  s["wick_generate_ms_per_token"] = wick_gen;
  if (!o.no_python) {
    std::string error;
    auto eager = run_gpt_peer(global, o, false, "train,generate", error);
    if (eager.count("python_train") && eager["python_train"].contains("ms_per_step")) {
      const auto& line = eager["python_train"];
      out.emit(line);
      s["python_train_ms"] = line.at("ms_per_step");
      s["train_vs_eager"] = line.at("ms_per_step").get<double>() / wick_train;
      s["eager_goal_met"] = s["train_vs_eager"].get<double>() >= kEagerGoal;
      s["python_check_loss"] = line.value("check_loss", 0.0);
    }
    if (eager.count("python_generate")) {
      const auto& line = eager["python_generate"];
      out.emit(line);
      s["python_generate_ms_per_token"] = line.at("ms_per_token");
      s["generate_vs_eager"] = line.at("ms_per_token").get<double>() / wick_gen;
    }
    // The same model with wick-gpt's float32 attention: what is left is C++ against Python.
    auto same_choice = run_gpt_peer(global, o, false, "train", error, /*fp32_attention=*/true);
    if (same_choice.count("python_train_fp32_attention") &&
        same_choice["python_train_fp32_attention"].contains("ms_per_step")) {
      const auto& line = same_choice["python_train_fp32_attention"];
      out.emit(line);
      s["python_fp32_attention_train_ms"] = line.at("ms_per_step");
      s["train_vs_eager_fp32_attention"] = line.at("ms_per_step").get<double>() / wick_train;
    }
    if (o.compile) {
      auto compiled = run_gpt_peer(global, o, true, "train", error);
      if (compiled.count("python_train_compile")) {
        const auto& line = compiled["python_train_compile"];
        out.emit(line);
        if (line.contains("ms_per_step")) {
          s["python_compile_train_ms"] = line.at("ms_per_step");
          s["train_vs_compile"] = line.at("ms_per_step").get<double>() / wick_train;
          s["compile_goal_met"] = s["train_vs_compile"].get<double>() >= kCompileGoal;
        }
        if (line.contains("error")) s["python_compile_error"] = line.at("error");
      }
    }
    if (!error.empty()) s["python_error"] = error;
  }
  s["threads"] = threads;
  s["batch"] = o.batch;
  s["context"] = o.config.context;
  s["layers"] = o.config.layers;
  s["width"] = o.config.width;
  s["steps"] = o.steps;
  s["repeats"] = o.repeats;
  add_run_environment(s, load_start);
  out.emit(s);
}

}  // namespace

void add_gpt_command(CLI::App& app, std::shared_ptr<GlobalOptions> global) {
  auto o = std::make_shared<GptBenchOptions>();
  CLI::App* sub = app.add_subcommand("gpt", "wick-gpt's training step and generation vs the same model in PyTorch");
  sub->add_option("--threads", o->threads, "intra-op threads here and in the peer")->capture_default_str();
  sub->add_option("--steps", o->steps, "timed training steps per run")->capture_default_str();
  sub->add_option("--warmup", o->warmup, "untimed steps first")->capture_default_str();
  sub->add_option("--repeats", o->repeats, "runs; figures are medians")->capture_default_str();
  sub->add_option("--batch", o->batch, "windows per step")->capture_default_str();
  sub->add_option("--new-tokens", o->new_tokens, "greedy tokens generated per run")->capture_default_str();
  sub->add_option("--layers", o->config.layers, "model layers")->capture_default_str();
  sub->add_option("--width", o->config.width, "model width")->capture_default_str();
  sub->add_option("--heads", o->config.heads, "attention heads")->capture_default_str();
  sub->add_option("--ffn-hidden", o->config.ffn_hidden, "SwiGLU hidden width")->capture_default_str();
  sub->add_option("--context", o->config.context, "bytes of context")->capture_default_str();
  sub->add_option("--seed", o->seed, "seed of weights and data")->capture_default_str();
  sub->add_flag("--no-python", o->no_python, "skip the Python peer");
  sub->add_flag("--compile", o->compile, "also the peer under torch.compile (minutes to compile)");
  sub->callback([o, global] { run_gpt_bench(*o, *global); });
}

}  // namespace wick_bench
