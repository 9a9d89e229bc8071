// wick-gpt: a small DeepSeek-style byte-level language model trained on
// Debian's fortunes with wick's Trainer, then sampled with a KV cache.
//
//   wick-gpt train --steps 600 --run-dir runs/gpt        # a few minutes on 2 cores
//   wick-gpt train --moe --steps 600 --run-dir runs/gpt-moe
//   wick-gpt sample --run-dir runs/gpt --prompt "The " --temperature 0.8 --top-k 40
//   wick-gpt sample --run-dir runs/gpt --quantize         # int8 Linear layers
//   (wick::quantize_dynamic) wick-gpt serve --run-dir runs/gpt --clients 32        # continuous
//   batching vs static vs one at a time wick-gpt train --device cuda --cuda-graph --tf32       #
//   GPU: the whole step captured as a CUDA graph wick-gpt sample --run-dir runs/gpt --device cuda
//   # sample / serve on the GPU (KV caches there)
//
// Prints a summary a person can read and, with --json, one JSON line last.

#include <wick/cuda.h>
#include <wick/cuda_graph.h>
#include <wick/wick.h>

#include "config.h"
#include "corpus.h"
#include "model.h"
#include "serve.h"

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <sys/stat.h>
#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <thread>

namespace {

struct TrainArgs {
  gpt::GPTConfig config;
  int64_t batch_size = 32;
  int64_t accum = 1;
  int64_t steps = 600;
  double lr = 3e-3;
  double min_lr_ratio = 0.1;
  int64_t warmup = -1;  // -1: min(50, steps / 10)
  std::string precision = "bf16";
  int threads = 0;
  std::string corpus = "/usr/share/games/fortunes";
  std::string run_dir = "runs/gpt";
  std::string resume;
  int64_t checkpoint_every = 0;  // 0: at epoch ends and at the end only
  int64_t val_batches = 40;
  int64_t eval_every = 200;
  uint64_t seed = 1;
  std::string device = "cpu";
  bool ddp = false;
  std::string shard;  // "": replicas (DDP); zero1, zero2, full (each block a unit)
  bool tf32 = false;
  bool cuda_graph = false;
  bool async_checkpoint = false;
  bool progress = true;
  bool json = false;
};

struct SampleArgs {
  std::string run_dir = "runs/gpt";
  std::string checkpoint;  // default: the latest in <run_dir>/checkpoints
  std::string prompt = "The ";
  gpt::SampleOptions sample;
  int64_t samples = 3;
  bool quantize = false;
  int threads = 0;
  std::string device = "cpu";
  bool json = false;
};

// mkdir -p.
void make_directories(const std::string& path) {
  for (size_t i = 1; i <= path.size(); ++i) {
    if (i == path.size() || path[i] == '/') {
      const std::string prefix = path.substr(0, i);
      if (::mkdir(prefix.c_str(), 0755) != 0 && errno != EEXIST) {
        TORCH_CHECK(false, "cannot create ", prefix, ": ", std::strerror(errno));
      }
    }
  }
}

// Mean validation loss over the first `batches` batches of `source`, in nats per byte.
double validation_loss(gpt::LanguageModelTask& task, wick::TensorBatchSource& source,
                       int64_t batches) {
  task.module().eval();
  c10::InferenceMode guard;
  source.reset(0);
  double total = 0;
  int64_t n = 0;
  while (n < batches) {
    auto b = source.next();
    if (!b) break;
    total += task.validation_step(*b).at("loss").item<double>();
    ++n;
  }
  task.module().train();
  return n ? total / static_cast<double>(n) : NAN;
}

struct GraphRun {
  int64_t steps = 0;
  double seconds = 0;
  double tokens_per_s = 0;  // after the capture: steady replays only
};

// `--cuda-graph`: the training step through wick::CudaGraphStep in a direct
// loop instead of the Trainer. The Trainer's step is not capturable as it is
// (it reads the loss on the host to skip non-finite steps, clips with
// clip_grad_norm_, which synchronises, runs callbacks between forward and
// step), and a capture mode inside it would change code this example does not
// own; the loop here does what the Trainer does for this model otherwise:
// bf16 autocast (or fp32), clipping at 1.0 (on the device), the cosine
// schedule (through the graph's lr tensors), a log line every 20 steps, and
// one checkpoint at the end in <run-dir>/checkpoints for sample and serve.
GraphRun train_graph(const TrainArgs& a, gpt::GPT& model, wick::FusedAdam& optimizer,
                     wick::TensorBatchSource& source, const torch::Device& device,
                     wick::Precision precision) {
  const int64_t T = a.config.context, V = a.config.vocab;
  model->train();
  wick::CosineWarmupLR schedule(optimizer,
                                a.warmup >= 0 ? a.warmup : std::min<int64_t>(50, a.steps / 10),
                                a.steps, a.min_lr_ratio);
  const int64_t warmup_steps = 3;
  wick::CudaGraphStep graph(
      model->parameters(), optimizer,
      [&](const torch::Tensor& x, const torch::Tensor& y) {
        auto logits = model->forward(x);
        return torch::nn::functional::cross_entropy(logits.reshape({-1, V}).to(torch::kFloat),
                                                    y.reshape({-1}));
      },
      wick::CudaGraphStepOptions()
          .warmup_steps(warmup_steps)
          .precision(precision)
          .grad_clip_norm(1.0));
  int64_t epoch = 0;
  source.reset(epoch);
  GraphRun r;
  const auto t0 = std::chrono::steady_clock::now();
  auto steady = t0;
  for (int64_t step = 0; step < a.steps; ++step) {
    auto b = source.next();
    if (!b) {
      source.reset(++epoch);
      b = source.next();
      TORCH_CHECK(b, "--cuda-graph: the training set holds less than one batch");
    }
    auto windows = b->data.to(device, /*non_blocking=*/true);
    auto loss = graph.step(windows.narrow(1, 0, T), windows.narrow(1, 1, T));
    schedule.step();
    if (step == warmup_steps) {  // the capture step ran: time the replays from here
      torch::cuda::synchronize(device.index());
      steady = std::chrono::steady_clock::now();
    }
    if ((step + 1) % 20 == 0 || step + 1 == a.steps) {
      std::printf("step %lld  loss %.4f  lr %.3g%s\n", static_cast<long long>(step + 1),
                  loss.item<double>(), schedule.get_last_lr()[0],
                  graph.captured() ? "  (graph)" : "");
      std::fflush(stdout);
    }
  }
  torch::cuda::synchronize(device.index());
  const auto t1 = std::chrono::steady_clock::now();
  r.steps = graph.steps();
  r.seconds = std::chrono::duration<double>(t1 - t0).count();
  const int64_t replays = a.steps - warmup_steps - 1;
  const double steady_s = std::chrono::duration<double>(t1 - steady).count();
  r.tokens_per_s = replays > 0 && steady_s > 0
                       ? static_cast<double>(replays * a.batch_size * T) / steady_s
                       : static_cast<double>(a.steps * a.batch_size * T) / r.seconds;
  make_directories(a.run_dir + "/checkpoints");
  wick::Checkpoint checkpoint;
  checkpoint.put_module("model", *model);
  checkpoint.put_optimizer("optimizer", optimizer);
  checkpoint.set_train_state({a.steps, epoch, 0, a.steps * a.batch_size});
  checkpoint.set_meta("cuda_graph", "true");
  checkpoint.save(a.run_dir + "/checkpoints/" + wick::checkpoint_name(a.steps));
  return r;
}

int train(const TrainArgs& a) {
  if (a.threads > 0) torch::set_num_threads(a.threads);
  a.config.check();
  TORCH_CHECK(a.device == "cpu" || a.device == "cuda", "--device must be cpu or cuda, got ",
              a.device);
  const bool cuda = a.device == "cuda";
  TORCH_CHECK(!cuda || torch::cuda::is_available(), "--device cuda, but no CUDA device is visible");
  auto pg = a.ddp ? wick::init_process_group(wick::ProcessGroupOptions().device(
                        cuda ? std::optional<torch::Device>(torch::kCUDA) : std::nullopt))
                  : std::make_shared<wick::ProcessGroup>();
  const torch::Device device =
      cuda ? torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(pg->local_rank()))
           : torch::Device(torch::kCPU);
  const auto precision = wick::parse_precision(a.precision);
  if (a.cuda_graph) {
    TORCH_CHECK(cuda, "--cuda-graph needs --device cuda");
    TORCH_CHECK(!a.config.moe,
                "--cuda-graph: the MoE's routing has data-dependent shapes, which a CUDA graph "
                "cannot capture; drop --moe");
    TORCH_CHECK(
        !a.ddp,
        "--cuda-graph with --ddp is not supported (DDP's bucketed all-reduce is not captured)");
    TORCH_CHECK(a.accum == 1,
                "--cuda-graph captures one micro-batch per step: --accum must be 1, got ", a.accum);
    TORCH_CHECK(precision != wick::Precision::kFP16,
                "--cuda-graph: fp16's loss scaling cannot be captured; use bf16 or fp32");
    TORCH_CHECK(a.resume.empty(), "--cuda-graph does not resume (--resume)");
    TORCH_CHECK(a.shard.empty(), "--cuda-graph with --shard is not supported");
    TORCH_CHECK(!a.async_checkpoint,
                "--async-checkpoint is for the Trainer's checkpoints; --cuda-graph writes its one "
                "checkpoint at the end, synchronously");
  }
  if (a.tf32) wick::set_tf32(true);

