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
//
// --device cuda: the GPU training step on a GPT-2-small shape (12 layers, 768
// wide, 12 heads, context 1024, SwiGLU hidden 2048 so that the feed-forward
// has GPT-2's 4.7 M parameters per block; vocabulary: the 256 bytes, not
// GPT-2's 50 257 tokens), batch 16. In one run: the bf16 matmul ceiling
// (8192^3 products, best of several), wick eager bf16 (autocast, SDPA's flash
// kernels, FusedAdam's fused AdamW, wick::clip_grad_norm_tensor), wick bf16
// with the step captured as a CUDA graph (wick::CudaGraphStep), wick eager
// fp32 with TF32 off, and the Python peer eager bf16, eager fp32 and
// torch.compile bf16 (under --peer-time-limit). Figures: tokens/s and MFU =
// flops per token x tokens/s / ceiling, with flops per token 6N (N: the
// parameters without the token embedding, a lookup) and 6N + 12 L H Q T (the
// attention's score and value products, PaLM's count, causal masking not
// discounted).

#include "bench_common.h"

#include <wick/amp.h>
#include <wick/cuda.h>
#include <wick/cuda_graph.h>
#include <wick/optim.h>

#include "model.h"

#include <torch/torch.h>
#include <CLI/CLI.hpp>

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
  std::string device = "cpu";
  double peer_time_limit = 100;
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
    return std::make_unique<wick::FusedAdamOptions>(wick::FusedAdamOptions(3e-3)
                                                        .betas(std::make_tuple(0.9, 0.95))
                                                        .weight_decay(wd)
                                                        .decoupled_weight_decay(true));
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
  for (int64_t i = 0; i < 16; ++i)
    prompt.push_back(static_cast<char>(data[0][0][i].item<int64_t>()));
  gpt::SampleOptions so;
  so.temperature = 0;
  so.max_new_tokens = o.new_tokens;
  gpt::generate(model, prompt, so);  // warm-up
  const auto t0 = std::chrono::steady_clock::now();
  const auto out = gpt::generate(model, prompt, so);
  return 1e3 * seconds_since(t0) / static_cast<double>(out.size());
}

// The model's shape as gpt_peer.py's flags, so the peer builds the same model.
void append_model_args(std::vector<std::string>& args, const gpt::GPTConfig& c) {
  for (const auto& [flag, value] : {std::pair<const char*, int64_t>{"--layers", c.layers},
                                    {"--width", c.width},
                                    {"--heads", c.heads},
                                    {"--ffn-hidden", c.ffn_hidden},
                                    {"--context", c.context}}) {
    args.emplace_back(flag);
    args.push_back(std::to_string(value));
  }
}

// The peer's lines by case name ("python_train", "python_generate", ...).
std::map<std::string, Json> run_gpt_peer(const GlobalOptions& global, const GptBenchOptions& o,
                                         bool compile, const std::string& cases, std::string& error,
                                         bool fp32_attention = false) {
  std::vector<std::string> args{
      "--threads", std::to_string(o.threads), "--steps",      std::to_string(o.steps),
      "--warmup",  std::to_string(o.warmup),  "--repeats",    std::to_string(o.repeats),
      "--batch",   std::to_string(o.batch),   "--new-tokens", std::to_string(o.new_tokens),
      "--seed",    std::to_string(o.seed),    "--cases",      cases};
  append_model_args(args, o.config);
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

// ---------------------------------------------------------------- CUDA

constexpr double kMfuGoal = 0.45;          // of the measured bf16 matmul ceiling
constexpr double kCudaEagerGoal = 1.2;     // wick eager tokens/s over Python eager
constexpr double kGraphCompileGoal = 1.0;  // wick + CUDA graph over torch.compile
constexpr double kBf16Fp32Goal = 3.0;      // bf16 tokens/s over fp32 (TF32 off)

// Best bf16 matmul rate (FLOP/s) of n x n x n products on the GPU.
double matmul_ceiling(int64_t n, int reps) {
  const auto opts = torch::TensorOptions(torch::kBFloat16).device(torch::kCUDA);
  auto a = torch::randn({n, n}, opts), b = torch::randn({n, n}, opts);
  auto c = torch::empty({n, n}, opts);
  for (int i = 0; i < 3; ++i) torch::mm_out(c, a, b);
  torch::cuda::synchronize();
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < 5; ++i) torch::mm_out(c, a, b);
    torch::cuda::synchronize();
    best = std::min(best, seconds_since(t0) / 5);
  }
  return 2.0 * static_cast<double>(n) * n * n / best;
}