  auto corpus = gpt::load_fortunes(a.corpus);
  const int64_t T = a.config.context;
  // Training windows start every T/2 bytes (each byte seen in two contexts);
  // validation windows do not overlap.
  auto train_windows = gpt::make_windows(corpus.train, T + 1, T / 2);
  auto val_windows = gpt::make_windows(corpus.val, T + 1, T);
  wick::TensorBatchSource train_source(train_windows, torch::zeros({train_windows.size(0)}),
                                       wick::TensorBatchSourceOptions(a.batch_size)
                                           .shuffle(true)
                                           .seed(a.seed)
                                           .drop_last(true)
                                           .rank(pg->rank())
                                           .world_size(pg->world_size()));
  wick::TensorBatchSource val_source(val_windows, torch::zeros({val_windows.size(0)}),
                                     wick::TensorBatchSourceOptions(a.batch_size).shuffle(false));

  torch::manual_seed(a.seed);
  gpt::GPT model(a.config);
  model->to(device);
  gpt::LanguageModelTask task(
      model.ptr(), [model](const torch::Tensor& x) mutable { return model->forward(x); },
      [model] { return model->aux_loss(); }, a.config.moe ? a.config.aux_loss_weight : 0.0);

  std::vector<torch::Tensor> decay, no_decay;  // no weight decay on norms
  for (const auto& p : model->named_parameters())
    (p.value().dim() >= 2 ? decay : no_decay).push_back(p.value());
  std::vector<torch::optim::OptimizerParamGroup> groups;
  // AdamW as in GPT-2/3 recipes: decay on matrices only.
  auto adamw = [&](double weight_decay) {
    return std::make_unique<wick::FusedAdamOptions>(wick::FusedAdamOptions(a.lr)
                                                        .betas(std::make_tuple(0.9, 0.95))
                                                        .weight_decay(weight_decay)
                                                        .decoupled_weight_decay(true)
                                                        .tensor_lr(a.cuda_graph));
  };
  groups.emplace_back(decay, adamw(0.1));
  groups.emplace_back(no_decay, adamw(0.0));
  wick::FusedAdam optimizer(groups, wick::FusedAdamOptions(a.lr));

  if (pg->is_main()) {
    make_directories(a.run_dir);
    std::ofstream cfg(a.run_dir + "/gpt_config.json");
    cfg << gpt::config_to_json(a.config);
    TORCH_CHECK(cfg.good(), "cannot write ", a.run_dir, "/gpt_config.json");
    std::printf(
        "wick-gpt: %lld parameters (%s), %lld layers x %lld wide, %lld heads, context %lld%s\n",
        static_cast<long long>(model->parameter_count()), a.config.moe ? "MoE" : "dense",
        static_cast<long long>(a.config.layers), static_cast<long long>(a.config.width),
        static_cast<long long>(a.config.heads), static_cast<long long>(T),
        a.config.moe ? c10::str(", ", a.config.experts, " routed + ", a.config.shared_experts,
                                " shared experts, top ", a.config.top_k)
                           .c_str()
                     : "");
    std::printf(
        "corpus: %lld files, %lld train / %lld val fortunes, %lld / %lld bytes; %s%s%s, batch %lld "
        "x %lld x %lld tokens, %d threads\n",
        static_cast<long long>(corpus.files), static_cast<long long>(corpus.train_fortunes),
        static_cast<long long>(corpus.val_fortunes), static_cast<long long>(corpus.train.numel()),
        static_cast<long long>(corpus.val.numel()), wick::to_string(precision).c_str(),
        a.tf32 ? ", TF32" : "", a.cuda_graph ? ", CUDA graph" : "",
        static_cast<long long>(a.batch_size), static_cast<long long>(a.accum),
        static_cast<long long>(T), torch::get_num_threads());
    std::fflush(stdout);
  }