struct CudaRun {
  double ms_per_step = 0;
  double first_loss = 0;
  double last_loss = 0;
  double first_steps_s = 0;  // warm-up (and capture) steps
};

enum class CudaMode { kEager, kGraph };

CudaRun run_train_cuda(const GptBenchOptions& o, const torch::Tensor& data,
                       wick::Precision precision, CudaMode mode) {
  const torch::Device cuda(torch::kCUDA);
  torch::manual_seed(o.seed);
  gpt::GPT model(o.config);  // built on the CPU in the peer's order, then moved: the same weights
  model->to(cuda);
  std::vector<torch::Tensor> decay, no_decay;
  for (const auto& p : model->parameters()) (p.dim() >= 2 ? decay : no_decay).push_back(p);
  const bool graph = mode == CudaMode::kGraph;
  auto adamw = [graph](double wd) {
    return std::make_unique<wick::FusedAdamOptions>(wick::FusedAdamOptions(3e-4)
                                                        .betas(std::make_tuple(0.9, 0.95))
                                                        .weight_decay(wd)
                                                        .decoupled_weight_decay(true)
                                                        .tensor_lr(graph));
  };
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(decay, adamw(0.1));
  groups.emplace_back(no_decay, adamw(0.0));
  wick::FusedAdam optimizer(groups, wick::FusedAdamOptions(3e-4));
  const int64_t T = o.config.context;
  const auto params = model->parameters();
  auto loss_fn = [&](const torch::Tensor& x, const torch::Tensor& y) {
    auto logits = model->forward(x);
    return torch::nn::functional::cross_entropy(logits.reshape({-1, 256}).to(torch::kFloat),
                                                y.reshape({-1}));
  };
  std::unique_ptr<wick::CudaGraphStep> captured;
  if (graph) {
    captured =
        std::make_unique<wick::CudaGraphStep>(params, optimizer, loss_fn,
                                              wick::CudaGraphStepOptions()
                                                  .warmup_steps(std::max<int64_t>(1, o.warmup - 1))
                                                  .precision(precision)
                                                  .grad_clip_norm(1.0));
  }
  auto step = [&](int64_t i) {
    auto batch = data[i];
    auto x = batch.narrow(1, 0, T), y = batch.narrow(1, 1, T);
    if (graph) return captured->step(x, y);
    torch::Tensor loss;
    {
      wick::AutocastGuard autocast(cuda, precision);
      loss = loss_fn(x, y);
    }
    optimizer.zero_grad(/*set_to_none=*/true);
    loss.backward();
    wick::clip_grad_norm_tensor(params, 1.0);
    optimizer.step();
    return loss.detach();
  };
  CudaRun r;
  const auto w0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < o.warmup; ++i) {
    auto loss = step(i);
    if (i == 0) r.first_loss = loss.item<double>();
  }
  torch::cuda::synchronize();
  r.first_steps_s = seconds_since(w0);
  const auto t0 = std::chrono::steady_clock::now();
  torch::Tensor loss;
  for (int64_t i = 0; i < o.steps; ++i) loss = step(o.warmup + i);
  torch::cuda::synchronize();
  r.ms_per_step = 1e3 * seconds_since(t0) / static_cast<double>(o.steps);
  r.last_loss = loss.item<double>();
  return r;
}