  const double val_before = validation_loss(task, val_source, a.val_batches);
  int64_t steps_done = 0;
  double train_seconds = 0, tokens_per_s = 0;
  if (a.cuda_graph) {
    // A direct loop rather than the Trainer: see train_graph.
    const auto r = train_graph(a, model, optimizer, train_source, device, precision);
    steps_done = r.steps;
    train_seconds = r.seconds;
    tokens_per_s = r.tokens_per_s;
  } else {
    auto trainer_options =
        wick::TrainerOptions()
            .max_epochs(1000000)
            .max_steps(a.steps)
            .grad_accum_steps(a.accum)
            .precision(precision)
            .grad_clip_norm(1.0)
            .seed(a.seed)
            .log_every_n_steps(20)
            .checkpoint_dir(a.run_dir + "/checkpoints")
            .checkpoint_every_n_steps(a.checkpoint_every)
            .keep_last_k(2)
            .async_checkpoint(a.async_checkpoint)
            .resume(a.resume)
            .process_group(pg)
            // A routed expert that no token of this rank's
            // batch chose gets no gradient here.
            .ddp(wick::DistributedDataParallelOptions().find_unused_parameters(a.config.moe))
            .device(device);
    if (!a.shard.empty()) {
      // Full sharding: every transformer block is a unit (model.cpp runs it
      // through wick::unit_call); the embedding, final norm and head are the root.
      std::vector<std::shared_ptr<torch::nn::Module>> units;
      for (const auto& block : *model->blocks) units.push_back(block);
      const auto strategy = wick::parse_sharding_strategy(a.shard);
      if (strategy != wick::ShardingStrategy::kFull) units.clear();
      trainer_options.sharding(
          wick::ShardingOptions().strategy(strategy).units(units).find_unused_parameters(
              a.config.moe));
    }
    wick::Trainer trainer(trainer_options);
    trainer.add_callback(
        std::make_shared<wick::LRSchedulerCallback>(std::make_shared<wick::CosineWarmupLR>(
            optimizer, a.warmup >= 0 ? a.warmup : std::min<int64_t>(50, a.steps / 10), a.steps,
            a.min_lr_ratio)));
    auto throughput = std::make_shared<wick::ThroughputMonitor>();
    trainer.add_callback(throughput);
    trainer.add_callback(
        std::make_shared<wick::MetricLogger>(wick::MetricLoggerOptions(a.run_dir)));
    if (a.progress) trainer.add_callback(std::make_shared<wick::ProgressBar>());
    auto result = trainer.fit(task, optimizer, train_source);
    steps_done = result.state.step;
    train_seconds = result.seconds;
    tokens_per_s = throughput->samples_per_s() * static_cast<double>(T) * pg->world_size();
  }
  const double val_after = validation_loss(task, val_source, a.val_batches);
  if (!pg->is_main()) return 0;

  std::printf("\ntrained %lld steps in %.1f s, %.0f tokens/s\n", static_cast<long long>(steps_done),
              train_seconds, tokens_per_s);
  std::printf("validation loss %.3f -> %.3f nats/byte (%.2f -> %.2f bits/byte)\n", val_before,
              val_after, val_before / std::log(2.0), val_after / std::log(2.0));
  gpt::SampleOptions so;
  so.max_new_tokens = 160;
  so.temperature = 0.8;
  so.top_k = 40;
  so.seed = a.seed;
  std::vector<std::string> samples;
  for (const std::string prompt : {"The ", "A man ", "Q: "}) {
    ++so.seed;
    samples.push_back(prompt + gpt::generate(model, prompt, so));
    std::printf("\n--- sample ---\n%s\n", samples.back().c_str());
  }
  if (a.json) {
    nlohmann::json j;
    j["parameters"] = model->parameter_count();
    j["moe"] = a.config.moe;
    j["steps"] = steps_done;
    j["train_seconds"] = train_seconds;
    j["device"] = device.str();
    j["tf32"] = wick::tf32_enabled();
    j["cuda_graph"] = a.cuda_graph;
    j["async_checkpoint"] = a.async_checkpoint;
    j["tokens_per_s"] = tokens_per_s;
    j["val_loss_before"] = val_before;
    j["val_loss_after"] = val_after;
    j["val_bits_per_byte"] = val_after / std::log(2.0);
    j["precision"] = wick::to_string(precision);
    j["threads"] = torch::get_num_threads();
    j["samples"] = samples;
    std::cout << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << std::endl;
  }
  return 0;
}

// The model train wrote into `run_dir`: its config and a checkpoint (the latest by default).
// On `device` ("cpu" or "cuda"): the weights, and so the KV caches built from them.
gpt::GPT load_model(const std::string& run_dir, std::string& checkpoint,
                    const std::string& device) {
  TORCH_CHECK(device == "cpu" || device == "cuda", "--device must be cpu or cuda, got ", device);
  TORCH_CHECK(device == "cpu" || torch::cuda::is_available(),
              "--device cuda, but no CUDA device is visible");
  gpt::GPT model(gpt::read_config(run_dir + "/gpt_config.json"));
  if (checkpoint.empty()) {
    auto latest = wick::latest_checkpoint(run_dir + "/checkpoints");
    TORCH_CHECK(latest, "no checkpoint in ", run_dir, "/checkpoints");
    checkpoint = *latest;
  }
  const auto saved = wick::Checkpoint::load(checkpoint);
  if (saved.meta("sharding")) {
    wick::restore_module_from_sharded_checkpoint(saved, *model);  // train --shard
  } else {
    saved.restore_module("model", *model);
  }
  model->to(torch::Device(device));
  model->eval();
  return model;
}

int sample(const SampleArgs& a) {
  if (a.threads > 0) torch::set_num_threads(a.threads);
  std::string path = a.checkpoint;
  TORCH_CHECK(!a.quantize || a.device == "cpu",
              "--quantize runs on the CPU (int8 dynamic quantization): use --device cpu");
  gpt::GPT model = load_model(a.run_dir, path, a.device);
  std::string report;
  if (a.quantize) report = wick::quantize_dynamic(*model).format();
  if (!report.empty()) std::printf("%s", report.c_str());
  std::vector<std::string> out;
  for (int64_t i = 0; i < a.samples; ++i) {
    auto so = a.sample;
    so.seed = a.sample.seed + static_cast<uint64_t>(i);
    out.push_back(a.prompt + gpt::generate(model, a.prompt, so));
    std::printf("--- sample %lld ---\n%s\n", static_cast<long long>(i), out.back().c_str());
  }
  if (a.json)
    std::cout << nlohmann::json{{"checkpoint", path},
                                {"quantized", a.quantize},
                                {"device", a.device},
                                {"samples", out}}
                     .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)
              << "\n";
  return 0;
}

struct ServeArgs {
  std::string run_dir = "runs/gpt";
  std::string checkpoint;
  std::string corpus = "/usr/share/games/fortunes";
  int64_t clients = 32;
  int64_t requests = 128;
  int64_t max_new = 64;
  int64_t max_batch = 32;
  std::string mode = "all";
  int threads = 0;
  std::string device = "cpu";
  bool json = false;
};