void run_gpt_cuda_bench(const GptBenchOptions& o, const GlobalOptions& global) {
  TORCH_CHECK(torch::cuda::is_available(),
              "wick-bench gpt --device cuda: no CUDA device is visible");
  TORCH_CHECK(o.steps >= 1 && o.warmup >= 2,
              "wick-bench gpt --device cuda: --steps must be >= 1 and --warmup >= 2");
  o.config.check();
  JsonOut out(global.jsonl);
  const double load_start = load_average_1m();
  const auto t_start = std::chrono::steady_clock::now();
  const double ceiling = matmul_ceiling(8192, 5);
  out.emit(
      {{"bench", "gpt"}, {"case", "bf16_matmul_ceiling"}, {"n", 8192}, {"tflops", ceiling / 1e12}});

  const auto& c = o.config;
  gpt::GPT probe(c);
  const double n_all = static_cast<double>(probe->parameter_count());
  const double n_embed = static_cast<double>(probe->embed->weight.numel());
  const double n = n_all - n_embed;
  const double attention = 12.0 * c.layers * c.heads * (c.width / c.heads) * c.context;
  const double tokens = static_cast<double>(o.batch * c.context);

  auto gen = at::make_generator<at::CPUGeneratorImpl>(o.seed + 1);
  const auto data =
      torch::randint(0, 256, {o.steps + o.warmup, o.batch, c.context + 1}, gen, torch::kLong)
          .to(torch::kCUDA);

  Json s;
  s["bench"] = "gpt";
  s["summary"] = true;
  s["device"] = "cuda";
  auto emit_case = [&](const std::string& name, double ms, const Json& extra) {
    Json line{{"bench", "gpt"}, {"case", name}, {"ms_per_step", ms}};
    const double tps = tokens / (ms / 1e3);
    line["tokens_per_s"] = tps;
    line["mfu"] = 6.0 * n * tps / ceiling;
    line["mfu_with_attention"] = (6.0 * n + attention) * tps / ceiling;
    for (auto it = extra.begin(); it != extra.end(); ++it) line[it.key()] = it.value();
    out.emit(line);
    s[name + "_tokens_per_s"] = tps;
    s[name + "_mfu"] = line["mfu"];
    return tps;
  };
  auto wick_case = [&](const std::string& name, wick::Precision precision, CudaMode mode) {
    wick::TF32Guard no_tf32(false);  // fp32 means fp32; bf16 products are unaffected
    const auto r = run_train_cuda(o, data, precision, mode);
    return emit_case(name, r.ms_per_step,
                     {{"check_loss", r.first_loss},
                      {"last_loss", r.last_loss},
                      {"first_steps_s", r.first_steps_s},
                      {"precision", wick::to_string(precision)},
                      {"cuda_graph", mode == CudaMode::kGraph}});
  };
  const double wick_eager = wick_case("wick_train_cuda", wick::Precision::kBF16, CudaMode::kEager);
  const double wick_graph =
      wick_case("wick_train_cuda_graph", wick::Precision::kBF16, CudaMode::kGraph);
  const double wick_fp32 =
      wick_case("wick_train_cuda_fp32", wick::Precision::kFP32, CudaMode::kEager);
  s["tokens_per_s"] = std::max(wick_eager, wick_graph);
  s["mfu"] = 6.0 * n * std::max(wick_eager, wick_graph) / ceiling;
  s["mfu_goal_met"] = s["mfu"].get<double>() >= kMfuGoal;
  s["bf16_vs_fp32"] = wick_eager / wick_fp32;
  s["bf16_fp32_goal_met"] = wick_eager / wick_fp32 >= kBf16Fp32Goal;
  s["graph_vs_eager"] = wick_graph / wick_eager;

  if (!o.no_python) {
    auto peer = [&](bool compile, const std::string& precision) {
      std::vector<std::string> args{"--device",     "cuda",
                                    "--cases",      "train",
                                    "--steps",      std::to_string(o.steps),
                                    "--warmup",     std::to_string(o.warmup),
                                    "--repeats",    "1",
                                    "--batch",      std::to_string(o.batch),
                                    "--seed",       std::to_string(o.seed),
                                    "--lr",         "3e-4",
                                    "--precision",  precision,
                                    "--time-limit", c10::str(o.peer_time_limit)};
      append_model_args(args, c);
      if (compile) args.push_back("--compile");
      auto r = run_peer(global, "gpt_peer.py", args);
      for (auto line : r.lines) {
        line["bench"] = "gpt";
        if (line.contains("ms_per_step")) {
          const double ms = line.at("ms_per_step").get<double>();
          line.erase("tokens_per_s");
          const std::string name = line.value("case", "python");
          Json extra;
          for (auto it = line.begin(); it != line.end(); ++it) {
            if (it.key() != "case" && it.key() != "ms_per_step" && it.key() != "bench")
              extra[it.key()] = it.value();
          }
          return emit_case(name, ms, extra);
        }
        out.emit(line);
        if (line.contains("error")) s[line.value("case", "python") + "_error"] = line.at("error");
      }
      if (!r.ok())
        s[std::string("python") + (compile ? "_compile" : "") + "_" + precision + "_error"] =
            r.error;
      return 0.0;
    };
    const double py_eager = peer(false, "bf16");
    if (py_eager > 0) {
      s["wick_vs_python_eager"] = wick_eager / py_eager;
      s["eager_goal_met"] = wick_eager / py_eager >= kCudaEagerGoal;
    }
    const double py_fp32 = peer(false, "fp32");
    if (py_fp32 > 0) s["python_bf16_vs_fp32"] = py_eager / py_fp32;
    if (o.compile) {
      const double py_compile = peer(true, "bf16");
      if (py_compile > 0) {
        s["wick_graph_vs_python_compile"] = wick_graph / py_compile;
        s["compile_goal_met"] = wick_graph / py_compile >= kGraphCompileGoal;
      }
    }
  }
  s["parameters"] = n_all;
  s["parameters_without_embedding"] = n;
  s["flops_per_token_6n"] = 6.0 * n;
  s["flops_per_token_with_attention"] = 6.0 * n + attention;
  s["bf16_matmul_ceiling_tflops"] = ceiling / 1e12;
  s["vocab"] = "bytes (256)";
  s["batch"] = o.batch;
  s["context"] = c.context;
  s["layers"] = c.layers;
  s["width"] = c.width;
  s["heads"] = c.heads;
  s["ffn_hidden"] = c.ffn_hidden;
  s["steps"] = o.steps;
  s["warmup"] = o.warmup;
  s["seconds"] = seconds_since(t_start);
  add_run_environment(s, load_start);
  out.emit(s);
}

void run_gpt_bench(const GptBenchOptions& o, const GlobalOptions& global) {
  if (o.device == "cuda") return run_gpt_cuda_bench(o, global);
  TORCH_CHECK(o.device == "cpu", "wick-bench gpt: --device must be cpu or cuda, got ", o.device);
  TORCH_CHECK(o.steps >= 1 && o.repeats >= 1 && o.warmup >= 1,
              "wick-bench gpt: --steps, --repeats and --warmup must be >= 1");
  o.config.check();
  const int threads = set_torch_threads(o.threads);
  JsonOut out(global.jsonl);
  const double load_start = load_average_1m();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(o.seed + 1);
  const auto data = torch::randint(0, 256, {o.steps + o.warmup, o.batch, o.config.context + 1}, gen,
                                   torch::kLong);

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
  out.emit({{"bench", "gpt"},
            {"case", "wick_train"},
            {"ms_per_step", wick_train},
            {"runs_ms", train_ms},
            {"tokens_per_s", tokens / (wick_train / 1e3)},
            {"check_loss", check_loss},
            {"threads", threads}});
  out.emit({{"bench", "gpt"},
            {"case", "wick_generate"},
            {"ms_per_token", wick_gen},
            {"runs_ms", gen_ms},
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
  CLI::App* sub = app.add_subcommand(
      "gpt", "wick-gpt's training step and generation vs the same model in PyTorch");
  sub->add_option("--threads", o->threads, "intra-op threads here and in the peer")
      ->capture_default_str();
  sub->add_option("--steps", o->steps, "timed training steps per run")->capture_default_str();
  sub->add_option("--warmup", o->warmup, "untimed steps first")->capture_default_str();
  sub->add_option("--repeats", o->repeats, "runs; figures are medians")->capture_default_str();
  sub->add_option("--batch", o->batch, "windows per step")->capture_default_str();
  sub->add_option("--new-tokens", o->new_tokens, "greedy tokens generated per run")
      ->capture_default_str();
  sub->add_option("--layers", o->config.layers, "model layers")->capture_default_str();
  sub->add_option("--width", o->config.width, "model width")->capture_default_str();
  sub->add_option("--heads", o->config.heads, "attention heads")->capture_default_str();
  sub->add_option("--ffn-hidden", o->config.ffn_hidden, "SwiGLU hidden width")
      ->capture_default_str();
  sub->add_option("--context", o->config.context, "bytes of context")->capture_default_str();
  sub->add_option("--seed", o->seed, "seed of weights and data")->capture_default_str();
  sub->add_flag("--no-python", o->no_python, "skip the Python peer");
  sub->add_flag("--compile", o->compile, "also the peer under torch.compile (minutes to compile)");
  sub->add_option("--device", o->device,
                  "cpu, or cuda: the GPT-2-small preset unless sizes are given (bf16 eager, CUDA "
                  "graph, fp32; "
                  "the peer eager, fp32 and with --compile)")
      ->capture_default_str();
  sub->add_option("--peer-time-limit", o->peer_time_limit,
                  "seconds per peer run on cuda (compilation included)")
      ->capture_default_str();
  sub->callback([o, global, sub] {
    if (o->device == "cuda") {
      // The GPT-2-small preset, for what the command line left alone.
      auto given = [sub](const char* name) { return sub->get_option(name)->count() > 0; };
      if (!given("--layers")) o->config.layers = 12;
      if (!given("--width")) o->config.width = 768;
      if (!given("--heads")) o->config.heads = 12;
      if (!given("--context")) o->config.context = 1024;
      if (!given("--ffn-hidden")) o->config.ffn_hidden = 2048;
      if (!given("--batch")) o->batch = 16;
      if (!given("--steps")) o->steps = 10;
      if (!given("--warmup")) o->warmup = 3;
    }
    run_gpt_bench(*o, *global);
  });
}

}  // namespace wick_bench