double percentile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  return v.empty()
             ? 0.0
             : v[std::min(v.size() - 1, static_cast<size_t>(q * static_cast<double>(v.size())))];
}

// `clients` threads send the requests (prompts: the starts of validation
// fortunes; 16 to max_new new bytes each, sampled with a seed per request)
// and wait for each answer before sending the next.
int serve(const ServeArgs& a) {
  if (a.threads > 0) torch::set_num_threads(a.threads);
  TORCH_CHECK(a.clients >= 1 && a.requests >= 1 && a.max_new >= 16 && a.max_batch >= 1,
              "serve: --clients, --requests, --max-batch must be >= 1 and --max-new >= 16");
  std::string path = a.checkpoint;
  gpt::GPT model = load_model(a.run_dir, path, a.device);
  auto corpus = gpt::load_fortunes(a.corpus);
  std::vector<std::string> prompts;
  {
    std::string val;
    for (int64_t i = 0; i < corpus.val.numel(); ++i)
      val.push_back(static_cast<char>(corpus.val[i].item<int64_t>()));
    size_t at = 0;
    while (static_cast<int64_t>(prompts.size()) < a.requests) {
      const size_t n = 8 + prompts.size() % 24;
      if (at + n > val.size()) at = 0;
      prompts.push_back(val.substr(at, n));
      at = val.find("\n\n", at + n);
      at = at == std::string::npos ? 0 : at + 2;
    }
  }
  std::vector<gpt::SampleOptions> options(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    options[i].max_new_tokens =
        16 + static_cast<int64_t>((i * 37) % static_cast<size_t>(a.max_new - 15));
    options[i].temperature = 0.8;
    options[i].top_k = 40;
    options[i].seed = i;
  }
  std::vector<std::pair<std::string, gpt::ServeOptions>> modes;
  if (a.mode == "all" || a.mode == "continuous")
    modes.push_back({"continuous", {a.max_batch, gpt::BatchingMode::kContinuous}});
  if (a.mode == "all" || a.mode == "static")
    modes.push_back({"static", {a.max_batch, gpt::BatchingMode::kStatic}});
  if (a.mode == "all" || a.mode == "sequential")
    modes.push_back({"sequential", {1, gpt::BatchingMode::kContinuous}});
  TORCH_CHECK(!modes.empty(), "serve: --mode must be all, continuous, static or sequential, got ",
              a.mode);

  nlohmann::json results;
  std::vector<std::string> reference;
  std::printf(
      "wick-gpt serve: %lld requests from %lld clients, 16..%lld new bytes each, %d threads\n",
      static_cast<long long>(a.requests), static_cast<long long>(a.clients),
      static_cast<long long>(a.max_new), torch::get_num_threads());
  for (const auto& [name, serve_options] : modes) {
    gpt::ContinuousBatcher server(model, serve_options);
    std::vector<std::string> answers(prompts.size());
    std::vector<double> latency_ms(prompts.size());
    std::atomic<size_t> next{0};
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> clients;
    for (int64_t c = 0; c < a.clients; ++c) {
      clients.emplace_back([&] {
        for (size_t i = next++; i < prompts.size(); i = next++) {
          const auto s = std::chrono::steady_clock::now();
          answers[i] = server.submit(prompts[i], options[i]).get();
          latency_ms[i] =
              1e3 * std::chrono::duration<double>(std::chrono::steady_clock::now() - s).count();
        }
      });
    }
    for (auto& t : clients) t.join();
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const auto stats = server.stats();
    if (reference.empty()) reference = answers;
    int64_t differ =
        0;  // answers unlike the first mode's (a near-tie rounded apart by a batched product)
    for (size_t i = 0; i < answers.size(); ++i) differ += answers[i] != reference[i];
    std::printf(
        "%-10s %8.0f tokens/s  p50 %7.0f ms  p99 %7.0f ms  mean batch %5.1f  %lld steps  %lld "
        "answers differ\n",
        name.c_str(), static_cast<double>(stats.tokens) / seconds, percentile(latency_ms, 0.5),
        percentile(latency_ms, 0.99), stats.mean_batch, static_cast<long long>(stats.decode_steps),
        static_cast<long long>(differ));
    results[name] = {{"tokens_per_s", static_cast<double>(stats.tokens) / seconds},
                     {"seconds", seconds},
                     {"tokens", stats.tokens},
                     {"p50_ms", percentile(latency_ms, 0.5)},
                     {"p99_ms", percentile(latency_ms, 0.99)},
                     {"mean_batch", stats.mean_batch},
                     {"decode_steps", stats.decode_steps},
                     {"answers_differing", differ}};
  }
  std::printf("--- an answer ---\n%s%s\n", prompts[0].c_str(), reference[0].c_str());
  if (results.contains("continuous") && results.contains("sequential")) {
    std::printf("continuous batching: %.1fx one request at a time\n",
                results["continuous"]["tokens_per_s"].get<double>() /
                    results["sequential"]["tokens_per_s"].get<double>());
  }
  if (a.json) {
    results["checkpoint"] = path;
    results["clients"] = a.clients;
    results["requests"] = a.requests;
    results["threads"] = torch::get_num_threads();
    results["device"] = a.device;
    std::cout << results.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)
              << std::endl;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"wick-gpt: a small DeepSeek-style byte-level language model on Debian's fortunes"};
  app.require_subcommand(1);
  TrainArgs t;
  auto* tr = app.add_subcommand("train", "train on the fortunes corpus");
  tr->add_option("--layers", t.config.layers, "transformer blocks")->capture_default_str();
  tr->add_option("--width", t.config.width, "model width")->capture_default_str();
  tr->add_option("--heads", t.config.heads, "attention heads")->capture_default_str();
  tr->add_option("--context", t.config.context, "bytes of context")->capture_default_str();
  tr->add_option("--ffn-hidden", t.config.ffn_hidden, "SwiGLU hidden width")->capture_default_str();
  tr->add_flag("--moe", t.config.moe, "DeepSeekMoE feed-forward: shared + top-k routed experts");
  tr->add_option("--experts", t.config.experts, "routed experts (--moe)")->capture_default_str();
  tr->add_option("--shared-experts", t.config.shared_experts, "shared experts (--moe)")
      ->capture_default_str();
  tr->add_option("--top-k", t.config.top_k, "routed experts per token (--moe)")
      ->capture_default_str();
  tr->add_option("--expert-hidden", t.config.expert_hidden, "hidden width of an expert (--moe)")
      ->capture_default_str();
  tr->add_option("--batch-size", t.batch_size, "windows per micro-batch")->capture_default_str();
  tr->add_option("--accum", t.accum, "micro-batches per optimizer step")->capture_default_str();
  tr->add_option("--steps", t.steps, "optimizer steps")->capture_default_str();
  tr->add_option("--lr", t.lr, "peak learning rate (AdamW)")->capture_default_str();
  tr->add_option("--warmup", t.warmup,
                 "warm-up steps of the cosine schedule (-1: min(50, steps / 10))")
      ->capture_default_str();
  tr->add_option("--precision", t.precision, "fp32, bf16 or fp16")->capture_default_str();
  tr->add_option("--threads", t.threads, "intra-op threads (0: LibTorch's default)")
      ->capture_default_str();
  tr->add_option("--corpus", t.corpus, "folder of fortune files")->capture_default_str();
  tr->add_option("--run-dir", t.run_dir, "metrics, config and checkpoints")->capture_default_str();
  tr->add_option("--resume", t.resume, "\"latest\" or a checkpoint path");
  tr->add_option("--checkpoint-every", t.checkpoint_every,
                 "also checkpoint every N steps (0: at epoch ends and at the end)")
      ->capture_default_str();
  tr->add_flag("--async-checkpoint", t.async_checkpoint,
               "write checkpoints in the background: training blocks only for a host copy of "
               "the state (TrainerOptions::async_checkpoint)");
  tr->add_option("--val-batches", t.val_batches, "validation batches before and after")
      ->capture_default_str();
  tr->add_option("--seed", t.seed, "seed of weights, data order and samples")
      ->capture_default_str();
  tr->add_option("--device", t.device, "cpu or cuda")->capture_default_str();
  tr->add_flag("--ddp", t.ddp, "data-parallel under torchrun");
  tr->add_option("--shard", t.shard,
                 "shard the training state across the ranks: zero1, zero2 or full (each block a "
                 "unit; docs/sharding.md)")
      ->check(CLI::IsMember({"zero1", "zero2", "full"}));
  tr->add_flag("--tf32", t.tf32, "TF32 for float32 matrix products on CUDA (wick::set_tf32)");
  tr->add_flag(
      "--cuda-graph", t.cuda_graph,
      "capture the whole step (forward, backward, clip, AdamW) as a CUDA graph and replay it "
      "(--device cuda, bf16 or fp32, dense, no --accum/--ddp/--resume)");
  tr->add_flag("!--no-progress", t.progress, "no progress bar");
  tr->add_flag("--json", t.json, "print a final JSON line");

  SampleArgs s;
  auto* sa = app.add_subcommand("sample", "generate from a trained model (KV cache)");
  sa->add_option("--run-dir", s.run_dir, "where train wrote gpt_config.json and checkpoints/")
      ->capture_default_str();
  sa->add_option("--checkpoint", s.checkpoint, "a checkpoint (default: the latest)");
  sa->add_option("--prompt", s.prompt, "text to continue")->capture_default_str();
  sa->add_option("--max-new", s.sample.max_new_tokens, "bytes to generate")->capture_default_str();
  sa->add_option("--temperature", s.sample.temperature, "0: greedy")->capture_default_str();
  sa->add_option("--top-k", s.sample.top_k, "0: off")->capture_default_str();
  sa->add_option("--top-p", s.sample.top_p, "1: off")->capture_default_str();
  sa->add_option("--seed", s.sample.seed, "seed of the first sample")->capture_default_str();
  sa->add_option("--samples", s.samples, "how many")->capture_default_str();
  sa->add_flag("--quantize", s.quantize, "int8 Linear layers (wick::quantize_dynamic)");
  sa->add_option("--device", s.device, "cpu or cuda")->capture_default_str();
  sa->add_option("--threads", s.threads, "intra-op threads (0: LibTorch's default)")
      ->capture_default_str();
  sa->add_flag("--json", s.json, "print a final JSON line");

  ServeArgs v;
  auto* sv = app.add_subcommand(
      "serve",
      "concurrent clients through continuous batching, vs static batches and one at a time");
  sv->add_option("--run-dir", v.run_dir, "where train wrote gpt_config.json and checkpoints/")
      ->capture_default_str();
  sv->add_option("--checkpoint", v.checkpoint, "a checkpoint (default: the latest)");
  sv->add_option("--corpus", v.corpus,
                 "folder of fortune files (prompts: starts of validation fortunes)")
      ->capture_default_str();
  sv->add_option("--clients", v.clients, "concurrent clients")->capture_default_str();
  sv->add_option("--requests", v.requests, "requests in all")->capture_default_str();
  sv->add_option("--max-new", v.max_new, "new bytes per request: 16 to this")
      ->capture_default_str();
  sv->add_option("--max-batch", v.max_batch, "sequences decoded together")->capture_default_str();
  sv->add_option("--mode", v.mode, "all, continuous, static or sequential")->capture_default_str();
  sv->add_option("--device", v.device, "cpu or cuda")->capture_default_str();
  sv->add_option("--threads", v.threads, "intra-op threads (0: LibTorch's default)")
      ->capture_default_str();
  sv->add_flag("--json", v.json, "print a final JSON line");

  CLI11_PARSE(app, argc, argv);
  try {
    if (tr->parsed()) return train(t);
    if (sv->parsed()) return serve(v);
    return sample(s);
  } catch (const c10::Error& e) {
    std::cerr << "wick-gpt: " << e.what_without_backtrace() << "\n";
  } catch (const std::exception& e) {
    std::cerr << "wick-gpt: " << e.what() << "\n";
  }
  return 1;
}
